"""The bundle's Triton repository on a real Triton Inference Server (nvidia-pytriton's tritonserver).

Triton runs from a second venv (nvidia-pytriton needs numpy<2; this one has numpy 2):
``scripts/setup_triton_venv.sh`` creates ``.venv-triton``, or ``$LSTM_DEPLOY_TRITON_PYTHON`` names
its Python. Without it the Triton tests skip, except on CI (``CI=true``), where they fail: CI
installs it. Where the platform cannot run the wheel (glibc < 2.35) they skip with that reason.

Every expected value comes from a direct ONNX Runtime run of the bundle's model.onnx, and the same
requests go to our server (lstm_deploy_serving) and to Triton, over tritonclient.http (binary and
JSON) and tritonclient.grpc.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import serving_support
import yaml
from google.protobuf import text_format
from lstm_deploy_export.tools.triton_env import ENV_PYTHON
from lstm_deploy_export.tools.triton_server import TritonServer, check_repository, infer
from serving_support import Reference, running_server
from tritonclient.grpc import model_config_pb2

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
PYTHON_MODELS = ("lstm_python", "lstm_python_stateful")
TRITON_DTYPES = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every artifact Triton can serve (onnxruntime, libtorch, python), two layers."""
    import torch
    from lstm_deploy_export.export.writer import export_bundle

    import lstm_deploy

    torch.manual_seed(0)
    model = lstm_deploy.LSTM(4, 8, num_layers=2, batch_first=True)
    out = tmp_path_factory.mktemp("triton") / "bundle"
    return export_bundle(model, out, artifacts=("onnx", "torchscript")).path


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return serving_support.triton_python()


@pytest.fixture(scope="module")
def triton(onnx_bundle: Path, triton_python: Path) -> Iterator[TritonServer]:
    with TritonServer(check_repository(onnx_bundle), python=triton_python) as server:
        yield server


@pytest.fixture(scope="module")
def ours(onnx_bundle: Path) -> Iterator[str]:
    """Our server, under the python model's name: the same client code works on both."""
    with running_server(onnx_bundle, model_name="lstm_python") as url:
        yield url


@pytest.fixture
def http_client(triton: TritonServer) -> Iterator[object]:
    import tritonclient.http as http

    client = http.InferenceServerClient(triton.http_url)
    yield client
    client.close()  # before the server stops: an open keep-alive connection delays its exit


# -- the generated files (no server) ----------------------------------------------------------


