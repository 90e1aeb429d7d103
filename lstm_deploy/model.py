"""The scratch LSTM: cell -> layer -> stack, a drop-in for torch.nn.LSTM.

The equations are the seed notebook's (gate order i, f, g, o as in torch.nn.LSTM), written out with
plain tensor ops: nothing here calls torch.nn.LSTM, torch.lstm or torch._VF. Every function and the
module are TorchScript-scriptable (proven by tests/test_model_script.py).

Speed (README "Performance", measured with `lstm-deploy bench`): the input projection runs over
many steps at once; a layer's time loop runs the cell as few ops as it can, in one of two forms:
the differentiable one (`_recurrence`), and, when nothing needs a gradient, the same cell written
into buffers made once (`recurrence_no_grad`, in `lstm_deploy._fast`), which model.pt runs on
weights laid out for it once (`lstm_deploy._ready`); padding costs nothing per step (see
`lstm_layer`). The argument and input checks are nn.LSTM's, in `lstm_deploy._checks`; a
PackedSequence input (eager mode) goes through `lstm_deploy._packed`.
"""

import math

# TorchScript resolves typing's generics
from typing import TYPE_CHECKING, Any, ClassVar, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstm_deploy._checks import check_config, check_input, check_lengths, check_state, check_steps
from lstm_deploy._fast import (
    Ready,
    input_projection,
    needs_grad,
    plain,
    recurrence_no_grad,
    reversed_within,
)
from lstm_deploy._packed import forward_packed
from lstm_deploy._ready import ReadyWeights, make_ready
from lstm_deploy.config import LSTMConfig

__all__ = ["LSTM", "LSTMConfig", "lstm_cell", "lstm_layer"]


