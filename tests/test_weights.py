"""Weights I/O: safetensors with the config inside, nn.LSTM checkpoints, never a pickle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lstm_deploy import (
    LSTM,
    WeightsError,
    config_from_state_dict,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)
from lstm_deploy.weights import check_finite


class TinyNet(nn.Module):
    """A whole model around an LSTM: its state_dict has "lstm."-prefixed keys."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 3)
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def write_onnx(path: Path) -> Path:
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def write_torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(TinyNet()), str(path))
    return path


def write_torch_export(path: Path) -> Path:
    torch.export.save(torch.export.export(TinyNet(), (torch.zeros(1, 3),)), str(path))
    return path


def write_safetensors(path: Path) -> Path:
    save_file(nn.LSTM(2, 3).state_dict(), str(path))
    return path


def write_lstm_deploy_safetensors(path: Path) -> Path:
    save_safetensors(LSTM(2, 3), path)
    return path


def non_finite_state_dict() -> dict[str, torch.Tensor]:
    state = nn.LSTM(2, 3).state_dict()
    state["weight_hh_l0"][0, :2] = float("nan")
    state["weight_hh_l0"][1, 0] = float("inf")
    state["bias_ih_l0"][0] = float("nan")  # a later parameter: only the first one is named
    return state


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-100])
    return path


def matches(*words: str) -> str:
    """A pattern for a message that holds `words` in this order."""
    return ".*".join(map(re.escape, words))


# Files that --checkpoint (load_checkpoint) refuses: the file, and the words that must name the
# problem and the fix, in order. tests/test_export_cli_errors.py runs each through the CLI.
BAD_CHECKPOINTS = [
    pytest.param(lambda d: write_onnx(d / "model.onnx"), ("an ONNX model, not a checkpoint", "model.onnx is already exported"), id="onnx"),
    pytest.param(lambda d: write_onnx(d / "lstm.pt"), ("an ONNX model",), id="onnx-named-pt"),
    pytest.param(lambda d: write_torchscript(d / "model.pt"), ("a TorchScript archive", "torch.save(model.state_dict(), path)"), id="torchscript"),
    pytest.param(lambda d: write_torch_export(d / "model.pt2"), ("a torch.export archive", "torch.save(model.state_dict(), path)"), id="torch-export"),
    pytest.param(lambda d: write_safetensors(d / "w.safetensors"), ("a safetensors file, not a PyTorch checkpoint", "--weights", "torch.save the state_dict"), id="safetensors"),
    pytest.param(lambda d: write_safetensors(d / "w.pt"), ("a safetensors file",), id="safetensors-named-pt"),
    pytest.param(lambda d: write_lstm_deploy_safetensors(d / "w.safetensors"), ("written by lstm-deploy", "pass it with --weights"), id="lstm-deploy-safetensors"),
    pytest.param(lambda d: save(nn.Linear(2, 2), d / "linear.pt"), ("a pickled module (torch.nn.modules.linear.Linear), not a state_dict", "torch.save(model.state_dict(), path)"), id="pickled-module"),
    pytest.param(lambda d: save({"step": torch.ones(1), "model": TinyNet()}, d / "ckpt.pt"), ("a pickled module (", "TinyNet)", "torch.save(model.state_dict(), path)"), id="pickled-module-in-dict"),
    pytest.param(lambda d: (torch.save(nn.LSTM(2, 3), d / "old.pt", _use_new_zipfile_serialization=False), d / "old.pt")[1], ("a pickled module (torch.nn.modules.rnn.LSTM)",), id="pickled-module-legacy-format"),
    pytest.param(lambda d: save({"weight_ih_l0": torch.zeros(2).numpy()}, d / "np.pt"), ("holds Python objects (numpy.", "save tensors only"), id="pickled-numpy"),
    pytest.param(lambda d: save(nn.GRU(8, 32).state_dict(), d / "gru.pt"), ("this is a GRU state_dict, not an LSTM", "[96, 8]", "3 gate blocks"), id="gru"),
    pytest.param(lambda d: save(nn.GRU(3, 4, num_layers=2, bidirectional=True).state_dict(), d / "gru.pt"), ("this is a GRU state_dict",), id="gru-bidirectional"),
    pytest.param(lambda d: save(nn.RNN(8, 32).state_dict(), d / "rnn.pt"), ("this is a vanilla RNN (torch.nn.RNN) state_dict, not an LSTM",), id="rnn"),
    pytest.param(lambda d: save({"model": nn.LSTM(2, 3).state_dict()}, d / "ckpt.pt"), ("nested under the key 'model'", "torch.save(checkpoint['model'], path)"), id="nested-model"),
    pytest.param(lambda d: save({"epoch": 3, "model_state_dict": nn.LSTM(2, 3).state_dict(), "optimizer_state_dict": torch.optim.SGD(nn.LSTM(2, 3).parameters(), lr=0.1).state_dict()}, d / "ckpt.pt"), ("nested under the key 'model_state_dict'", "'epoch', 'optimizer_state_dict'", "torch.save(checkpoint['model_state_dict'], path)"), id="nested-training-checkpoint"),
    pytest.param(lambda d: save({"state_dict": TinyNet().state_dict(), "epoch": 3}, d / "ckpt.pt"), ("under the key 'state_dict'", "the prefix 'lstm.'", "torch.save(model.lstm.state_dict(), path)"), id="nested-whole-model"),
    pytest.param(lambda d: save(TinyNet().state_dict(), d / "ckpt.pt"), ("a whole model's state_dict", "the prefix 'lstm.'", "torch.save(model.lstm.state_dict(), path)"), id="whole-model-state-dict"),
    pytest.param(lambda d: save(non_finite_state_dict(), d / "nan.pt"), ("weight_hh_l0 has 2 NaN and 1 Inf (of 36 values)", "before training diverged"), id="nan-inf"),
    pytest.param(lambda d: write_text(d / "empty.pt", ""), ("an empty file, not a checkpoint",), id="empty"),
    pytest.param(lambda d: truncated(save(nn.LSTM(2, 3).state_dict(), d / "cut.pt")), ("not a checkpoint that torch.load can read (", "torch.save(lstm.state_dict(), path)"), id="truncated"),
    pytest.param(lambda d: write_text(d / "notes.pt", "hello\n"), ("neither torch.save's zip format nor a pickle",), id="text"),
]  # fmt: skip


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


