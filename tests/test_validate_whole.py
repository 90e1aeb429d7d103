"""`lstm-deploy validate` on whole-model bundles (`export_model`): a user's module with LSTMs inside.

Every artifact is compared with the user's module in float64, converted (the oracle) and with
torch.nn.LSTMs (its own, or ours swapped for nn.LSTMs that take `lengths` by
pack_padded_sequence), over the quick sweep at sizes other than the examples'. The models:

- random stacks of 1 to 3 LSTMs between an Embedding or raw features and two heads (a per-step
  Linear, a Linear on the last LSTM's h_n), drawn from a seed: nn.LSTM or lstm_deploy.LSTM, uni-
  or bidirectional, batch first or not, with or without a lengths input;
- a tagger (token ids + lengths -> logits), exported with a factory that validate rebuilds it by;
- a streamable detector (features -> a probability per step, each LSTM's state in and out).

Broken on purpose: a head bias in model.onnx moved by 1e-4, a module that ignores the lengths it
is given; both must fail. The C++ rows run in one test (the build is cached, see test_cpp.py), the
Triton row in another (where the Triton venv is installed, as test_triton.py).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from lstm_deploy_export.check.references import ModelReferences
from lstm_deploy_export.check.report import FAILED, PASSED, SKIPPED, TOLERANCE, Report, Row
from lstm_deploy_export.check.sweep import model_inputs, sweep
from lstm_deploy_export.check.validate import validate
from lstm_deploy_export.cli import main
from lstm_deploy_export.export.whole import export_model
from onnx import numpy_helper
from torch import Tensor, nn

import lstm_deploy
from lstm_deploy.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    ModelInfo,
    Signature,
    StateSpec,
    TensorSpec,
    file_entry,
    load_bundle,
)

VOCAB, TAGS, FEATURES = 40, 5, 6
# The rows that run on any CPU machine; the C++ rows with cpp=True.
CPU_ROWS = {
    ("pytorch-eager", "weights.safetensors"),
    ("torchscript-cpu", "model.pt"),
    ("onnxruntime-cpu", "model.onnx"),
    ("onnxruntime-cpu", "model.scan.onnx"),
    ("onnx-reference", "model.onnx"),
    ("onnx-reference", "model.scan.onnx"),
    ("onnxruntime-cpu", "model.int8.onnx"),
}
OPENVINO_ROWS = {("openvino-cpu", "model.onnx"), ("openvino-cpu", "model.scan.onnx")}
CPP_ROWS = {
    ("cpp-libtorch", "model.pt"),
    ("cpp-onnxruntime", "model.onnx"),
    ("cpp-onnxruntime", "model.scan.onnx"),
    ("cpp-onnxruntime", "model.int8.onnx"),
}
ONNX_ROWS = {row for row in CPU_ROWS | OPENVINO_ROWS if row[1] == "model.onnx"}


# -- the models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A random stack, drawn from a seed."""

    embed: bool  # token ids through an Embedding, else float features
    lengths: bool  # a lengths input, passed to every LSTM
    lstms: tuple[tuple[str, int, int, bool, bool], ...]  # (kind, hidden, layers, bidi, batch_first)

    @classmethod
    def draw(cls, seed: int) -> Spec:
        rng = random.Random(seed)
        lengths = rng.random() < 0.5
        lstms = []
        for _ in range(rng.randint(1, 3)):
            # nn.LSTM takes no lengths: with a lengths input, every LSTM is ours
            kind = "ours" if lengths or rng.random() < 0.5 else "nn"
            bidi = rng.random() < 0.5
            lstms.append((kind, rng.randint(3, 8), rng.randint(1, 2), bidi, rng.random() < 0.5))
        return cls(rng.random() < 0.5, lengths, tuple(lstms))


