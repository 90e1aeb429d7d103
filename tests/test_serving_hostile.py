"""Serving that holds under hostile input: the malformed-request table, the response bound, the
manifest checked against model.onnx.

Every case goes raw over HTTP to the real server on a loopback port and must get its exact 4xx
(or 503) with Triton's ``{"error": "..."}`` body, never a 500, and a valid request must work right
after it. The known cases of the issue are in the table: 100,000 ``[``, JSON nested 5,000 deep,
``timeout`` 10**400, a long ``sequence_id``; the 33.5 MB gzip amplification has a test of its
own, with a bound on time and on this process's RSS (the server runs in this process). The
figures (cases, statuses, time, RSS) go to the test output and to ``hostile-summary.json`` under
pytest's base temp directory.
"""

from __future__ import annotations

import collections
import gzip
import json
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from lstm_deploy_export import cli as lstm_deploy_cli
from serving_support import metrics, running_server

INFER = "/v2/models/lstm_onnx/infer"
MAX_BODY = 1024 * 1024
MAX_RESPONSE = 256 * 1024
LIMITS = {"max_body_bytes": MAX_BODY, "max_response_bytes": MAX_RESPONSE}
X = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
SUMMARY: dict[str, Any] = {"statuses": collections.Counter(), "cases": 0}


# -- bodies ----------------------------------------------------------------------------------


def tensor(name: str = "input", value: Any = X, datatype: str = "FP32", **extra: Any) -> dict:
    value = np.asarray(value)
    entry = {"name": name, "datatype": datatype, "shape": list(value.shape)}
    entry["data"] = value.ravel().tolist()
    return {**entry, **extra}


def request(*inputs: dict, **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs) or [tensor()], **top}).encode()


def with_parameters(**parameters: Any) -> bytes:
    return request(parameters=parameters)


def with_input(**fields: Any) -> bytes:
    return request({**tensor(), **fields})


def binary(
    x: np.ndarray = X,
    *,
    size: Any = None,
    cut: int = 0,
    extra: bytes = b"",
    datatype: str = "FP32",
    shape: Any = None,
    header_length: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": datatype,
                    "shape": list(x.shape) if shape is None else shape,
                    "parameters": {"binary_data_size": len(raw) if size is None else size},
                }
            ]
        }
    ).encode()
    length = str(len(header)) if header_length is None else header_length
    return header + raw[: len(raw) - cut] + extra, {"Inference-Header-Content-Length": length}


def gzipped(body: bytes, encoding: str = "gzip") -> tuple[bytes, dict[str, str]]:
    return gzip.compress(body), {"Content-Encoding": encoding}


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


def raw_input(data: str, shape: str = "[1, 5, 8]") -> bytes:
    """An input whose ``data`` is given as JSON text: for what json.dumps cannot write."""
    return (
        f'{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": {shape}, "data": {data}}}]}}'
    ).encode()


NAN = X.copy()
NAN[0, 1, 2] = np.nan
LENGTH = {"name": "lengths", "datatype": "INT64", "shape": [1]}
PAD = b" " * 300_000  # past the size the server decodes on its event loop


@dataclass(frozen=True)
class Case:
    id: str
    body: bytes
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    path: str = INFER
    method: str = "POST"
    fragment: str = ""  # in the error message, where the wording matters


def case(id: str, body: bytes | tuple[bytes, dict[str, str]], status: int = 400, **kw: Any) -> Case:
    if isinstance(body, tuple):
        body, headers = body
        kw["headers"] = {**headers, **kw.get("headers", {})}
    return Case(id, body, status, **kw)


