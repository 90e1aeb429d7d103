"""The statistics extension, as Triton reports it: ``GET /v2/models[/{m}[/versions/{v}]]/stats``,
the gRPC ``ModelStatistics`` and ``/metrics``, all read from one record.

The server batches at most 4 rows with a fixed 30 s window, so the batches are known in advance:
batch-1 requests sent together run 4 at a time, a batch-4 request runs at once, alone. Every
batch these tests send fills up, so none waits out the window; its length only keeps a stall of
the test process (a CI run failed here once with a 1 s window: 1 + 2 rows instead of 3) from
splitting requests sent together.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as http
from google.protobuf import json_format
from serving_support import Reference, metrics, running_servers
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

MODEL = "lstm_onnx"
ALIAS = "lstm_python"
MAX_BATCH = 4
COMPUTE = ("compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def urls(onnx_bundle: Path) -> Iterator[tuple[str, str]]:
    # A fixed window: the batches are then known in advance (an adaptive one runs the first
    # request of a burst at once).
    options = dict(
        max_batch_size=MAX_BATCH,
        max_queue_delay_us=30_000_000,
        adaptive_window=False,
        model_aliases=(ALIAS,),
    )
    with running_servers(onnx_bundle, **options) as pair:
        yield pair


@pytest.fixture()
def client(urls: tuple[str, str]) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(urls[1])
    yield c
    c.close()


def _stats(client: grpcclient.InferenceServerClient) -> service_pb2.ModelStatistics:
    (entry,) = client.get_inference_statistics(MODEL).model_stats
    return entry


def _count(stats: service_pb2.ModelStatistics, name: str) -> int:
    return int(getattr(stats.inference_stats, name).count)


def _ns(stats: service_pb2.ModelStatistics, name: str) -> int:
    return int(getattr(stats.inference_stats, name).ns)


def _batches(stats: service_pb2.ModelStatistics) -> dict[int, int]:
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def _input(value: np.ndarray) -> grpcclient.InferInput:
    item = grpcclient.InferInput("input", list(value.shape), "FP32")
    item.set_data_from_numpy(value)
    return item


def _send_together(
    client: grpcclient.InferenceServerClient,
    xs: list[np.ndarray],
    timeouts: list[int] | None = None,
) -> list[object]:
    """Send all at once; each one's error (None for a success), in the order sent."""
    answers: list[queue.Queue] = [queue.Queue() for _ in xs]
    for x, answer, timeout in zip(xs, answers, timeouts or [None] * len(xs), strict=True):
        client.async_infer(
            MODEL, [_input(x)], lambda result, error, a=answer: a.put(error), timeout=timeout
        )
    return [answer.get(timeout=30) for answer in answers]


