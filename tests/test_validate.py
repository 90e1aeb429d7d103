"""`lstm-deploy validate`: every row listed, broken artifacts caught, the report's numbers real.

One small bundle (2 layers, bidirectional: a reverse direction that must honour lengths) is exported
once; the tests that break an artifact work on a copy. Each validate run uses the quick sweep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lstm_deploy_export.check.compare import REL_FLOOR, TOLERANCES, Tolerance, compare
from lstm_deploy_export.check.sweep import Case, make_inputs
from lstm_deploy_export.check.validate import validate
from lstm_deploy_export.cli import main
from lstm_deploy_export.export.graphs import DeployLSTM
from lstm_deploy_export.export.writer import export_bundle, load_model
from onnx import numpy_helper

from lstm_deploy import LSTM
from lstm_deploy.bundle import MANIFEST, load_bundle, sha256

INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 5, 8, 2
CPU_ROWS = [
    ("pytorch-eager", "weights.safetensors"),
    ("torchscript-cpu", "model.pt"),
    ("onnxruntime-cpu", "model.onnx"),
    ("onnxruntime-cpu", "model.scan.onnx"),
    ("openvino-cpu", "model.onnx"),
    ("openvino-cpu", "model.scan.onnx"),
    ("onnx-reference", "model.onnx"),
    ("onnx-reference", "model.scan.onnx"),
    ("onnxruntime-cpu", "model.int8.onnx"),  # judged by the int8 class (tests/test_int8.py)
]
CUDA_ROWS = [
    ("torchscript-cuda", "model.pt"),
    ("onnxruntime-cuda", "model.onnx"),
    ("onnxruntime-cuda", "model.scan.onnx"),
]
CPP_ROWS = [
    ("cpp-libtorch", "model.pt"),
    ("cpp-onnxruntime", "model.onnx"),
    ("cpp-onnxruntime", "model.scan.onnx"),
    ("cpp-onnxruntime", "model.int8.onnx"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, bidirectional=True)
    return export_bundle(model, tmp_path_factory.mktemp("validate") / "bundle").path


@pytest.fixture
def bundle_copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def run_cli(*argv: str) -> int:
    return main(["validate", *argv, "--no-progress"])


def statuses(report_json: dict) -> dict[tuple[str, str], dict]:
    return {(r["runtime"], r["artifact"]): r for r in report_json["rows"]}


# --- a good bundle -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """`validate --quick --cpp` on the good bundle, its report in a separate directory."""
    report_dir = tmp_path_factory.mktemp("report")
    code = run_cli(str(exported), "--quick", "--cpp", "--report", str(report_dir))
    return code, report_dir


def test_quick_passes_and_lists_every_row(quick_run: tuple[int, Path]) -> None:
    code, report_dir = quick_run
    report = json.loads((report_dir / "report.json").read_text())
    assert code == 0 and report["passed"] and report["failures"] == []
    rows = statuses(report)
    assert list(rows)[: len(CPU_ROWS)] == CPU_ROWS
    for key in CPU_ROWS + CPP_ROWS:  # the C++ programs build on this machine (see test_cpp.py)
        assert rows[key]["status"] == "passed", (key, rows[key]["failures"], rows[key]["reason"])
        assert len(rows[key]["cases"]) == len(report["sweep"]["cases"])
    for key in CUDA_ROWS:
        assert key in rows
        if not torch.cuda.is_available():
            assert rows[key]["status"] == "skipped" and "CUDA" in rows[key]["reason"]
    # the sweep covers batch 1, odd and >= 64; T 1, short and >= 1024; variable lengths
    cases = report["sweep"]["cases"]
    assert {1, 64} <= {c["batch"] for c in cases} and any(
        c["batch"] % 2 for c in cases if c["batch"] > 1
    )
    assert {1, 1024} <= {c["steps"] for c in cases} and any(1 < c["steps"] < 100 for c in cases)
    assert {"full", "random", "equal", "one-long"} <= {c["lengths"] for c in cases}
    md = (report_dir / "report.md").read_text()
    assert "**PASSED**" in md and "onnxruntime-cpu" in md and "CUDAExecutionProvider" in md


def test_manifest_parity_updated_and_bundle_still_verifies(
    quick_run: tuple[int, Path], exported: Path
) -> None:
    bundle = load_bundle(exported)  # sha256 of every listed file still matches
    parity = bundle.manifest["parity"]
    assert parity["passed"] is True and parity["sweep"] == "quick" and parity["failures"] == 0
    assert parity["report"] == str((quick_run[1] / "report.json").resolve())
    rows = {(r["runtime"], r["artifact"]): r for r in parity["rows"]}
    assert rows[("onnxruntime-cpu", "model.onnx")]["max_abs"] < 1e-5
    assert MANIFEST not in bundle.manifest["files"]


def test_report_numbers_come_from_the_runs(quick_run: tuple[int, Path], exported: Path) -> None:
    """Recompute one row's metrics for one case, independently of validate's runners."""
    report = json.loads((quick_run[1] / "report.json").read_text())
    row = statuses(report)[("onnxruntime-cpu", "model.onnx")]
    case_json = next(c for c in report["sweep"]["cases"] if c["lengths"] == "random")
    case = Case(**case_json)
    inputs = make_inputs(case, load_bundle(exported).config)
    assert inputs["input"].shape == (case.batch, case.steps, INPUT_SIZE)

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    actual = dict(zip(["output", "hn", "cn"], session.run(None, inputs)))
    oracle_module = DeployLSTM(load_model(load_bundle(exported)).double()).eval()
    with torch.no_grad():
        tensors = [torch.from_numpy(inputs[k]) for k in ("input", "lengths", "h0", "c0")]
        oracle = oracle_module(
            tensors[0].double(), tensors[1], tensors[2].double(), tensors[3].double()
        )
    recorded = next(c for c in row["cases"] if c["case"] == case.id)["metrics"]
    for name, ref in zip(["output", "hn", "cn"], oracle):
        diff = np.abs(actual[name].astype(np.float64) - ref.numpy())
        m = recorded[name]["oracle"]
        assert m["max_abs"] == pytest.approx(diff.max(), rel=1e-6, abs=1e-12)
        assert m["mean_abs"] == pytest.approx(diff.mean(), rel=1e-6, abs=1e-12)
        rel = diff / np.maximum(np.abs(ref.numpy()), REL_FLOOR)
        assert m["max_rel"] == pytest.approx(rel.max(), rel=1e-6, abs=1e-12)
        assert m["p99_abs"] == pytest.approx(
            np.quantile(diff, 0.99, method="inverted_cdf"), rel=1e-6, abs=1e-12
        )
        assert m["count"] == diff.size and diff[tuple(m["index"])] == pytest.approx(
            m["max_abs"], rel=1e-6
        )
        assert m["actual"] == actual[name][tuple(m["index"])]
    # padded steps were checked and are exactly zero
    assert recorded["output"]["oracle"]["padding_nonzero"] == 0


# --- broken artifacts ------------------------------------------------------------------------


def rewrite_onnx(bundle_dir: Path, edit) -> None:
    """Edit model.onnx's graph in place and re-sign it in the manifest: the bundle still loads."""
    path = bundle_dir / "model.onnx"
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(path), "size": path.stat().st_size}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    load_bundle(bundle_dir)


