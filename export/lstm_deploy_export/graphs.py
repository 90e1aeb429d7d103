"""The deployed forms of a scratch LSTM, all with the signature of `signature.py`.

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
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan

from lstm_deploy import LSTM, lstm_cell

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
        self.lstm = _batch_first_copy(model)

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())  # (L*D, B, H)
        output, (hn, cn) = self.lstm(input, hx, lengths)
        return output, hn.transpose(0, 1), cn.transpose(0, 1)


def _onnx_gates(w: Tensor, hidden_size: int) -> Tensor:
    blocks = w.detach().split(hidden_size, 0)
    return torch.cat([blocks[k] for k in _TORCH_TO_ONNX_GATES], 0)


class NativeOnnxLSTM(nn.Module):
    """One ONNX `LSTM` op per layer, weights reordered once into the op's layout.

    The op runs time-major (layout=0: ONNX Runtime rejects layout=1), so the graph transposes the
    batch-first input, state and outputs around it. `sequence_lens` carries `lengths`.
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
        d, h = self.num_directions, self.hidden_size
        for layer in range(self.num_layers):
            ks = [layer * d + direction for direction in range(d)]
            w = torch.stack([_onnx_gates(model._w_ih[k], h) for k in ks])  # (D, 4H, I)
            r = torch.stack([_onnx_gates(model._w_hh[k], h) for k in ks])  # (D, 4H, H)
            if model.bias:  # ONNX's B is [Wb, Rb]: (D, 8H)
                b = torch.stack(
                    [
                        torch.cat([_onnx_gates(model._b_ih[k], h), _onnx_gates(model._b_hh[k], h)])
                        for k in ks
                    ]
                )
            else:
                b = w.new_zeros(d, 8 * h)
            self.register_buffer(f"w_l{layer}", w)
            self.register_buffer(f"r_l{layer}", r)
            self.register_buffer(f"b_l{layer}", b)

    def forward(
        self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        d, h = self.num_directions, self.hidden_size
        x = input.transpose(0, 1)  # (T, B, I)
        steps, batch = x.shape[0], x.shape[1]
        sequence_lens = lengths.to(torch.int32)  # the op's type for sequence_lens
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            state = slice(layer * d, (layer + 1) * d)
            y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
                "LSTM",
                [
                    x,
                    getattr(self, f"w_l{layer}"),
                    getattr(self, f"r_l{layer}"),
                    getattr(self, f"b_l{layer}"),
                    sequence_lens,
                    h0[:, state].transpose(0, 1),  # (D, B, H)
                    c0[:, state].transpose(0, 1),
                ],
                {
                    "hidden_size": h,
                    "direction": "bidirectional" if d == 2 else "forward",
                    "layout": 0,
                },
                dtypes=[x.dtype] * 3,
                shapes=[[steps, d, batch, h], [d, batch, h], [d, batch, h]],
            )  # y: (T, D, B, H); y_h, y_c: (D, B, H)
            x = y.permute(0, 2, 1, 3).reshape(steps, batch, d * h)  # (T, B, D * H)
            h_n.append(y_h)
            c_n.append(y_c)
        return (
            x.transpose(0, 1),
            torch.cat(h_n, 0).transpose(0, 1),
            torch.cat(c_n, 0).transpose(0, 1),
        )


class ScanOnnxLSTM(nn.Module):
    """The cell equations inside a `Scan` body, one Scan per layer and direction.

    The input projection of all steps is hoisted out of the body as one MatMul; `lengths` becomes a
    (T, B, 1) mask: a padded step keeps (h, c) and outputs zeros, as the scratch module does.
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
        steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (T, 1)
        valid = (steps < lengths.unsqueeze(0)).unsqueeze(2).to(x.dtype)  # (T, B, 1)
        h_n, c_n = [], []
        for layer in range(m.num_layers):
            outputs = []
            for direction in range(d):
                k = layer * d + direction
                xw = torch.matmul(x, m._w_ih[k].t())  # (T, B, 4H)
                if m.bias:
                    xw = xw + (m._b_ih[k] + m._b_hh[k])
                w_hh = m._w_hh[k]
                w_hr = m._w_hr[k] if m.proj_size > 0 else None

                def step(
                    carry: tuple[Tensor, Tensor], xs: tuple[Tensor, Tensor], w_hh=w_hh, w_hr=w_hr
                ) -> tuple[tuple[Tensor, Tensor], Tensor]:
                    h, c = carry
                    xw_t, keep = xs  # (B, 4H), (B, 1)
                    h_new, c_new = lstm_cell(xw_t, h, c, w_hh, w_hr)
                    # keep is 0 or 1: these blends are exact selects for finite values.
                    out = keep * h_new
                    return (out + (1 - keep) * h, keep * c_new + (1 - keep) * c), out

                (h, c), out = scan(
                    step, (h0[:, k].contiguous(), c0[:, k].contiguous()), (xw, valid),
                    reverse=direction == 1,
                )  # fmt: skip
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if d == 1 else torch.cat(outputs, 2)  # (T, B, D * H_out)
        return x.transpose(0, 1), torch.stack(h_n, 1), torch.stack(c_n, 1)
