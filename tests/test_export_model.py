"""export_model and `lstm-deploy export --module`: the signature a whole model gets, its graphs,
and the errors that name the submodule and the reason. (Parity of every artifact with the
unconverted module is tests/test_validate_whole.py's; serving is tests/test_serving_whole.py's.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lstm_deploy_export.export.exporters import op_types
from lstm_deploy_export.export.graphs import ExportError
from lstm_deploy_export.export.whole import export_model
from torch import Tensor, nn

from lstm_deploy import LSTM
from lstm_deploy.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True)  # time-major
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        y, (h, _) = self.lstm(self.embed(tokens).transpose(0, 1))
        return self.head(y.transpose(0, 1)), h[-1]  # per step, and the last layer's final h


def test_signature_names_the_axes_the_outputs_follow(tmp_path: Path) -> None:
    bundle = export_model(
        Tagger(), {"tokens": torch.zeros(1, 4, dtype=torch.int64)}, tmp_path / "b",
        input_ranges={"tokens": (0, 20)}, output_names=["logits", "summary"],
        artifacts="onnx",
    )  # fmt: skip
    sig = bundle.manifest["signature"]
    assert sig["inputs"] == [{"name": "tokens", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert sig["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 5]},
        {"name": "summary", "dtype": "float32", "shape": ["batch", 8]},
    ]
    assert bundle.manifest["model"]["ranges"] == {"tokens": [0, 20]}
    assert load_bundle(bundle.path).info.whole
    proto = onnx.load(str(bundle.path / "model.onnx"))
    ops = op_types(proto)
    assert "LSTM" in ops and "Loop" not in ops and "Scan" not in ops
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in proto.graph.output]  # fmt: skip
    assert dims == [["batch", "sequence", 5], ["batch", 8]]


def test_the_graph_runs_at_other_sizes_as_the_original_module(tmp_path: Path) -> None:
    model = Tagger().eval()
    bundle = export_model(
        model, {"tokens": torch.zeros(1, 4, dtype=torch.int64)}, tmp_path / "b",
        input_ranges={"tokens": (0, 20)}, artifacts="onnx",
    )  # fmt: skip
    tokens = torch.randint(0, 20, (6, 13))
    with torch.no_grad():
        expected = [t.numpy() for t in model.double()(tokens)]
    got = ort.InferenceSession(str(bundle.path / "model.onnx")).run(
        None, {"tokens": tokens.numpy()}
    )
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = LSTM(3, 4, batch_first=True)
        self.gate = Gate()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.lstm(x)[0])


class Gate(nn.Module):
    def forward(self, y: Tensor) -> Tensor:
        if y.sum() > 0:  # data-dependent Python control flow
            return y
        return -y


def test_data_dependent_control_flow_names_the_submodule(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"'gate' \(Gate\).*data-dependent"):
        export_model(Branchy(), {"x": torch.randn(1, 5, 3)}, tmp_path / "b", artifacts="onnx")


class WithGru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4)
        self.decoder = nn.GRU(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.lstm(x)[0])[0]


def test_an_unsupported_recurrent_type_is_named(tmp_path: Path) -> None:
    with (
        pytest.warns(UserWarning, match="decoder"),
        pytest.raises(ExportError, match=r"'decoder'.*GRU"),
    ):
        export_model(WithGru(), {"x": torch.randn(1, 5, 3)}, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_an_integer_input_needs_its_range(tmp_path: Path) -> None:
    with pytest.raises(
        ExportError, match=r"'tokens' is int64 without a declared range.*input_ranges"
    ):
        export_model(Tagger(), {"tokens": torch.zeros(1, 4, dtype=torch.int64)}, tmp_path / "b")


def test_example_inputs_follow_forward(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"forward's first parameters.*\['tokens'\]"):
        export_model(Tagger(), {"ids": torch.zeros(1, 4, dtype=torch.int64)}, tmp_path / "b")


def test_streaming_is_refused_where_chunks_cannot_equal_a_run(tmp_path: Path) -> None:
    class Pooled(nn.Module):  # a head over all steps: not per step
        def __init__(self) -> None:
            super().__init__()
            self.lstm = LSTM(3, 4, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            y = self.lstm(x)[0]
            return y - y.mean(1, keepdim=True)

    examples = {"x": torch.randn(1, 5, 3)}
    with pytest.raises(ExportError, match="differs from one run"):
        export_model(Pooled(), examples, tmp_path / "a", streamable=True)
    bidirectional = _First(LSTM(3, 4, batch_first=True, bidirectional=True))
    with pytest.raises(ExportError, match="cannot stream 'lstm': it is bidirectional"):
        export_model(bidirectional, examples, tmp_path / "b", streamable=True)


class _First(nn.Module):
    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]


def test_a_streamable_bundle_declares_each_lstms_state(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.LSTM(3, 4, batch_first=True), nn.LSTM(4, 5, 2, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x)[0])[0]

    model = Two().eval()
    bundle = export_model(model, {"x": torch.randn(1, 5, 3)}, tmp_path / "b", streamable=True,
                          artifacts="onnx")  # fmt: skip
    info = bundle.info
    assert info.streamable and [s.h0 for s in info.state] == ["a.h0", "b.h0"]
    shapes = {t.name: list(t.shape) for t in info.signature.inputs}
    assert shapes["b.h0"] == ["batch", 2, 5] and shapes["a.c0"] == ["batch", 1, 4]
    # Two chunks through model.onnx, the state carried, equal one run of the original module.
    session = ort.InferenceSession(str(bundle.path / "model.onnx"))
    x = torch.randn(3, 11, 3)
    with torch.no_grad():
        expected = model.double()(x.double()).numpy()
    state = {n: np.zeros([3, *shapes[n][1:]], np.float32) for n in info.state_inputs}
    pieces = []
    for part in (x[:, :4], x[:, 4:]):
        out = dict(zip(info.signature.output_names,
                       session.run(None, {"x": part.numpy(), **state})))  # fmt: skip
        pieces.append(out["output0"])
        state = {s.h0: out[s.hn] for s in info.state} | {s.c0: out[s.cn] for s in info.state}
    np.testing.assert_allclose(np.concatenate(pieces, 1), expected, atol=1e-5, rtol=1e-5)


def run_export(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_deploy_export.cli", "export", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )  # fmt: skip


def test_cli_module_exports_the_example_tagger(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    from examples.tagger import make_model

    save_model(make_model(), str(tmp_path / "w.safetensors"))
    done = run_export(
        "--module", "examples.tagger:make_model", "--weights", str(tmp_path / "w.safetensors"),
        "--example", "tokens=1x16:int64:0:100", "--example", "lengths=1:int64",
        "--output-names", "logits", "--artifacts", "onnx", "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["factory"] == "examples.tagger:make_model"
    assert manifest["model"]["lengths"] == "lengths"
    assert [t["name"] for t in manifest["signature"]["outputs"]] == ["logits"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--module", "no_such_pkg.mod:make"], "cannot import no_such_pkg"),
        (["--module", "examples.tagger:nope", "--example", "tokens=1x4:int64:0:9"], "has no nope"),
        (["--module", "examples.tagger:make_model"], "needs an --example for each input"),
        (["--module", "examples.tagger:make_model", "--example", "tokens=1xA"], "NAME=SHAPE"),
        (["--module", "examples.tagger:make_model", "--example", "tokens=1x4:int64"],
         "'tokens' is int64 without a declared range"),
        (["--module", "examples.tagger:make_model", "--weights", "missing.pt",
          "--example", "tokens=1x4:int64:0:9"], "cannot read a state_dict"),
        ([], "choose the model"),
    ],
)  # fmt: skip
def test_cli_module_errors_are_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    done = run_export(*args, "--out", str(tmp_path / "b"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("lstm-deploy export: error:") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_an_lstm_registered_under_two_names_is_exported_in_both_places(tmp_path: Path) -> None:
    class Shared(nn.Module):  # one LSTM applied twice, reached through two attribute names
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.LSTM(3, 3, batch_first=True)
            self.again = self.enc

        def forward(self, x: Tensor) -> Tensor:
            return self.again(self.enc(x)[0])[0]

    model = Shared().eval()
    bundle = export_model(model, {"x": torch.randn(1, 4, 3)}, tmp_path / "b", artifacts="onnx")
    x = torch.randn(2, 7, 3)
    with torch.no_grad():
        expected = model.double()(x.double()).numpy()
    got = ort.InferenceSession(str(bundle.path / "model.onnx")).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