def edit_input_weights(edit):
    """An edit of each LSTM op's W (1, 4H, I + 1): gate blocks i, o, f, c; the pad flag last."""

    def apply(proto: onnx.ModelProto) -> None:
        for node in (n for n in proto.graph.node if n.op_type == "LSTM"):
            init = next(i for i in proto.graph.initializer if i.name == node.input[1])
            w = numpy_helper.to_array(init).copy()
            edit(w)
            init.CopyFrom(numpy_helper.from_array(w, init.name))

    return apply


def swap_f_and_c(w: np.ndarray) -> None:
    h = HIDDEN_SIZE
    w[:, 2 * h : 3 * h], w[:, 3 * h : 4 * h] = (
        w[:, 3 * h : 4 * h].copy(),
        w[:, 2 * h : 3 * h].copy(),
    )


def unfreeze_padding(w: np.ndarray) -> None:
    """What model.onnx was before: padded steps update the state unless the runtime honours the
    op's sequence_lens (ONNX Runtime does, OpenVINO and onnx's reference evaluator do not)."""
    w[:, :, -1] = 0.0


def ignore_lengths(proto: onnx.ModelProto) -> None:
    """Every use of the `lengths` input reads T instead: a graph that ignores lengths."""
    for node in proto.graph.node:
        node.input[:] = ["full_lengths" if name == "lengths" else name for name in node.input]
    make = onnx.helper.make_node
    first = [
        make("Shape", ["input"], ["input_shape"]),
        make("Gather", ["input_shape", "one"], ["steps"], axis=0),
        make("Shape", ["lengths"], ["lengths_shape"]),
        make("Expand", ["steps", "lengths_shape"], ["full_lengths"]),
    ]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    for node in reversed(first):
        proto.graph.node.insert(0, node)