def _dims(tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> list[int]:
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def test_every_config_parses_and_agrees_with_the_manifest(full_bundle: Path) -> None:
    manifest = json.loads((full_bundle / "manifest.json").read_text())
    sig = manifest["signature"]
    assert set(manifest["triton"]) == {"lstm_onnx", "lstm_torchscript", *PYTHON_MODELS}
    for model_name, entry in manifest["triton"].items():
        config = text_format.Parse(
            (full_bundle / "triton" / model_name / "config.pbtxt").read_text(),
            model_config_pb2.ModelConfig(),
        )
        assert config.name == model_name and config.max_batch_size == entry["max_batch_size"]
        assert config.platform == entry.get("platform", "")
        assert config.backend == entry.get("backend", "")
        for specs, tensors in ((sig["inputs"], config.input), (sig["outputs"], config.output)):
            assert len(tensors) == len(specs)
            for i, (spec, tensor) in enumerate(zip(specs, tensors, strict=True)):
                if model_name == "lstm_torchscript":
                    kind = "INPUT" if specs is sig["inputs"] else "OUTPUT"
                    assert tensor.name == f"{kind}__{i}"
                else:
                    assert tensor.name == spec["name"]
                assert tensor.data_type == TRITON_DTYPES[spec["dtype"]]
                expected = [-1 if isinstance(d, str) else d for d in spec["shape"][1:]]
                assert _dims(tensor) == expected, (model_name, tensor.name)
        if model_name in PYTHON_MODELS:
            assert config.backend == "python"
            inputs = {t.name: t for t in config.input}
            assert inputs["input"].allow_ragged_batch and not inputs["input"].optional
            assert all(inputs[n].optional for n in ("lengths", "h0", "c0"))
            files = {p.name for p in (full_bundle / "triton" / model_name / "1").iterdir()}
            assert {"model.py", "model.onnx", "lstm_deploy_serving"} <= files
            assert (
                manifest["files"][f"triton/{model_name}/1/model.onnx"]["sha256"]
                == manifest["files"]["model.onnx"]["sha256"]
            )
    stateful = text_format.Parse(
        (full_bundle / "triton/lstm_python_stateful/config.pbtxt").read_text(),
        model_config_pb2.ModelConfig(),
    )
    batcher = stateful.sequence_batching
    kinds = {c.name: c.control[0].kind for c in batcher.control_input}
    assert kinds == {
        "START": model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START,
        "END": model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END,
        "CORRID": model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID,
    }
    assert batcher.HasField("oldest") and batcher.max_sequence_idle_microseconds > 0
    assert not stateful.HasField("dynamic_batching")


def test_kserve_manifest(full_bundle: Path) -> None:
    manifest = json.loads((full_bundle / "manifest.json").read_text())
    assert "kserve/inferenceservice.yaml" in manifest["files"]
    service = yaml.safe_load((full_bundle / "kserve/inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert service["metadata"]["name"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["storageUri"].endswith("/triton")
    # NVIDIA's image runs the onnxruntime and libtorch models; its python has no onnxruntime.
    assert "--model-control-mode=explicit" in model["args"]
    loaded = {a.split("=", 1)[1] for a in model["args"] if a.startswith("--load-model=")}
    assert loaded == {"lstm_onnx", "lstm_torchscript"}


# -- a real Triton ----------------------------------------------------------------------------


def _request(rng: np.random.Generator, batch: int, steps: int, full: bool) -> dict:
    inputs = {"input": rng.standard_normal((batch, steps, 8), dtype=np.float32)}
    if full:  # every optional input given; otherwise the servers fill in the defaults
        inputs["lengths"] = rng.integers(1, steps + 1, batch).astype(np.int64)
        inputs["h0"] = rng.standard_normal((batch, 2, 16), dtype=np.float32)
        inputs["c0"] = rng.standard_normal((batch, 2, 16), dtype=np.float32)
    return inputs


def _expected(reference: Reference, inputs: dict) -> dict[str, np.ndarray]:
    return reference.run(inputs["input"], *(inputs.get(n) for n in ("lengths", "h0", "c0")))


def test_triton_loads_the_bundle_repository(http_client, triton: TritonServer) -> None:
    assert http_client.is_server_ready()
    index = {m["name"]: m.get("state") for m in http_client.get_model_repository_index()}
    assert index["lstm_python"] == index["lstm_python_stateful"] == "READY"
    assert index.get("lstm_onnx") != "READY"  # explicit mode: the wheel has no onnxruntime backend
    config = http_client.get_model_config("lstm_python")
    assert config["backend"] == "python" and config["max_batch_size"] == 64
    assert [t["name"] for t in config["input"]] == ["input", "lengths", "h0", "c0"]


@pytest.mark.parametrize("batch,steps,full", [(1, 1, False), (3, 17, True), (5, 40, False)])
def test_same_outputs_from_triton_and_ours(
    triton: TritonServer, ours: str, reference: Reference, batch: int, steps: int, full: bool
) -> None:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    inputs = _request(np.random.default_rng(steps), batch, steps, full)
    expected = _expected(reference, inputs)
    runs = {}
    # The same requests to both servers (lengths as [batch, 1], as the Triton config declares it).
    for server, url in (("triton", triton.http_url), ("ours", ours)):
        client = http.InferenceServerClient(url)
        try:
            for name, binary in (("binary", True), ("json", False)):
                runs[f"{server} http {name}"] = infer(client, "lstm_python", inputs, binary=binary)
        finally:
            client.close()
    client = grpc.InferenceServerClient(triton.grpc_url)
    try:
        runs["triton grpc"] = infer(client, "lstm_python", inputs)
    finally:
        client.close()
    for name, outputs in runs.items():
        for key, want in expected.items():
            np.testing.assert_allclose(
                outputs[key], want, rtol=0, atol=ATOL, err_msg=f"{name} {key}"
            )
            np.testing.assert_allclose(
                outputs[key], runs["ours http binary"][key], rtol=0, atol=ATOL, err_msg=name
            )


def test_a_subset_of_outputs_and_a_bad_request(http_client) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.ones((1, 4, 8), np.float32)
    outputs = infer(http_client, "lstm_python", {"input": x}, outputs=["hn"])
    assert set(outputs) == {"hn"} and outputs["hn"].shape == (1, 2, 16)
    with pytest.raises(InferenceServerException, match=r"lengths must be in \[1, 4\]"):
        infer(http_client, "lstm_python", {"input": x, "lengths": np.array([9], np.int64)})
    assert infer(http_client, "lstm_python", {"input": x})["output"].shape == (1, 4, 16)


@pytest.mark.parametrize("request_id", ["", "req-7", None])
def test_response_id_as_triton_echoes_it(triton: TritonServer, ours: str, request_id) -> None:
    """Triton echoes a request's ``id`` only when it is not empty (perf_analyzer sends "")."""
    body: dict[str, object] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2, 8], "data": [0.5] * 16}],
        "outputs": [{"name": "hn", "parameters": {"binary_data": False}}],
    }
    if request_id is not None:
        body["id"] = request_id
    heads = {}
    for server, url in (("triton", triton.http_url), ("ours", ours)):
        request = urllib.request.Request(
            f"http://{url}/v2/models/lstm_python/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            heads[server] = {k: v for k, v in json.loads(response.read()).items() if k != "outputs"}
    assert heads["ours"] == heads["triton"], heads
    assert ("id" in heads["ours"]) == bool(request_id)


def _exec_count(server: TritonServer, model: str) -> float:
    return server.metrics().get(f'nv_inference_exec_count{{model="{model}",version="1"}}', 0.0)


def test_48_concurrent_mixed_length_requests_are_batched(
    triton: TritonServer, reference: Reference
) -> None:
    import tritonclient.http as http
    import tritonclient.http.aio as aio

    rng = np.random.default_rng(48)
    # Every request has its own length: any merged execution merged different lengths. Triton
    # batches requests only with the same set of inputs (here all four, lengths < T included).
    requests = [_request(rng, 1, steps, full=True) for steps in range(1, 49)]
    before = _exec_count(triton, "lstm_python")

    async def send_all() -> list[dict[str, np.ndarray]]:
        client = aio.InferenceServerClient(triton.http_url, conn_limit=64)
        try:

            async def one(inputs: dict) -> dict[str, np.ndarray]:
                wire = []
                for name, value in inputs.items():
                    array = value.reshape(-1, 1) if name == "lengths" else value
                    t = http.InferInput(
                        name, list(array.shape), "INT64" if name == "lengths" else "FP32"
                    )
                    t.set_data_from_numpy(np.ascontiguousarray(array))
                    wire.append(t)
                result = await client.infer("lstm_python", wire)
                return {n: result.as_numpy(n) for n in ("output", "hn", "cn")}

            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await client.close()

    results = asyncio.run(send_all())
    executions = _exec_count(triton, "lstm_python") - before
    assert 1 <= executions < len(requests), executions
    for inputs, outputs in zip(requests, results, strict=True):
        for key, want in _expected(reference, inputs).items():
            np.testing.assert_allclose(outputs[key], want, rtol=0, atol=ATOL)
    stats = triton.metrics()
    assert stats['nv_inference_request_success{model="lstm_python",version="1"}'] >= 48


def _stream(url: str, model: str, sequences: dict[int, np.ndarray], chunk: dict[int, int]) -> dict:
    """Each sequence in chunks; a round sends the next chunk of every live sequence at once."""
    import tritonclient.http as http
    import tritonclient.http.aio as aio

    async def run() -> dict[int, list[dict[str, np.ndarray]]]:
        client = aio.InferenceServerClient(url)
        parts: dict[int, list[dict[str, np.ndarray]]] = {k: [] for k in sequences}
        try:

            async def send(seq_id: int, start: int) -> None:
                x = sequences[seq_id][:, start : start + chunk[seq_id]]
                t = http.InferInput("input", list(x.shape), "FP32")
                t.set_data_from_numpy(np.ascontiguousarray(x))
                result = await client.infer(
                    model,
                    [t],
                    sequence_id=seq_id,
                    sequence_start=start == 0,
                    sequence_end=start + chunk[seq_id] >= sequences[seq_id].shape[1],
                )
                parts[seq_id].append({n: result.as_numpy(n) for n in ("output", "hn", "cn")})

            longest = max(x.shape[1] for x in sequences.values())
            for step in range(0, longest, min(chunk.values())):
                due = [
                    k for k, x in sequences.items() if step % chunk[k] == 0 and step < x.shape[1]
                ]
                await asyncio.gather(*(send(k, step) for k in due))
        finally:
            await client.close()
        return parts

    parts = asyncio.run(run())
    return {
        k: {
            "output": np.concatenate([p["output"] for p in chunks], axis=1),
            "hn": chunks[-1]["hn"],
            "cn": chunks[-1]["cn"],
        }
        for k, chunks in parts.items()
    }


def test_interleaved_sequences_through_the_sequence_batcher_equal_one_shot(
    triton: TritonServer, ours: str, reference: Reference
) -> None:
    rng = np.random.default_rng(3)
    sequences = {
        11: reference.random_input(rng, 1, 24),
        12: reference.random_input(rng, 1, 30),
        13: reference.random_input(rng, 1, 12),
    }
    chunk = {11: 4, 12: 6, 13: 2}  # 6, 5 and 6 chunks, interleaved
    for url, model in ((triton.http_url, "lstm_python_stateful"), (ours, "lstm_python")):
        streamed = _stream(url, model, sequences, chunk)
        for seq_id, x in sequences.items():
            for key, want in reference.run(x).items():
                np.testing.assert_allclose(
                    streamed[seq_id][key],
                    want,
                    rtol=0,
                    atol=ATOL,
                    err_msg=f"{model} {seq_id} {key}",
                )
    # The sequence batcher merged chunks of different sequences into one execution.
    executions = _exec_count(triton, "lstm_python_stateful")
    assert 0 < executions < sum(-(-x.shape[1] // chunk[k]) for k, x in sequences.items())


# -- metadata and config, field by field ------------------------------------------------------

# Where our /config may differ from Triton's for the same lstm_python config, and why. Both are
# compared as Triton's ModelConfig protobuf, so a field one side leaves at its default (false, 0,
# "", FORMAT_NONE) and the other prints equals it, as in Triton's own gRPC answer.
CONFIG_DIFFERENCES = {
    "optimization.input_pinned_memory.enable": "Triton pins host memory for copies to and from "
    "GPUs by default; our server has no GPU path to pin memory for",
    "optimization.output_pinned_memory.enable": "the same, for outputs",
    "default_model_filename": "Triton fills in the python backend's file, model.py; our server "
    "runs the bundle's model.onnx in process and has no model file to name",
}


def _flat(value: object, path: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        return {
            k: v for key, item in value.items() for k, v in _flat(item, f"{path}{key}.").items()
        }
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{path}{i}.").items()}
    return {path.rstrip("."): value}


def _config_differences(ours: dict, theirs: dict) -> dict[str, tuple[object, object]]:
    """Every field where the two configs differ, as Triton's ModelConfig messages."""
    from google.protobuf import json_format

    def message(config: dict) -> dict[str, object]:
        parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        return _flat(json_format.MessageToDict(parsed, preserving_proto_field_name=True))

    a, b = message(ours), message(theirs)
    return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_metadata_and_config_as_triton_presents_them(
    onnx_bundle: Path, triton: TritonServer
) -> None:
    """The same lstm_python config on Triton and ours: the metadata equal, the config equal but
    where CONFIG_DIFFERENCES says why, over HTTP and gRPC."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from serving_support import running_servers

    with running_servers(onnx_bundle, model_name="lstm_python") as (ours_http, ours_grpc):
        found = {}
        for server, (http_url, grpc_url) in {
            "triton": (triton.http_url, triton.grpc_url),
            "ours": (ours_http, ours_grpc),
        }.items():
            client = http.InferenceServerClient(http_url)
            found[server, "http"] = (
                client.get_model_metadata("lstm_python"),
                client.get_model_config("lstm_python"),
            )
            client.close()
            client = grpc.InferenceServerClient(grpc_url)
            found[server, "grpc"] = (
                client.get_model_metadata("lstm_python"),  # protobuf messages
                client.get_model_config("lstm_python").config,
            )
            client.close()
    for protocol in ("http", "grpc"):
        (ours_meta, ours_config), (meta, config) = (
            found["ours", protocol],
            found["triton", protocol],
        )
        assert ours_meta == meta, protocol
        if protocol == "grpc":
            from google.protobuf import json_format

            ours_config, config = (json_format.MessageToDict(c) for c in (ours_config, config))
        differences = _config_differences(ours_config, config)
        assert set(differences) == set(CONFIG_DIFFERENCES), (protocol, differences)
    # What perf_analyzer and tritonclient read: Triton's shapes, the optional inputs.
    meta, config = found["ours", "http"]
    assert {t["name"]: t["shape"] for t in meta["inputs"]}["lengths"] == [-1, 1]
    assert meta["platform"] == "python" and config["backend"] == "python"
    assert [t["name"] for t in config["input"] if t.get("optional")] == ["lengths", "h0", "c0"]


# -- the command and the validate hook ------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lstm_deploy_export.cli", "triton", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_cli_errors_name_the_problem(onnx_bundle: Path, tmp_path: Path) -> None:
    cases = [
        ([str(onnx_bundle), "--python", str(tmp_path / "nope")], "no Python at"),
        ([str(onnx_bundle), "--python", sys.executable], "has no nvidia-pytriton"),
        ([str(tmp_path), "--python", sys.executable], "is not a bundle"),
    ]
    env = {k: v for k, v in os.environ.items() if k != ENV_PYTHON}
    for args, message in cases:
        proc = _cli(*args, env=env)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, out, err)
        assert "lstm-deploy triton: error:" in err and message in err, err


def test_cli_serves_until_sigterm(onnx_bundle: Path, triton_python: Path) -> None:
    import tritonclient.http as http

    proc = _cli(str(onnx_bundle), "--port", "0", "--python", str(triton_python))
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]  # printed once Triton is ready
        endpoints = dict(line.split(None, 1) for line in lines[1:4] if line.strip())
        assert set(endpoints) == {"HTTP", "gRPC", "metrics"}, (lines, proc.stderr)
        url = endpoints["HTTP"].strip().removeprefix("http://")
        assert url.startswith("127.0.0.1:")  # loopback only
        client = http.InferenceServerClient(url)
        try:
            x = np.ones((2, 3, 8), np.float32)
            assert infer(client, "lstm_python", {"input": x})["output"].shape == (2, 3, 16)
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_validate_triton_row_runs_the_sweep_through_triton(
    onnx_bundle: Path, triton_python: Path
) -> None:
    from lstm_deploy_export.check.report import PASSED
    from lstm_deploy_export.check.validate import validate

    report = validate(
        onnx_bundle, quick=True, triton=True, triton_python=str(triton_python), write=False
    )
    row = next(r for r in report.rows if r.runtime == "triton-python")
    assert row.status == PASSED, (row.reason, row.failures)
    assert len(row.results) == len(report.cases)  # every case went through the real server


# -- perf_analyzer: ours against Triton ---------------------------------------------------------


def test_loadtest_against_triton_quick(
    onnx_bundle: Path, triton_python: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loadtest --against-triton --quick` starts both servers and measures both protocols."""
    from lstm_deploy_serving import cli
    from serving_support import perf_analyzer_exe

    exe = perf_analyzer_exe()
    args = ["loadtest", "--bundle", str(onnx_bundle), "--against-triton", "--quick"]
    args += ["--concurrency", "2", "--triton-python", str(triton_python)]
    assert cli.main([*args, "--perf-analyzer", str(exe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("lstm-deploy ") and " vs Triton 2." in out[0], out[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out[4:]]
    assert [row[:2] for row in rows] == [["http", "2"], ["grpc", "2"]], out
    for row in rows:
        ours, theirs, ratio = float(row[2]), float(row[3]), float(row[4])
        assert ours > 0 and theirs > 0
        assert ratio == pytest.approx(ours / theirs, abs=0.01)  # printed to 2 places
