"""The scratch LSTM: cell -> layer -> stack, a drop-in for torch.nn.LSTM.

The equations are the seed notebook's (gate order i, f, g, o as in torch.nn.LSTM), written out with
plain tensor ops: nothing here calls torch.nn.LSTM, torch.lstm or torch._VF. Every function and the
module are TorchScript-scriptable (proven by tests/test_model_script.py).
"""

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, List, Optional, Tuple  # TorchScript resolves typing's generics

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_WEIGHT_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


@dataclass(frozen=True)
class LSTMConfig:
    """The constructor arguments of an LSTM (and of torch.nn.LSTM), as plain data."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LSTMConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown LSTM config keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def real_hidden_size(self) -> int:
        """H_out: the size of h (proj_size when projecting, else hidden_size)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size


def lstm_cell(
    xw: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """One time step; `xw` is the step's input projection W_ih x_t + b_ih + b_hh, precomputed."""
    gates = torch.addmm(xw, h, weight_hh.t())  # (B, 4H)
    i, f, g, o = gates.chunk(4, 1)  # (B, H) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    if weight_hr is not None:
        h = torch.mm(h, weight_hr.t())  # (B, proj_size)
    return h, c


def lstm_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Optional[Tensor],
    weight_hr: Optional[Tensor],
    mask: Optional[Tensor],
    reverse: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer over time.

    x: (T, B, I); h: (B, H_out); c: (B, H); mask: (T, B, 1) bool, True at valid steps, or None.
    Masked steps leave (h, c) untouched and output zeros, so the reverse direction of a sequence
    of length L starts from the initial state at step L-1, as with pack_padded_sequence.
    Returns output (T, B, H_out) and the final (h, c).
    """
    xw = torch.matmul(x, weight_ih.t())  # (T, B, 4H): the input projection of all steps, one GEMM
    if bias is not None:
        xw = xw + bias
    steps = x.size(0)
    output = x.new_zeros(steps, x.size(1), h.size(1))  # (T, B, H_out)
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h_new, c_new = lstm_cell(xw[t], h, c, weight_hh, weight_hr)
        if mask is None:
            h, c = h_new, c_new
            output[t] = h
        else:
            valid = mask[t]  # (B, 1)
            h = torch.where(valid, h_new, h)
            c = torch.where(valid, c_new, c)
            output[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return output, h, c


class LSTM(nn.Module):
    r"""A multi-layer LSTM written from scratch, with torch.nn.LSTM's interface.

    Args:
        input_size: the number of features of the input `x`.
        hidden_size: the number of features of the cell state `c` (and of `h` without projection).
        num_layers: the number of stacked layers. Default: 1
        bias: if False, the layers use no `b_ih` and `b_hh`. Default: True
        batch_first: if True, input and output are (batch, seq, feature). Default: False
        dropout: dropout probability on the outputs of each layer but the last, in training mode.
            Default: 0
        bidirectional: if True, a bidirectional LSTM. Default: False
        proj_size: if > 0, `h` is projected to this size by `weight_hr_l{k}`. Default: 0

    Inputs: input, (h_0, c_0), lengths
        input: (L, N, H_in), (N, L, H_in) when batch_first, or (L, H_in) unbatched.
        h_0: (D * num_layers, N, H_out) or (D * num_layers, H_out); zeros when hx is None.
        c_0: (D * num_layers, N, H_cell) or (D * num_layers, H_cell); zeros when hx is None.
        lengths: optional int64 (N,) with each value in [1, L]: steps at t >= length are padding.

    Outputs: output, (h_n, c_n)
        output: (L, N, D * H_out) ((N, L, D * H_out) when batch_first); zero at padded steps.
        h_n, c_n: the state after each sequence's last valid step, shaped like h_0 and c_0.

    Raises:
        ValueError: for a bad configuration, as torch.nn.LSTM does.
        RuntimeError / TypeError: for a bad input, naming the expected and the actual shape/dtype.
    """

    __jit_unused_properties__: ClassVar = ["config"]
    __constants__: ClassVar = [
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
    ]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_config(input_size, hidden_size, num_layers, dropout, proj_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        d = 2 if bidirectional else 1
        h_out = proj_size if proj_size > 0 else hidden_size
        self._weight_names = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else d * h_out
            for direction in range(d):
                shapes = {
                    "weight_ih": (4 * hidden_size, layer_input),
                    "weight_hh": (4 * hidden_size, h_out),
                    "bias_ih": (4 * hidden_size,),
                    "bias_hh": (4 * hidden_size,),
                    "weight_hr": (proj_size, hidden_size),
                }
                if not bias:
                    del shapes["bias_ih"], shapes["bias_hh"]
                if proj_size == 0:
                    del shapes["weight_hr"]
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                for kind, shape in shapes.items():
                    name = kind + suffix
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    self._weight_names.append(name)
        self._refresh_weight_lists()
        self.reset_parameters()

    _weight_names: List[str]
    # Per (layer, direction) weight lists, indexed by layer * D + direction: TorchScript cannot look
    # attributes up by a computed name, so forward reads these (as nn.LSTM reads _flat_weights).
    _w_ih: List[Tensor]
    _w_hh: List[Tensor]
    _b_ih: List[Tensor]
    _b_hh: List[Tensor]
    _w_hr: List[Tensor]

    def _refresh_weight_lists(self) -> None:
        def collect(kind: str) -> List[Tensor]:
            return [getattr(self, n) for n in self._weight_names if n.startswith(kind + "_l")]

        self._w_ih = collect("weight_ih")
        self._w_hh = collect("weight_hh")
        self._b_ih = collect("bias_ih")
        self._b_hh = collect("bias_hh")
        self._w_hr = collect("weight_hr")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # load_state_dict(assign=True) and friends replace parameters: keep the lists in step.
        if name in getattr(self, "_weight_names", ()) and all(
            hasattr(self, n) for n in self._weight_names
        ):
            self._refresh_weight_lists()

    def _apply(self, fn: Any, recurse: bool = True) -> "LSTM":
        ret = super()._apply(fn, recurse)
        self._refresh_weight_lists()
        return ret

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's init: every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for w in self.parameters():
                w.uniform_(-bound, bound)

    @property
    def config(self) -> "LSTMConfig":
        return LSTMConfig(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
        )

    @classmethod
    def from_config(cls, config: LSTMConfig, **factory: Any) -> "LSTM":
        return cls(**config.to_dict(), **factory)

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> "LSTM":
        """A scratch LSTM with the configuration and (copied) weights of a torch.nn.LSTM."""
        p = next(lstm.parameters())
        model = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            float(lstm.dropout),
            lstm.bidirectional,
            lstm.proj_size,
            device=p.device,
            dtype=p.dtype,
        )
        model.load_state_dict(lstm.state_dict())
        return model

    def to_torch(self) -> nn.LSTM:
        """A torch.nn.LSTM with this model's configuration and (copied) weights."""
        p = next(self.parameters())
        lstm = nn.LSTM(**self.config.to_dict(), device=p.device, dtype=p.dtype)
        lstm.load_state_dict(self.state_dict())
        return lstm

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = LSTMConfig(self.input_size, self.hidden_size)
        for key, value in self.config.to_dict().items():
            if value != getattr(defaults, key):
                s += f", {key}={value}"
        return s

    def forward(
        self,
        input: Tensor,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        lengths: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        d = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        _check_input(input, self.input_size, self._w_ih[0])
        is_batched = input.dim() == 3
        x = input if is_batched else input.unsqueeze(1)  # (T, B, I) or (B, T, I)
        if self.batch_first and is_batched:
            x = x.transpose(0, 1)
        steps, batch = x.size(0), x.size(1)  # x: (T, B, I) from here on

        if hx is None:
            h0 = x.new_zeros(self.num_layers * d, batch, h_out)
            c0 = x.new_zeros(self.num_layers * d, batch, self.hidden_size)
        else:
            h0, c0 = hx
            if not is_batched:
                _check_unbatched_state(h0, c0)
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            _check_state(h0, "h_0", (self.num_layers * d, batch, h_out), x)
            _check_state(c0, "c_0", (self.num_layers * d, batch, self.hidden_size), x)

        mask: Optional[Tensor] = None
        if lengths is not None:
            _check_lengths(lengths, batch, steps)
            steps_idx = torch.arange(steps, device=x.device).unsqueeze(1)  # (T, 1)
            mask = (steps_idx < lengths.to(x.device).unsqueeze(0)).unsqueeze(2)  # (T, B, 1)

        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0.0 and self.training:
                x = F.dropout(x, self.dropout, True)
            outputs: List[Tensor] = []
            for direction in range(d):
                k = layer * d + direction
                bias: Optional[Tensor] = None
                if self.bias:
                    bias = self._b_ih[k] + self._b_hh[k]
                weight_hr: Optional[Tensor] = None
                if self.proj_size > 0:
                    weight_hr = self._w_hr[k]
                out, h, c = lstm_layer(
                    x, h0[k], c0[k], self._w_ih[k], self._w_hh[k], bias, weight_hr, mask,
                    direction == 1,
                )  # fmt: skip
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if d == 1 else torch.cat(outputs, 2)  # (T, B, D * H_out)

        output = x
        hn = torch.stack(h_n, 0)
        cn = torch.stack(c_n, 0)
        if not is_batched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)


def _check_config(
    input_size: int, hidden_size: int, num_layers: int, dropout: float, proj_size: int
) -> None:
    # The same checks and messages as torch.nn.RNNBase.
    if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(
            "proj_size should be a positive integer or zero to disable projections, "
            f"got {proj_size!r}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
            f"and hidden_size={hidden_size}"
        )


def _check_input(input: Tensor, input_size: int, weight: Tensor) -> None:
    if input.dim() not in (2, 3):
        raise ValueError(
            f"LSTM: expected input to be 2-D (L, H_in) or 3-D (L, N, H_in), got {input.dim()}-D "
            f"with shape {list(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"LSTM: expected a floating-point input, got dtype {input.dtype}")
    if input.size(-1) != input_size:
        raise RuntimeError(
            f"LSTM: input.size(-1) must be equal to input_size. Expected {input_size}, "
            f"got {input.size(-1)} (input shape {list(input.shape)})"
        )
    if input.dtype != weight.dtype:
        raise TypeError(
            f"LSTM: input dtype {input.dtype} does not match the parameters' dtype {weight.dtype}; "
            "convert one of them (e.g. input.to(dtype) or model.to(dtype))"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"LSTM: input is on {input.device} but the parameters are on {weight.device}; "
            "move one of them (input.to(device) or model.to(device))"
        )


def _check_unbatched_state(h0: Tensor, c0: Tensor) -> None:
    if h0.dim() != 2 or c0.dim() != 2:
        raise RuntimeError(
            f"LSTM: for unbatched 2-D input, hx and cx should also be 2-D but got "
            f"({h0.dim()}-D, {c0.dim()}-D) tensors"
        )


def _check_state(state: Tensor, name: str, expected: Tuple[int, int, int], x: Tensor) -> None:
    if state.dim() != 3 or (state.size(0), state.size(1), state.size(2)) != expected:
        raise RuntimeError(
            f"LSTM: expected {name} of shape {list(expected)}, got {list(state.shape)}"
        )
    if state.dtype != x.dtype:
        raise TypeError(f"LSTM: expected {name} of dtype {x.dtype}, got {state.dtype}")
    if state.device != x.device:
        raise RuntimeError(f"LSTM: expected {name} on {x.device}, got it on {state.device}")


def _check_lengths(lengths: Tensor, batch: int, steps: int) -> None:
    if lengths.dtype != torch.int64:
        raise TypeError(f"LSTM: expected lengths of dtype torch.int64, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise RuntimeError(
            f"LSTM: expected lengths of shape [{batch}] (one per sequence), "
            f"got {list(lengths.shape)}"
        )
    if batch > 0:
        lo = int(lengths.min())
        hi = int(lengths.max())
        if lo < 1 or hi > steps:
            raise ValueError(
                f"LSTM: every length must be in [1, {steps}] (the sequence length), got values "
                f"from {lo} to {hi}"
            )