class Stack(nn.Module):
    """Embedding or features -> LSTMs (a Linear between two) -> per-step and summary heads."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        width = 6
        self.embed = nn.Embedding(VOCAB, width) if spec.embed else nn.Linear(FEATURES, width)
        self.lstms = nn.ModuleList()
        self.mids = nn.ModuleList()
        for kind, hidden, layers, bidi, batch_first in spec.lstms:
            make = lstm_deploy.LSTM if kind == "ours" else nn.LSTM
            self.lstms.append(
                make(width, hidden, num_layers=layers, bidirectional=bidi, batch_first=batch_first)
            )
            width = hidden * (2 if bidi else 1)
            self.mids.append(nn.Linear(width, width))
        self.head = nn.Linear(width, TAGS)
        last = spec.lstms[-1]
        self.summary = nn.Linear(last[1], 2)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.embed(x)  # (B, T, width)
        hn = h
        for lstm, mid in zip(self.lstms, self.mids):
            batch_first = lstm.batch_first
            y = h if batch_first else h.transpose(0, 1)
            if lengths is None:
                y, (hn, _) = lstm(y)
            else:
                y, (hn, _) = lstm(y, lengths=lengths)
            h = torch.tanh(mid(y if batch_first else y.transpose(0, 1)))
        return self.head(h), self.summary(hn[-1])


class Tagger(nn.Module):
    """Token ids + lengths -> a tag's logits per token (the factory "test_validate_whole:Tagger")."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lstm = lstm_deploy.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, TAGS)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(tokens), lengths=lengths)
        return self.head(out)


class DeafTagger(Tagger):
    """The tagger's weights, its lengths ignored: what an artifact that ignored them would be."""

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return self.head(self.lstm(self.emb(tokens))[0])


