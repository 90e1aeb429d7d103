"""The fast path of the time loop: the cell written into buffers made once, for no-grad runs.

`lstm_deploy.model._recurrence` is the readable, differentiable loop; when nothing needs a gradient
(inference, export, the scripted model.pt) `lstm_layer` takes `recurrence_no_grad` instead: the
same equations, with `out=` and in-place ops, so that a step allocates nothing and runs the fewest
kernels (per-op overhead is most of a step at batch 1; see README "Performance").

The step uses sigmoid only: tanh(x) = 2 sigmoid(2x) - 1. One sigmoid over all four gate blocks
then serves g too, once its pre-activation is doubled, and tanh(c) comes from the cell state the
loop carries doubled (see `_step`). Doubling is exact in binary floating point; torch.tanh on the
CPU is MKL VML's vsTanh, about 5 sigmoids per element on AMD, and would be two more kernels.

The GEMMs have two routes: ATen's addmm (MKL on x86), or oneDNN's inner product with weights packed
once (`Ready.packed_*`, made by `lstm_deploy._ready`) where that is faster, chosen per layer call by
batch size.
"""

# TorchScript resolves typing's generics
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class Ready(NamedTuple):
    """One layer direction's weights in the form `recurrence_no_grad` takes them.

    `plain` views the parameters as they are; `lstm_deploy._ready` derives them once for a frozen
    model, with the g block (columns 2H:3H of the (., 4H) weights and of the bias) doubled so that
    one sigmoid serves all four gates (see `_step`), and the transposes contiguous: MKL's sgemm
    takes up to 2x longer on a transposed (N, K) view (h @ W_hh^T at batch 8, hidden 512, on an
    Intel Xeon). `packed_*` are the same weights in oneDNN's layout, for `onednn_linear`, or None
    where that route is off.
    """

    w_ih_t: Tensor  # (I, 4H)
    bias: Optional[Tensor]  # (4H,): b_ih + b_hh
    w_hh_t: Tensor  # (H_out, 4H)
    w_hr_t: Optional[Tensor]  # (H, P)
    g_doubled: bool  # whether the g block of w_ih_t, bias, w_hh_t and packed_* is doubled
    packed_ih: Optional[Tensor]
    packed_hh: Optional[Tensor]
    onednn_from_batch: int  # batch sizes from this one take the oneDNN route (with packed_*)


def plain(
    weight_ih: Tensor, bias: Optional[Tensor], weight_hh: Tensor, weight_hr: Optional[Tensor]
) -> Ready:
    """The parameters as `recurrence_no_grad` takes them, as views: nothing is copied."""
    w_hr_t: Optional[Tensor] = None
    if weight_hr is not None:
        w_hr_t = weight_hr.t()
    return Ready(weight_ih.t(), bias, weight_hh.t(), w_hr_t, False, None, None, 0)


