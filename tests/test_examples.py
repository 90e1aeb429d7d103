"""The worked examples of examples/, end to end as a user runs them: each trains for a few
seconds on its synthetic data, is exported with `lstm-deploy export --module`, validated (the C++
programs included), served, and queried with tritonclient; the streaming detector is sent its
audio in chunks, which must equal one run of the model as written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc
import tritonclient.http as http
from lstm_deploy_export.check.report import PASSED, SKIPPED
from lstm_deploy_export.check.validate import validate
from safetensors.torch import save_model
from serving_support import running_servers

from examples import detector, tagger

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 3.0  # of training: enough to learn each task far above chance
# Not int8: validate measured it over its bound on both trained examples (README, Your own model).
ARTIFACTS = "torchscript,onnx,scan"


def export(tmp: Path, name: str, model: torch.nn.Module, *args: str) -> Path:
    """`lstm-deploy export --module examples.NAME:make_model` of the trained weights."""
    weights, out = tmp / f"{name}.safetensors", tmp / f"{name}-bundle"
    save_model(model, str(weights))
    done = subprocess.run(
        [sys.executable, "-m", "lstm_deploy_export.cli", "export",
         "--module", f"examples.{name}:make_model", "--weights", str(weights), *args,
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def trained_tagger(tmp_path_factory: pytest.TempPathFactory) -> tuple[tagger.Tagger, Path]:
    model = tagger.make_model()
    accuracy = tagger.train(model, SECONDS)
    assert accuracy > 0.5, f"the tagger did not learn: held-out accuracy {accuracy:.1%}"
    bundle = export(
        tmp_path_factory.mktemp("tagger"), "tagger", model,
        "--example", "tokens=1x16:int64:0:100", "--example", "lengths=1:int64",
        "--output-names", "logits", "--artifacts", ARTIFACTS,
    )  # fmt: skip
    return model.eval(), bundle


@pytest.fixture(scope="module")
def trained_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[detector.Detector, Path]:
    model = detector.make_model()
    accuracy = detector.train(model, SECONDS)
    assert accuracy > 0.8, f"the detector did not learn: held-out accuracy {accuracy:.1%}"
    bundle = export(
        tmp_path_factory.mktemp("detector"), "detector", model,
        "--example", "features=1x50x20", "--output-names", "speech", "--streamable",
        "--artifacts", ARTIFACTS,
    )  # fmt: skip
    return model.eval(), bundle


@pytest.mark.parametrize("example", ["trained_tagger", "trained_detector"])
def test_every_artifact_validates_against_the_model_as_written(
    example: str, request: pytest.FixtureRequest
) -> None:
    _, bundle = request.getfixturevalue(example)
    report = validate(bundle, quick=True, cpp=True)  # the factory that the manifest records
    rows = {(r.runtime, r.artifact): r for r in report.rows}
    assert report.passed, [(f.kind, f.runtime, f.artifact, f.detail) for f in report.failures]
    ran = {key for key, r in rows.items() if r.status == PASSED}
    for needed in [
        ("onnxruntime-cpu", "model.onnx"),
        ("torchscript-cpu", "model.pt"),
        ("cpp-onnxruntime", "model.onnx"),
        ("onnxruntime-cpu", "model.scan.onnx"),
    ]:
        assert needed in ran, (needed, sorted(ran))  # fmt: skip
    assert ("cpp-libtorch", "model.pt") in ran, sorted(ran)
    for r in rows.values():
        assert r.status in (PASSED, SKIPPED) and (r.status == PASSED or r.reason), r


def test_the_tagger_served_tags_as_the_model(trained_tagger) -> None:
    model, bundle = trained_tagger
    g = torch.Generator().manual_seed(5)
    tokens, lengths, truth = tagger.batch(6, g)
    with torch.no_grad():
        expected = model(tokens, lengths).numpy()
    with running_servers(bundle) as (http_url, grpc_url):
        for module, url in ((http, http_url), (grpc, grpc_url)):
            inputs = [module.InferInput("tokens", list(tokens.shape), "INT64"),
                      module.InferInput("lengths", [6, 1], "INT64")]  # fmt: skip
            inputs[0].set_data_from_numpy(tokens.numpy())
            inputs[1].set_data_from_numpy(lengths.numpy().reshape(6, 1))
            client = module.InferenceServerClient(url)
            logits = client.infer("lstm_onnx", inputs).as_numpy("logits")
            client.close()
            valid = truth.numpy() >= 0
            np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=1e-4)
            accuracy = (logits.argmax(-1)[valid] == truth.numpy()[valid]).mean()
            assert accuracy > 0.5, accuracy
    # The example's own client, as README runs it, against a server of its own.
    with running_servers(bundle) as (http_url, _):
        done = subprocess.run(
            [sys.executable, "-m", "examples.tagger", "query", "12 57 3 88", "--url", http_url],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [w.split("/")[0] for w in done.stdout.split()] == ["12", "57", "3", "88"]


def test_the_detector_streamed_in_chunks_equals_one_run(trained_detector) -> None:
    model, bundle = trained_detector
    x, _ = detector.audio(1, 120, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).numpy()
    frames = x.numpy()
    with running_servers(bundle) as (http_url, grpc_url):
        for module, url, sequence in ((http, http_url, 11), (grpc, grpc_url, 12)):
            client = module.InferenceServerClient(url)
            pieces = []
            for start in range(0, 120, 25):  # chunks of 25 frames, the last of 20
                chunk = np.ascontiguousarray(frames[:, start : start + 25])
                item = module.InferInput("features", list(chunk.shape), "FP32")
                item.set_data_from_numpy(chunk)
                result = client.infer(
                    "lstm_onnx", [item], sequence_id=sequence, sequence_start=start == 0,
                    sequence_end=start + 25 >= 120,
                )  # fmt: skip
                pieces.append(result.as_numpy("speech"))
            client.close()
            np.testing.assert_allclose(np.concatenate(pieces, 1), expected, atol=1e-5, rtol=1e-5)
        done = subprocess.run(
            [sys.executable, "-m", "examples.detector", "stream", "--url", grpc_url],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
