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
            h_n.append(y_h)
            c_n.append(y_c)
            # With one direction a Squeeze, which reuses the op's output buffer; a Reshape after
            # a Transpose is a copy in ONNX Runtime (1.7% of B64 T128 H128, profiled).
            if layer < self.num_layers - 1:
                x = y.squeeze(1) if d == 1 else y.permute(0, 2, 1, 3).reshape(steps, batch, d * h)
        # Straight to batch first: one Transpose of the output per call, not two.
        if d == 1:
            output = y.squeeze(1).transpose(0, 1)  # (B, T, H)
        else:
            output = y.permute(2, 0, 1, 3).reshape(batch, steps, d * h)  # (B, T, D * H)
        return output, torch.cat(h_n, 0).transpose(0, 1), torch.cat(c_n, 0).transpose(0, 1)


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
        steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (T, 1)
        valid = steps < lengths.unsqueeze(0)  # (T, B)
        reverse_order = torch.where(valid, lengths.unsqueeze(0) - 1 - steps, steps).unsqueeze(2)
        last = (lengths - 1).view(1, -1, 1)  # (1, B, 1)
        h_n, c_n = [], []
        for layer in range(m.num_layers):
            outputs = []
            for direction in range(d):
                k = layer * d + direction
                bias = m._b_ih[k] + m._b_hh[k] if m.bias else None
                xw = F.linear(x, m._w_ih[k], bias)  # (T, B, 4H)
                if direction == 1:
                    xw = xw.gather(0, reverse_order.expand_as(xw))
                w_hh = m._w_hh[k]
                w_hr = m._w_hr[k] if m.proj_size > 0 else None

                def step(
                    carry: tuple[Tensor, Tensor], xw_t: Tensor, w_hh=w_hh, w_hr=w_hr
                ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
                    h, c = lstm_cell(xw_t, carry[0], carry[1], w_hh, w_hr)
                    return (h, c), (h.clone(), c.clone())  # HOPs forbid aliased outputs

                _, (out, cells) = scan(step, (h0[:, k].contiguous(), c0[:, k].contiguous()), xw)
                h_n.append(out.gather(0, last.expand(1, out.shape[1], out.shape[2])).squeeze(0))
                c_n.append(
                    cells.gather(0, last.expand(1, cells.shape[1], cells.shape[2])).squeeze(0)
                )
                if direction == 1:
                    out = out.gather(0, reverse_order.expand_as(out))  # back to time order
                outputs.append(out)
            x = outputs[0] if d == 1 else torch.cat(outputs, 2)  # (T, B, D * H_out)
        output = torch.where(valid.unsqueeze(2), x, torch.zeros((), dtype=x.dtype))
        return output.transpose(0, 1), torch.stack(h_n, 1), torch.stack(c_n, 1)
