"""Dynamic batching: the numpy core (pad, merge, split), the asyncio batcher, and the server.

Batched results must equal unbatched ones (<= 1e-5) whatever the mix of sequence lengths.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lstm_deploy_serving.errors import ServerFault, Unavailable
from lstm_deploy_serving.model_spec import layout_of
from lstm_deploy_serving.scheduler import DynamicBatcher
from serving_support import Reference, metrics, running_server

from lstm_deploy.bundle import Bundle, lstm_signature
from lstm_deploy.config import LSTMConfig

ATOL = 1e-5
# The layout of the test bundle's LSTM (8 -> 16, two layers), as its manifest gives it.
CONFIG = LSTMConfig(8, 16, num_layers=2, batch_first=True)
LAYOUT = layout_of(
    Bundle(Path(), {"config": CONFIG.to_dict(), "signature": lstm_signature(CONFIG).to_json()}).info
)


def _request(
    rng: np.random.Generator, batch: int, steps: int, ragged: bool = True
) -> dict[str, np.ndarray]:
    x = rng.standard_normal((batch, steps, 8), dtype=np.float32)
    lengths = rng.integers(1, steps + 1, batch) if ragged else np.full(batch, steps)
    inputs = {"input": x, "lengths": lengths.astype(np.int64)}
    if rng.random() < 0.5:  # some requests bring their own initial state
        inputs["h0"] = rng.standard_normal((batch, 2, 16), dtype=np.float32)
    return LAYOUT.fill_defaults(inputs)


def test_fill_defaults() -> None:
    filled = LAYOUT.fill_defaults({"input": np.ones((3, 5, 8), np.float32)})
    np.testing.assert_array_equal(filled["lengths"], [5, 5, 5])
    assert filled["lengths"].dtype == np.int64
    assert filled["h0"].shape == (3, 2, 16) and not filled["h0"].any()
    assert filled["c0"].dtype == np.float32


def test_pad_and_merge_layout() -> None:
    rng = np.random.default_rng(0)
    requests = [_request(rng, 2, 3), _request(rng, 1, 7), _request(rng, 3, 1)]
    merged, plan = LAYOUT.merge(requests)
    assert plan.rows == ((0, 2), (2, 3), (3, 6)) and plan.steps == (3, 7, 1)
    assert merged["input"].shape == (6, 7, 8)
    assert merged["h0"].shape == (6, 2, 16) and merged["lengths"].shape == (6,)
    np.testing.assert_array_equal(merged["input"][0:2, :3], requests[0]["input"])
    assert not merged["input"][0:2, 3:].any()  # zero padding past each request's own steps
    np.testing.assert_array_equal(merged["lengths"][3:], requests[2]["lengths"])
    # split cuts the time axis of `output` back to each request's steps
    outputs = {"output": np.arange(6 * 7).reshape(6, 7, 1), "hn": np.arange(6)[:, None]}
    parts = LAYOUT.split(outputs, plan)
    assert [p["output"].shape for p in parts] == [(2, 3, 1), (1, 7, 1), (3, 1, 1)]
    np.testing.assert_array_equal(parts[2]["hn"][:, 0], [3, 4, 5])


def test_single_request_is_not_copied() -> None:
    request = _request(np.random.default_rng(1), 2, 4)
    merged, plan = LAYOUT.merge([request])
    assert all(merged[k] is request[k] for k in request)
    assert plan.batch_size == 2


def test_merged_run_equals_separate_runs(reference: Reference) -> None:
    """The core as a Triton python backend would use it: one ORT run for many requests."""
    rng = np.random.default_rng(2)
    requests = [_request(rng, int(rng.integers(1, 4)), int(rng.integers(1, 40))) for _ in range(12)]
    merged, plan = LAYOUT.merge(requests)
    outputs = reference.run(merged["input"], merged["lengths"], merged["h0"], merged["c0"])
    for request, got in zip(requests, LAYOUT.split(outputs, plan), strict=True):
        alone = reference.run(request["input"], request["lengths"], request["h0"], request["c0"])
        for name in ("output", "hn", "cn"):
            assert got[name].shape == alone[name].shape
            np.testing.assert_allclose(got[name], alone[name], rtol=0, atol=ATOL, err_msg=name)


class _Recorder:
    """A fake model that records the batch size of each run; optionally blocks until released."""

    def __init__(self, block: bool = False, fail_first: bool = False) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not block:
            self.gate.set()
        self.fail_first = fail_first

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(feeds["input"].shape[0])
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom")
        x = feeds["input"]
        return {"output": x * 2, "hn": x[:, -1:, :1], "cn": x[:, -1:, :1]}


def _item(steps: int, batch: int = 1) -> dict[str, np.ndarray]:
    x = np.full((batch, steps, 8), float(steps), np.float32)
    return LAYOUT.fill_defaults({"input": x})


def test_batcher_merges_within_max_batch_size() -> None:
    model = _Recorder()

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(model, LAYOUT, max_batch_size=8, max_queue_delay_s=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(_item(t % 5 + 1)) for t in range(20)))
        await batcher.stop()
        return list(results)

    results = asyncio.run(main())
    assert sum(model.batches) == 20 and max(model.batches) <= 8 and len(model.batches) < 20
    for t, result in enumerate(results):
        assert result["output"].shape == (1, t % 5 + 1, 8)
        assert (result["output"] == 2.0 * (t % 5 + 1)).all()


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_lone_client_pays_no_window(adaptive: bool) -> None:
    """One request at a time runs at once when adaptive (nobody could join it); a second one
    inside the server opens the window, for both of them; fixed always waits it."""
    model, window = _Recorder(), 0.3

    async def one(batcher: DynamicBatcher) -> float:
        with batcher.request():
            start = time.perf_counter()
            await batcher.submit(_item(2))
            return time.perf_counter() - start

    async def main() -> tuple[float, float]:
        batcher = DynamicBatcher(
            model, LAYOUT, max_batch_size=8, max_queue_delay_s=window, adaptive=adaptive
        )
        batcher.start()
        alone = await one(batcher)
        with batcher.request():  # a second request inside: the window opens
            crowded = await one(batcher)
        await batcher.stop()
        return alone, crowded

    alone, crowded = asyncio.run(main())
    assert crowded >= window * 0.9
    assert (alone < window / 3) if adaptive else (alone >= window * 0.9)


def test_batcher_without_dynamic_batching_runs_each_alone() -> None:
    model = _Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(
            model, LAYOUT, max_batch_size=8, max_queue_delay_s=0.05, dynamic=False
        )
        batcher.start()
        await asyncio.gather(*(batcher.submit(_item(3, batch=2)) for _ in range(5)))
        await batcher.stop()

    asyncio.run(main())
    assert model.batches == [2] * 5


def test_batcher_queue_full_timeout_and_fault() -> None:
    model = _Recorder(block=True, fail_first=True)

    async def main() -> None:
        batcher = DynamicBatcher(
            model, LAYOUT, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2
        )
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(_item(1)))
        while not model.entered.is_set():  # the first request is in the model, blocked
            await asyncio.sleep(0.005)
        expiring = asyncio.ensure_future(batcher.submit(_item(2), timeout_s=1e-6))
        waiting = asyncio.ensure_future(batcher.submit(_item(3)))
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit(_item(4))
        model.gate.set()
        with pytest.raises(ServerFault, match="inference failed: RuntimeError: boom"):
            await running
        with pytest.raises(Unavailable, match="timeout"):
            await expiring
        assert (await waiting)["output"].shape == (1, 3, 8)  # the batcher survived the fault
        await batcher.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(_item(1))

    asyncio.run(main())


def test_stop_runs_what_is_queued() -> None:
    model = _Recorder()

    async def main() -> int:
        batcher = DynamicBatcher(model, LAYOUT, max_batch_size=4, max_queue_delay_s=10.0)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(_item(2))) for _ in range(3)]
        await asyncio.sleep(0.01)  # queued, waiting for the (long) batching window
        await batcher.stop()
        return sum(p.done() and not p.exception() for p in pending)

    assert asyncio.run(main()) == 3


@pytest.fixture(scope="module")
def url(onnx_bundle: Path) -> Iterator[str]:
    # A 5 ms window so that merging does not hinge on the scheduling of a loaded test machine.
    with running_server(onnx_bundle, max_queue_delay_us=5000) as address:
        yield address


def test_64_concurrent_requests_of_mixed_lengths(url: str, reference: Reference) -> None:
    """64 requests in flight at once (tritonclient's asyncio client): all correct, merged."""
    import tritonclient.http.aio as aio

    rng = np.random.default_rng(3)
    xs = [reference.random_input(rng, 1, int(t)) for t in rng.integers(1, 60, 64)]

    async def burst() -> list[aio.InferResult]:
        client = aio.InferenceServerClient(url, conn_limit=64)
        try:
            items = [
                aio.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x) for x in xs
            ]
            return list(await asyncio.gather(*(client.infer("lstm_onnx", [i]) for i in items)))
        finally:
            await client.close()

    before = metrics(url)
    results = asyncio.run(burst())
    after = metrics(url)
    for x, result in zip(xs, results, strict=True):
        alone = reference.run(x)
        for name in ("output", "hn", "cn"):
            np.testing.assert_allclose(result.as_numpy(name), alone[name], rtol=0, atol=ATOL)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 64
    assert after["nv_inference_count"] - before["nv_inference_count"] == 64
    assert 1 <= executions < 64 / 2, executions