def test_checkpoint_in_the_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(nn.LSTM(3, 5).state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path).config.hidden_size == 5


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight_ih_l0": Evil()}, path)
    with pytest.raises(WeightsError, match=matches("(builtins.print)", "weights_only=True")):
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
        (nn.GRU(8, 32).state_dict(), "this is a GRU state_dict, not an LSTM"),
        (nn.RNN(3, 4, num_layers=2).state_dict(), r"this is a vanilla RNN \(torch.nn.RNN\)"),
        (
            nn.Sequential(nn.GRU(2, 4)).state_dict(),
            matches("under its prefix '0.'", "this is a GRU state_dict"),
        ),
        (
            nn.ModuleDict({"enc": nn.ModuleList([nn.LSTM(2, 3)])}).state_dict(),
            matches("the prefix 'enc.0.'", "torch.save(model.enc[0].state_dict(), path)"),
        ),
        (
            {f"{n}.{k}": v for n in ("enc", "dec") for k, v in nn.LSTM(2, 3).state_dict().items()},
            matches("the prefixes ['dec.', 'enc.']", "model.dec.state_dict()"),
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


@pytest.mark.parametrize("hidden", [3, 6, 8])
def test_lstm_whose_gate_rows_divide_by_three_stays_an_lstm(hidden: int) -> None:
    for proj in (0, 2):
        config = config_from_state_dict(nn.LSTM(5, hidden, proj_size=proj).state_dict())
        assert (config.hidden_size, config.proj_size) == (hidden, proj)


@pytest.mark.parametrize(("write", "words"), BAD_CHECKPOINTS)
def test_bad_checkpoint_is_named_in_one_line(write, words: tuple[str, ...], tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(WeightsError, match=matches(str(path), *words)) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message


def test_check_finite_names_the_first_bad_parameter() -> None:
    check_finite(LSTM(2, 3))
    check_finite(nn.LSTM(2, 3).state_dict())
    check_finite({"weight_ih_l0": torch.zeros(4, 2), "steps": torch.tensor([1, 2])})
    with pytest.raises(WeightsError, match=r"^weight_hh_l0 has 2 NaN and 1 Inf \(of 36 values\)"):
        check_finite(non_finite_state_dict())
    model = LSTM(2, 3, num_layers=2)
    with torch.no_grad():
        model.bias_hh_l1[3] = float("-inf")
    with pytest.raises(
        WeightsError, match=r"^m\.safetensors: bias_hh_l1 has 1 Inf \(of 12 values\)"
    ):
        check_finite(model, where="m.safetensors")


def test_safetensors_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    model = LSTM(2, 3)
    with torch.no_grad():
        model.weight_ih_l0[0, 0] = float("nan")
    save_safetensors(model, tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError, match=r"w\.safetensors: weight_ih_l0 has 1 NaN \(of 24 values\)"
    ):
        load_safetensors(tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (lambda d: save(nn.LSTM(2, 3).state_dict(), d / "w.safetensors"), "a PyTorch checkpoint (torch.save), not safetensors: pass it with --checkpoint"),
        (lambda d: write_onnx(d / "model.onnx"), "an ONNX model"),
        (lambda d: write_torchscript(d / "model.pt"), "a TorchScript archive"),
    ],
    ids=["checkpoint", "onnx", "torchscript"],
)  # fmt: skip
def test_safetensors_loader_names_other_formats(write, match: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape(match)):
        load_safetensors(write(tmp_path))
