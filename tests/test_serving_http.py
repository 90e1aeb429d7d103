"""The real tritonclient.http client against the server on a loopback port.

Every output is compared with a direct ONNX Runtime run of the bundle's model.onnx (<= 1e-6).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from serving_support import Reference, metrics, running_server
from tritonclient.utils import InferenceServerException

MODEL = "lstm_onnx"
ATOL = 1e-6


@pytest.fixture(scope="module")
def url(onnx_bundle: Path) -> Iterator[str]:
    with running_server(onnx_bundle) as address:
        yield address


@pytest.fixture()
def client(url: str) -> Iterator[http.InferenceServerClient]:
    c = http.InferenceServerClient(url)
    yield c
    c.close()


def _input(name: str, value: np.ndarray, binary: bool = True) -> http.InferInput:
    datatype = "FP32" if value.dtype == np.float32 else "INT64"
    item = http.InferInput(name, list(value.shape), datatype)
    item.set_data_from_numpy(value, binary_data=binary)
    return item


def _close(result: http.InferResult, expected: dict[str, np.ndarray], names: list[str]) -> None:
    for name in names:
        got = result.as_numpy(name)
        assert got is not None, name
        assert got.shape == expected[name].shape, name
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=ATOL, err_msg=name)


def test_health_and_metadata(client: http.InferenceServerClient, onnx_bundle: Path) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "lstm-deploy-serving"
    assert {"binary_tensor_data", "model_configuration", "sequence"} <= set(server["extensions"])
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]}
    assert shapes == {
        "input": ("FP32", [-1, -1, 8]),
        "lengths": ("INT64", [-1, 1]),  # as Triton presents the config's dims [1]
        "h0": ("FP32", [-1, 2, 16]),
        "c0": ("FP32", [-1, 2, 16]),
        "output": ("FP32", [-1, -1, 16]),
        "hn": ("FP32", [-1, 2, 16]),
        "cn": ("FP32", [-1, 2, 16]),
    }
    assert client.get_model_metadata(MODEL, "1") == meta


def test_config_is_the_bundles_triton_config(
    client: http.InferenceServerClient, onnx_bundle: Path
) -> None:
    import json

    # lstm_python's: the Triton model this server is (same batcher, same optional inputs),
    # under the served name, with the fields Triton fills in when it loads a config.
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    config = client.get_model_config(MODEL)
    written = manifest["triton"]["lstm_python"]
    filled = {
        "version_policy": {"latest": {"num_versions": 1}},
        "dynamic_batching": {**written["dynamic_batching"], "preferred_batch_size": [64]},
        "instance_group": [{**written["instance_group"][0], "name": f"{MODEL}_0"}],
    }
    assert config == {**written, "name": MODEL, **filled}


def test_unknown_model_and_version_are_404(client: http.InferenceServerClient) -> None:
    for call in (
        lambda: client.get_model_metadata("nope"),
        lambda: client.get_model_config(MODEL, "2"),
    ):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_all_outputs(
    client: http.InferenceServerClient, reference: Reference, binary: bool
) -> None:
    rng = np.random.default_rng(1)
    x = reference.random_input(rng, 3, 11)
    lengths = np.array([11, 4, 1], np.int64)
    h0 = rng.standard_normal((3, *reference.h_shape), dtype=np.float32)
    c0 = rng.standard_normal((3, *reference.c_shape), dtype=np.float32)
    inputs = [
        _input(n, v, binary)
        for n, v in [("input", x), ("lengths", lengths), ("h0", h0), ("c0", c0)]
    ]
    outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("output", "hn", "cn")]
    result = client.infer(MODEL, inputs, outputs=outputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "1"
    described = result.get_response()["outputs"]
    assert all(("parameters" in o) == binary and ("data" in o) != binary for o in described)
    _close(result, reference.run(x, lengths, h0, c0), ["output", "hn", "cn"])


def test_infer_defaults_and_binary_by_default(
    client: http.InferenceServerClient, reference: Reference
) -> None:
    """Only `input`: full lengths and zero states; no outputs named: all of them, binary."""
    x = reference.random_input(np.random.default_rng(2), 2, 7)
    result = client.infer(MODEL, [_input("input", x, binary=False)])
    assert all("parameters" in o for o in result.get_response()["outputs"])
    _close(result, reference.run(x), ["output", "hn", "cn"])


def test_infer_subset_of_outputs(client: http.InferenceServerClient, reference: Reference) -> None:
    x = reference.random_input(np.random.default_rng(3), 1, 5)
    result = client.infer(
        MODEL, [_input("input", x)], outputs=[http.InferRequestedOutput("hn", binary_data=False)]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["hn"]
    assert result.as_numpy("output") is None
    _close(result, reference.run(x), ["hn"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(
    client: http.InferenceServerClient, reference: Reference, algorithm: str
) -> None:
    x = reference.random_input(np.random.default_rng(4), 2, 6)
    result = client.infer(MODEL, [_input("input", x)], request_compression_algorithm=algorithm)
    _close(result, reference.run(x), ["output", "hn", "cn"])


def test_versioned_infer_and_metrics(
    client: http.InferenceServerClient, url: str, reference: Reference
) -> None:
    before = metrics(url)
    x = reference.random_input(np.random.default_rng(5), 4, 3)
    _close(client.infer(MODEL, [_input("input", x)], model_version="1"), reference.run(x), ["cn"])
    after = metrics(url)
    assert after["nv_inference_request_success"] == before["nv_inference_request_success"] + 1
    assert after["nv_inference_count"] == before["nv_inference_count"] + 4
    assert after["nv_inference_exec_count"] == before["nv_inference_exec_count"] + 1
    with urllib.request.urlopen(f"http://{url}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    for name in (
        "nv_inference_request_failure",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
    ):
        assert f"# TYPE {name} " in text and f'{name}{{model="lstm_onnx",version="1"}}' in text


def test_model_name_flag(onnx_bundle: Path, reference: Reference) -> None:
    with running_server(onnx_bundle, model_name="speech") as address:
        c = http.InferenceServerClient(address)
        assert c.is_model_ready("speech") and not c.is_model_ready(MODEL)
        assert c.get_model_config("speech")["name"] == "speech"
        x = reference.random_input(np.random.default_rng(6), 1, 2)
        _close(c.infer("speech", [_input("input", x)]), reference.run(x), ["output"])
        c.close()


def test_one_model_under_the_triton_repository_names(
    onnx_bundle: Path, reference: Reference
) -> None:
    # `serve --model-name lstm_python --model-name lstm_python_stateful`: README's Triton client
    # code runs unchanged, the stream going to lstm_python_stateful as on Triton.
    names = ("lstm_python", "lstm_python_stateful")
    with running_server(onnx_bundle, model_name=names[0], model_aliases=names[1:]) as address:
        c = http.InferenceServerClient(address)
        for name in names:
            assert c.is_model_ready(name)
            assert c.get_model_metadata(name)["name"] == c.get_model_config(name)["name"] == name
        assert not c.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException, match="serves 'lstm_python', 'lstm_python_s"):
            c.get_model_metadata(MODEL)
        x = reference.random_input(np.random.default_rng(7), 1, 6)
        whole = c.infer(names[0], [_input("input", x)])
        assert whole.get_response()["model_name"] == names[0]
        _close(whole, reference.run(x), ["output", "hn", "cn"])
        first, second = np.split(x, 2, axis=1)
        c.infer(names[1], [_input("input", first)], sequence_id=3, sequence_start=True)
        last = c.infer(names[1], [_input("input", second)], sequence_id=3, sequence_end=True)
        assert last.get_response()["model_name"] == names[1]
        _close(last, reference.run(x), ["hn", "cn"])
        c.close()


def test_serving_never_imports_torch() -> None:
    # Serving reads bundles through the torch-free contract (lstm_deploy.bundle), and nothing else
    # of lstm_deploy: not the model, not the weights, not the export package.
    code = (
        "import sys\n"
        "import lstm_deploy_serving.server, lstm_deploy_serving.app, lstm_deploy_serving.cli\n"
        "import lstm_deploy_serving.loadtest, lstm_deploy_serving.__main__\n"
        "from lstm_deploy_serving.service import InferenceService\n"
        "bad = [m for m in ('torch', 'lstm_deploy.model', 'lstm_deploy.weights', "
        "'lstm_deploy_export') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