class Detector(nn.Module):
    """Features -> a probability per step: two nn.LSTMs, one after the other, streamable."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, 10, num_layers=2, batch_first=True)
        self.post = nn.LSTM(10, 4)  # time first
        self.head = nn.Linear(4, 1)

    def forward(self, features: Tensor) -> Tensor:
        out, _ = self.lstm(features)
        out, _ = self.post(out.transpose(0, 1))
        return torch.sigmoid(self.head(out.transpose(0, 1)))


# -- exports, once per module ----------------------------------------------------------------

SEEDS = (0, 3, 15)  # drawn to cover 1, 2 and 3 LSTMs, both kinds, with and without lengths


def export_stack(seed: int, out: Path) -> tuple[Bundle, nn.Module]:
    torch.manual_seed(seed)
    spec = Spec.draw(seed)
    model = Stack(spec).eval()
    x = torch.randint(0, VOCAB, (2, 5)) if spec.embed else torch.randn(2, 5, FEATURES)
    examples = {"x": x}
    if spec.lengths:
        examples["lengths"] = torch.tensor([5, 3])
    bundle = export_model(
        model,
        examples,
        out,
        output_names=["tags", "summary"],
        input_ranges={"x": (0, VOCAB)} if spec.embed else None,
    )
    return bundle, model


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Bundle, nn.Module]]:
    root = tmp_path_factory.mktemp("stacks")
    return {seed: export_stack(seed, root / f"stack{seed}") for seed in SEEDS}


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    torch.manual_seed(0)
    example = {"tokens": torch.randint(0, VOCAB, (2, 5)), "lengths": torch.tensor([5, 3])}
    return export_model(
        Tagger().eval(),
        example,
        tmp_path_factory.mktemp("whole") / "tagger",
        output_names=["logits"],
        input_ranges={"tokens": (0, VOCAB)},
        factory="test_validate_whole:Tagger",
    )


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, nn.Module]:
    torch.manual_seed(1)
    model = Detector().eval()
    bundle = export_model(
        model,
        {"features": torch.randn(2, 5, FEATURES)},
        tmp_path_factory.mktemp("whole") / "detector",
        output_names=["prob"],
        streamable=True,
        artifacts="torchscript,onnx,scan",
    )
    return bundle, model


def rows(report: Report) -> dict[tuple[str, str], Row]:
    return {(r.runtime, r.artifact): r for r in report.rows}


def assert_passed(report: Report, expected: set[tuple[str, str]]) -> None:
    found = rows(report)
    for key in expected:
        row = found[key]
        assert row.status == PASSED, (key, row.reason, row.failures)
        assert len(row.results) == len(report.cases)
    assert report.passed, [str(f) for f in report.failures]


def expected_rows(bundle: Bundle) -> set[tuple[str, str]]:
    have = {r for r in CPU_ROWS if bundle.has(r[1])}
    try:
        import openvino  # noqa: F401
    except ImportError:
        return have
    return have | {r for r in OPENVINO_ROWS if bundle.has(r[1])}


# -- every artifact equals the module ----------------------------------------------------------


def test_the_seeds_cover_the_space() -> None:
    specs = [Spec.draw(seed) for seed in SEEDS]
    lstms = [lstm for spec in specs for lstm in spec.lstms]
    assert {len(spec.lstms) for spec in specs} == {1, 2, 3}
    assert {spec.lengths for spec in specs} == {True, False}
    assert {spec.embed for spec in specs} == {True, False}
    assert {kind for kind, *_ in lstms} == {"nn", "ours"}
    assert {bidi for *_, bidi, _ in lstms} == {True, False}
    assert {bf for *_, bf in lstms} == {True, False}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_stacks_pass(stacks: dict[int, tuple[Bundle, nn.Module]], seed: int) -> None:
    bundle, model = stacks[seed]
    report = validate(bundle, quick=True, model=model, write=False)
    assert_passed(report, expected_rows(bundle))
    assert report.outputs == ["tags", "summary"]
    # sizes other than the examples' (2 x 5): batch 1, odd and >= 32; sequence 1, short, >= 512
    batches, steps = {c.batch for c in report.cases}, {c.steps for c in report.cases}
    assert 1 in batches and max(batches) >= 32 and any(b % 2 and b > 1 for b in batches)
    assert 1 in steps and max(steps) >= 512 and any(1 < t < 100 for t in steps)
    assert 2 not in batches and 5 not in steps
    patterns = {c.lengths for c in report.cases}
    assert patterns == (
        {"full", "random", "equal", "one-long"} if Spec.draw(seed).lengths else {"full"}
    )
    assert rows(report)[("aoti-cpu", "model.pt2")].status == SKIPPED


def test_integer_inputs_are_drawn_in_their_range(tagger: Bundle) -> None:
    info = tagger.info
    seen = np.concatenate(
        [model_inputs(case, info, {})["tokens"].ravel() for case in sweep(quick=True)]
    )
    assert seen.min() == 0 and seen.max() == VOCAB - 1 and seen.dtype == np.int64


def test_inputs_follow_any_signature() -> None:
    """Other named axes at the manifest's sizes, each dtype, lengths in [1, T], state per case."""
    sig = Signature(
        inputs=(
            TensorSpec("x", "float32", ("batch", "sequence", "channels")),
            TensorSpec("mask", "bool", ("batch", "sequence")),
            TensorSpec("ids", "int32", ("batch", 3)),
            TensorSpec("lengths", "int64", ("batch",)),
            TensorSpec("enc.h0", "float32", ("batch", 2, 4)),
            TensorSpec("enc.c0", "float32", ("batch", 2, 4)),
        ),
        outputs=(
            TensorSpec("y", "float32", ("batch", "sequence", 4)),
            TensorSpec("enc.hn", "float32", ("batch", 2, 4)),
            TensorSpec("enc.cn", "float32", ("batch", 2, 4)),
        ),
    )
    state = (StateSpec("enc.h0", "enc.c0", "enc.hn", "enc.cn"),)
    info = ModelInfo(sig, "lengths", {"ids": (3, 9)}, state, streamable=True, whole=True)
    for case in sweep(quick=True):
        inputs = model_inputs(case, info, {"channels": 11})
        b, t = case.batch, case.steps
        assert {k: (v.dtype.name, v.shape) for k, v in inputs.items()} == {
            "x": ("float32", (b, t, 11)),
            "mask": ("bool", (b, t)),
            "ids": ("int32", (b, 3)),
            "lengths": ("int64", (b,)),
            "enc.h0": ("float32", (b, 2, 4)),
            "enc.c0": ("float32", (b, 2, 4)),
        }
        assert inputs["ids"].min() >= 3 and inputs["ids"].max() < 9
        lengths = inputs["lengths"]
        assert lengths.min() >= 1 and lengths.max() <= t
        assert (lengths == t).all() == (case.lengths == "full")
        assert (inputs["enc.c0"] == 0).all() == (case.state == "zeros")
        assert np.abs(inputs["enc.h0"]).max() < 1  # tanh
    with pytest.raises(BundleError, match="'channels'"):
        model_inputs(case, info, {})
    unranged = ModelInfo(sig, "lengths", {}, state, streamable=True, whole=True)
    with pytest.raises(BundleError, match="'ids' is int32 without a range"):
        model_inputs(case, unranged, {"channels": 11})