DEEP = 5000
CASES = [
    # -- JSON: the document ------------------------------------------------------------------
    case("empty-body", b"", fragment="malformed JSON"),
    case("json-null", b"null", fragment="must be a JSON object"),
    case("json-list", b"[]"),
    case("json-string", b'"inputs"'),
    case("json-number", b"1e999"),
    case("json-truncated", b'{"inputs": [', fragment="malformed JSON"),
    case("json-trailing-garbage", request() + b"}"),
    case("brackets-100000", b"[" * 100_000, fragment="nested too deeply"),
    case("objects-5000-deep", ('{"a":' * DEEP + "1" + "}" * DEEP).encode()),
    case(
        "parameters-5000-deep",
        request().replace(b"}]}", b'}], "p": ' + nested(DEEP).encode() + b"}"),
    ),
    case("data-5000-deep", raw_input(nested(DEEP)), fragment="nested too deeply"),
    case("data-100-deep", raw_input(nested(100))),
    case("not-utf8", b'{"inputs": "\xff\xfe"}', fragment="malformed JSON"),
    case("int-4500-digits", b'{"inputs": [], "id": ' + b"9" * 4500 + b"}"),
    case("lone-surrogate-name", request(tensor(name="\ud800"))),
    case("nul-in-name", request(tensor(name="in\x00put"))),
    # -- JSON: inputs ------------------------------------------------------------------------
    case("inputs-missing", b'{"outputs": []}', fragment="non-empty list 'inputs'"),
    case("inputs-object", b'{"inputs": {}}'),
    case("inputs-empty", b'{"inputs": []}'),
    case("inputs-number", b'{"inputs": [1]}'),
    case("inputs-null", b'{"inputs": [null]}'),
    case("name-missing", request({k: v for k, v in tensor().items() if k != "name"})),
    case("name-number", with_input(name=7)),
    case("name-unknown", request(tensor(name="x")), fragment="unexpected inference input 'x'"),
    case("name-duplicate", request(tensor(), tensor()), fragment="duplicate inputs"),
    case("input-missing", request({**LENGTH, "data": [5]}), fragment="expected input 'input'"),
    case("datatype-unknown", with_input(datatype="FP8")),
    case("datatype-bytes", with_input(datatype="BYTES")),
    case("datatype-wrong", with_input(datatype="FP64"), fragment="expects 'FP32'"),
    case("datatype-number", with_input(datatype=32)),
    case("shape-missing", request({k: v for k, v in tensor().items() if k != "shape"})),
    case("shape-string", with_input(shape="1,5,8")),
    case("shape-negative", with_input(shape=[1, -5, 8])),
    case("shape-float", with_input(shape=[1, 5.0, 8])),
    case("shape-bool", with_input(shape=[True, 5, 8])),
    case("shape-2**70", with_input(shape=[0, 2**70, 8], data=[])),
    case("shape-10**400", with_input(shape=[1, 10**400, 8])),
    case("shape-40-dims", with_input(shape=[1] * 40, data=[0.0])),
    case("shape-rank", with_input(shape=[5, 8]), fragment="Expected [-1,-1,8]"),
    case("shape-feature", with_input(shape=[1, 5, 9]), fragment="Expected [-1,-1,8]"),
    case("batch-zero", with_input(shape=[0, 5, 8], data=[])),
    case("batch-over-max", with_input(shape=[65, 1, 8], data=[0.0] * 520)),
    case("steps-zero", with_input(shape=[1, 0, 8], data=[]), fragment="0 time steps"),
    case("steps-over-max", with_input(shape=[1, 8193, 8]), fragment="--max-sequence-length"),
    case("data-count", with_input(data=[0.0] * 39), fragment="39 values in data"),
    case("data-ragged", raw_input("[[0.0, 1.0], [2.0]]", "[1, 1, 3]")),
    case("data-strings", with_input(data=["0.5"] * 40)),
    case("data-null", with_input(data=None)),
    case("data-object", with_input(data={"0": 1.0})),
    case("data-bools", with_input(data=[True] * 40)),
    case("data-nan-token", raw_input("[" + ", ".join(["NaN"] * 40) + "]"), fragment="NaN or Inf"),
    case("data-infinity", raw_input("[" + ", ".join(["-Infinity"] * 40) + "]")),
    case("data-1e400", raw_input("[" + ", ".join(["1e400"] * 40) + "]")),
    case("data-above-fp32", with_input(data=[1e39] * 40), fragment="NaN or Inf"),
    case("data-10**30", with_input(data=[10**30] * 40)),
    case("data-nan-json", request(tensor(value=NAN)), fragment="NaN or Inf"),
    case("lengths-float", request(tensor(), {**LENGTH, "data": [5.0]})),
    case("lengths-2**63", request(tensor(), {**LENGTH, "data": [2**63]}), fragment="range"),
    case("lengths-negative", request(tensor(), {**LENGTH, "data": [-1]})),
    case("lengths-past-steps", request(tensor(), {**LENGTH, "data": [6]})),
    case("lengths-int32", request(tensor(), {**LENGTH, "datatype": "INT32", "data": [5]})),
    case("h0-wrong-batch", request(tensor(), tensor("h0", np.zeros((2, 2, 16))))),
    case("data-and-binary", with_input(parameters={"binary_data_size": 160})),
    case("no-data", request({k: v for k, v in tensor().items() if k != "data"})),
    case("input-parameters-list", with_input(parameters=[1])),
    case("shared-memory", with_input(parameters={"shared_memory_region": "r"})),
    # -- JSON: outputs, id, parameters -------------------------------------------------------
    case("outputs-object", request(outputs={"name": "hn"})),
    case("outputs-number", request(outputs=[1])),
    case(
        "outputs-unknown", request(outputs=[{"name": "y"}]), fragment="unexpected inference output"
    ),
    case("outputs-twice", request(outputs=[{"name": "hn"}, {"name": "hn"}])),
    case("outputs-name-null", request(outputs=[{"name": None}])),
    case(
        "output-classification",
        request(outputs=[{"name": "hn", "parameters": {"classification": 2}}]),
    ),
    case(
        "output-binary-string",
        request(outputs=[{"name": "hn", "parameters": {"binary_data": "yes"}}]),
    ),
    case("id-number", request(id=7)),
    case("parameters-list", request(parameters=[])),
    case("binary-output-string", with_parameters(binary_data_output="true")),
    case("timeout-10**400", with_parameters(timeout=10**400), fragment="timeout"),
    case("timeout-2**64", with_parameters(timeout=2**64)),
    case("timeout-negative", with_parameters(timeout=-1)),
    case("timeout-float", with_parameters(timeout=1.5)),
    case("timeout-string", with_parameters(timeout="100")),
    case("timeout-expired", with_parameters(timeout=1), 503, fragment="timeout expired"),
    case("sequence-id-negative", with_parameters(sequence_id=-1, sequence_start=True)),
    case("sequence-id-2**64", with_parameters(sequence_id=2**64, sequence_start=True)),
    case("sequence-id-10**400", with_parameters(sequence_id=10**400, sequence_start=True)),
    case("sequence-id-bool", with_parameters(sequence_id=True, sequence_start=True)),
    case("sequence-id-float", with_parameters(sequence_id=7.0, sequence_start=True)),
    case("sequence-id-list", with_parameters(sequence_id=[7], sequence_start=True)),
    case("sequence-id-null", with_parameters(sequence_id=None)),
    case(
        "sequence-id-129-chars",
        with_parameters(sequence_id="s" * 129, sequence_start=True),
        fragment="at most 128 characters, got a string of 129",
    ),
    case("sequence-id-1MB", with_parameters(sequence_id="s" * 1_000_000, sequence_start=True)),
    case("sequence-start-string", with_parameters(sequence_id=7, sequence_start="true")),
    case("sequence-start-no-id", with_parameters(sequence_start=True)),
    case("sequence-not-live", with_parameters(sequence_id=987_654_321), fragment="not live"),
    case(
        "sequence-batch-2",
        request(
            tensor(value=np.zeros((2, 1, 8))), parameters={"sequence_id": 5, "sequence_start": True}
        ),
    ),
    # -- the binary tensor extension ---------------------------------------------------------
    case("binary-truncated", binary(cut=7), fragment="truncated binary data"),
    case("binary-extra-bytes", binary(extra=b"\0" * 4), fragment="belong to no input"),
    case("binary-size-negative", binary(size=-4)),
    case("binary-size-string", binary(size="160")),
    case("binary-size-bool", binary(size=True)),
    case("binary-size-2**70", binary(size=2**70)),
    case("binary-size-vs-shape", binary(size=156, cut=4), fragment="needs 160"),
    case("binary-shape-huge", binary(shape=[1, 2**62, 8])),
    case("binary-nan", binary(NAN), fragment="NaN or Inf"),
    case("binary-fp64", binary(X.astype(np.float64), datatype="FP64")),
    case("header-length-word", binary(header_length="ten"), fragment="must be an integer"),
    case("header-length-empty", binary(header_length="")),
    case("header-length-hex", binary(header_length="0x10")),
    case("header-length-negative", binary(header_length="-1")),
    case("header-length-past-body", binary(header_length="999999")),
    case("header-length-10**30", binary(header_length=str(10**30))),
    case("header-length-zero", binary(header_length="0"), fragment="malformed JSON"),
    case("header-length-mid-json", binary(header_length="20"), fragment="malformed JSON"),
    case(
        "header-length-binary-garbage",
        (b"\x89PNG\r\n\x1a\n" * 20, {"Inference-Header-Content-Length": "160"}),
    ),
    # -- content encodings and sizes ---------------------------------------------------------
    case("encoding-br", gzipped(request(), "br"), fragment="unsupported Content-Encoding"),
    case("encoding-gzip-twice", gzipped(request(), "gzip, gzip")),
    case("encoding-gzip-not-gzip", (request(), {"Content-Encoding": "gzip"})),
    case("encoding-deflate-not-deflate", (b"\x00" * 64, {"Content-Encoding": "deflate"})),
    case("encoding-gzip-truncated", (gzip.compress(request())[:40], {"Content-Encoding": "gzip"})),
    case("encoding-gzip-bomb", gzipped(b" " * (4 * MAX_BODY)), 413, fragment="decompressed"),
    case(
        "encoding-deflate-bomb",
        (zlib.compress(b"0" * (4 * MAX_BODY)), {"Content-Encoding": "deflate"}),
        413,
    ),
    case("body-over-limit", request() + b" " * MAX_BODY, 413, fragment="over the limit"),
    case(
        "response-over-limit-json",
        with_input(shape=[8, 1024, 8], data=[0.0] * 65536),
        fragment="ask for fewer outputs or binary data",
    ),
    case(
        "response-over-limit-binary",
        request(
            tensor(value=np.zeros((8, 1024, 8), np.float32)),
            parameters={"binary_data_output": True},
        ),
        fragment="--max-response-bytes",
    ),
    # -- the same over 256 KB (padded): decoded in a worker thread, by largejson --------------
    case("big-brackets-300000", b"[" * 300_000),
    case("big-data-5000-deep", raw_input(nested(DEEP)) + PAD),
    case(
        "big-parameters-5000-deep",
        request().replace(b"}]}", b'}], "p": ' + nested(DEEP).encode() + b"}") + PAD,
    ),
    case("big-data-strings", with_input(data=["0.5"] * 40) + PAD),
    case("big-data-10**30", with_input(data=[10**30] * 40) + PAD),
    case("big-data-100-deep", raw_input(nested(100)) + PAD),
    case(
        "big-lengths-2**63", request(tensor(), {**LENGTH, "data": [2**63]}) + PAD, fragment="range"
    ),
    case("big-timeout-10**400", with_parameters(timeout=10**400) + PAD, fragment="timeout"),
    case(
        "big-sequence-id-129-chars",
        with_parameters(sequence_id="s" * 129, sequence_start=True) + PAD,
    ),
    case("big-not-utf8", b'{"inputs": "\xff\xfe"}' + PAD, fragment="malformed JSON"),
    # -- routes ------------------------------------------------------------------------------
    case("model-unknown", request(), 404, path="/v2/models/gru/infer"),
    case("version-unknown", request(), 404, path="/v2/models/lstm_onnx/versions/2/infer"),
    case("model-name-8KB", request(), 404, path="/v2/models/" + "m" * 8192 + "/infer"),
    case("model-name-unicode", request(), 404, path="/v2/models/%F0%9F%A6%9C%00/infer"),
    case("infer-by-get", b"", 405, method="GET"),
    case("route-unknown", request(), 404, path="/v2/models/lstm_onnx/explain"),
]

