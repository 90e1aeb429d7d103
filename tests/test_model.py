"""lstm_deploy.LSTM against torch.nn.LSTM with the same weights (state_dict both ways)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CONFIGS, config_id
from torch import nn

from lstm_deploy import LSTM

INPUT, HIDDEN = 5, 7
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_pair(config: dict, dtype: torch.dtype) -> tuple[LSTM, nn.LSTM]:
    ref = nn.LSTM(INPUT, HIDDEN, **config, dtype=dtype)
    model = LSTM(INPUT, HIDDEN, **config, dtype=dtype)
    model.load_state_dict(ref.state_dict())  # nn.LSTM -> scratch
    return model.eval(), ref.eval()


def make_input(config: dict, steps: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
    shape = (batch, steps, INPUT) if config["batch_first"] else (steps, batch, INPUT)
    return torch.randn(shape, dtype=dtype)


def make_hx(
    config: dict, batch: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    d = 2 if config["bidirectional"] else 1
    h_out = config["proj_size"] or HIDDEN
    lead = (config["num_layers"] * d,) + ((batch,) if batch is not None else ())
    return torch.randn(*lead, h_out, dtype=dtype), torch.randn(*lead, HIDDEN, dtype=dtype)


def assert_close(actual, expected, tol: float) -> None:
    (out, (h, c)), (rout, (rh, rc)) = actual, expected
    for name, a, e in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
        err = (a - e).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("steps", "with_hx"), [(1, False), (201, True)], ids=["T1", "T201-hx"])
def test_matches_torch_lstm(config: dict, dtype: torch.dtype, steps: int, with_hx: bool) -> None:
    model, ref = make_pair(config, dtype)
    x = make_input(config, steps, batch=3, dtype=dtype)
    hx = make_hx(config, 3, dtype) if with_hx else None
    with torch.no_grad():
        assert_close(model(x, hx), ref(x, hx), TOL[dtype])


@pytest.mark.parametrize("config", MODEL_CONFIGS[::3], ids=config_id)
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(config: dict, with_hx: bool) -> None:
    model, ref = make_pair(config, torch.float64)
    x = torch.randn(6, INPUT, dtype=torch.float64)
    hx = make_hx(config, None, torch.float64) if with_hx else None
    with torch.no_grad():
        assert_close(model(x, hx), ref(x, hx), TOL[torch.float64])


@pytest.mark.parametrize("config", MODEL_CONFIGS[::4], ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_wide_batches_match_torch_lstm(config: dict, dtype: torch.dtype) -> None:
    # batch * hidden >= 2048 takes the wide step (tanh through sigmoid, doubled cell state)
    ref = nn.LSTM(INPUT, 64, **config, dtype=dtype)
    model = LSTM(INPUT, 64, **config, dtype=dtype)
    model.load_state_dict(ref.state_dict())
    shape = (40, 9, INPUT) if config["batch_first"] else (9, 40, INPUT)
    x = torch.randn(shape, dtype=dtype)
    lengths = torch.randint(1, 10, (40,))
    with torch.no_grad():
        assert_close(model(x), ref(x), TOL[dtype])
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=config["batch_first"], enforce_sorted=False
        )
        rpacked, (rh, rc) = ref(packed)
        rout, _ = nn.utils.rnn.pad_packed_sequence(
            rpacked, batch_first=config["batch_first"], total_length=9
        )
        assert_close(model(x, None, lengths), (rout, (rh, rc)), TOL[dtype])


def test_state_dict_round_trip_both_ways() -> None:
    model = LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=3)
    ref = nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=3)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]
    ref.load_state_dict(model.state_dict())  # scratch -> nn.LSTM
    x = torch.randn(4, 2, INPUT)
    with torch.no_grad():
        assert_close(model(x), ref(x), 1e-5)
        assert_close(LSTM.from_torch(ref)(x), ref(x), 1e-5)
        assert_close(model.to_torch()(x), model(x), 1e-5)


def test_load_state_dict_assign_keeps_forward_in_step() -> None:
    ref = nn.LSTM(INPUT, HIDDEN)
    model = LSTM(INPUT, HIDDEN)
    model.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(3, 2, INPUT)
    with torch.no_grad():
        assert_close(model(x), ref(x), 1e-5)


def test_dtype_conversion_keeps_forward_in_step() -> None:
    model, ref = make_pair(
        dict(num_layers=2, bidirectional=True, proj_size=0, bias=True, batch_first=False),
        torch.float32,
    )
    model.double()
    ref.double()
    x = torch.randn(9, 2, INPUT, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), ref(x), TOL[torch.float64])


def test_dropout_between_layers_in_training_only() -> None:
    model = LSTM(INPUT, HIDDEN, num_layers=2, dropout=0.5)
    x = torch.randn(4, 3, INPUT)
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.equal(a, b), "training mode with dropout=0.5 should be stochastic"
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    ref = nn.LSTM(INPUT, HIDDEN, num_layers=2, dropout=0.5).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(model(x), ref(x), 1e-5)


def test_gradients_match_torch_lstm() -> None:
    model, ref = make_pair(
        dict(num_layers=2, bidirectional=True, proj_size=0, bias=True, batch_first=True),
        torch.float64,
    )
    x = torch.randn(2, 6, INPUT, dtype=torch.float64)
    model(x)[0].sum().backward()
    ref(x)[0].sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None
        assert (p.grad - q.grad).abs().max().item() <= 1e-10, name


def test_repr_shows_non_defaults_only() -> None:
    assert repr(LSTM(4, 8)) == "LSTM(4, 8)"
    assert (
        repr(LSTM(4, 8, num_layers=2, batch_first=True))
        == "LSTM(4, 8, num_layers=2, batch_first=True)"
    )
