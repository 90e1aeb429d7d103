"""Heavy and hostile bodies against a real server process: the event loop stays responsive,
memory comes back, and a full decode pool answers 503 with Retry-After.

The server runs as a subprocess (``lstm-deploy serve`` on loopback): an in-process server would
share this test's GIL, and its RSS would be the test's.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lstm_deploy_serving.launch import ServerProcess
from serving_support import Reference

LIVENESS_P99_S = 0.1
RSS_RETURN_MB = 150


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v2/models/lstm_onnx/infer", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


class _Watch(threading.Thread):
    """Polls /v2/health/live every 10 ms and samples the server's RSS."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.latencies: list[float] = []
        self.peak_rss = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        host, port = self.url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while not self._done.is_set():
            start = time.perf_counter()
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            self.latencies.append(time.perf_counter() - start)
            self.peak_rss = max(self.peak_rss, _rss_mb(self.pid))
            time.sleep(0.01)
        conn.close()

    def stop(self) -> float:
        """Stop; the 99th percentile of the liveness latencies, in seconds."""
        self._done.set()
        self.join()
        return float(np.percentile(self.latencies, 99))


def _concurrently(url: str, jobs: list[tuple[bytes, dict[str, str]]]) -> list[tuple]:
    results: list[tuple] = [()] * len(jobs)

    def one(i: int) -> None:
        results[i] = _post(url, *jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _binary_request(x: np.ndarray, outputs: str = "binary") -> tuple[bytes, dict[str, str]]:
    header: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ]
    }
    if outputs == "binary":
        header["parameters"] = {"binary_data_output": True}
    else:
        header["outputs"] = [{"name": "output"}, {"name": "hn"}]
    head = json.dumps(header).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


@pytest.fixture(scope="module")
def server(onnx_bundle: Path) -> Iterator[ServerProcess]:
    # Five: the test below sends five large bodies at once, which all arrive before any is done
    # (a sixth would be refused with 503: test_codec_pool_full_is_503_with_retry_after).
    with ServerProcess(onnx_bundle, ["--max-codec-requests", "5"]) as s:
        yield s


def test_big_json_bodies_refused_early_while_liveness_answers(
    server: ServerProcess, reference: Reference
) -> None:
    """Four 39 MB JSON bodies claiming a [1, 1, 8] tensor, and a large valid JSON request at the
    same time: 400s without parsing 3M floats, the valid one answered right, and liveness on
    time throughout (before: +850 MB and 8 s of a blocked event loop for four 60 MB bodies)."""
    pid = server.process.pid  # type: ignore[union-attr]
    base = _rss_mb(pid)
    hostile = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": [0.1] * 3_000_000}
            ]
        }
    ).encode()
    x = reference.random_input(np.random.default_rng(0), 4, 2048)
    valid = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
            ],
            "outputs": [{"name": "output"}, {"name": "hn"}],
        }
    ).encode()
    assert len(valid) > 1024 * 1024  # the large-body path
    watch = _Watch(server.url, pid)
    watch.start()
    time.sleep(0.2)
    results = _concurrently(server.url, [(hostile, {})] * 4 + [(valid, {})])
    p99 = watch.stop()
    print(f"liveness p99 {p99 * 1e3:.1f} ms, RSS +{watch.peak_rss - base:.0f} MB at the peak")
    for status, body, _ in results[:4]:
        assert status == 400, body
        assert b"at least 2999999 values in data, but shape [1, 1, 8] needs 8" in body
    status, body, _ = results[4]
    assert status == 200, body
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    want = reference.run(x)
    for name in ("output", "hn"):
        got = np.asarray(outputs[name]["data"], np.float32).reshape(outputs[name]["shape"])
        np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5)
    assert p99 < LIVENESS_P99_S
    # The bodies themselves (4 x 39 MB, briefly twice while joined), not 3M Python floats each.
    assert watch.peak_rss - base < 4 * 2.5 * len(hostile) / 2**20


def test_largest_request_memory_returns(server: ServerProcess, reference: Reference) -> None:
    """The largest request the server allows ([64, 8192, 8]: max batch, max length), binary:
    RSS back within 150 MB of its baseline within 5 s (before: ONNX Runtime's arena kept
    690 MB), and liveness on time while it runs."""
    pid = server.process.pid  # type: ignore[union-attr]
    x = reference.random_input(np.random.default_rng(1), 64, 8192)
    body, headers = _binary_request(x)
    _post(server.url, *_binary_request(x[:1, :16]))  # warm
    time.sleep(0.5)
    base = _rss_mb(pid)
    watch = _Watch(server.url, pid)
    watch.start()
    status, answer, _ = _post(server.url, body, headers)
    p99 = watch.stop()
    assert status == 200, answer[:200]
    peak = watch.peak_rss - base
    deadline, after = time.monotonic() + 5, _rss_mb(pid) - base
    while after > RSS_RETURN_MB and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _rss_mb(pid) - base
    print(f"liveness p99 {p99 * 1e3:.1f} ms, RSS +{peak:.0f} MB at the peak, +{after:.0f} after")
    assert after <= RSS_RETURN_MB
    assert p99 < LIVENESS_P99_S