# Requests at the edge of what is allowed: each must get 200.
VALID_EDGES = [
    ("timeout-2**64-1", with_parameters(timeout=2**64 - 1)),
    (
        "sequence-id-2**64-1",
        with_parameters(sequence_id=2**64 - 1, sequence_start=True, sequence_end=True),
    ),
    (
        "sequence-id-128-chars",
        with_parameters(sequence_id="s" * 128, sequence_start=True, sequence_end=True),
    ),
    ("lengths-as-triton-sends", request(tensor(), {**LENGTH, "shape": [1, 1], "data": [3]})),
    ("key-ending-in-data", request(**{'x"data': [1, 2], "data": [[3]]})),
    ("data-key-in-parameters", request(parameters={"data": [1, 2, 3]})),
    ("one-output-json", request(outputs=[{"name": "hn", "parameters": {"binary_data": False}}])),
]


# -- the table -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(onnx_bundle: Path) -> Iterator[str]:
    with running_server(onnx_bundle, **LIMITS) as address:
        yield address


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{url}", timeout=30) as c:
        yield c


def _good(client: httpx.Client) -> None:
    r = client.post(INFER, content=request())
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["output", "hn", "cn"]


def test_the_table_has_the_cases_it_claims() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_request_then_a_good_one(client: httpx.Client, c: Case) -> None:
    r = client.request(c.method, c.path, content=c.body, headers=c.headers)
    SUMMARY["cases"] += 1
    SUMMARY["statuses"][r.status_code] += 1
    assert r.status_code == c.status, r.text[:500]
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert isinstance(error, str) and error
    assert c.fragment in error
    assert len(error) < 20_000  # a hostile megabyte is not echoed back (a path is < 16 KB)
    _good(client)


