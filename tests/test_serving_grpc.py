"""The real tritonclient.grpc client against the server's gRPC port (KServe v2's
inference.GRPCInferenceService, as Triton serves it).

Every output is compared with a direct ONNX Runtime run of the bundle's model.onnx (<= 1e-5);
metadata and config with what the HTTP routes serve; errors with HTTP's message and Triton's
status code.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as http
from google.protobuf import json_format
from lstm_deploy_serving.launch import ServerProcess
from serving_support import Reference, metrics, running_servers, wait_until
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

MODEL = "lstm_onnx"
ALIAS = "lstm_python"
ATOL = 1e-5
KEY = "grpc-test-key-0123"


@pytest.fixture(scope="module")
def urls(onnx_bundle: Path) -> Iterator[tuple[str, str]]:
    with running_servers(onnx_bundle, model_aliases=(ALIAS,), max_body_bytes=1 << 20) as pair:
        yield pair


@pytest.fixture()
def client(urls: tuple[str, str]) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(urls[1])
    yield c
    c.close()


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{url}{path}", timeout=10) as r:
        return json.loads(r.read())


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    item = grpcclient.InferInput(
        name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64"
    )
    item.set_data_from_numpy(value)
    return item


def _close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=0, atol=ATOL, err_msg=name)


def _status(call: object) -> tuple[str | None, str]:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as e:
        return e.status(), e.message()
    raise AssertionError("the call succeeded")


def test_health_metadata_and_config_are_https(
    client: grpcclient.InferenceServerClient, urls: tuple[str, str]
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(ALIAS, "1")
    assert not client.is_model_ready("other") and not client.is_model_ready(MODEL, "2")
    assert (
        client.get_server_metadata(as_json=True)["extensions"] == _get(urls[0], "/v2")["extensions"]
    )
    for name in (MODEL, ALIAS):
        meta = client.get_model_metadata(name, as_json=True)
        want = _get(urls[0], f"/v2/models/{name}")
        assert meta["name"] == name and meta["versions"] == want["versions"]
        assert meta["platform"] == want["platform"]
        for side in ("inputs", "outputs"):
            got = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[side]]
            assert got == [(t["name"], t["datatype"], t["shape"]) for t in want[side]]
        # The same config message as HTTP's JSON parsed by protobuf: nothing lost on the way.
        config = client.get_model_config(name).config
        http_config = _get(urls[0], f"/v2/models/{name}/config")
        assert config == json_format.ParseDict(http_config, model_config_pb2.ModelConfig())
        assert config.name == name and config.max_batch_size == http_config["max_batch_size"]


@pytest.mark.parametrize("model", [MODEL, ALIAS])
def test_infer_equals_onnxruntime(
    client: grpcclient.InferenceServerClient, reference: Reference, model: str
) -> None:
    rng = np.random.default_rng(1)
    x = reference.random_input(rng, 3, 7)
    lengths = np.array([7, 3, 5], np.int64)
    h0 = rng.standard_normal((3, *reference.h_shape), dtype=np.float32)
    c0 = rng.standard_normal((3, *reference.c_shape), dtype=np.float32)
    expected = reference.run(x, lengths, h0, c0)
    inputs = [
        _input("input", x),
        _input("lengths", lengths[:, None]),
        _input("h0", h0),
        _input("c0", c0),
    ]
    result = client.infer(model, inputs, request_id="r-1")
    assert result.get_response().model_name == model and result.get_response().id == "r-1"
    _close({n: result.as_numpy(n) for n in expected}, expected)
    only = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("hn")])
    assert [o.name for o in only.get_response().outputs] == ["hn"]
    _close({"hn": only.as_numpy("hn")}, {"hn": expected["hn"]})


def test_typed_contents_equal_raw(urls: tuple[str, str], reference: Reference) -> None:
    """Inputs in their typed fields (fp32_contents, int64_contents), not raw_input_contents."""
    x = reference.random_input(np.random.default_rng(2), 2, 6)
    lengths = np.array([6, 2], np.int64)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    request.inputs.add(name="lengths", datatype="INT64", shape=[2]).contents.int64_contents.extend(
        lengths.tolist()
    )
    with grpc.insecure_channel(urls[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=10)
        request.inputs[1].contents.ClearField("int64_contents")
        request.inputs[1].contents.fp32_contents.extend([6.0, 2.0])
        with pytest.raises(grpc.RpcError) as wrong:
            stub.ModelInfer(request, timeout=10)
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INT64 data goes in contents.int64_contents" in str(wrong.value.details())
    result = grpcclient.InferResult(response)
    _close({n: result.as_numpy(n) for n in ("output", "hn", "cn")}, reference.run(x, lengths))


def test_a_repeated_header_is_checked_once_and_each_request_still_checked(
    urls: tuple[str, str], reference: Reference
) -> None:
    """The server reuses the checked header of a request it has seen (grpc_codec.header_key):
    the same header with other data runs on its own data, and with a raw entry too many or of
    the wrong size it is refused as it would be the first time."""
    rng = np.random.default_rng(5)
    xs = [reference.random_input(rng, 1, 4) for _ in range(2)]

    def request(*raw: bytes) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name=MODEL)
        message.inputs.add(name="input", datatype="FP32", shape=[1, 4, 8])
        message.raw_input_contents.extend(raw)
        return message

    with grpc.insecure_channel(urls[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        results = [grpcclient.InferResult(stub.ModelInfer(request(x.tobytes()))) for x in xs]
        refused = {}
        for name, raw in (("two", (xs[0].tobytes(),) * 2), ("short", (xs[0].tobytes()[:-4],))):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request(*raw), timeout=10)
            refused[name] = e.value
    for x, result in zip(xs, results, strict=True):
        _close({n: result.as_numpy(n) for n in ("output", "hn", "cn")}, reference.run(x))
    assert {e.code() for e in refused.values()} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "raw_input_contents has 2 entries for 1 inputs" in refused["two"].details()
    assert "input" in refused["short"].details(), refused["short"].details()


def test_stream_sequences_equal_one_shot(
    client: grpcclient.InferenceServerClient, reference: Reference
) -> None:
    """Two sequences interleaved on one stream, in chunks, with an error between them: each
    sequence's outputs equal one ONNX Runtime run over the whole of it, and the stream goes on."""
    rng = np.random.default_rng(3)
    steps = {7: [5, 1, 9, 3], "seq-b": [2, 6, 4]}
    xs = {k: reference.random_input(rng, 1, sum(v)) for k, v in steps.items()}
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = 0
    for i in range(max(len(v) for v in steps.values())):
        for seq, sizes in steps.items():
            if i >= len(sizes):
                continue
            at = sum(sizes[:i])
            chunk = xs[seq][:, at : at + sizes[i]]
            client.async_stream_infer(
                MODEL,
                [_input("input", chunk)],
                request_id=f"{seq}:{i}",
                sequence_id=seq,
                sequence_start=i == 0,
                sequence_end=i == len(sizes) - 1,
            )
            sent += 1
        if i == 1:  # a bad request in the middle: answered with an error, the stream stays open
            client.async_stream_infer(MODEL, [_input("input", np.zeros((1, 2, 3), np.float32))])
    results, errors = {}, []
    for _ in range(sent + 1):
        result, error = answers.get(timeout=20)
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result
    client.stop_stream()
    assert len(errors) == 1 and "unexpected shape for input 'input'" in errors[0].message()
    for seq, sizes in steps.items():
        output = np.concatenate(
            [results[f"{seq}:{i}"].as_numpy("output") for i in range(len(sizes))], 1
        )
        last = results[f"{seq}:{len(sizes) - 1}"]
        expected = reference.run(xs[seq])
        _close({"output": output, "hn": last.as_numpy("hn"), "cn": last.as_numpy("cn")}, expected)


