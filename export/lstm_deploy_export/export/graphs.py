"""The deployed forms of a scratch LSTM, all with the signature `lstm_deploy.bundle.lstm_signature`.

- `DeployLSTM`: the scratch module behind the batch-first signature; scripted into `model.pt`.
- `NativeOnnxLSTM`: one ONNX `LSTM` op per layer (both directions in one op), emitted with
  `torch.onnx.ops.symbolic_multi_out`; exported into `model.onnx`.
- `ScanOnnxLSTM`: the module's own cell (`lstm_cell`) inside `torch._higher_order_ops.scan`, which
  the dynamo exporter turns into an ONNX `Scan`; exported into `model.scan.onnx`.

Each takes its weights from the module once, at construction: the graphs hold them as constants.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan

from lstm_deploy.model import LSTM, lstm_cell

# torch.nn.LSTM stacks the gate blocks i, f, g, o; the ONNX LSTM op wants i, o, f, c (c = g).
_TORCH_TO_ONNX_GATES = (0, 3, 1, 2)


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says what to do instead."""


def _batch_first_copy(model: LSTM) -> LSTM:
    """An eval-mode, batch-first copy of the model with the same weights (no dropout)."""
    config = dataclasses.replace(model.config, batch_first=True, dropout=0.0)
    p = next(model.parameters())
    copy = LSTM.from_config(config, device=p.device, dtype=p.dtype)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


class DeployLSTM(nn.Module):
    """The scratch module behind the deployed signature: batch-first input, state and outputs."""

    def __init__(self, model: LSTM) -> None:
        super().__init__()
        # An inference artifact: without parameters that require grad, the scripted module takes
        # the no-grad fast path even where grad mode is on (LibTorch's default).
        self.lstm = _batch_first_copy(model).requires_grad_(False)

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())  # (L*D, B, H)
        output, (hn, cn) = self.lstm(input, hx, lengths)
        return output, hn.transpose(0, 1), cn.transpose(0, 1)


def _onnx_gates(w: Tensor, hidden_size: int) -> Tensor:
    blocks = w.detach().split(hidden_size, 0)
    return torch.cat([blocks[k] for k in _TORCH_TO_ONNX_GATES], 0)


# The pad flag's weight in each gate (ONNX order i, o, f, c): at a padded step the input gate
# saturates to 0 and the forget gate to 1, so c_t = 1 * c_{t-1} + 0 * g_t = c_{t-1} exactly. 1e4
# saturates sigmoid whatever the rest of the pre-activation is, in any float32 implementation.
_FREEZE = 1e4


def _freeze_column(hidden_size: int, like: Tensor) -> Tensor:
    blocks = (-_FREEZE, 0.0, _FREEZE, 0.0)  # i, o, f, c
    return torch.cat([like.new_full((hidden_size, 1), v) for v in blocks])  # (4H, 1)


# Time steps are picked as whole rows of a (T * B, F) view, with Gather: ONNX Runtime runs it much
# faster than GatherElements with a (T, B, F) index, and onnx's reference evaluator takes any T
# (its GatherElements, np.choose, takes at most 64 along an axis).


