"""model.int8.onnx: model.onnx with int8 LSTM weights (ONNX Runtime's DynamicQuantizeLSTM).

The bundle is the serving tests' (conftest's `onnx_bundle`: 2 layers, exported with onnx and int8).
The quantized graph is checked against model.onnx (same graph around the LSTM ops, weights within
half an 8-bit step), validate's int8 row against the float64 references under the int8 class,
broken int8 graphs are caught, the runtimes listed as unable to run it are shown unable, and the
server and the Triton repository serve it.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from google.protobuf import text_format
from lstm_deploy_export.check.compare import INT8, TOLERANCES, compare
from lstm_deploy_export.check.references import References
from lstm_deploy_export.check.sweep import Case, make_inputs, padding_mask
from lstm_deploy_export.check.validate import validate
from lstm_deploy_export.cli import main as export_main
from lstm_deploy_export.export.quantize import QUANTIZED_OP
from lstm_deploy_export.export.writer import load_model, parse_artifacts
from lstm_deploy_serving.cli import main as serving_main
from onnx import numpy_helper
from serving_support import Reference, running_server
from tritonclient.grpc import model_config_pb2

from lstm_deploy.bundle import INT8_ONNX, MANIFEST, ONNX, BundleError, file_entry, load_bundle

OUTPUTS = ("output", "hn", "cn")
INT8_ROW = ("onnxruntime-cpu", INT8_ONNX)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _nodes(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rows(report) -> dict[tuple[str, str], object]:
    return {(r.runtime, r.artifact): r for r in report.rows}


# -- the graph ----------------------------------------------------------------------------------


def test_int8_graph_is_model_onnx_with_quantized_lstm_ops(onnx_bundle: Path) -> None:
    bundle = load_bundle(onnx_bundle)
    assert bundle.manifest["files"][INT8_ONNX] == file_entry(onnx_bundle / INT8_ONNX)
    float_graph = onnx.load(str(onnx_bundle / ONNX))
    int8_graph = onnx.load(str(onnx_bundle / INT8_ONNX))
    lstms, quantized = _nodes(float_graph, "LSTM"), _nodes(int8_graph, QUANTIZED_OP)
    assert len(quantized) == len(lstms) == bundle.config.num_layers and not _nodes(
        int8_graph, "LSTM"
    )
    assert {n.domain for n in quantized} == {"com.microsoft"}
    # The exact-length logic around the op is model.onnx's, node for node, same inputs/outputs.
    others = Counter(n.op_type for n in float_graph.graph.node if n.op_type != "LSTM")
    assert Counter(n.op_type for n in int8_graph.graph.node if n.op_type != QUANTIZED_OP) == others
    for side in ("input", "output"):
        assert getattr(int8_graph.graph, side) == getattr(float_graph.graph, side)
    props = {p.key: p.value for p in int8_graph.metadata_props}
    assert (
        props["lstm_deploy.graph"] == "int8"
        and "per_channel=True" in props["lstm_deploy.quantization"]
    )

    floats, ints = _initializers(float_graph), _initializers(int8_graph)
    h = bundle.config.hidden_size
    for lstm, q in zip(lstms, quantized, strict=True):
        w, r = floats[lstm.input[1]][0], floats[lstm.input[2]][0]  # (4H, I + 1), (4H, H)
        # inputs 1, 2: W, R (D, K, 4H) int8; 8..11: W's and R's scales and zero points (D, 4H)
        for weights, names, is_w in ((w, q.input[1:2] + q.input[8:10], True),
                                     (r, q.input[2:3] + q.input[10:12], False)):  # fmt: skip
            q_w, scale, zero = (ints[name][0] for name in names)
            assert q_w.dtype == np.int8 and scale.shape == zero.shape == (4 * h,)
            assert not zero.any()  # symmetric: the kernel requires zero points of 0 for int8
            assert q_w.shape == weights.shape[::-1]
            if is_w:  # the pad flag's column (model.onnx: +-1e4 in the i and f rows) is zeroed
                assert not q_w[-1].any() and np.abs(weights[:, -1]).max() == 1e4
                weights = np.concatenate([weights[:, :-1], np.zeros_like(weights[:, -1:])], 1)
            # per output channel (gate row): scale = max |w| / 127, each weight within half a step
            np.testing.assert_allclose(scale, np.abs(weights).max(1) / 127, rtol=1e-6)
            dequantized = q_w.T.astype(np.float64) * scale[:, None]  # (4H, K)
            assert (np.abs(dequantized - weights) <= scale[:, None] / 2 * (1 + 1e-5)).all()


# -- validate -----------------------------------------------------------------------------------


def test_validate_judges_int8_by_its_own_class(onnx_bundle: Path) -> None:
    report = validate(onnx_bundle, quick=True, write=False)
    rows = _rows(report)
    row = rows[INT8_ROW]
    assert row.status == "passed" and row.precision == INT8, row.failures
    assert row.tolerance == TOLERANCES[INT8]
    assert len(row.results) == len(report.cases)
    metrics = [res.metrics[o]["oracle"] for res in row.results for o in OUTPUTS]
    # int8's error is real (float32's class would fail it) and within its own bound
    assert max(m.max_abs for m in metrics) > 1e-3
    assert max(m.max_ratio for m in metrics) < 1.0
    assert all(
        m.padding_nonzero == 0 for res in row.results for m in [res.metrics["output"]["oracle"]]
    )
    skipped = {
        "openvino-cpu": "sequence_lens",
        "onnx-reference": QUANTIZED_OP,
        "onnxruntime-cuda": "CUDA kernel",
    }
    for runtime, words in skipped.items():
        other = rows[(runtime, INT8_ONNX)]
        assert other.status == "skipped" and words in (other.reason or ""), runtime


def _rewrite_int8(bundle_dir: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Edit model.int8.onnx in place and re-sign it in the manifest: the bundle still loads."""
    path = bundle_dir / INT8_ONNX
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"][INT8_ONNX] = file_entry(path)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    load_bundle(bundle_dir)


