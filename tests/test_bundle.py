"""The bundle: manifest, checksums, the Triton repository, and the `lstm-deploy export` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from lstm_deploy_export.cli import main
from lstm_deploy_export.export.writer import export_bundle, load_model
from torch import nn
from tritonclient.grpc import model_config_pb2

from lstm_deploy import LSTM
from lstm_deploy.bundle import BundleError, load_bundle

TRITON_DTYPES = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    model = LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    return export_bundle(model, tmp_path_factory.mktemp("b") / "bundle").path


def test_manifest_lists_every_file_with_its_checksum(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    on_disk = sorted(
        p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()
    )
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert {"model.pt", "model.onnx", "model.scan.onnx", "weights.safetensors"} <= set(
        manifest["files"]
    )
    assert (
        manifest["versions"]["torch"] == torch.__version__.split("+")[0]
        or manifest["versions"]["torch"] == torch.__version__
    )
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert manifest["config"]["hidden_size"] == 8 and manifest["opset"] >= 18
    assert [t["name"] for t in manifest["signature"]["inputs"]] == ["input", "lengths", "h0", "c0"]
    assert load_model(load_bundle(bundle_dir)).config.bidirectional


@pytest.mark.parametrize(
    "artifact",
    [
        "model.pt",
        "model.onnx",
        "model.scan.onnx",
        "weights.safetensors",
        "triton/lstm_onnx/config.pbtxt",
    ],
)
def test_tampering_with_one_byte_is_caught(bundle_dir: Path, tmp_path: Path, artifact: str) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / artifact).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / artifact).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{artifact}: sha256 mismatch"):
        load_bundle(copy)
    (copy / artifact).unlink()
    with pytest.raises(BundleError, match=rf"{artifact}: missing"):
        load_bundle(copy)


def test_triton_configs_parse_and_agree_with_the_manifest(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    sig = manifest["signature"]
    names = {
        "lstm_onnx": lambda kind, i, t: t["name"],
        "lstm_torchscript": lambda kind, i, t: f"{kind.upper()}__{i}",
    }
    for model_name, name_of in names.items():
        config = text_format.Parse(
            (bundle_dir / "triton" / model_name / "config.pbtxt").read_text(),
            model_config_pb2.ModelConfig(),
        )
        assert config.name == model_name and config.max_batch_size > 0
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        for kind, specs, tensors in (
            ("input", sig["inputs"], config.input),
            ("output", sig["outputs"], config.output),
        ):
            assert len(tensors) == len(specs)
            for i, (spec, tensor) in enumerate(zip(specs, tensors)):
                assert tensor.name == name_of(kind, i, spec)
                assert tensor.data_type == TRITON_DTYPES[spec["dtype"]]
                expected = [
                    -1 if isinstance(d, str) else d for d in spec["shape"][1:]
                ]  # batch left out
                shape = (
                    list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
                )
                assert shape == expected, (model_name, tensor.name)
        model_file = "model.onnx" if model_name == "lstm_onnx" else "model.pt"
        assert (
            manifest["files"][f"triton/{model_name}/1/{model_file}"]["sha256"]
            == manifest["files"][model_file]["sha256"]
        )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_deploy_export.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_checkpoint_round_trip_equals_torch_lstm(tmp_path: Path) -> None:
    ref = nn.LSTM(6, 10, num_layers=2, batch_first=True, bidirectional=True).eval()
    ckpt = tmp_path / "lstm.pt"
    torch.save(ref.state_dict(), ckpt)
    result = run_cli(
        "export",
        "--checkpoint",
        str(ckpt),
        "--batch-first",
        "--artifacts",
        "onnx",
        "--out",
        str(tmp_path / "b"),
    )
    assert result.returncode == 0, result.stderr
    assert "model.onnx" in result.stdout and "sha256" in result.stdout
    session = ort.InferenceSession(
        str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(3, 17, 6)
    lengths = torch.tensor([17, 5, 1])
    output, hn, cn = session.run(None, {
        "input": x.numpy(), "lengths": lengths.numpy(),
        "h0": np.zeros((3, 4, 10), np.float32), "c0": np.zeros((3, 4, 10), np.float32),
    })  # fmt: skip
    with torch.no_grad():
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        rpacked, (rh, rc) = ref(packed)
        rout, _ = nn.utils.rnn.pad_packed_sequence(rpacked, batch_first=True, total_length=17)
    assert np.abs(output - rout.numpy()).max() <= 1e-5
    assert np.abs(hn - rh.transpose(0, 1).numpy()).max() <= 1e-5
    assert np.abs(cn - rc.transpose(0, 1).numpy()).max() <= 1e-5


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: ["--checkpoint", str(d / "missing.pt")], "no such file"),
        (lambda d: (torch.save({"fc.weight": torch.zeros(2, 2)}, d / "fc.pt"), ["--checkpoint", str(d / "fc.pt")])[1], "not an LSTM state_dict"),
        (lambda d: (torch.save({"weight_ih_l0": Evil()}, d / "evil.pt"), ["--checkpoint", str(d / "evil.pt")])[1], "weights_only=True"),
        (lambda d: ["--demo", "--artifacts", "onnx,tflite"], "unknown artifacts"),
        (lambda d: ["--demo", "--hidden-size", "0"], "hidden_size must be greater than zero"),
        (lambda d: ["--demo", "--proj-size", "4", "--artifacts", "onnx"], "model.scan.onnx"),
    ],
    ids=["missing-file", "not-lstm", "pickle-objects", "bad-artifacts", "bad-config", "proj-onnx"],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, make, match: str) -> None:
    result = run_cli("export", *make(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "pwned" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lstm-deploy export: error:") and match in last, result.stderr


def test_cli_refuses_to_overwrite_without_force(bundle_dir: Path, capsys) -> None:
    assert main(["export", "--demo", "--out", str(bundle_dir), "--artifacts", "onnx"]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_nan_weights_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from lstm_deploy import WeightsError

    model = LSTM(3, 4)
    with torch.no_grad():
        model.weight_hh_l0[1, 2] = float("nan")
    with pytest.raises(WeightsError, match="weight_hh_l0 has 1 NaN"):
        export_bundle(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_has_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """weights.safetensors too: safetensors' save_file would make it 0600 whatever the umask."""
    old = os.umask(umask)
    try:
        export_bundle(LSTM(3, 4), tmp_path / "b")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o666 & ~umask}, modes