def test_full_decode_pool_answers_503_with_retry_after(onnx_bundle: Path) -> None:
    """With one decode slot, large bodies arriving together: the ones that find it taken get
    503 and Retry-After at once; small requests are never refused by it."""
    hostile = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": [0.1] * 2_000_000}
            ]
        }
    ).encode()
    small = _binary_request(np.zeros((1, 4, 8), np.float32))
    with ServerProcess(onnx_bundle, ["--max-codec-requests", "1"]) as s:
        results = _concurrently(s.url, [(hostile, {})] * 6 + [small] * 4)
    statuses = [r[0] for r in results]
    assert set(statuses[:6]) <= {400, 503} and 503 in statuses[:6], statuses
    assert statuses[6:] == [200] * 4
    for status, body, headers in results[:6]:
        if status == 503:
            assert headers.get("retry-after") == "1"
            assert "--max-codec-requests" in json.loads(body)["error"]


_NESTED = np.arange(2 * 5 * 3, dtype=np.float64).reshape(2, 5, 3) / 7
LARGEJSON_CASES = [
    ("flat", _NESTED.ravel().tolist(), [2, 5, 3]),
    ("nested", _NESTED.tolist(), [2, 5, 3]),
    ("one huge row", [_NESTED.reshape(10, 3).tolist()], [1, 10, 3]),
    ("ints", np.arange(40).tolist(), [40]),
    ("booleans", [True, False] * 20, [40]),
    ("empty", [], [0]),
]


@pytest.mark.parametrize(
    "data, shape", [c[1:] for c in LARGEJSON_CASES], ids=[c[0] for c in LARGEJSON_CASES]
)
@pytest.mark.parametrize("indent", [None, 2])
def test_largejson_parses_as_json_loads(
    monkeypatch: pytest.MonkeyPatch, data: list, shape: list[int], indent: int | None
) -> None:
    """Chunks and blocks of a few bytes, so every step runs: the header json.loads gives, each
    data list as np.asarray of it; the encoder writes what json.dumps writes."""
    from lstm_deploy_serving import largejson

    monkeypatch.setattr(largejson, "CHUNK_BYTES", 24)
    monkeypatch.setattr(largejson, "BLOCK_BYTES", 7)
    monkeypatch.setattr(largejson, "CHUNK_VALUES", 5)
    doc = {
        "id": 'a "data": [1]',
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}],
        "parameters": {"inputs": [{"data": [1]}]},
    }
    raw = json.dumps(doc, indent=indent).encode()
    got = largejson.loads_header(raw)
    want = json.loads(raw)
    got_data, want_data = got["inputs"][0].pop("data"), np.asarray(want["inputs"][0].pop("data"))
    assert got == want
    assert got_data.dtype == want_data.dtype and np.array_equal(got_data, want_data)
    values = np.asarray(data, np.float32)
    assert (
        largejson.encode_json_data(values)
        == json.dumps(values.ravel().tolist(), separators=(",", ":")).encode()
    )


@pytest.mark.parametrize(
    "data, shape, message",
    [
        ([[1, 2], [3]], [3], "not a regular"),
        (list(range(100)), [3], "at least 99 values in data, but shape [3] needs 3"),
        ([1] + [None] * 3, [4], None),  # nulls reach the codec, which refuses them
    ],
)
def test_largejson_refuses_before_parsing(
    monkeypatch: pytest.MonkeyPatch, data: list, shape: list[int], message: str | None
) -> None:
    from lstm_deploy_serving import largejson
    from lstm_deploy_serving.errors import BadRequest

    monkeypatch.setattr(largejson, "CHUNK_BYTES", 8)
    raw = json.dumps({"inputs": [{"name": "x", "shape": shape, "data": data}]}).encode()
    if message is None:
        assert largejson.loads_header(raw)["inputs"][0]["data"].dtype == object
        return
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        largejson.loads_header(raw)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_cut_off_compressed_body_is_refused(encoding: str) -> None:
    """A stream cut before its end (for gzip: before its checksum) is not taken as the body."""
    import zlib

    from lstm_deploy_serving.codecpool import inflate
    from lstm_deploy_serving.errors import BadRequest

    wbits = 31 if encoding == "gzip" else 15
    compressor = zlib.compressobj(wbits=wbits)
    whole = compressor.compress(b'{"inputs": []}' * 100) + compressor.flush()
    assert inflate(whole, encoding, 1 << 20) == b'{"inputs": []}' * 100
    with pytest.raises(BadRequest, match="ends early"):
        inflate(whole[:-4], encoding, 1 << 20)
