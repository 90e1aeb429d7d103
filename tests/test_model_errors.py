"""Bad configurations raise as torch.nn.LSTM does; bad inputs name the expected and actual value.

tests/test_model_module_db.py holds the exception types against nn.LSTM's; here, the messages.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bias=0), "bias should be of type bool, got: int"),
        (dict(batch_first="False"), "batch_first should be of type bool, got: str"),
        (dict(input_size=4.0), "input_size should be of type int, got: float"),
        (dict(num_layers=2.0), "num_layers should be of type int, got: float"),
        (dict(proj_size="2"), "proj_size should be of type int, got: str"),
        (dict(dropout=None), r"dropout should be a number in range \[0, 1\].*got None"),
    ],
)
def test_argument_of_a_wrong_type_raises_type_error_like_torch(kwargs: dict, match: str) -> None:
    args = dict(input_size=4, hidden_size=8) | kwargs
    with pytest.raises(TypeError, match=match):
        LSTM(**args)
    with pytest.raises(TypeError):  # torch.nn.LSTM rejects the same argument
        nn.LSTM(**args)


@pytest.mark.parametrize("kwargs", [dict(input_size=True), dict(num_layers=True)])
def test_a_bool_is_not_a_size(kwargs: dict) -> None:
    # Stricter than torch.nn.LSTM, which takes True as 1 here.
    args = dict(input_size=4, hidden_size=8) | kwargs
    with pytest.raises(TypeError, match="should be of type int, got: bool"):
        LSTM(**args)


M = LSTM(4, 8, num_layers=2, bidirectional=True)  # state: (4, B, 8)
X = torch.randn(5, 3, 4)
H, C = torch.zeros(4, 3, 8), torch.zeros(4, 3, 8)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: M(torch.randn(5, 3, 6)), RuntimeError, "Expected 4, got 6"),
        (lambda: M(torch.randn(2, 5, 3, 4)), ValueError, "got 4-D"),
        (lambda: M(torch.ones(5, 3, 4, dtype=torch.int64)), ValueError, r"input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)"),
        (lambda: M(X.double()), ValueError, r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
        (lambda: M(X, (torch.zeros(2, 3, 8), C)), RuntimeError, r"h_0 of shape \[4, 3, 8\], got \[2, 3, 8\]"),
        (lambda: M(X, (H, torch.zeros(4, 2, 8))), RuntimeError, r"c_0 of shape \[4, 3, 8\], got \[4, 2, 8\]"),
        (lambda: M(X, (H.double(), C)), RuntimeError, "h_0 of dtype torch.float32, got torch.float64"),
        (lambda: M(X[:, 0], (H, C)), RuntimeError, "hx and cx should also be 2-D"),
        (lambda: M(X, None, torch.tensor([5, 0, 2])), RuntimeError, r"\[1, 5\].*from 0 to 5"),
        (lambda: M(X, None, torch.tensor([5, 6, 2])), RuntimeError, r"\[1, 5\].*from 2 to 6"),
        (lambda: M(X, None, torch.tensor([5, 5])), RuntimeError, r"lengths of shape \[3\]"),
        (lambda: M(X, None, torch.tensor([5.0, 5.0, 5.0])), RuntimeError, r"lengths of an integer dtype \(torch.int64\), got torch.float32"),
        (lambda: M(X, None, torch.ones(3, dtype=torch.bool)), RuntimeError, r"lengths of an integer dtype \(torch.int64\), got torch.bool"),
        (lambda: M(X, None, torch.full((1, 3), 5)), RuntimeError, r"lengths of shape \[3\] \(one per sequence\), got \[1, 3\]"),
        (lambda: M(X[:0]), RuntimeError, "expected sequence length to be larger than 0, got 0"),
        (lambda: M(X, (H[:, 0], C[:, 0])), RuntimeError, r"hx and cx should also be 3-D but got \(2-D, 2-D\)"),
        (lambda: M(pack_sequence([X[:, 0]]), None, torch.tensor([5])), ValueError, r"carries its own lengths; expected lengths=None, got a tensor of shape \[1\]"),
    ],
    ids=[
        "feature-size", "rank", "integer-input", "dtype-mismatch", "h0-shape", "c0-batch",
        "h0-dtype", "unbatched-3d-state", "length-zero", "length-past-T", "lengths-shape",
        "lengths-dtype", "lengths-bool", "lengths-2d", "empty-sequence", "batched-2d-state",
        "packed-with-lengths",
    ],
)  # fmt: skip
def test_bad_input_names_expected_and_actual(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_device_mismatch_is_named() -> None:
    model = LSTM(4, 8, device="meta")
    with pytest.raises(RuntimeError, match="input is on cpu but the parameters are on meta"):
        model(torch.randn(2, 1, 4))
