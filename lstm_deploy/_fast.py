"""The fast path of the time loop: the cell written into buffers made once, for no-grad runs.

`lstm_deploy.model._recurrence` is the readable, differentiable loop; when nothing needs a gradient
(inference, export, the scripted model.pt) `lstm_layer` takes `recurrence_no_grad` instead: the
same equations, with `out=` and in-place ops, so that a step allocates nothing and runs the fewest
kernels (per-op overhead is most of a step at batch 1; see README "Performance").
"""

from typing import Optional, Tuple  # TorchScript resolves typing's generics

import torch
from torch import Tensor


def recurrence_no_grad(
    xw: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh_t: Tensor,
    w_hr_t: Optional[Tensor],
    reverse: bool,
    cells: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """`_recurrence` for when nothing needs a gradient: the same cell with `out=` and in-place ops.

    Every step writes into buffers made once (gates and their four block views, tanh(g), tanh(c),
    two cell states) and h straight into its row of `output`, which is the next step's h: 9 ops
    per step instead of 13 and no allocation (per-op overhead is most of a step at batch 1).
    Wide steps (see `_is_wide`) take `_step_wide`.
    """
    steps, batch, hidden = xw.size(0), xw.size(1), c.size(1)
    output = xw.new_empty(steps, batch, h.size(1))  # (T, B, H_out)
    gates = xw.new_empty(batch, 4 * hidden)  # pre-activations, then activations in place
    i, f, g, o = gates.chunk(4, 1)  # (B, H) views
    blocks = (i, f, g, o)
    g_act = xw.new_empty(batch, hidden)  # tanh(g)
    tanh_c = xw.new_empty(batch, hidden)
    h_full = xw.new_empty(batch, hidden)  # o * tanh(c), when projected
    wide = _is_wide(c)
    c_prev = c * 2.0 if wide else c.clone()  # the wide step carries 2c (see `_step_wide`)
    c_next = torch.empty_like(c_prev)
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        if cells is not None:
            c_next = cells[t]
        row = output[t]
        h_next = row if w_hr_t is None else h_full
        torch.addmm(xw[t], h, w_hh_t, out=gates)  # (B, 4H)
        if wide:
            _step_wide(gates, blocks, c_prev, c_next, tanh_c, h_next)
        else:
            _step(gates, blocks, c_prev, c_next, g_act, tanh_c, h_next)
        if w_hr_t is not None:
            torch.mm(h_full, w_hr_t, out=row)  # (B, proj_size)
        h = row
        c_prev, c_next = c_next, c_prev
    if wide:
        c_prev = c_prev * 0.5
        if cells is not None:
            cells.mul_(0.5)
    return output, h, c_prev


def _step(
    gates: Tensor,
    blocks: Tuple[Tensor, Tensor, Tensor, Tensor],
    c: Tensor,
    c_next: Tensor,
    g_act: Tensor,
    tanh_c: Tensor,
    h_next: Tensor,
) -> None:
    """`_cell`'s pointwise part in place: gates (B, 4H) -> c_next and h_next = o * tanh(c_next)."""
    i, f, g, o = blocks  # views of gates
    torch.tanh(g, out=g_act)  # before sigmoid_ overwrites g
    gates.sigmoid_()  # i, f, o (and g's quarter, unused: one kernel instead of three)
    torch.mul(f, c, out=c_next)
    c_next.addcmul_(i, g_act)  # f * c + i * g
    torch.tanh(c_next, out=tanh_c)
    torch.mul(o, tanh_c, out=h_next)  # o * tanh(c)


def _step_wide(
    gates: Tensor,
    blocks: Tuple[Tensor, Tensor, Tensor, Tensor],
    c2: Tensor,
    c2_next: Tensor,
    s_c: Tensor,
    h_next: Tensor,
) -> None:
    """`_step` with tanh(x) = 2 sigmoid(2x) - 1, which is cheaper than tanh (see `_is_wide`).

    The cell state is carried doubled, c2 = 2c (exact in binary floating point), so that
    tanh(c) = 2 sigmoid(c2) - 1 needs no scaling: 2c' = f * 2c - 2i + 4i * sigmoid(2g).
    """
    i, f, s_g, o = blocks  # views of gates
    s_g.mul_(2.0)
    gates.sigmoid_()  # i, f, sigmoid(2g), o
    torch.mul(f, c2, out=c2_next)
    c2_next.sub_(i, alpha=2.0).addcmul_(i, s_g, value=4.0)  # f 2c + 2i (2 sigmoid(2g) - 1)
    torch.sigmoid(c2_next, out=s_c)
    torch.mul(o, s_c.mul_(2.0).sub_(1.0), out=h_next)  # o * tanh(c)


def _is_wide(c: Tensor) -> bool:
    """Whether a step is wide enough (batch * hidden_size elements) for `_step_wide`.

    torch.tanh on the CPU runs MKL VML's high-accuracy vsTanh, about 5x a sigmoid per element
    (measured; the profile shows mkl_vml_kernel_sTanh_EXHA), so from this size the wide step's
    three extra cheap ops cost less than two tanh kernels (6-7% faster a step at batch 16-64);
    below it, per-op overhead dominates and the fewest ops win.
    """
    return c.size(0) * c.size(1) >= 2048