def test_tagger_from_its_factory_by_the_cli(tagger: Bundle, tmp_path: Path) -> None:
    """The manifest's factory rebuilds the module; the report and the manifest's parity."""
    code = main(
        ["validate", str(tagger.path), "--quick", "--no-progress", "--report", str(tmp_path)]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and report["passed"] and report["whole_model"], report["failures"]
    statuses = {(r["runtime"], r["artifact"]): r["status"] for r in report["rows"]}
    assert all(statuses[key] == PASSED for key in expected_rows(tagger))
    assert "the user's module" in report["policy"]["references"]
    assert load_bundle(tagger.path).manifest["parity"]["passed"] is True
    # the references agree with each other: nn.LSTM (packed) and the converted module
    assert all(check["passed"] for check in report["references"])


def test_streamable_detector_carries_each_lstms_state(
    detector: tuple[Bundle, nn.Module],
) -> None:
    bundle, model = detector
    report = validate(bundle, quick=True, model=model, write=False)
    assert_passed(report, expected_rows(bundle))
    assert report.outputs == ["prob", "lstm.hn", "lstm.cn", "post.hn", "post.cn"]
    assert {c.state for c in report.cases} == {"zeros", "random"}


def test_the_references_take_and_give_the_state(detector: tuple[Bundle, nn.Module]) -> None:
    """ModelReferences' hooks against the module called with hx by hand."""
    bundle, model = detector
    info = bundle.info
    case = next(c for c in sweep(quick=True) if c.state == "random" and c.steps > 1)
    inputs = model_inputs(case, info, {})
    got = ModelReferences(model, info).run_torch(inputs, torch.float64)
    t = {k: torch.from_numpy(v).double() for k, v in inputs.items()}
    m = Detector().double().eval()
    m.load_state_dict(model.state_dict())

    def hx(name: str) -> tuple[Tensor, Tensor]:
        return t[f"{name}.h0"].transpose(0, 1), t[f"{name}.c0"].transpose(0, 1)

    with torch.no_grad():
        out, (hn, cn) = m.lstm(t["features"], hx("lstm"))
        out2, (hn2, cn2) = m.post(out.transpose(0, 1), hx("post"))
        prob = torch.sigmoid(m.head(out2.transpose(0, 1)))
    expected = {"prob": prob, "lstm.hn": hn, "lstm.cn": cn, "post.hn": hn2, "post.cn": cn2}
    for name, value in expected.items():
        if name != "prob":
            value = value.transpose(0, 1)
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=1e-12, err_msg=name)
    zeros = {k: np.zeros_like(v) if k.endswith(("h0", "c0")) else v for k, v in inputs.items()}
    assert np.abs(ModelReferences(model, info).run_oracle(zeros)["prob"] - got["prob"]).max() > 1e-3