def test_batched_request_rows_match(url: str, reference: Reference) -> None:
    """A request with batch > 1 and ragged lengths, merged with others, equals its lone run."""
    import tritonclient.http.aio as aio

    rng = np.random.default_rng(4)
    x = reference.random_input(rng, 5, 30)
    lengths = np.array([30, 1, 17, 9, 2], np.int64)
    others = [reference.random_input(rng, 2, int(t)) for t in (50, 3, 12)]

    async def together() -> aio.InferResult:
        client = aio.InferenceServerClient(url)
        try:
            a = aio.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
            b = aio.InferInput("lengths", [5], "INT64").set_data_from_numpy(lengths)
            calls = [client.infer("lstm_onnx", [a, b])]
            for o in others:
                item = aio.InferInput("input", list(o.shape), "FP32").set_data_from_numpy(o)
                calls.append(client.infer("lstm_onnx", [item]))
            return (await asyncio.gather(*calls))[0]
        finally:
            await client.close()

    before = metrics(url)
    result = asyncio.run(together())
    executions = metrics(url)["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    alone = reference.run(x, lengths)
    for name in ("output", "hn", "cn"):
        np.testing.assert_allclose(result.as_numpy(name), alone[name], rtol=0, atol=ATOL)
    assert not result.as_numpy("output")[1, 1:].any()  # zero past each row's length
    assert executions < 4, "the four requests were not merged at all"