MODEL_ONNX_ROWS = [(r, "model.onnx") for r in ("onnxruntime-cpu", "openvino-cpu", "onnx-reference")]


def test_swapped_gates_are_caught(bundle_copy: Path, capsys: pytest.CaptureFixture) -> None:
    rewrite_onnx(bundle_copy, edit_input_weights(swap_f_and_c))
    assert run_cli(str(bundle_copy), "--quick") == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["runtime", "artifact", "status"]
    passed, failed = len(CPU_ROWS) - len(MODEL_ONNX_ROWS), len(MODEL_ONNX_ROWS)
    assert f"FAILED: {passed} passed, {failed} failed" in out
    report = json.loads((bundle_copy / "report.json").read_text())
    rows = statuses(report)
    for key in CPU_ROWS:
        assert rows[key]["status"] == ("failed" if key in MODEL_ONNX_ROWS else "passed"), key
    broken = rows[("onnxruntime-cpu", "model.onnx")]
    for output in ("output", "hn", "cn"):
        line = next(
            f
            for f in report["failures"]
            if f.startswith(f"-[x] model.onnx on onnxruntime-cpu: {output}:")
        )
        assert line in out  # printed, not only written
        assert "vs the float64 oracle" in line and "B=" in line and "T=" in line
    # not a near miss: the error is orders of magnitude past the tolerance
    worst = broken["summary"]["output"]["oracle"]
    assert worst["max_ratio"] > 1e3 and worst["max_abs"] > 1e-2
    assert load_bundle(bundle_copy).manifest["parity"]["passed"] is False


def test_ignored_lengths_are_caught(bundle_copy: Path, capsys: pytest.CaptureFixture) -> None:
    rewrite_onnx(bundle_copy, ignore_lengths)
    assert run_cli(str(bundle_copy), "--quick") == 1
    out = capsys.readouterr().out
    report = json.loads((bundle_copy / "report.json").read_text())
    assert statuses(report)[("onnxruntime-cpu", "model.onnx")]["status"] == "failed"
    padding = [f for f in report["failures"] if "padded steps" in f]
    assert padding and padding[0].startswith("-[x] model.onnx on onnxruntime-cpu: output:")
    assert "lengths are not honoured" in out
    # hn/cn come from the wrong step too; the full-length cases still pass, so some cases do
    hn = next(
        f for f in report["failures"] if f.startswith("-[x] model.onnx on onnxruntime-cpu: hn:")
    )
    assert "lengths=" in hn
    assert all(f.startswith("-[x] model.onnx on ") for f in report["failures"])


def test_an_artifact_right_on_one_runtime_only_fails(
    bundle_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """model.onnx as it was: exact on ONNX Runtime only, which honours sequence_lens."""
    rewrite_onnx(bundle_copy, edit_input_weights(unfreeze_padding))
    assert run_cli(str(bundle_copy), "--quick") == 1
    capsys.readouterr()
    rows = statuses(json.loads((bundle_copy / "report.json").read_text()))
    assert rows[("onnxruntime-cpu", "model.onnx")]["status"] == "passed"
    for key in MODEL_ONNX_ROWS[1:]:
        assert rows[key]["status"] == "failed", key
        assert any(f.startswith(f"-[x] model.onnx on {key[0]}: cn:") for f in rows[key]["failures"])


def test_tolerance_overrides_apply(bundle_copy: Path, capsys: pytest.CaptureFixture) -> None:
    # atol = rtol = 0 and no float32 allowance: any rounding difference fails
    code = run_cli(
        str(bundle_copy),
        "--quick",
        "--atol",
        "0",
        "--rtol",
        "0",
        "--f32-factor",
        "0",
        "--seeds",
        "3",
    )
    assert code == 1
    report = json.loads((bundle_copy / "report.json").read_text())
    assert report["policy"]["tolerance_source"].startswith("command line")
    assert report["policy"]["tolerances"]["float32"]["atol"] == 0
    assert report["sweep"]["seeds"] == [3]
    capsys.readouterr()


# --- usage errors -----------------------------------------------------------------------------


def test_usage_errors_exit_2(
    tmp_path: Path, bundle_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli(str(tmp_path / "missing")) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert run_cli(str(tmp_path)) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (bundle_copy / "model.pt").write_bytes(b"tampered")
    assert run_cli(str(bundle_copy)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pt: sha256 mismatch" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--atol", "-1"], ["--seeds", "a,b"], ["--rtol", "nan"]])