def test_cpp_rows(tagger: Bundle, detector: tuple[Bundle, nn.Module]) -> None:
    """The C++ programs read any signature from the manifest: token ids and lengths; the state
    tensors named lstm.h0 ... (their .npy files named so)."""
    report = validate(tagger, quick=True, cpp=True, write=False)
    assert_passed(report, expected_rows(tagger) | CPP_ROWS)
    bundle, model = detector
    report = validate(bundle, quick=True, cpp=True, model=model, write=False)
    assert_passed(report, expected_rows(bundle) | {r for r in CPP_ROWS if bundle.has(r[1])})


def test_triton_row(detector: tuple[Bundle, nn.Module]) -> None:
    """The bundle's lstm_python model on a real tritonserver: the state tensors by name."""
    from serving_support import triton_python

    bundle, model = detector
    python = str(triton_python())
    report = validate(
        bundle, quick=True, triton=True, triton_python=python, model=model, write=False
    )
    assert_passed(report, {("triton-python", "model.onnx")})


# -- validate can fail -------------------------------------------------------------------------


def _perturb_head_bias(bundle_dir: Path, delta: float) -> None:
    """Move model.onnx's head bias by `delta`; the manifest's sha256 follows (it loads)."""
    path = bundle_dir / "model.onnx"
    proto = onnx.load(str(path))
    (init,) = [i for i in proto.graph.initializer if i.name.endswith("head.bias")]
    init.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(delta), init.name)
    )
    onnx.save(proto, str(path))
    manifest_path = bundle_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.onnx"] = file_entry(path)
    manifest_path.write_text(json.dumps(manifest))


def test_a_head_bias_off_by_1e4_in_model_onnx_fails(tagger: Bundle, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(tagger.path, tmp_path / "bundle"))
    _perturb_head_bias(broken, 1e-4)
    report = validate(broken, quick=True, write=False)
    assert not report.passed
    found = rows(report)
    for key in expected_rows(tagger):
        assert found[key].status == (FAILED if key in ONNX_ROWS else PASSED), key
    failed = {(f.runtime, f.artifact) for f in report.failures if f.kind == TOLERANCE}
    assert failed == ONNX_ROWS & expected_rows(tagger)
    assert all(f.output == "logits" for f in report.failures)


def test_a_model_that_ignores_lengths_fails_everywhere(tagger: Bundle) -> None:
    """The sweep's lengths vary and matter: the same weights without them differ on every
    artifact's row. (The eager row runs the module it is given, as the references do: it passes.)"""
    report = validate(tagger, quick=True, model=DeafTagger(), write=False)
    status = {key: row.status for key, row in rows(report).items()}
    eager = ("pytorch-eager", "weights.safetensors")
    assert status[eager] == PASSED
    assert all(status[key] == FAILED for key in expected_rows(tagger) - {eager}), status


# -- errors ----------------------------------------------------------------------------------


def test_no_factory_says_pass_module(
    tagger: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(tagger.path, tmp_path / "bundle"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["model"]["factory"] = None
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="--module"):
        validate(copy, quick=True, write=False)
    assert main(["validate", str(copy), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lstm-deploy validate: error:") and "--module" in err
    assert len(err.splitlines()) == 1
    # --module names the factory: it passes
    code = main(
        [
            "validate",
            str(copy),
            "--quick",
            "--no-progress",
            "--module",
            "test_validate_whole:Tagger",
        ]
    )
    assert code == 0, capsys.readouterr()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("test_validate_whole:Detector", "does not fit Detector"),
        ("no_such_package.models:Tagger", "cannot import no_such_package"),
        ("test_validate_whole:NoSuchThing", "has no NoSuchThing"),
        ("test_validate_whole", "expected package.module:function"),
    ],
)
def test_module_errors_are_one_line(
    tagger: Bundle, module: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(tagger.path), "--quick", "--no-progress", "--module", module]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_module_is_refused_for_an_lstm_bundle(onnx_bundle: Path) -> None:
    with pytest.raises(BundleError, match="is an LSTM bundle"):
        validate(onnx_bundle, quick=True, model=Tagger(), write=False)
