"""Compatibility with the seed notebook that this project started from.

The seed wrote one LSTM layer as 12 tensors in its "School version" order
`[W_xc, W_hc, b_c, W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o]`, with `W_x*` of shape
(input_size, hidden_size) and `W_h*` of shape (hidden_size, hidden_size) applied as `x @ W`
(the transpose of torch.nn.LSTM's layout), and one bias per gate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lstm_deploy.model import LSTM

SEED_ORDER = (
    "W_xc",
    "W_hc",
    "b_c",
    "W_xi",
    "W_hi",
    "b_i",
    "W_xf",
    "W_hf",
    "b_f",
    "W_xo",
    "W_ho",
    "b_o",
)


def from_seed_tensors(tensors: Sequence[object], batch_first: bool = True) -> LSTM:
    """A one-layer LSTM holding the seed's 12 tensors (numpy arrays or tensors, SEED_ORDER).

    The seed's single bias per gate goes to `bias_ih_l0`; `bias_hh_l0` is zero.
    """
    if len(tensors) != len(SEED_ORDER):
        raise ValueError(
            f"expected the seed's {len(SEED_ORDER)} tensors {SEED_ORDER}, got {len(tensors)}"
        )
    t = {name: torch.as_tensor(v) for name, v in zip(SEED_ORDER, tensors)}
    input_size, hidden_size = t["W_xi"].shape
    for name, value in t.items():
        kind = name[:3]
        shape = {"W_x": (input_size, hidden_size), "W_h": (hidden_size, hidden_size)}.get(
            kind, (hidden_size,)
        )
        if tuple(value.shape) != shape:
            raise ValueError(
                f"seed tensor {name}: expected shape {list(shape)}, got {list(value.shape)}"
            )
    dtype = t["W_xi"].dtype if t["W_xi"].is_floating_point() else torch.float32
    model = LSTM(int(input_size), int(hidden_size), batch_first=batch_first, dtype=dtype)
    gates = ("i", "f", "c", "o")  # the seed's c~ is torch.nn.LSTM's g
    state = {
        "weight_ih_l0": torch.cat([t[f"W_x{g}"].t() for g in gates]),  # (4H, I)
        "weight_hh_l0": torch.cat([t[f"W_h{g}"].t() for g in gates]),  # (4H, H)
        "bias_ih_l0": torch.cat([t[f"b_{g}"] for g in gates]),
        "bias_hh_l0": torch.zeros(4 * hidden_size, dtype=dtype),
    }
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model


def seed_init_(model: LSTM, generator: torch.Generator | None = None) -> LSTM:
    """The seed's init, in place: weights ~ randn * 0.1, biases zero. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    return model


def last_valid_output(output: Tensor, lengths: Tensor, batch_first: bool = True) -> Tensor:
    """The output at each sequence's last valid step (index length - 1): (B, D * H_out).

    The seed indexed `src_len`, one past the last valid step; this takes `lengths - 1`.
    """
    if not batch_first:
        output = output.transpose(0, 1)  # (B, T, F)
    if lengths.dim() != 1 or lengths.size(0) != output.size(0):
        raise ValueError(f"expected lengths of shape [{output.size(0)}], got {list(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > output.size(1)).any()):
        raise ValueError(f"every length must be in [1, {output.size(1)}]")
    index = (lengths.to(output.device) - 1).view(-1, 1, 1).expand(-1, 1, output.size(2))
    return output.gather(1, index).squeeze(1)