def onednn_linear(x: Tensor, packed: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ W^T + bias on oneDNN's inner product, W packed by mkldnn._reorder_linear_weight."""
    scalars: List[Optional[Union[int, float, complex]]] = []  # the op's post-op arguments: none
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", scalars, "")


def recurrence_no_grad(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Ready,
    reverse: bool,
    cells: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """`_recurrence` for when nothing needs a gradient, from the input x (T, B, I) on.

    The input projection runs a chunk of steps at a time (see `_chunk_steps`) into a buffer made
    once. Every step writes into buffers made once (gates and their four block views,
    sigmoid(-2c), two cell states) and h straight into its row of `output`, which is the next
    step's h: 7 ops per step and no allocation on the MKL route. Without `weights.g_doubled` the
    step doubles the g block of the gates itself. From `weights.onednn_from_batch` on, the GEMMs
    run on oneDNN.
    """
    packed_ih, packed_hh = weights.packed_ih, weights.packed_hh
    if x.size(1) < weights.onednn_from_batch:
        packed_ih, packed_hh = None, None
    x = x.contiguous()  # chunks of whole steps are then views
    if packed_hh is None and weights.g_doubled and weights.w_hr_t is None and cells is None:
        return _loop_mkl(x, h, c, weights, reverse)
    return _loop(x, h, c, weights, reverse, cells, packed_ih, packed_hh)


def _loop(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Ready,
    reverse: bool,
    cells: Optional[Tensor],
    packed_ih: Optional[Tensor],
    packed_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The loop of `recurrence_no_grad`, every case: on oneDNN with `packed_*`."""
    steps, batch, hidden = x.size(0), x.size(1), c.size(1)
    chunk = _chunk_steps(x, hidden)
    buffer = x.new_empty(chunk, batch, 4 * hidden)  # the chunk's projections, on the MKL route
    xw_rows: List[Tensor] = []  # (B, 4H) per step of the chunk, in time order from step `first`
    first = 0
    gates = x.new_empty(batch, 4 * hidden)  # pre-activations, then activations in place
    i, f, g, o = gates.chunk(4, 1)  # (B, H) views
    output = x.new_empty(steps, batch, h.size(1))  # (T, B, H_out)
    s_c = x.new_empty(batch, hidden)  # sigmoid(-2c)
    h_full = x.new_empty(batch, hidden)  # o * tanh(c), when projected
    c_prev = c * -2.0  # the loop carries -2c (see `_step`)
    c_next = torch.empty_like(c_prev)
    w_hh_t, w_hr_t = weights.w_hh_t, weights.w_hr_t
    out_rows = list(output.unbind(0))  # (B, H_out) views, indexed without an op per step
    cell_rows: List[Tensor] = [] if cells is None else list(cells.unbind(0))
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        if s % chunk == 0:
            n = min(chunk, steps - s)
            first = steps - s - n if reverse else s
            xw = _project(x.narrow(0, first, n), weights, packed_ih, buffer)  # (n, B, 4H)
            xw_rows = list(xw.unbind(0))
        if packed_hh is None:
            torch.addmm(xw_rows[t - first], h, w_hh_t, out=gates)  # (B, 4H)
        else:
            torch.add(xw_rows[t - first], onednn_linear(h, packed_hh, None), out=gates)
        if not weights.g_doubled:
            g.add_(g)  # 2g, exactly; cheaper than mul_(2.0), whose scalar becomes a tensor
        if cells is not None:
            c_next = cell_rows[t]
        row = out_rows[t]
        h_next = row if w_hr_t is None else h_full
        _step(gates, i, f, g, o, c_prev, c_next, s_c, h_next)
        if w_hr_t is not None:
            torch.mm(h_full, w_hr_t, out=row)  # (B, proj_size)
        h = row
        c_prev, c_next = c_next, c_prev
    if cells is not None:
        cells.mul_(-0.5)
    return output, h, c_prev * -0.5


def _loop_mkl(
    x: Tensor, h: Tensor, c: Tensor, weights: Ready, reverse: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """`_loop` for model.pt's common case: MKL's route, ready weights, no lengths, no projection.

    The same step without the branches of the other cases: TorchScript's interpreter runs each
    one, and they cost 5-10% of a step at batch 1-16 (measured).
    """
    steps, batch, hidden = x.size(0), x.size(1), c.size(1)
    chunk = _chunk_steps(x, hidden)
    buffer = x.new_empty(chunk, batch, 4 * hidden)
    xw_rows: List[Tensor] = []
    first = 0
    gates = x.new_empty(batch, 4 * hidden)
    i, f, g, o = gates.chunk(4, 1)
    output = x.new_empty(steps, batch, hidden)
    s_c = x.new_empty(batch, hidden)
    c_prev = c * -2.0
    c_next = torch.empty_like(c_prev)
    w_hh_t = weights.w_hh_t
    out_rows = list(output.unbind(0))
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        if s % chunk == 0:
            n = min(chunk, steps - s)
            first = steps - s - n if reverse else s
            xw_rows = list(_project(x.narrow(0, first, n), weights, None, buffer).unbind(0))
        row = out_rows[t]
        torch.addmm(xw_rows[t - first], h, w_hh_t, out=gates)  # (B, 4H)
        _step(gates, i, f, g, o, c_prev, c_next, s_c, row)
        h = row
        c_prev, c_next = c_next, c_prev
    return output, h, c_prev * -0.5


def _chunk_steps(x: Tensor, hidden: int) -> int:
    """How many steps of x (T, B, I) the input projection does at once: 2**17 floats on a CPU.

    The loop then reads the chunk while it is still in cache: 2-3x faster at batch 64 than one
    GEMM that writes all T * B * 4H floats to memory, freshly allocated (page faults) every call.
    On a GPU, all steps at once: its caching allocator has no page faults, and a chunk is a launch.
    """
    steps, batch = x.size(0), x.size(1)
    if x.device.type != "cpu":
        return steps
    return max(1, min(steps, 131072 // max(1, batch * 4 * hidden)))


def _project(x: Tensor, weights: Ready, packed_ih: Optional[Tensor], buffer: Tensor) -> Tensor:
    """W_ih x_t + b for the n steps of x (n, B, I) in one GEMM: (n, B, 4H), in `buffer` on MKL."""
    n, batch = x.size(0), x.size(1)
    x2d = x.view(n * batch, x.size(2))
    if packed_ih is not None:
        xw = onednn_linear(x2d, packed_ih, weights.bias)
    else:
        xw = buffer.narrow(0, 0, n).view(n * batch, buffer.size(2))
        bias = weights.bias
        if bias is None:
            torch.mm(x2d, weights.w_ih_t, out=xw)
        else:
            torch.addmm(bias, x2d, weights.w_ih_t, out=xw)
    return xw.view(n, batch, xw.size(1))


def _step(
    gates: Tensor,
    i: Tensor,
    f: Tensor,
    s_g: Tensor,
    o: Tensor,
    c2: Tensor,
    c2_next: Tensor,
    s_c: Tensor,
    h_next: Tensor,
) -> None:
    """`_cell`'s pointwise part in place, in sigmoids: gates (B, 4H) -> c2_next and h_next.

    i, f, s_g, o are the views of the gates' blocks. The cell state is carried as c2 = -2c, the g
    block of `gates` holds 2g. With tanh(x) = 2 sigmoid(2x) - 1 = 1 - 2 sigmoid(-2x):
        -2c' = f (-2c) - 2i tanh(g) = f c2 + 2i - 4i sigmoid(2g)
        h'   = o tanh(c') = o - 2o sigmoid(c2')
    Six kernels, none of them tanh, and no scalar-operand op (each costs as much as a kernel).
    """
    gates.sigmoid_()  # i, f, sigmoid(2g), o
    torch.mul(f, c2, out=c2_next)
    c2_next.add_(i, alpha=2.0).addcmul_(i, s_g, value=-4.0)
    torch.sigmoid(c2_next, out=s_c)
    torch.addcmul(o, o, s_c, value=-2.0, out=h_next)


def needs_grad(tensors: List[Optional[Tensor]]) -> bool:
    """Whether autograd must see the layer: grad mode is on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # noqa: SIM110  (TorchScript has no generator expressions for any())
        if t is not None and t.requires_grad:
            return True
    return False


def input_projection(x: Tensor, weight_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """W_ih x_t + b for every step at once: one GEMM over all T * B rows, not one per step.

    On a 2-D view of x (a copy of a batch-first input): F.linear on a strided 3-D input runs T
    batched GEMMs and a separate bias add. F.linear, not addmm: TorchScript rewrites addmm into
    mm + a broadcast add, 2-3x slower here.
    """
    x2d = x.reshape(-1, x.size(2))  # (T * B, I)
    xw = F.linear(x2d, weight_ih, bias)  # (T * B, 4H)
    return xw.view(x.size(0), x.size(1), xw.size(1))


def reversed_within(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) step index that reverses each sequence's first `length` steps, padding in place.

    Its own inverse: gathering with it twice gives the original order back.
    """
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    flipped = lengths.unsqueeze(0) - 1 - t  # (T, B)
    return torch.where(t < lengths.unsqueeze(0), flipped, t)