def test_errors_carry_https_message_and_tritons_status(
    client: grpcclient.InferenceServerClient, urls: tuple[str, str]
) -> None:
    bad = np.zeros((1, 2, 3), np.float32)  # input_size 8 expected
    status, message = _status(lambda: client.infer(MODEL, [_input("input", bad)]))
    over = http.InferenceServerClient(urls[0])
    with pytest.raises(InferenceServerException) as over_http:
        over.infer(MODEL, [http_input(bad)])
    over.close()
    assert status == "StatusCode.INVALID_ARGUMENT" and message == over_http.value.message()
    ok = np.zeros((1, 2, 8), np.float32)
    cases = {
        "StatusCode.NOT_FOUND": lambda: client.infer("other", [_input("input", ok)]),
        "StatusCode.INVALID_ARGUMENT": lambda: client.infer(
            MODEL, [_input("input", np.zeros((65, 2, 8), np.float32))]
        ),
    }
    for code, call in cases.items():
        assert _status(call)[0] == code
    # a chunk of a sequence never started; a request over --max-body-bytes (1 MiB here)
    status, message = _status(lambda: client.infer(MODEL, [_input("input", ok)], sequence_id=99))
    assert status == "StatusCode.INVALID_ARGUMENT" and "send sequence_start" in message
    big = np.zeros((1, 40000, 8), np.float32)
    assert (
        _status(lambda: client.infer(MODEL, [_input("input", big)]))[0]
        == "StatusCode.RESOURCE_EXHAUSTED"
    )
    assert _status(lambda: client.get_model_metadata("other"))[0] == "StatusCode.NOT_FOUND"
    assert _status(client.get_model_repository_index)[0] == "StatusCode.UNIMPLEMENTED"
    assert client.infer(MODEL, [_input("input", ok)]).as_numpy("hn") is not None


