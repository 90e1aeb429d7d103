"""`lstm-deploy export` on weights that are not what it takes, through the real CLI in a subprocess:
exit status 2 and one line that names the file's kind and the fix, with no traceback, no colour
codes, and no advice to load a pickle unsafely."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_weights import BAD_CHECKPOINTS, matches, save, write_onnx, write_torchscript

from lstm_deploy import LSTM, save_safetensors


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_deploy_export.cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, words: tuple[str, ...]) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lstm-deploy export: error:"), lines[0]
    assert re.search(matches(*words), lines[0]), lines[0]
    for unwanted in ("Traceback", "weights_only=False", "\x1b["):
        assert unwanted not in result.stderr


@pytest.mark.parametrize(("write", "words"), BAD_CHECKPOINTS)
def test_bad_checkpoint(write, words: tuple[str, ...], tmp_path: Path) -> None:
    path = write(tmp_path)
    result = run_export("--checkpoint", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, (str(path), *words))
    assert not (tmp_path / "out").exists()


def write_non_finite_weights(path: Path) -> Path:
    model = LSTM(2, 3)
    with torch.no_grad():
        model.weight_hh_l0[2, :] = float("inf")
    save_safetensors(model, path)
    return path


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda d: write_non_finite_weights(d / "w.safetensors"), ("weight_hh_l0 has 3 Inf (of 36 values)",)),
        (lambda d: save(torch.nn.LSTM(2, 3).state_dict(), d / "lstm.safetensors"), ("a PyTorch checkpoint", "pass it with --checkpoint")),
        (lambda d: write_onnx(d / "model.onnx"), ("an ONNX model",)),
        (lambda d: write_torchscript(d / "model.pt"), ("a TorchScript archive",)),
    ],
    ids=["inf", "checkpoint", "onnx", "torchscript"],
)  # fmt: skip
def test_bad_weights(write, words: tuple[str, ...], tmp_path: Path) -> None:
    path = write(tmp_path)
    result = run_export("--weights", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, (str(path), *words))


def test_a_command_without_its_extra_says_which_to_install(tmp_path: Path) -> None:
    """A serving-only install has no torch: demo says so in one line, not a traceback."""
    code = (
        "import sys; sys.modules['torch'] = None  # as if not installed\n"
        "from lstm_deploy_export.cli import main\n"
        f"sys.exit(main(['demo', {str(tmp_path / 'b')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "lstm-deploy demo: error: needs torch, which this install lacks: "
        "pip install 'lstm-deploy[export]' (README: On a fresh machine)\n"
    )