@pytest.mark.parametrize(("id", "body"), VALID_EDGES, ids=[v[0] for v in VALID_EDGES])
def test_edges_that_are_allowed(client: httpx.Client, id: str, body: bytes) -> None:
    r = client.post(INFER, content=body)
    assert r.status_code == 200, r.text[:500]


def test_no_failure_was_a_500_and_failures_are_counted(url: str) -> None:
    assert SUMMARY["statuses"].get(500, 0) == 0
    assert metrics(url)["nv_inference_request_failure"] > 0


# -- a real fault is a 500, counted ----------------------------------------------------------


def test_an_unexpected_fault_is_a_counted_500(onnx_bundle: Path) -> None:
    from lstm_deploy_serving.config import ServeOptions
    from lstm_deploy_serving.server import ThreadedServer

    options = ServeOptions(bundle=onnx_bundle, port=0, log_level="critical")
    with ThreadedServer(options) as server, httpx.Client(timeout=30) as c:
        url = f"127.0.0.1:{server.port}"
        service = server.service

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        real = service._check_header
        service._check_header = broken  # type: ignore[method-assign]
        try:
            r = c.post(f"http://{url}{INFER}", content=request())
        finally:
            service._check_header = real  # type: ignore[method-assign]
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
        assert metrics(url)["nv_inference_request_failure"] == 1

        real_infer = service.infer_body
        service.infer_body = broken  # type: ignore[method-assign,assignment]
        try:
            r = c.post(f"http://{url}{INFER}", content=request())
        finally:
            service.infer_body = real_infer  # type: ignore[method-assign]
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
        assert metrics(url)["nv_inference_request_failure"] == 2
        assert c.post(f"http://{url}{INFER}", content=request()).status_code == 200


