"""Bad configurations raise as torch.nn.LSTM does; bad inputs name the expected and actual value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lstm_deploy import LSTM


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden_size=0), "hidden_size must be greater than zero"),
        (dict(hidden_size=-3), "hidden_size must be greater than zero"),
        (dict(proj_size=8), "proj_size has to be smaller than hidden_size"),
        (dict(proj_size=-1), "proj_size should be a positive integer or zero"),
        (dict(dropout=1.5), r"dropout should be a number in range \[0, 1\]"),
        (dict(dropout=-0.1), r"dropout should be a number in range \[0, 1\]"),
        (dict(num_layers=0), "num_layers must be"),
    ],
)
def test_bad_configuration_raises_value_error_like_torch(kwargs: dict, match: str) -> None:
    args = dict(input_size=4, hidden_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        LSTM(**args)
    with pytest.raises(ValueError):  # torch.nn.LSTM rejects the same configuration
        nn.LSTM(**args)


M = LSTM(4, 8, num_layers=2, bidirectional=True)  # state: (4, B, 8)
X = torch.randn(5, 3, 4)
H, C = torch.zeros(4, 3, 8), torch.zeros(4, 3, 8)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: M(torch.randn(5, 3, 6)), RuntimeError, "Expected 4, got 6"),
        (lambda: M(torch.randn(2, 5, 3, 4)), ValueError, "got 4-D"),
        (lambda: M(torch.ones(5, 3, 4, dtype=torch.int64)), TypeError, "floating-point input"),
        (lambda: M(X.double()), TypeError, "does not match the parameters' dtype"),
        (lambda: M(X, (torch.zeros(2, 3, 8), C)), RuntimeError, r"h_0 of shape \[4, 3, 8\], got \[2, 3, 8\]"),
        (lambda: M(X, (H, torch.zeros(4, 2, 8))), RuntimeError, r"c_0 of shape \[4, 3, 8\], got \[4, 2, 8\]"),
        (lambda: M(X, (H.double(), C)), TypeError, "h_0 of dtype torch.float32"),
        (lambda: M(X[:, 0], (H, C)), RuntimeError, "hx and cx should also be 2-D"),
        (lambda: M(X, None, torch.tensor([5, 0, 2])), ValueError, r"\[1, 5\].*from 0 to 5"),
        (lambda: M(X, None, torch.tensor([5, 6, 2])), ValueError, r"\[1, 5\].*from 2 to 6"),
        (lambda: M(X, None, torch.tensor([5, 5])), RuntimeError, r"lengths of shape \[3\]"),
        (lambda: M(X, None, torch.tensor([5.0, 5.0, 5.0])), TypeError, "lengths of dtype torch.int64"),
    ],
    ids=[
        "feature-size", "rank", "integer-input", "dtype-mismatch", "h0-shape", "c0-batch",
        "h0-dtype", "unbatched-3d-state", "length-zero", "length-past-T", "lengths-shape",
        "lengths-dtype",
    ],
)  # fmt: skip
def test_bad_input_names_expected_and_actual(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_device_mismatch_is_named() -> None:
    model = LSTM(4, 8, device="meta")
    with pytest.raises(RuntimeError, match="input is on cpu but the parameters are on meta"):
        model(torch.randn(2, 1, 4))