def http_input(value: np.ndarray) -> http.InferInput:
    item = http.InferInput("input", list(value.shape), "FP32")
    item.set_data_from_numpy(value)
    return item


def test_api_key(onnx_bundle: Path) -> None:
    x = np.zeros((1, 2, 8), np.float32)
    with running_servers(onnx_bundle, api_key=KEY) as (_, url):
        c = grpcclient.InferenceServerClient(url)
        assert c.is_server_live() and c.is_server_ready()  # open, as /v2/health/*
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            call = partial(c.infer, MODEL, [_input("input", x)], headers=headers)
            assert _status(call)[0] == "StatusCode.UNAUTHENTICATED"
            assert (
                _status(partial(c.is_model_ready, MODEL, headers=headers))[0]
                == "StatusCode.UNAUTHENTICATED"
            )
        answers: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: answers.put(error))
        # refused when it opens, before any request is read
        assert "UNAUTHENTICATED" in str(answers.get(timeout=10))
        c.stop_stream()
        good = {"authorization": f"Bearer {KEY}"}
        assert c.is_model_ready(MODEL, headers=good)
        assert c.infer(MODEL, [_input("input", x)], headers=good).as_numpy("hn") is not None
        c.start_stream(callback=lambda result, error: answers.put(error), headers=good)
        c.async_stream_infer(MODEL, [_input("input", x)])
        assert answers.get(timeout=10) is None
        c.stop_stream()
        c.close()


