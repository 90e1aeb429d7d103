"""Every artifact of a bundle, on its runtime, against the eager scratch module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lstm_deploy_export.check.compare import INT8, TOLERANCES, compare
from lstm_deploy_export.export.exporters import OPSET, op_types
from lstm_deploy_export.export.graphs import DeployLSTM, ExportError
from lstm_deploy_export.export.writer import export_bundle

from lstm_deploy import LSTM
from lstm_deploy.bundle import INT8_ONNX, Bundle

# layers 1-2 x bidirectional x projection, hidden sizes from 8 to 64.
EXPORT_CONFIGS = [
    dict(input_size=3, hidden_size=8, num_layers=1, bidirectional=False, proj_size=0),
    dict(input_size=6, hidden_size=16, num_layers=1, bidirectional=True, proj_size=0),
    dict(input_size=5, hidden_size=32, num_layers=2, bidirectional=False, proj_size=0),
    dict(input_size=4, hidden_size=64, num_layers=2, bidirectional=True, proj_size=0, bias=False),
    dict(input_size=3, hidden_size=12, num_layers=1, bidirectional=False, proj_size=5),
    dict(input_size=7, hidden_size=24, num_layers=2, bidirectional=True, proj_size=8),
]
SIZES = [(1, 1), (1, 300), (5, 1), (5, 7), (5, 300)]  # (B, T): none is the export example (2, 3)


def config_id(c: dict) -> str:
    return f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-H{c['hidden_size']}-P{c['proj_size']}"


@pytest.fixture(scope="module", params=EXPORT_CONFIGS, ids=config_id)
def exported(request, tmp_path_factory) -> tuple[LSTM, Bundle]:
    torch.manual_seed(0)
    model = LSTM(**request.param, batch_first=True).eval()
    return model, export_bundle(model, tmp_path_factory.mktemp("bundle"))


def make_inputs(model: LSTM, batch: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    d = 2 if model.bidirectional else 1
    state = model.num_layers * d
    h_out = model.proj_size or model.hidden_size
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps  # the longest is full length
    return {
        "input": torch.randn(batch, steps, model.input_size, generator=g).numpy(),
        "lengths": lengths.numpy(),
        "h0": torch.randn(batch, state, h_out, generator=g).numpy(),
        "c0": torch.randn(batch, state, model.hidden_size, generator=g).numpy(),
    }


def eager(model: LSTM, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outs = DeployLSTM(model)(*(torch.from_numpy(v) for v in inputs.values()))
    return [o.numpy() for o in outs]


def assert_outputs_close(actual: list, expected: list, where: str, atol: float = 1e-5) -> None:
    for name, a, e in zip(("output", "hn", "cn"), actual, expected):
        assert a.shape == e.shape, f"{where} {name}: shape {a.shape} != {e.shape}"
        err = float(np.abs(a - e).max())
        assert err <= atol, f"{where} {name}: max abs {err:.3g} > {atol:g}"


def test_torchscript_matches_eager(exported) -> None:
    model, bundle = exported
    loaded = torch.jit.load(str(bundle.file("model.pt")))
    for batch, steps in SIZES:
        inputs = make_inputs(model, batch, steps)
        with torch.no_grad():
            outs = [o.numpy() for o in loaded(*(torch.from_numpy(v) for v in inputs.values()))]
        assert_outputs_close(outs, eager(model, inputs), f"model.pt B={batch} T={steps}")


@pytest.mark.parametrize("artifact", ["model.onnx", "model.scan.onnx"])
def test_onnx_matches_eager_on_onnxruntime(exported, artifact: str) -> None:
    model, bundle = exported
    if artifact == "model.onnx" and model.proj_size > 0:
        # No ONNX LSTM op has a projection: such a bundle ships model.scan.onnx alone.
        assert not bundle.has(artifact) and bundle.has("model.scan.onnx")
        return
    session = ort.InferenceSession(str(bundle.file(artifact)), providers=["CPUExecutionProvider"])
    for batch, steps in SIZES:
        inputs = make_inputs(model, batch, steps)
        assert_outputs_close(
            session.run(None, inputs), eager(model, inputs), f"{artifact} B={batch} T={steps}"
        )


def test_int8_within_its_tolerance_on_onnxruntime(exported) -> None:
    """model.int8.onnx against the eager module, judged by the int8 class (README "Parity")."""
    model, bundle = exported
    if model.proj_size > 0:  # quantized from model.onnx, which has no projection
        assert not bundle.has(INT8_ONNX)
        return
    session = ort.InferenceSession(str(bundle.file(INT8_ONNX)), providers=["CPUExecutionProvider"])
    tolerance = TOLERANCES[INT8]
    for batch, steps in SIZES:
        inputs = make_inputs(model, batch, steps)
        actual = session.run(None, inputs)
        for name, a, e in zip(("output", "hn", "cn"), actual, eager(model, inputs)):
            m = compare(a, e, tolerance, eps32=0.0)
            assert m.passed, f"int8 B={batch} T={steps} {name}: max abs {m.max_abs:.3g}"


def test_onnx_graphs_are_well_formed(exported) -> None:
    model, bundle = exported
    for artifact in ("model.onnx", "model.scan.onnx"):
        if not bundle.has(artifact):
            continue
        proto = onnx.load(str(bundle.file(artifact)))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
        ops = op_types(proto)
        assert not ops & {
            "Loop",
            "SequenceEmpty",
            "SequenceConstruct",
            "ConcatFromSequence",
            "SplitToSequence",
        }
        if artifact == "model.onnx":
            assert "LSTM" in ops and "Scan" not in ops
            lstm_nodes = [n for n in proto.graph.node if n.op_type == "LSTM"]
            # one op per layer and direction: the reverse one runs forward over each sequence
            # reversed within its length, exact where sequence_lens is ignored (test_onnx_runtimes)
            assert len(lstm_nodes) == model.num_layers * (2 if model.bidirectional else 1)
            for node in lstm_nodes:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs.get("layout", 0) == 0 and attrs["direction"] == b"forward"
                assert node.input[4], "sequence_lens must be wired from lengths"
                # W, R, B are constants (initializers), not computed by Split/Concat in the graph
                initializers = {i.name for i in proto.graph.initializer}
                assert all(name in initializers for name in node.input[1:4] if name)
        else:
            assert "Scan" in ops and "LSTM" not in ops
        dims = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*proto.graph.input, *proto.graph.output)
        }
        assert dims["input"] == ["batch", "sequence", model.input_size]
        assert dims["lengths"] == ["batch"]
        assert dims["output"][:2] == ["batch", "sequence"]
        props = {p.key: p.value for p in proto.metadata_props}
        assert (
            props["lstm_deploy.version"]
            and f'"hidden_size": {model.hidden_size}' in props["lstm_deploy.config"]
        )


def test_projection_has_no_native_onnx_graph(tmp_path: Path) -> None:
    model = LSTM(3, 8, proj_size=2)
    with pytest.raises(ExportError, match=r"model.scan.onnx"):
        export_bundle(model, tmp_path / "b", artifacts="onnx")