def _swap_f_and_c(proto: onnx.ModelProto) -> None:
    """The quantized W's f and c gate blocks (and their scales) exchanged: a wrong gate order."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in _nodes(proto, QUANTIZED_OP):
        for name in (node.input[1], node.input[8]):
            a = numpy_helper.to_array(inits[name]).copy()
            h = a.shape[-1] // 4
            a[..., 2 * h : 3 * h], a[..., 3 * h :] = (
                a[..., 3 * h :].copy(),
                a[..., 2 * h : 3 * h].copy(),
            )
            inits[name].CopyFrom(numpy_helper.from_array(a, name))


def _drop_sequence_lens(proto: onnx.ModelProto) -> None:
    """The ops without sequence_lens: padded steps update the state (the pad flag is zeroed)."""
    for node in _nodes(proto, QUANTIZED_OP):
        node.input[4] = ""


@pytest.mark.parametrize(
    ("edit", "broken"),
    [(_swap_f_and_c, {"output", "hn", "cn"}), (_drop_sequence_lens, {"cn"})],
    ids=["swapped-gates", "no-sequence-lens"],
)
def test_broken_int8_graphs_fail(
    onnx_bundle: Path, tmp_path: Path, edit: Callable[[onnx.ModelProto], None], broken: set[str]
) -> None:
    copy = Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))
    _rewrite_int8(copy, edit)
    report = validate(copy, quick=True, write=False)
    rows = _rows(report)
    assert rows[("onnxruntime-cpu", ONNX)].status == "passed"  # model.onnx is untouched
    row = rows[INT8_ROW]
    assert row.status == "failed"
    assert {f.output for f in row.failures if f.kind == "tolerance"} == broken
    worst = max(res.metrics[o]["oracle"].max_ratio for res in row.results for o in broken)
    assert worst > 3  # not a near miss: several times the int8 bound
    if broken == {"cn"}:  # wrong only where a sequence is shorter than the batch's T
        cases = {c.id: c for c in report.cases}
        for res in row.results:
            if cases[res.case].lengths == "full":
                assert all(res.metrics[o]["oracle"].passed for o in OUTPUTS)


# -- why the other runtimes are skipped, and why the pad flag is zeroed -------------------------


def _cases_and_references(bundle_dir: Path) -> tuple[list[Case], References, object]:
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle)
    cases = [
        Case(0, 0, 5, 9, "full", "random"),
        Case(1, 0, 7, 40, "random", "random"),
    ]
    return cases, References(model, bundle.signature), bundle.config


def test_other_runtimes_cannot_run_it(onnx_bundle: Path) -> None:
    from onnx.reference import ReferenceEvaluator

    cases, refs, config = _cases_and_references(onnx_bundle)
    inputs = make_inputs(cases[0], config)
    with pytest.raises(NotImplementedError, match=QUANTIZED_OP):
        ReferenceEvaluator(str(onnx_bundle / INT8_ONNX)).run(None, inputs)

    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(onnx_bundle / INT8_ONNX), "CPU")
    tolerance = TOLERANCES[INT8]
    for case in cases:
        inputs = make_inputs(case, config)
        result = compiled.create_infer_request().infer(inputs)
        out = {o: np.array(result[compiled.output(o)]) for o in OUTPUTS}
        oracle = refs.run_oracle(inputs)
        checks = {o: compare(out[o], oracle[o], tolerance, 0.0) for o in OUTPUTS}
        if case.lengths == "full":  # OpenVINO reads DynamicQuantizeLSTM right...
            assert all(m.passed for m in checks.values()), case
        else:  # ...but ignores sequence_lens: c_n runs on over the padding
            assert checks["output"].passed and checks["hn"].passed
            assert checks["cn"].max_abs > 0.1, checks["cn"]


def test_the_pad_flag_column_would_spoil_quantization(onnx_bundle: Path, tmp_path: Path) -> None:
    """quantize_dynamic on model.onnx as it is: the pad flag's 1e4 sets its rows' scales."""
    from onnxruntime.quantization import quantize_dynamic

    naive = tmp_path / "naive.onnx"
    quantize_dynamic(onnx_bundle / ONNX, naive, op_types_to_quantize=["LSTM"], per_channel=True)
    cases, refs, config = _cases_and_references(onnx_bundle)
    inputs = make_inputs(cases[1], config)
    oracle = refs.run_oracle(inputs)
    pad = padding_mask(inputs["lengths"], cases[1].steps)
    for path, within in ((onnx_bundle / INT8_ONNX, True), (naive, False)):
        out = dict(zip(OUTPUTS, _session(path).run(list(OUTPUTS), inputs), strict=True))
        checks = [
            compare(out[o], oracle[o], TOLERANCES[INT8], 0.0, pad if o == "output" else None)
            for o in OUTPUTS
        ]
        assert all(m.passed for m in checks) == within, (path.name, [m.max_abs for m in checks])


# -- export -------------------------------------------------------------------------------------


def test_artifacts_int8_needs_onnx_and_no_projection(capsys: pytest.CaptureFixture) -> None:
    assert parse_artifacts(None)[:3] == ["torchscript", "onnx", "int8"]
    assert "int8" not in parse_artifacts(None, projected=True)  # no model.onnx to quantize
    with pytest.raises(BundleError, match="--artifacts onnx,int8"):
        parse_artifacts("int8")
    assert export_main(["export", "--demo", "--artifacts", "int8", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lstm-deploy export: error: --artifacts int8 needs onnx")
    assert "Traceback" not in err


# -- Triton and the server ----------------------------------------------------------------------


def test_triton_config_of_the_int8_model(onnx_bundle: Path) -> None:
    manifest = json.loads((onnx_bundle / MANIFEST).read_text())
    entry = manifest["triton"]["lstm_onnx_int8"]
    config = text_format.Parse(
        (onnx_bundle / "triton/lstm_onnx_int8/config.pbtxt").read_text(),
        model_config_pb2.ModelConfig(),
    )
    lstm_onnx = manifest["triton"]["lstm_onnx"]
    assert config.name == "lstm_onnx_int8" and config.platform == "onnxruntime_onnx"
    assert {k: v for k, v in entry.items() if k != "name"} == {
        k: v for k, v in lstm_onnx.items() if k != "name"
    }  # the same tensors, batching and instances as lstm_onnx
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [t.name for t in config.input] == ["input", "lengths", "h0", "c0"]
    # the onnxruntime backend's default file name, holding the int8 graph
    assert manifest["files"]["triton/lstm_onnx_int8/1/model.onnx"] == manifest["files"][INT8_ONNX]
    service = yaml.safe_load((onnx_bundle / "kserve/inferenceservice.yaml").read_text())
    assert "--load-model=lstm_onnx_int8" in service["spec"]["predictor"]["model"]["args"]


def test_serve_int8(onnx_bundle: Path, reference: Reference) -> None:
    import tritonclient.http as http

    rng = np.random.default_rng(0)
    x = reference.random_input(rng, 3, 11)
    lengths = np.array([11, 4, 1], np.int64)
    int8 = _session(onnx_bundle / INT8_ONNX)
    zeros_h = np.zeros((3, *reference.h_shape), np.float32)
    zeros_c = np.zeros((3, *reference.c_shape), np.float32)
    feeds = {"input": x, "lengths": lengths, "h0": zeros_h, "c0": zeros_c}
    expected = dict(zip(OUTPUTS, int8.run(list(OUTPUTS), feeds), strict=True))
    float32 = reference.run(x, lengths)
    with running_server(onnx_bundle, artifact=INT8_ONNX, dynamic_batching=False) as url:
        client = http.InferenceServerClient(url)
        try:
            inputs = [http.InferInput("input", list(x.shape), "FP32"),
                      http.InferInput("lengths", [3], "INT64")]  # fmt: skip
            inputs[0].set_data_from_numpy(x)
            inputs[1].set_data_from_numpy(lengths)
            result = client.infer("lstm_onnx", inputs)
        finally:
            client.close()
    for name in OUTPUTS:
        got = result.as_numpy(name)
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-6, err_msg=name)
        # ...which is the int8 graph, not model.onnx: near it, and not equal
        assert 1e-5 < np.abs(got - float32[name]).max() < TOLERANCES[INT8].atol, name


def test_serve_an_artifact_the_bundle_lacks(
    onnx_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"][INT8_ONNX]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / INT8_ONNX).unlink()
    assert serving_main(["serve", str(copy), "--artifact", INT8_ONNX, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"has no {INT8_ONNX}" in err and "--artifacts onnx,int8" in err, err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse: not a graph the server runs
        serving_main(["serve", str(copy), "--artifact", "model.pt"])
    capsys.readouterr()