def _lengths_rows(lengths: Tensor, steps: int, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """valid (T, B): t < length; the rows that reverse each sequence within its length (T * B,),
    its own inverse; the rows of each sequence's last valid step (B,)."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    b = torch.arange(batch, device=lengths.device)
    valid = t < lengths.unsqueeze(0)
    order = torch.where(valid, lengths.unsqueeze(0) - 1 - t, t)  # (T, B)
    return valid, (order * batch + b).reshape(-1), (lengths - 1) * batch + b


def _rows(x: Tensor, rows: Tensor) -> Tensor:
    """(T, B, F) x with its (T * B) rows taken in the order `rows`."""
    return x.reshape(-1, x.shape[2]).index_select(0, rows).reshape(x.shape)


def _at(x: Tensor, rows: Tensor) -> Tensor:
    """(B, F): the rows `rows` of (T, B, F) x, one per sequence."""
    return x.reshape(-1, x.shape[2]).index_select(0, rows)


class NativeOnnxLSTM(nn.Module):
    """One ONNX `LSTM` op per layer and direction, weights reordered once into the op's layout.

    Exact at variable lengths on every conforming runtime, whether it honours the op's
    `sequence_lens` (ONNX Runtime, which is faster with it: it is wired) or ignores it (OpenVINO,
    onnx's reference evaluator). The graph does what the scratch module does, and relies on the op
    only for steps 0..length-1 of each sequence, whose padding comes after them:
    - the reverse direction is a forward op over each sequence reversed within its length (a
      Gather before and after), so its padding comes last too;
    - the input carries one more feature, 1 at padded steps, whose weights saturate the input and
      forget gates: c is frozen over the padding, so the op's final c is c at step length - 1;
    - h_n is gathered from the op's per-step h at step length - 1, and padded outputs are zeroed.
    Padded input must be finite (the server refuses NaN and Inf): it is zeroed by a product.

    The op runs time-major (layout=0: ONNX Runtime rejects layout=1), so the graph transposes the
    batch-first input, state and outputs around it.
    """

    def __init__(self, model: LSTM) -> None:
        super().__init__()
        if model.proj_size > 0:
            raise ExportError(
                f"model.onnx cannot express proj_size={model.proj_size}: the ONNX LSTM op has no "
                "projection. Export model.scan.onnx instead (--artifacts torchscript,scan)."
            )
        self.hidden_size = model.hidden_size
        self.num_layers = model.num_layers
        self.num_directions = 2 if model.bidirectional else 1
        h = self.hidden_size
        for k in range(self.num_layers * self.num_directions):
            w = _onnx_gates(model._w_ih[k], h)  # (4H, I)
            w = torch.cat([w, _freeze_column(h, w)], 1)  # (4H, I + 1): the pad flag's column
            r = _onnx_gates(model._w_hh[k], h)  # (4H, H)
            if model.bias:  # ONNX's B is [Wb, Rb]: (8H,)
                b = torch.cat([_onnx_gates(model._b_ih[k], h), _onnx_gates(model._b_hh[k], h)])
            else:
                b = w.new_zeros(8 * h)
            self.register_buffer(f"w_{k}", w.unsqueeze(0))  # (1, 4H, I + 1)
            self.register_buffer(f"r_{k}", r.unsqueeze(0))
            self.register_buffer(f"b_{k}", b.unsqueeze(0))

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        d, h = self.num_directions, self.hidden_size
        x = input.transpose(0, 1)  # (T, B, I)
        steps, batch = x.shape[0], x.shape[1]
        valid, rows, last = _lengths_rows(lengths, steps, batch)
        # Masks as a float product, not Where: ONNX Runtime's broadcasting Where is ~3x slower.
        keep = valid.unsqueeze(2).to(x.dtype)  # (T, B, 1): 1 at valid steps
        pad = 1.0 - keep  # the extra input feature
        sequence_lens = lengths.to(torch.int32)  # the op's type for sequence_lens
        # Padding may hold anything finite: zeroed, it cannot outweigh the pad flag's saturation.
        # Later layers' padded inputs are earlier layers' outputs there: bounded (|h| < 1).
        outputs = [x * keep]
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            # One Concat makes the layer's input: the last layer's directions and the pad flag.
            x = torch.cat([*outputs, pad], 2)  # (T, B, I_l + 1); reversal keeps the padding put
            outputs = []
            for direction in range(d):
                k = layer * d + direction
                xk = x if direction == 0 else _rows(x, rows)
                y, _, y_c = torch.onnx.ops.symbolic_multi_out(
                    "LSTM",
                    [
                        xk,
                        getattr(self, f"w_{k}"),
                        getattr(self, f"r_{k}"),
                        getattr(self, f"b_{k}"),
                        sequence_lens,
                        h0[:, k : k + 1].transpose(0, 1),  # (1, B, H)
                        c0[:, k : k + 1].transpose(0, 1),
                    ],
                    {"hidden_size": h, "direction": "forward", "layout": 0},
                    dtypes=[x.dtype] * 3,
                    shapes=[[steps, 1, batch, h], [1, batch, h], [1, batch, h]],
                )  # y: (T, 1, B, H); y_c: (1, B, H), c at step length - 1 (frozen after it)
                y = y.squeeze(1)  # (T, B, H)
                h_n.append(_at(y, last))  # h at step length - 1
                c_n.append(y_c.squeeze(0))
                if direction == 1:
                    y = _rows(y, rows)  # back to time order (the reversal is its own inverse)
                outputs.append(y)
        x = outputs[0] if d == 1 else torch.cat(outputs, 2)  # (T, B, D * H)
        output = (x * keep).transpose(0, 1)  # padded outputs are 0
        return output, torch.stack(h_n, 1), torch.stack(c_n, 1)


class ScanOnnxLSTM(nn.Module):
    """The cell equations inside a `Scan` body, one Scan per layer and direction.

    The body is the cell alone (`lstm_cell`: twelve nodes, the weights constants transposed at
    export): ONNX Runtime pays for every node of the body at every step (about 0.6 us each at
    batch 1, measured). What can be done once per call stays outside the Scan: the input
    projection of all steps (one MatMul) and everything `lengths` needs. Each sequence runs
    unmasked over all T steps, its padded steps coming after its valid ones; the final state is
    gathered at step length - 1 from the Scan's per-step h and c, and padded outputs are zeroed
    once. The reverse direction scans each sequence reversed within its length (a Gather before
    and after), as the scratch module does.
    """

    def __init__(self, model: LSTM) -> None:
        super().__init__()
        self.lstm = _batch_first_copy(model)

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        m = self.lstm
        d = 2 if m.bidirectional else 1
        x = input.transpose(0, 1)  # (T, B, I)
        valid, rows, last = _lengths_rows(lengths, x.shape[0], x.shape[1])
        h_n, c_n = [], []
        for layer in range(m.num_layers):
            outputs = []
            for direction in range(d):
                k = layer * d + direction
                bias = m._b_ih[k] + m._b_hh[k] if m.bias else None
                xw = F.linear(x, m._w_ih[k], bias)  # (T, B, 4H)
                if direction == 1:
                    xw = _rows(xw, rows)
                w_hh = m._w_hh[k]
                w_hr = m._w_hr[k] if m.proj_size > 0 else None

                def step(
                    carry: tuple[Tensor, Tensor], xw_t: Tensor, w_hh=w_hh, w_hr=w_hr
                ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
                    h, c = lstm_cell(xw_t, carry[0], carry[1], w_hh, w_hr)
                    return (h, c), (h.clone(), c.clone())  # HOPs forbid aliased outputs

                _, (out, cells) = scan(step, (h0[:, k].contiguous(), c0[:, k].contiguous()), xw)
                h_n.append(_at(out, last))
                c_n.append(_at(cells, last))
                if direction == 1:
                    out = _rows(out, rows)  # back to time order
                outputs.append(out)
            x = outputs[0] if d == 1 else torch.cat(outputs, 2)  # (T, B, D * H_out)
        output = x * valid.unsqueeze(2).to(x.dtype)  # padded outputs are 0
        return output.transpose(0, 1), torch.stack(h_n, 1), torch.stack(c_n, 1)