class UnaryClient(threading.Thread):
    """Sends ModelInfer back to back until the server refuses one."""

    def __init__(self, url: str, x: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.client = grpcclient.InferenceServerClient(url)
        self.x = x
        self.outcomes: Counter[str] = Counter()
        self.finished_at: list[float] = []
        self.hn: list[np.ndarray] = []

    def run(self) -> None:
        while True:
            try:
                result = self.client.infer(MODEL, [_input("input", self.x)], client_timeout=30)
            except InferenceServerException as e:
                self.outcomes[str(e.status())] += 1
                break
            self.outcomes["OK"] += 1
            self.finished_at.append(time.monotonic())
            self.hn.append(result.as_numpy("hn"))
        self.client.close()


def test_sigterm_drains_calls_and_streams(onnx_bundle: Path, reference: Reference) -> None:
    """In-flight calls finish, a stream's requests already sent are all answered (a sequence
    whose chunks run one after another, 100 ms batching window each), then the stream ends with
    UNAVAILABLE; new calls get UNAVAILABLE; the process exits 0 before the drain timeout."""
    chunks, drain_timeout = 6, 10.0
    rng = np.random.default_rng(4)
    x = reference.random_input(rng, 1, 3)
    seq = reference.random_input(rng, 1, 2 * chunks)
    args = ["--drain-timeout", str(drain_timeout), "--max-queue-delay-us", "100000"]
    with ServerProcess(onnx_bundle, args) as server:
        assert server.process is not None and server.grpc_url
        clients = [UnaryClient(server.grpc_url, x) for _ in range(6)]
        for c in clients:
            c.start()
        streamer = grpcclient.InferenceServerClient(server.grpc_url)
        answers: queue.Queue = queue.Queue()
        streamer.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(chunks):
            streamer.async_stream_infer(
                MODEL,
                [_input("input", seq[:, 2 * i : 2 * i + 2])],
                request_id=str(i),
                sequence_id=5,
                sequence_start=i == 0,
                sequence_end=i == chunks - 1,
            )
        deadline = time.monotonic() + 30
        while min(c.outcomes["OK"] for c in clients) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        first = [answers.get(timeout=20) for _ in range(2)]  # every chunk has been read by now
        # SIGTERM while unary calls wait in the batcher's window (a stream chunk is one more)
        assert wait_until(lambda: metrics(server.url)["nv_inference_pending_request_count"] >= 3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(drain_timeout + 5)
        exited = time.monotonic() - signalled
        rest = [answers.get(timeout=10) for _ in range(chunks - 2 + 1)]
        for c in clients:
            c.join(10)
        streamer.stop_stream()
        streamer.close()

    assert code == 0, "\n".join(server.lines)
    assert exited < drain_timeout
    results = {r.get_response().id: r for r, e in first + rest if e is None}
    errors = [e for r, e in first + rest if e is not None]
    assert sorted(results, key=int) == [str(i) for i in range(chunks)], errors
    assert len(errors) == 1 and errors[0].status() == "StatusCode.UNAVAILABLE", errors
    assert "shutting down" in errors[0].message()
    output = np.concatenate([results[str(i)].as_numpy("output") for i in range(chunks)], 1)
    _close(
        {"output": output, "hn": results[str(chunks - 1)].as_numpy("hn")},
        {k: v for k, v in reference.run(seq).items() if k != "cn"},
    )
    totals = sum((c.outcomes for c in clients), Counter())
    assert set(totals) <= {"OK", "StatusCode.UNAVAILABLE"}, totals
    assert all(c.outcomes["StatusCode.UNAVAILABLE"] == 1 for c in clients), totals
    assert sum(t > signalled for c in clients for t in c.finished_at) >= 1, (
        "none in flight finished"
    )
    expected = reference.run(x)["hn"]
    for c in clients:
        for hn in c.hn:
            np.testing.assert_allclose(hn, expected, rtol=0, atol=ATOL)


def test_a_taken_grpc_port_fails_before_anything_listens(onnx_bundle: Path) -> None:
    from lstm_deploy_serving.config import ServeOptions
    from lstm_deploy_serving.connections import FrontEndError
    from lstm_deploy_serving.server import ThreadedServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = ServeOptions(bundle=onnx_bundle, host="127.0.0.1", port=0, grpc_port=port)
        with pytest.raises(
            FrontEndError, match=rf"127.0.0.1:{port}: Address already in use; pass --grpc-port"
        ):
            ThreadedServer(options)
