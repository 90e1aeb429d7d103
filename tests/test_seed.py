"""Seed compatibility: the seed's 12 tensors, its equations in numpy, its last-step output, its init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lstm_deploy import LSTM, from_seed_tensors, last_valid_output, seed_init_
from lstm_deploy.seed import SEED_ORDER


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def seed_forward(
    x: np.ndarray, w: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed notebook's equations, batch-first, with its bugs fixed (input gate reads W_hi)."""
    batch, steps, _ = x.shape
    hidden = w["b_i"].shape[0]
    h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
    outputs = []
    for t in range(steps):
        x_t = x[:, t]
        i = sigmoid(x_t @ w["W_xi"] + h @ w["W_hi"] + w["b_i"])
        f = sigmoid(x_t @ w["W_xf"] + h @ w["W_hf"] + w["b_f"])
        c_tilde = np.tanh(x_t @ w["W_xc"] + h @ w["W_hc"] + w["b_c"])
        o = sigmoid(x_t @ w["W_xo"] + h @ w["W_ho"] + w["b_o"])
        c = f * c + i * c_tilde
        h = o * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, 1), h, c


def seed_tensors(input_size: int, hidden: int, rng: np.random.Generator) -> list[np.ndarray]:
    shapes = {"W_x": (input_size, hidden), "W_h": (hidden, hidden)}
    return [rng.standard_normal(shapes.get(name[:3], (hidden,))) * 0.3 for name in SEED_ORDER]


def test_seed_tensors_load_and_match_numpy_equations() -> None:
    rng = np.random.default_rng(0)
    tensors = seed_tensors(3, 5, rng)
    model = from_seed_tensors(tensors)
    assert model.config.num_layers == 1 and model.batch_first
    x = rng.standard_normal((4, 11, 3))
    out, (h, c) = model(torch.from_numpy(x))
    ref_out, ref_h, ref_c = seed_forward(x, dict(zip(SEED_ORDER, tensors)))
    assert np.abs(out.detach().numpy() - ref_out).max() <= 1e-12
    assert np.abs(h[0].detach().numpy() - ref_h).max() <= 1e-12
    assert np.abs(c[0].detach().numpy() - ref_c).max() <= 1e-12


def test_seed_tensor_shapes_are_checked() -> None:
    tensors = seed_tensors(3, 5, np.random.default_rng(0))
    tensors[4] = np.zeros((5, 4))  # W_hi
    with pytest.raises(ValueError, match=r"W_hi: expected shape \[5, 5\], got \[5, 4\]"):
        from_seed_tensors(tensors)
    with pytest.raises(ValueError, match="12 tensors"):
        from_seed_tensors(tensors[:11])


def test_last_valid_output_is_the_output_at_length_minus_one() -> None:
    model = LSTM(3, 4, batch_first=True, bidirectional=True)
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 1, 4])
    out, _ = model(x, lengths=lengths)
    last = last_valid_output(out, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(last[b], out[b, n - 1])
    # forward direction: the last valid output is that direction's h_n
    fwd = LSTM(3, 4, batch_first=True)
    out, (h, _) = fwd(x, lengths=lengths)
    assert torch.equal(last_valid_output(out, lengths), h[0])
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        last_valid_output(out, torch.tensor([7, 1, 1]))


def test_seed_init() -> None:
    torch.manual_seed(0)
    model = seed_init_(LSTM(16, 200, num_layers=2))
    for name, p in model.named_parameters():
        if name.startswith("bias"):
            assert torch.count_nonzero(p) == 0
        else:
            assert abs(p.std().item() - 0.1) < 0.005, name
