"""Variable lengths against torch.nn.LSTM run on pack_padded_sequence."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_deploy import LSTM

INPUT, HIDDEN = 4, 6


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
    ref = nn.LSTM(
        INPUT, HIDDEN, num_layers, batch_first=batch_first, bidirectional=bidirectional,
        proj_size=proj_size, dtype=torch.float64,
    )  # fmt: skip
    model = LSTM.from_torch(ref)
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