# -- the amplification: 33 KB of gzip, 33.5 MB of JSON, 347 MB of JSON back ------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


class _PeakRSS:
    """This process's peak RSS growth over a block, in MB: VmHWM after resetting it (Linux's
    clear_refs), and a 2 ms sampler of VmRSS where that reset is not allowed."""

    def __enter__(self) -> _PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self.baseline = _status_kb("VmRSS")
        self._peak, self._stop = self.baseline, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, _status_kb("VmHWM") if self._hwm else 0)
        self.growth_mb = (peak - self.baseline) / 1024


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """input 32, hidden 32: the bundle of the issue's report (its Triton max_batch_size is 64)."""
    import torch
    from lstm_deploy_export.export.writer import export_bundle

    import lstm_deploy

    torch.manual_seed(0)
    model = lstm_deploy.LSTM(32, 32, batch_first=True)
    return export_bundle(
        model, tmp_path_factory.mktemp("wide") / "bundle", artifacts=("onnx",)
    ).path


def test_gzip_amplification_is_refused_before_the_work(
    wide_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    batch, steps, features = 64, 8192, 32
    head = json.dumps({"name": "input", "datatype": "FP32", "shape": [batch, steps, features]})
    count = batch * steps * features
    plain = b'{"inputs":[' + head[:-1].encode() + b',"data":[' + b"0," * (count - 1) + b"0]}]}"
    body = gzip.compress(plain, 9)
    plain_size = len(plain)
    del plain
    # Default limits: a 64 MiB body and a 64 MiB response; every output in JSON.
    with (
        running_server(wide_bundle) as url,
        httpx.Client(base_url=f"http://{url}", timeout=30) as c,
    ):
        small = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32], "data": [0] * 32}
        assert c.post(INFER, json={"inputs": [small]}).status_code == 200  # warm
        with _PeakRSS() as rss:
            start = time.perf_counter()
            r = c.post(INFER, content=body, headers={"Content-Encoding": "gzip"})
            seconds = time.perf_counter() - start
        assert r.status_code == 400, r.text[:500]
        error = r.json()["error"]
        assert (
            "67108864 bytes (--max-response-bytes): ask for fewer outputs or binary data" in error
        )
        assert c.post(INFER, json={"inputs": [small]}).status_code == 200
    figures = {
        "gzip_bytes": len(body),
        "plain_bytes": plain_size,
        "status": r.status_code,
        "seconds": round(seconds, 3),
        "rss_growth_mb": round(rss.growth_mb, 1),
        "rss_method": "VmHWM after clear_refs" if rss._hwm else "VmRSS sampled every 2 ms",
    }
    SUMMARY["amplification"] = figures
    print(f"\namplification: {figures}")
    assert seconds < 1.0, figures
    assert rss.growth_mb < 100, figures


