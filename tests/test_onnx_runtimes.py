"""model.onnx and model.scan.onnx are exact on every ONNX runtime, not only on ONNX Runtime.

OpenVINO and onnx's reference evaluator both ignore the LSTM op's `sequence_lens`; the graphs must
not depend on it. Each configuration is exported and validated (quick sweep: T = 1, short and
1024; batch 1, odd and 64; full, equal, random and one-long lengths) on every CPU row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lstm_deploy_export.check.sweep import Case, make_inputs
from lstm_deploy_export.check.validate import validate
from lstm_deploy_export.export.writer import export_bundle

from lstm_deploy import LSTM
from lstm_deploy.bundle import ONNX

ONNX_ROWS = ("onnxruntime-cpu", "openvino-cpu", "onnx-reference")
CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=3),  # no model.onnx: the op has no projection
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_every_onnx_runtime_passes(config: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LSTM(5, 6, batch_first=True, **config)
    bundle = export_bundle(
        model, tmp_path / "bundle", artifacts="onnx,scan" if not config.get("proj_size") else "scan"
    )
    report = validate(bundle, quick=True, write=False)
    rows = {(r.runtime, r.artifact): r for r in report.rows}
    artifacts = ["model.scan.onnx"] + ([] if config.get("proj_size") else ["model.onnx"])
    for runtime in ONNX_ROWS:
        for artifact in artifacts:
            row = rows[(runtime, artifact)]
            assert row.status == "passed", (runtime, artifact, row.reason, row.failures)
            steps = {report.case(r.case).steps for r in row.results}
            assert 1 in steps and any(s > 1 for s in steps)  # T = 1 and longer, varied lengths
    if config.get("proj_size"):
        row = rows[("openvino-cpu", "model.onnx")]
        assert row.status == "skipped" and "projection" in (row.reason or "")
    assert report.passed, report.failures


def test_device_call_binds_what_session_run_computes(tmp_path: Path) -> None:
    """The CUDA rows' I/O-binding call, run on the CPU: the same outputs as session.run."""
    from lstm_deploy_export.check import ort_session

    torch.manual_seed(0)
    bundle = export_bundle(LSTM(3, 4, num_layers=2, batch_first=True), tmp_path / "b")
    session = ort_session.make_session(bundle.file(ONNX), threads=1)
    sig = bundle.signature
    feeds = make_inputs(Case(0, 0, 3, 5, "random", "random"), bundle.config)
    feeds = {n: np.ascontiguousarray(feeds[n]) for n in sig.input_names}
    bound = ort_session.device_call(session, feeds, sig.output_names, "cpu")().copy_outputs_to_cpu()
    for name, want, got in zip(sig.output_names, session.run(sig.output_names, feeds), bound):
        np.testing.assert_array_equal(got, want, err_msg=name)
