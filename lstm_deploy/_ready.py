"""Weights made ready once for the no-grad loop of a frozen model: the fast path of model.pt.

`make_ready(model)` gives an LSTM a `ReadyWeights` child that holds, per layer and direction, what
`lstm_deploy._fast.Ready` lists: the gate weights with their g block doubled, W_hh^T contiguous,
and, where oneDNN's inner product is faster than MKL's sgemm (`choose_onednn_from_batch`), the
weights in oneDNN's packed layout. These are derived from the parameters, never stored: a saved
model.pt holds the parameters once, and TorchScript's `__setstate__` derives the rest again when
LibTorch or torch.jit.load reads it (on the device it is loaded to). The forward uses them only
while they are current (`ReadyWeights.current`): after an in-place change of a parameter, or on
another device or dtype, the model runs the plain no-grad path, correct and slower.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lstm_deploy._fast import Ready, onednn_linear

if TYPE_CHECKING:
    from lstm_deploy.model import LSTM

__all__ = ["ReadyWeights", "choose_onednn_from_batch", "make_ready"]

# The saved state: the parameters (the model's own tensors, so stored once), onednn_from_batch.
_State = Tuple[
    List[Tensor], List[Tensor], List[Tensor], List[Tensor], List[Tensor], int, bool
]  # fmt: skip


class ReadyWeights(nn.Module):
    """Per layer and direction k, the weights of `lstm_deploy._fast.Ready`, derived once.

    onednn_from_batch: batch sizes from this one run the GEMMs on oneDNN; 0: never (and no packed
    weights are made).
    """

    # The parameters, per kind (empty without bias or projection), and their versions when derived.
    weight_ih: List[Tensor]
    weight_hh: List[Tensor]
    bias_ih: List[Tensor]
    bias_hh: List[Tensor]
    weight_hr: List[Tensor]
    versions: List[int]
    onednn_from_batch: int
    # Derived, per k (see `Ready`).
    ih_t: List[Tensor]
    b: List[Tensor]
    hh_t: List[Tensor]
    hr_t: List[Tensor]
    packed_ih: List[Tensor]
    packed_hh: List[Tensor]

    def __init__(
        self,
        weight_ih: List[Tensor],
        weight_hh: List[Tensor],
        bias_ih: List[Tensor],
        bias_hh: List[Tensor],
        weight_hr: List[Tensor],
        onednn_from_batch: int,
    ) -> None:
        super().__init__()
        state = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, onednn_from_batch, False)
        self.__setstate__(state)

    @torch.jit.export
    def __getstate__(self) -> _State:
        return (
            self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr,
            self.onednn_from_batch, self.training,
        )  # fmt: skip

    @torch.jit.export
    def __setstate__(self, state: _State) -> None:
        if not torch.jit.is_scripting():
            self._init_if_unpickled()
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr = state[:5]
        self.onednn_from_batch = state[5]
        self.training = state[6]
        sources = self.weight_ih + self.weight_hh + self.bias_ih + self.bias_hh + self.weight_hr
        self.versions = [torch.ops.aten._version(t) for t in sources]
        with torch.no_grad():
            self._derive()

    @torch.jit.unused
    def _init_if_unpickled(self) -> None:
        if "_modules" not in self.__dict__:  # unpickled in Python (copy.deepcopy): no __init__ ran
            nn.Module.__init__(self)

    def _derive(self) -> None:
        hidden = self.weight_hh[0].size(0) // 4
        scale = torch.ones_like(self.weight_hh[0][:, 0])  # (4H,)
        scale[2 * hidden : 3 * hidden] = 2.0  # the g block (see lstm_deploy._fast._step)
        self.ih_t, self.b, self.hh_t = [], [], []
        self.hr_t, self.packed_ih, self.packed_hh = [], [], []
        onednn = self.onednn_from_batch > 0 and _onednn_can_run(self.weight_hh[0])
        for k in range(len(self.weight_hh)):
            w_ih = self.weight_ih[k] * scale.unsqueeze(1)  # (4H, I)
            w_hh = self.weight_hh[k] * scale.unsqueeze(1)  # (4H, H_out)
            self.ih_t.append(w_ih.t().contiguous())  # (I, 4H)
            self.hh_t.append(w_hh.t().contiguous())  # (H_out, 4H)
            if len(self.bias_ih) > 0:
                self.b.append((self.bias_ih[k] + self.bias_hh[k]) * scale)
            if len(self.weight_hr) > 0:
                self.hr_t.append(self.weight_hr[k].t().contiguous())  # (H, P)
            if onednn:
                self.packed_ih.append(torch.ops.mkldnn._reorder_linear_weight(w_ih))
                self.packed_hh.append(torch.ops.mkldnn._reorder_linear_weight(w_hh))

    def current(self, like: Tensor) -> bool:
        """Whether the derived weights still match the parameters and suit an input like `like`."""
        if like.device != self.weight_hh[0].device or like.dtype != self.weight_hh[0].dtype:
            return False
        sources = self.weight_ih + self.weight_hh + self.bias_ih + self.bias_hh + self.weight_hr
        for t, version in zip(sources, self.versions):
            if torch.ops.aten._version(t) != version:
                return False
        return True

    def get(self, k: int) -> Ready:
        bias: Optional[Tensor] = None
        if len(self.b) > 0:
            bias = self.b[k]
        w_hr_t: Optional[Tensor] = None
        if len(self.hr_t) > 0:
            w_hr_t = self.hr_t[k]
        packed_ih: Optional[Tensor] = None
        packed_hh: Optional[Tensor] = None
        if len(self.packed_hh) > 0:
            packed_ih, packed_hh = self.packed_ih[k], self.packed_hh[k]
        return Ready(
            self.ih_t[k], bias, self.hh_t[k], w_hr_t, True, packed_ih, packed_hh,
            self.onednn_from_batch,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"onednn_from_batch={self.onednn_from_batch}"


def _onednn_can_run(w: Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32


def make_ready(model: "LSTM", onednn_from_batch: Optional[int] = None) -> "LSTM":
    """Give `model` (a frozen copy: eval mode, no parameter requiring grad) its `ReadyWeights`.

    onednn_from_batch: None measures it here (`choose_onednn_from_batch`); 0 turns oneDNN off.
    Returns the model.
    """
    if onednn_from_batch is None:
        onednn_from_batch = choose_onednn_from_batch(model._w_hh[0])
    model._ready = ReadyWeights(
        model._w_ih, model._w_hh, model._b_ih, model._b_hh, model._w_hr, onednn_from_batch
    )
    return model


PROBE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def choose_onednn_from_batch(weight_hh: Tensor, margin: float = 0.9) -> int:
    """The smallest batch size from which oneDNN's per-step GEMM beats ATen's addmm here; 0: none.

    Which is faster depends on the CPU and the shape: MKL's sgemm reaches the fp32 peak on Intel
    CPUs but runs a slower path on others (about half of it on AMD Zen), while oneDNN's fixed cost
    per call (tens of microseconds) outweighs a small GEMM. So this times both on the step's own
    shape, gates += (B, H_out) @ (H_out, 4H), on one thread (a model instance per core, as
    `lstm-deploy bench` runs it), at each of PROBE_BATCHES (interleaved, best of several rounds),
    and picks the smallest B from which oneDNN takes at most `margin` of addmm's time at every
    probed batch size (larger batches go as the largest probed). About 0.2 s at H 512.
    """
    if not (_onednn_can_run(weight_hh) and torch.backends.mkldnn.is_available()):
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _first_onednn_batch(weight_hh, margin)
    finally:
        torch.set_num_threads(threads)


def _first_onednn_batch(weight_hh: Tensor, margin: float) -> int:
    w_t = weight_hh.detach().t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight_hh.detach())
    chosen = 0
    for batch in reversed(PROBE_BATCHES):
        h = torch.full((batch, weight_hh.size(1)), 0.5)  # not random: the caller's RNG is theirs
        gates = torch.zeros(batch, weight_hh.size(0))

        def mkl(h: Tensor = h, gates: Tensor = gates) -> None:
            gates.addmm_(h, w_t)  # as recurrence_no_grad's step on each route

        def onednn(h: Tensor = h, gates: Tensor = gates) -> None:
            gates.add_(onednn_linear(h, packed, None))

        mkl_time, onednn_time = _best_times(mkl, onednn)
        if onednn_time > margin * mkl_time:
            break
        chosen = batch
    return chosen


def _best_times(*calls: Callable[[], object], rounds: int = 5, per_round: int = 4) -> list[float]:
    """Each call's best time per call over `rounds` interleaved rounds (after a warm-up call)."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for n, call in enumerate(calls):
            call()
            start = time.perf_counter()
            for _ in range(per_round):
                call()
            best[n] = min(best[n], (time.perf_counter() - start) / per_round)
    return best
