"""Errors as Triton returns them: status + {"error": "..."}, and the server keeps serving.

Each bad request of the serving issue is sent raw over one keep-alive connection, followed by a
correct request that must still succeed. The CLI's errors are one line and exit code 2.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from lstm_deploy_export import cli as lstm_deploy_cli
from lstm_deploy_serving import cli
from lstm_deploy_serving.server import ThreadedServer

INFER = "/v2/models/lstm_onnx/infer"
LIMITS = {"max_sequence_length": 64, "max_batch_size": 4, "max_body_bytes": 64 * 1024}


def _tensor(name: str, value: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(value.shape),
        "data": value.ravel().tolist(),
    }


def _json_body(*tensors: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(tensors)}).encode()


def _binary_body(
    x: np.ndarray, claimed: int | None = None, cut: int = 0
) -> tuple[bytes, dict[str, str]]:
    raw = x.astype(np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": claimed or len(raw)},
                }
            ]
        }
    ).encode()
    body = header + raw[: len(raw) - cut]
    return body, {"Inference-Header-Content-Length": str(len(header))}


X = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
NAN = X.copy()
NAN[0, 2, 3] = np.nan
INF = X.copy()
INF[0, 0, 0] = np.inf

# (id, path, body, headers, status, message fragment)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed-json", INFER, b'{"inputs": [', {}, 400, "malformed JSON"),
    ("truncated-binary", INFER, *_binary_body(X, cut=7), 400, "truncated binary data"),
    (
        "header-length-past-body",
        INFER,
        _binary_body(X)[0],
        {"Inference-Header-Content-Length": "999999"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "wrong-input-name",
        INFER,
        _json_body(_tensor("inputs", X)),
        {},
        400,
        "unexpected inference input 'inputs' for model 'lstm_onnx'",
    ),
    (
        "missing-input",
        INFER,
        _json_body(_tensor("lengths", np.array([5]), "INT64")),
        {},
        400,
        "expected input 'input'",
    ),
    (
        "wrong-datatype",
        INFER,
        _json_body(_tensor("input", X, "FP64")),
        {},
        400,
        "data-type is 'FP64', but model 'lstm_onnx' expects 'FP32'",
    ),
    (
        "wrong-rank",
        INFER,
        _json_body(_tensor("input", X[0])),
        {},
        400,
        "Expected [-1,-1,8], got [5,8]",
    ),
    (
        "wrong-feature-size",
        INFER,
        _json_body(_tensor("input", X[:, :, :3])),
        {},
        400,
        "Expected [-1,-1,8], got [1,5,3]",
    ),
    (
        # lengths comes as [batch, 1] (Triton's form, the metadata's) or [batch] (the signature's)
        "lengths-shape",
        INFER,
        _json_body(_tensor("input", X), _tensor("lengths", np.array([[5, 5]]), "INT64")),
        {},
        400,
        "unexpected shape for input 'lengths' for model 'lstm_onnx'. Expected [-1,1] or [-1], "
        "got [1,2]",
    ),
    ("nan-json", INFER, _json_body(_tensor("input", NAN)), {}, 400, "contains NaN or Inf"),
    ("inf-binary", INFER, *_binary_body(INF), 400, "contains NaN or Inf"),
    ("zero-steps", INFER, _json_body(_tensor("input", X[:, :0])), {}, 400, "0 time steps"),
    (
        "too-many-steps",
        INFER,
        _json_body(_tensor("input", np.zeros((1, 65, 8)))),
        {},
        400,
        "65 time steps, above this server's maximum of 64",
    ),
    (
        "length-zero",
        INFER,
        _json_body(_tensor("input", X), _tensor("lengths", np.array([0]), "INT64")),
        {},
        400,
        "lengths must be in [1, 5]",
    ),
    (
        "length-past-steps",
        INFER,
        _json_body(_tensor("input", X), _tensor("lengths", np.array([6]), "INT64")),
        {},
        400,
        "lengths must be in [1, 5]",
    ),
    (
        "batch-above-max",
        INFER,
        _json_body(_tensor("input", np.zeros((5, 2, 8)))),
        {},
        400,
        "batch-size must be <= 4",
    ),
    (
        "duplicate-inputs",
        INFER,
        _json_body(_tensor("input", X), _tensor("input", X)),
        {},
        400,
        "duplicate inputs: input",
    ),
    (
        "h0-wrong-batch",
        INFER,
        _json_body(_tensor("input", X), _tensor("h0", np.zeros((2, 2, 16)))),
        {},
        400,
        "input 'h0' has batch size 2, but 'input' has 1",
    ),
    (
        "unknown-output",
        INFER,
        json.dumps({"inputs": [_tensor("input", X)], "outputs": [{"name": "y"}]}).encode(),
        {},
        400,
        "unexpected inference output 'y'",
    ),
    (
        "bad-sequence-flag",
        INFER,
        json.dumps(
            {"inputs": [_tensor("input", X)], "parameters": {"sequence_start": True}}
        ).encode(),
        {},
        400,
        "need a non-zero sequence_id",
    ),
    (
        "body-over-limit",
        INFER,
        _json_body(_tensor("input", np.zeros((1, 64, 8)))) + b" " * 70_000,
        {},
        413,
        "over the limit of 65536",
    ),
    (
        "queue-timeout",
        INFER,
        json.dumps({"inputs": [_tensor("input", X)], "parameters": {"timeout": 1}}).encode(),
        {},
        503,
        "request timeout expired in the queue",
    ),
    (
        "unknown-model",
        "/v2/models/gru/infer",
        _json_body(_tensor("input", X)),
        {},
        404,
        "unknown model 'gru'",
    ),
    (
        "unknown-version",
        "/v2/models/lstm_onnx/versions/3/infer",
        _json_body(_tensor("input", X)),
        {},
        404,
        "unknown version '3'",
    ),
    ("unknown-route", "/v2/models/lstm_onnx/explain", b"{}", {}, 404, "Not Found"),
]


@pytest.fixture(scope="module")
def server(onnx_bundle: Path) -> Iterator[ThreadedServer]:
    from lstm_deploy_serving.config import ServeOptions

    options = ServeOptions(bundle=onnx_bundle, port=0, log_level="warning", **LIMITS)  # type: ignore[arg-type]
    with ThreadedServer(options) as s:
        yield s


@pytest.fixture(scope="module")
def http_client(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def _good(client: httpx.Client) -> None:
    r = client.post(INFER, content=_json_body(_tensor("input", X)))
    assert r.status_code == 200, r.text
    assert {o["name"] for o in r.json()["outputs"]} == {"output", "hn", "cn"}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_request_then_good(
    http_client: httpx.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    r = http_client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    _good(http_client)


def test_failures_are_counted(http_client: httpx.Client) -> None:
    text = http_client.get("/metrics").text
    assert 'nv_inference_request_failure{model="lstm_onnx",version="1"} 0' not in text


def test_a_runtime_fault_is_500_and_the_server_recovers(
    server: ThreadedServer, http_client: httpx.Client
) -> None:
    class Broken:
        def run(self, *args: object) -> None:
            raise RuntimeError("device lost")

    model = server.service.model
    session, model.session = model.session, Broken()  # type: ignore[assignment]
    try:
        r = http_client.post(INFER, content=_json_body(_tensor("input", X)))
    finally:
        model.session = session
    assert r.status_code == 500
    assert r.json() == {"error": "inference failed: RuntimeError: device lost"}
    _good(http_client)


# -- the CLI -------------------------------------------------------------------------------------


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = lstm_deploy_cli.main(["serve", *args])  # the command users run
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_missing_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _serve(capsys, str(tmp_path / "nope"))
    assert (
        code == 2
        and err
        == f"lstm-deploy serve: error: bundle not found: {tmp_path / 'nope'} is not a directory"
    )


def test_cli_tampered_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, onnx_bundle: Path
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    code, err = _serve(capsys, str(copy))
    assert code == 2 and "does not match the sha256" in err and len(err.splitlines()) == 1


def test_cli_port_in_use(capsys: pytest.CaptureFixture[str], onnx_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # gRPC on a free port: its default, port + 1, may be any socket's of this process.
        code, err = _serve(capsys, str(onnx_bundle), "--port", str(port), "--grpc-port", "0")
    assert code == 2 and err.startswith(
        f"lstm-deploy serve: error: cannot listen on 127.0.0.1:{port}"
    )


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "b", "--max-batch-size", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert cli.main(["loadtest"]) == 2
    assert "give either a server URL or --bundle" in capsys.readouterr().err


def test_chunked_body_over_the_limit_is_413(http_client: httpx.Client) -> None:
    """No Content-Length to refuse up front: the limit is counted while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield _json_body(_tensor("input", X))
        for _ in range(20):
            yield b" " * 8192

    r = http_client.post(INFER, content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    _good(http_client)