def test_summary(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Write the figures (run after the table and the amplification test, in file order)."""
    summary = {**SUMMARY, "statuses": dict(sorted(SUMMARY["statuses"].items()))}
    path = tmp_path_factory.getbasetemp() / "hostile-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nhostile requests: {json.dumps(summary)} ({path})")
    assert 500 not in summary["statuses"]


# -- a manifest that disagrees with model.onnx: the server refuses to start --------------------


def _edited(onnx_bundle: Path, tmp_path: Path, *edits: tuple[str, Any]) -> Path:
    """A copy of the bundle with manifest fields set (dotted paths), no checksum touched."""
    copy = Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    for dotted, value in edits:
        *parents, last = dotted.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("edits", "words"),
    [
        (
            [("config.input_size", 9), ("signature.inputs.0.shape.2", 9)],
            "manifest.json and model.onnx disagree: input 'input': manifest.json float32 "
            "[batch, sequence, 9], model.onnx float32 [batch, sequence, 8]",
        ),
        (
            [("signature.inputs.0.shape.2", 9)],
            "its signature and its LSTM config disagree: input 'input': signature float32 "
            "[batch, sequence, 9], config float32 [batch, sequence, 8]",
        ),
        (
            [("config.hidden_size", 17)]
            + [(f"signature.inputs.{i}.shape.2", 17) for i in (2, 3)]
            + [(f"signature.outputs.{i}.shape.2", 17) for i in (0, 1, 2)],
            "input 'c0': manifest.json float32 [batch, 2, 17], model.onnx float32 [batch, 2, 16]",
        ),
        (
            [("signature.inputs.1.dtype", "int32")],
            "input 'lengths': signature int32 [batch], config int64 [batch]",
        ),
        (
            # The served config, which the metadata (and so clients) read, edited alone.
            [("triton.lstm_python.input.2.dims", [3, 16])],
            "triton.lstm_python and the signature disagree: input 'h0': signature float32 "
            "[batch, 2, 16], triton.lstm_python TYPE_FP32 dims [3, 16]",
        ),
    ],
    ids=["input-size", "signature-only", "hidden-size", "lengths-dtype", "triton-config"],
)
def test_manifest_and_model_disagree_refuses_to_start(
    capsys: pytest.CaptureFixture[str],
    onnx_bundle: Path,
    tmp_path: Path,
    edits: list[tuple[str, Any]],
    words: str,
) -> None:
    bundle = _edited(onnx_bundle, tmp_path, *edits)
    code = lstm_deploy_cli.main(["serve", str(bundle), "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lstm-deploy serve: error: ") and words in err, err


def test_max_response_bytes_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from lstm_deploy_serving import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "b", "--max-response-bytes", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