def test_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli("bundle", *argv)
    assert e.value.code == 2
    capsys.readouterr()


# --- the metrics themselves ---------------------------------------------------------------------


def test_compare_metrics_by_hand() -> None:
    ref = np.array([[0.5, -2.0, 1e-5, 0.0]])
    actual = np.array([[0.5, -2.001, 2e-5, 0.0]], dtype=np.float32)
    tol = Tolerance(atol=1e-4, rtol=0.0, f32_factor=0.0)
    m = compare(actual, ref, tol, eps32=0.0)
    d = np.abs(actual.astype(np.float64) - ref)
    assert m.max_abs == d.max() and m.index == [0, 1] and m.reference == -2.0
    assert m.max_rel == pytest.approx(max(d[0, 1] / 2.0, d[0, 2] / REL_FLOOR))
    assert m.violations == 1 and not m.passed and m.count == 4
    assert compare(actual, ref, Tolerance(1e-4, 1e-3, 0.0), 0.0).passed  # rtol covers |ref| = 2
    assert compare(actual, ref, Tolerance(1e-4, 0.0, 10.0), 1e-4).passed  # so does eps32


def test_compare_flags_nan_and_nonzero_padding() -> None:
    ref = np.zeros((2, 3, 1))
    actual = np.zeros((2, 3, 1), dtype=np.float32)
    actual[0, 2, 0] = 1e-9
    actual[1, 0, 0] = np.nan
    padding = np.array([[False, False, True], [False, True, True]])
    m = compare(actual, ref, TOLERANCES["float32"], 0.0, padding)
    assert m.nonfinite == 1 and m.padding_nonzero == 1 and not m.passed
    assert np.isfinite(m.max_abs) and m.max_abs == pytest.approx(1e-9)


def test_inputs_are_a_function_of_the_case() -> None:
    config = LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2).config
    case = Case(id=0, seed=1, batch=9, steps=64, lengths="one-long", state="random")
    a, b = make_inputs(case, config), make_inputs(case, config)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["h0"].shape == (9, 4, 2) and a["c0"].shape == (9, 4, 4) and a["h0"].dtype == np.float32
    lengths = a["lengths"]
    assert lengths.dtype == np.int64 and (lengths == 64).sum() >= 1 and lengths.min() >= 1
    assert np.sort(lengths)[-2] <= 64 // 16


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
def test_cuda_rows_pass(exported: Path, tmp_path: Path) -> None:
    report = validate(exported, quick=True, tf32=True, report_dir=tmp_path)
    rows = {(r.runtime, r.artifact): r for r in report.rows}
    assert rows[("torchscript-cuda", "model.pt")].status == "passed", report.failures
    for key in [("onnxruntime-cuda", "model.onnx"), ("onnxruntime-cuda", "model.scan.onnx")]:
        row = rows[key]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            assert row.status == "passed", report.failures
        else:
            assert row.status == "skipped" and "CUDAExecutionProvider" in (row.reason or "")
    assert report.policy["tolerances"]["cuda-float32"]["atol"] == TOLERANCES["cuda-float32"].atol
    # TF32 is off in the parity rows and restored afterwards
    assert ("torchscript-cuda-tf32", "model.pt") in rows
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_switch_restores_the_flags() -> None:
    from lstm_deploy_export.check.runners import torch_tf32

    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    with torch_tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    with torch_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    after = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    assert after == before
