"""TorchScript: every configuration scripts, matches eager, and survives save/load at new sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MODEL_CONFIGS, config_id
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from lstm_deploy import LSTM

INPUT, HIDDEN = 5, 7


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=config_id)
def test_script_save_load_run_at_new_sizes(config: dict, tmp_path: Path) -> None:
    model = LSTM(INPUT, HIDDEN, **config).eval()
    scripted = torch.jit.script(model)
    path = tmp_path / "lstm.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    d = 2 if config["bidirectional"] else 1
    h_out = config["proj_size"] or HIDDEN
    # Sizes the scripted module never saw: batch 1 and 6, T 1 and 37, lengths, hx, unbatched.
    for batch, steps in ((1, 1), (6, 37)):
        shape = (batch, steps, INPUT) if config["batch_first"] else (steps, batch, INPUT)
        x = torch.randn(shape)
        hx = (
            torch.randn(config["num_layers"] * d, batch, h_out),
            torch.randn(config["num_layers"] * d, batch, HIDDEN),
        )
        lengths = torch.randint(1, steps + 1, (batch,))
        for args in ((x, None, None), (x, hx, lengths)):
            expected = model(*args)
            for module in (scripted, loaded):
                out, (h, c) = module(*args)
                assert (out - expected[0]).abs().max().item() <= 1e-6
                assert (h - expected[1][0]).abs().max().item() <= 1e-6
                assert (c - expected[1][1]).abs().max().item() <= 1e-6
    x = torch.randn(4, INPUT)
    assert (loaded(x)[0] - model(x)[0]).abs().max().item() <= 1e-6


def test_scripted_module_raises_clear_errors() -> None:
    scripted = torch.jit.script(LSTM(INPUT, HIDDEN))
    with pytest.raises(torch.jit.Error, match="Expected 5, got 3"):
        scripted(torch.randn(2, 2, 3))
    with pytest.raises(torch.jit.Error, match=r"every length must be in \[1, 2\]"):
        scripted(torch.randn(2, 1, INPUT), None, torch.tensor([3]))


def test_scripted_errors_name_dtypes_as_eager_does() -> None:
    # TorchScript formats a dtype as a number ("6"); the messages must still say torch.float32.
    model = LSTM(INPUT, HIDDEN)
    scripted = torch.jit.script(model)
    calls = [
        lambda m: m(torch.randn(2, 1, INPUT, dtype=torch.float64)),
        lambda m: m(torch.randn(2, 1, INPUT), (torch.zeros(1, 1, HIDDEN).half(), torch.zeros(1, 1, HIDDEN))),
        lambda m: m(torch.randn(2, 1, INPUT), None, torch.ones(1, dtype=torch.bool)),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises((ValueError, RuntimeError)) as eager:
            call(model)
        assert "torch.float" in str(eager.value) or "torch.bool" in str(eager.value)
        with pytest.raises(torch.jit.Error) as script:
            call(scripted)
        assert str(eager.value) in str(script.value)


def test_packed_sequence_is_eager_only() -> None:
    # The scripted forward keeps one signature, input: Tensor, with lengths= for padding.
    model = LSTM(INPUT, HIDDEN)
    scripted = torch.jit.script(model)
    packed = pack_sequence([torch.randn(3, INPUT), torch.randn(2, INPUT)])
    assert isinstance(model(packed)[0], PackedSequence)
    assert "PackedSequence" not in scripted.code
    with pytest.raises(RuntimeError, match="type 'Tensor' for argument 'input'"):
        scripted(packed)
