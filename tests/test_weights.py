"""Weights I/O: safetensors with the config inside, nn.LSTM checkpoints, never a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lstm_deploy import (
    LSTM,
    WeightsError,
    config_from_state_dict,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)


def test_safetensors_round_trip_keeps_config_and_outputs(tmp_path: Path) -> None:
    model = LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True).eval()
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["lstm_deploy.config"]) == model.config.to_dict()
    loaded = load_safetensors(path).eval()
    assert loaded.config == model.config
    x = torch.randn(2, 5, 4)
    assert torch.equal(loaded(x)[0], model(x)[0])


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(num_layers=3, bidirectional=True),
        dict(num_layers=2, proj_size=2, bias=False),
    ],
)
def test_checkpoint_config_inferred_from_shapes(config: dict, tmp_path: Path) -> None:
    ref = nn.LSTM(3, 5, batch_first=True, **config)
    path = tmp_path / "ckpt.pt"
    torch.save(ref.state_dict(), path)
    model = load_checkpoint(path, batch_first=True)
    assert model.config.to_dict() == {**dict(input_size=3, hidden_size=5, num_layers=1, bias=True,
        batch_first=True, dropout=0.0, bidirectional=False, proj_size=0), **config}  # fmt: skip
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        assert (model(x)[0] - ref(x)[0]).abs().max() <= 1e-6


def test_checkpoint_wrapped_in_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": nn.LSTM(3, 5).state_dict(), "epoch": 3}, path)
    assert load_checkpoint(path).config.hidden_size == 5


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight_ih_l0": Evil()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"conv.weight": torch.zeros(3)}, "not an LSTM state_dict"),
        ({}, "non-empty"),
        (
            {"weight_ih_l0": torch.zeros(5, 3), "weight_hh_l0": torch.zeros(5, 1)},
            r"4 \* hidden_size",
        ),
    ],
)
def test_not_an_lstm_state_dict(state: dict, match: str) -> None:
    with pytest.raises(WeightsError, match=match):
        config_from_state_dict(state)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        load_safetensors(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_safetensors(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(nn.LSTM(2, 3).state_dict(), str(plain))
    with pytest.raises(WeightsError, match=r"no 'lstm_deploy\.config'"):
        load_safetensors(plain)
