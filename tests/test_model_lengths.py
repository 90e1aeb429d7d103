"""Variable lengths against torch.nn.LSTM run on pack_padded_sequence; PackedSequence input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import (
    PackedSequence,
    pack_padded_sequence,
    pack_sequence,
    pad_packed_sequence,
)

from lstm_deploy import LSTM

INPUT, HIDDEN = 4, 6


def _pair(
    num_layers: int, bidirectional: bool, batch_first: bool, proj_size: int
) -> tuple[nn.LSTM, LSTM]:
    """A float64 torch.nn.LSTM and ours with its weights."""
    ref = nn.LSTM(
        INPUT, HIDDEN, num_layers, batch_first=batch_first, bidirectional=bidirectional,
        proj_size=proj_size, dtype=torch.float64,
    )  # fmt: skip
    return ref, LSTM.from_torch(ref)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize(
    "lengths",
    [[9, 9, 9], [9, 1, 4], [1, 1, 1], [3, 9, 1, 6, 2]],
    ids=["all-full", "mixed", "all-one", "unsorted"],
)
def test_matches_packed_torch_lstm(
    num_layers: int, bidirectional: bool, batch_first: bool, proj_size: int, lengths: list[int]
) -> None:
    ref, model = _pair(num_layers, bidirectional, batch_first, proj_size)
    steps, batch = 9, len(lengths)
    x = torch.randn(
        (batch, steps, INPUT) if batch_first else (steps, batch, INPUT), dtype=torch.float64
    )
    d = 2 if bidirectional else 1
    hx = (
        torch.randn(num_layers * d, batch, proj_size or HIDDEN, dtype=torch.float64),
        torch.randn(num_layers * d, batch, HIDDEN, dtype=torch.float64),
    )
    lens = torch.tensor(lengths)
    with torch.no_grad():
        out, (h, c) = model(x, hx, lens)
        packed = pack_padded_sequence(x, lens, batch_first=batch_first, enforce_sorted=False)
        rpacked, (rh, rc) = ref(packed, hx)
        rout, _ = pad_packed_sequence(rpacked, batch_first=batch_first, total_length=steps)
    for name, a, e in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        err = (a - e).abs().max().item()
        assert err <= 1e-10, f"{name}: max abs error {err:.3g}"


def test_padding_does_not_leak() -> None:
    # Garbage (even NaN) past a sequence's length must not reach its outputs or final state.
    model = LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(2, 7, INPUT)
    lengths = torch.tensor([7, 3])
    dirty = x.clone()
    dirty[1, 3:] = float("nan")
    with torch.no_grad():
        a, (ha, ca) = model(x, lengths=lengths)
        b, (hb, cb) = model(dirty, lengths=lengths)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)
    assert torch.count_nonzero(a[1, 3:]) == 0


def test_full_lengths_equal_no_lengths() -> None:
    model = LSTM(INPUT, HIDDEN, bidirectional=True).eval()
    x = torch.randn(5, 3, INPUT)
    with torch.no_grad():
        a, (ha, ca) = model(x)
        b, (hb, cb) = model(x, lengths=torch.full((3,), 5, dtype=torch.int64))
    assert torch.allclose(a, b, atol=0, rtol=0) and torch.equal(ha, hb) and torch.equal(ca, cb)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_lengths_as_pack_padded_sequence_takes_them(dtype: torch.dtype) -> None:
    model = LSTM(INPUT, HIDDEN, bidirectional=True).eval()
    x = torch.randn(6, 3, INPUT)
    lengths = torch.tensor([6, 2, 4])
    with torch.no_grad():
        a, (ha, ca) = model(x, lengths=lengths)
        b, (hb, cb) = model(x, lengths=lengths.to(dtype))
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)


PACKINGS = {
    # lengths, enforce_sorted: ties, so that a re-sort could order them unlike the input's packing
    "sorted": ([9, 6, 6, 2], True),
    "unsorted": ([3, 9, 1, 6, 6], False),
}


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize(("lengths", "enforce_sorted"), PACKINGS.values(), ids=PACKINGS.keys())
def test_packed_sequence_matches_torch_lstm(
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    proj_size: int,
    with_hx: bool,
    lengths: list[int],
    enforce_sorted: bool,
) -> None:
    ref, model = _pair(num_layers, bidirectional, batch_first, proj_size)
    batch, steps = len(lengths), max(lengths)
    x = torch.randn(
        (batch, steps, INPUT) if batch_first else (steps, batch, INPUT), dtype=torch.float64
    )
    packed = pack_padded_sequence(
        x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted
    )
    d = 2 if bidirectional else 1
    hx = None
    if with_hx:  # in the caller's batch order, as nn.LSTM takes it
        hx = (
            torch.randn(num_layers * d, batch, proj_size or HIDDEN, dtype=torch.float64),
            torch.randn(num_layers * d, batch, HIDDEN, dtype=torch.float64),
        )
    with torch.no_grad():
        out, (h, c) = model(packed, hx)
        rout, (rh, rc) = ref(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, rout.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, e = getattr(out, name), getattr(rout, name)
        assert (a is None and e is None) or torch.equal(a, e), f"{name}: {a} != {e}"
    for name, a, e in (("output", out.data, rout.data), ("h_n", h, rh), ("c_n", c, rc)):
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
        err = (a - e).abs().max().item()
        assert err <= 1e-10, f"{name}: max abs error {err:.3g}"


def test_packed_sequence_gradients_match_torch_lstm() -> None:
    ref = nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True, dtype=torch.float64)
    model = LSTM.from_torch(ref)
    sequences = [torch.randn(n, INPUT, dtype=torch.float64) for n in (4, 7, 1)]
    grads = []
    for module in (model, ref):
        leaves = [s.clone().requires_grad_() for s in sequences]
        out, (h, c) = module(pack_sequence(leaves, enforce_sorted=False))
        (out.data.sum() + h.sum() + c.sum()).backward()
        grads.append([t.grad for t in leaves] + [p.grad for p in module.parameters()])
    for a, e in zip(*grads, strict=True):
        assert (a - e).abs().max().item() <= 1e-10