def lstm_cell(
    xw: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """One time step; `xw` is the step's input projection W_ih x_t + b_ih + b_hh, precomputed."""
    w_hr_t: Optional[Tensor] = None
    if weight_hr is not None:
        w_hr_t = weight_hr.t()
    return _cell(xw, h, c, weight_hh.t(), w_hr_t)


def _cell(
    xw: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor, w_hr_t: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """`lstm_cell` with the weights' transposes made once per layer, not once per step.

    Also the Scan body of model.scan.onnx, where every op is a node that ONNX Runtime runs at
    every step: hence one sigmoid over all four gate blocks (g's quarter is wasted work, cheaper
    than two more kernels) and one Split of it.
    """
    hidden = c.size(1)
    gates = torch.addmm(xw, h, w_hh_t)  # (B, 4H)
    i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # (B, H) each
    g = torch.tanh(gates[:, 2 * hidden : 3 * hidden])  # (B, H)
    c = torch.addcmul(f * c, i, g)  # f * c + i * g
    h = o * torch.tanh(c)  # (B, H)
    if w_hr_t is not None:
        h = torch.mm(h, w_hr_t)  # (B, proj_size)
    return h, c


def lstm_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Optional[Tensor],
    weight_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    ready: Optional[Ready] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer over time.

    x: (T, B, I); h: (B, H_out); c: (B, H); lengths: (B,) int64 in [1, T], or None (all T).
    With lengths, the outputs at t >= length are zeros and (h, c) is the state after step
    length - 1; the reverse direction of a sequence of length L starts from the initial state at
    step L - 1, as with pack_padded_sequence. Returns output (T, B, H_out) and the final (h, c).
    `ready`: the same weights made ready once for the no-grad loop (`lstm_deploy._ready`, the
    fast path of model.pt), used when nothing needs a gradient.

    Padding costs nothing per step: each sequence runs unmasked over all T steps (its padded steps
    cannot reach its valid ones, which come first), its final state is gathered at step L - 1, and
    its padded outputs are zeroed once. The reverse direction runs forward in time over each
    sequence reversed within its length.
    """
    steps = x.size(0)
    order: Optional[Tensor] = None
    if lengths is not None and reverse:
        order = reversed_within(lengths, steps).unsqueeze(2)  # (T, B, 1)
        reverse = False
    cells: Optional[Tensor] = None
    if lengths is not None:
        cells = c.new_empty(steps, c.size(0), c.size(1))  # (T, B, H): c at every step
    if needs_grad([x, h, c, weight_ih, weight_hh, bias, weight_hr]):
        xw = input_projection(x, weight_ih, bias)  # (T, B, 4H)
        if order is not None:
            xw = xw.gather(0, order.expand_as(xw))
        w_hr_t: Optional[Tensor] = None
        if weight_hr is not None:
            w_hr_t = weight_hr.t()
        output, h, c = _recurrence(xw, h, c, weight_hh.t(), w_hr_t, reverse, cells)
    else:
        if order is not None:
            x = x.gather(0, order.expand(steps, x.size(1), x.size(2)))
        if ready is None:
            ready = plain(weight_ih, bias, weight_hh, weight_hr)
        output, h, c = recurrence_no_grad(x, h, c, ready, reverse, cells)
    if lengths is None or cells is None:
        return output, h, c
    last = (lengths - 1).view(1, -1, 1)  # (1, B, 1)
    h = output.gather(0, last.expand(1, h.size(0), h.size(1))).squeeze(0)
    c = cells.gather(0, last.expand(1, c.size(0), c.size(1))).squeeze(0)
    if order is not None:
        output = output.gather(0, order.expand_as(output))  # back to time order
    padding = torch.arange(steps, device=x.device).view(-1, 1, 1) >= lengths.view(1, -1, 1)
    return output.masked_fill(padding, 0.0), h, c


def _recurrence(
    xw: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh_t: Tensor,
    w_hr_t: Optional[Tensor],
    reverse: bool,
    cells: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The time loop over a precomputed input projection xw (T, B, 4H); fills `cells` if given.

    Differentiable: every step makes new tensors. `recurrence_no_grad` is the fast path.
    """
    steps = xw.size(0)
    output = xw.new_empty(steps, xw.size(1), h.size(1))  # (T, B, H_out), every step written
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h, c = _cell(xw[t], h, c, w_hh_t, w_hr_t)
        output[t] = h
        if cells is not None:
            cells[t] = c
    return output, h, c


class LSTM(nn.Module):
    r"""A multi-layer LSTM written from scratch, with torch.nn.LSTM's interface.

    Args:
        input_size: the number of features of the input `x`.
        hidden_size: the number of features of the cell state `c` (and of `h` without projection).
        num_layers: the number of stacked layers. Default: 1
        bias: if False, the layers use no `b_ih` and `b_hh`. Default: True
        batch_first: if True, input and output are (batch, seq, feature). Default: False
        dropout: dropout probability on the outputs of each layer but the last, in training mode;
            with one layer it does nothing, and a UserWarning says so. Default: 0
        bidirectional: if True, a bidirectional LSTM. Default: False
        proj_size: if > 0, `h` is projected to this size by `weight_hr_l{k}`. Default: 0

    Inputs: input, (h_0, c_0), lengths
        input: (L, N, H_in), (N, L, H_in) when batch_first, or (L, H_in) unbatched, with L >= 1;
            in eager mode also a PackedSequence (from pack_padded_sequence or pack_sequence,
            sorted or not), as nn.LSTM takes it. The scripted module takes tensors only: it has
            `lengths` instead.
        h_0: (D * num_layers, N, H_out) or (D * num_layers, H_out); zeros when hx is None. With a
            PackedSequence, N is its batch, in the order of the sequences before packing.
        c_0: (D * num_layers, N, H_cell) or (D * num_layers, H_cell); zeros when hx is None.
        lengths: optional (N,) of an integer dtype, each in [1, L]: steps at t >= length are
            padding. None with a PackedSequence (it carries its lengths).

    Outputs: output, (h_n, c_n)
        output: (L, N, D * H_out) ((N, L, D * H_out) when batch_first); zero at padded steps. For
            a PackedSequence input, a PackedSequence with the input's batch_sizes,
            sorted_indices and unsorted_indices.
        h_n, c_n: the state after each sequence's last valid step, shaped like h_0 and c_0, in the
            caller's batch order.

    Raises:
        TypeError: for an argument of the wrong type (bias and batch_first must be bools; the
            sizes ints), as torch.nn.LSTM does.
        ValueError: for a bad configuration, as torch.nn.LSTM does; for an input that is not 2-D
            or 3-D, or whose dtype is not the parameters' (nn.LSTM's types); for lengths with a
            PackedSequence.
        RuntimeError: for a bad input size, hx rank, shape, dtype or device, an empty sequence
            (L = 0), or a PackedSequence of another dtype, as torch.nn.LSTM does; for a length
            below 1, as pack_padded_sequence does, and for what it does not check: a length above
            L, lengths of a float or bool dtype or not shaped (N,). Each message names the
            expected and the actual.
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
        check_config(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
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
        # A frozen copy's weights made ready for the no-grad loop (lstm_deploy._ready.make_ready:
        # the exporter's copy for model.pt); None: the plain path.
        self._ready = None

    _weight_names: List[str]
    # Per (layer, direction) weight lists, indexed by layer * D + direction: TorchScript cannot look
    # attributes up by a computed name, so forward reads these (as nn.LSTM reads _flat_weights).
    _w_ih: List[Tensor]
    _w_hh: List[Tensor]
    _b_ih: List[Tensor]
    _b_hh: List[Tensor]
    _w_hr: List[Tensor]
    if TYPE_CHECKING:  # not for TorchScript, which types it from its value: None or the module
        _ready: Optional[ReadyWeights]

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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_ready" not in self.__dict__ and "_ready" not in self._modules:
            self._ready = None  # a module pickled by a version without it

    def _apply(self, fn: Any, recurse: bool = True) -> "LSTM":
        ret = super()._apply(fn, recurse)
        self._refresh_weight_lists()
        if self._ready is not None:  # made from the parameters that fn just replaced
            make_ready(self, self._ready.onednn_from_batch)
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

    def flatten_parameters(self) -> None:  # nn.LSTM's, for code that calls it: nothing to do
        pass

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = LSTMConfig(self.input_size, self.hidden_size)
        for key, value in self.config.to_dict().items():
            if value != getattr(defaults, key):
                s += f", {key}={value}"
        return s

    @torch.jit.unused
    def _forward_packed(
        self, input: Any, hx: Optional[Tuple[Tensor, Tensor]], lengths: Optional[Tensor]
    ) -> Any:
        # Eager only: TorchScript drops forward's `not torch.jit.is_scripting()` branch that calls
        # this before compiling it, and jit.unused keeps this body (PackedSequence in and out,
        # which TorchScript cannot type) out of any compilation.
        dtype = self._w_ih[0].dtype
        return forward_packed(self.forward, input, hx, lengths, self.batch_first, dtype)

    def forward(
        self,
        input: Tensor,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        lengths: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if not torch.jit.is_scripting() and isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, lengths)
        d = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        check_input(input, hx, self.input_size, self._w_ih[0])
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
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            check_state(h0, "h_0", (self.num_layers * d, batch, h_out), x)
            check_state(c0, "c_0", (self.num_layers * d, batch, self.hidden_size), x)
        check_steps(steps)

        padded: Optional[Tensor] = None  # lengths, unless every sequence is full length
        if lengths is not None and check_lengths(lengths, batch, steps) < steps:
            padded = lengths.to(device=x.device, dtype=torch.int64)

        fast = False  # whether the ready weights are current for x (an `if`: TorchScript
        if self._ready is not None:  # compiles the branch only when the attribute is a module)
            fast = self._ready.current(x)
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
                ready: Optional[Ready] = None
                if self._ready is not None:  # noqa: SIM102  (TorchScript: see `fast`)
                    if fast:
                        ready = self._ready.get(k)
                out, h, c = lstm_layer(
                    x, h0[k], c0[k], self._w_ih[k], self._w_hh[k], bias, weight_hr, padded,
                    direction == 1, ready,
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