def test_requests_and_executions_are_counted_as_batched(
    client: grpcclient.InferenceServerClient, urls: tuple[str, str], reference: Reference
) -> None:
    rng = np.random.default_rng(0)
    together = [reference.random_input(rng, 1, steps) for steps in range(3, 3 + 2 * MAX_BATCH)]
    alone = reference.random_input(rng, MAX_BATCH, 5)
    before, started_ms = _stats(client), time.time_ns() // 1_000_000
    assert _send_together(client, together) == [None] * len(together)
    client.infer(MODEL, [_input(alone)])
    after = _stats(client)

    requests = len(together) + 1
    assert after.inference_count - before.inference_count == len(together) + MAX_BATCH
    assert after.execution_count - before.execution_count == len(together) // MAX_BATCH + 1
    assert _delta(_batches(after), _batches(before)) == {MAX_BATCH: len(together) // MAX_BATCH + 1}
    for name in ("success", "queue", *COMPUTE):
        assert _count(after, name) - _count(before, name) == requests, name
    assert _count(after, "fail") == _count(before, "fail")
    assert started_ms <= after.last_inference <= time.time_ns() // 1_000_000
    # A request's parts do not overlap: its whole time covers its queue and compute times.
    parts = sum(_ns(after, n) - _ns(before, n) for n in ("queue", *COMPUTE))
    assert 0 < parts <= _ns(after, "success") - _ns(before, "success")


def test_failures_are_counted_as_fail(
    client: grpcclient.InferenceServerClient, urls: tuple[str, str], reference: Reference
) -> None:
    rng = np.random.default_rng(1)
    before = _stats(client)
    with pytest.raises(InferenceServerException):  # refused from its header: bad input size
        client.infer(MODEL, [_input(np.zeros((1, 2, 3), np.float32))])
    over_http = http.InferenceServerClient(urls[0])
    with pytest.raises(InferenceServerException):  # over HTTP: one record for both
        item = http.InferInput("input", [1, 2, 3], "FP32")
        item.set_data_from_numpy(np.zeros((1, 2, 3), np.float32))
        over_http.infer(MODEL, [item])
    over_http.close()
    with pytest.raises(InferenceServerException):  # no such model: not this model's failure
        client.infer("other", [_input(np.zeros((1, 2, 8), np.float32))])
    # A request whose timeout (1 us) expires in the queue fails; the 3 sent with it run as 3 rows.
    xs = [reference.random_input(rng, 1, 4) for _ in range(MAX_BATCH)]
    errors = _send_together(client, xs, timeouts=[1] + [0] * (MAX_BATCH - 1))
    after = _stats(client)

    assert [error is None for error in errors] == [False] + [True] * (MAX_BATCH - 1)
    assert "timeout expired" in str(errors[0])
    assert _count(after, "fail") - _count(before, "fail") == 3
    assert _count(after, "success") - _count(before, "success") == MAX_BATCH - 1
    assert _delta(_batches(after), _batches(before)) == {MAX_BATCH - 1: 1}
    assert after.inference_count - before.inference_count == MAX_BATCH - 1
    assert _ns(after, "fail") > _ns(before, "fail")


def test_http_grpc_and_metrics_read_one_record(
    client: grpcclient.InferenceServerClient, urls: tuple[str, str]
) -> None:
    client.infer(MODEL, [_input(np.zeros((MAX_BATCH, 3, 8), np.float32))])
    over_grpc = client.get_inference_statistics(MODEL)
    with urllib.request.urlopen(f"http://{urls[0]}/v2/models/{MODEL}/stats", timeout=10) as r:
        over_http = json.loads(r.read())
    assert json_format.ParseDict(over_http, service_pb2.ModelStatisticsResponse()) == over_grpc
    stats = _stats(client)
    m = metrics(urls[0])
    assert m["nv_inference_count"] == stats.inference_count
    assert m["nv_inference_exec_count"] == stats.execution_count
    assert m["nv_inference_request_success"] == _count(stats, "success")
    assert m["nv_inference_request_failure"] == _count(stats, "fail")
    assert m["nv_inference_queue_duration_us"] == _ns(stats, "queue") // 1000
    assert m["nv_inference_compute_infer_duration_us"] == _ns(stats, "compute_infer") // 1000
    # Every path of the extension, and tritonclient.http's reader of it.
    h = http.InferenceServerClient(urls[0])
    for name, version in ((MODEL, ""), (MODEL, "1"), (ALIAS, "1"), ("", "")):
        (entry,) = h.get_inference_statistics(name, version)["model_stats"]
        assert entry["name"] == (name or MODEL) and entry["version"] == "1"
        assert entry["execution_count"] == stats.execution_count
    for name, version in (("other", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as e:
            h.get_inference_statistics(name, version)
        assert e.value.status() == "404" and name in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.get_inference_statistics(name, version)
        assert e.value.status() == "StatusCode.NOT_FOUND"
    h.close()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{urls[0]}/v2/models/other/stats", timeout=10)
    assert missing.value.code == 404 and "error" in json.loads(missing.value.read())
