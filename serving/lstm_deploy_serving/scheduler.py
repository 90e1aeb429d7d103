"""The dynamic batcher: an asyncio queue in front of the model, as Triton's dynamic batcher.

Requests wait in a bounded queue. The batcher takes the oldest and, for up to
``max_queue_delay_s`` after it arrived, adds whatever else arrives that can share its run (the
layout's ``key``: any length where the model takes lengths, else equal shapes) while the merged
batch stays within ``max_batch_size`` rows; then it runs them as one model execution
(``batching``'s merge and split, in a worker thread so the event loop keeps accepting) and hands
each request its own slice. A request that cannot join waits for a later batch, in its place in
the queue. While one batch runs the next one fills, so under load batches grow by themselves.

A lone client pays no window: while the server has had at most one request inside at a time for
``ALONE_AFTER_S``, a request runs at once (no one could join it; at concurrency 1 the window was
all of its queue time). Any overlap opens the window again at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np

from .batching import Layout
from .errors import ServerFault, ServingError, Unavailable
from .metrics import Metrics

ALONE_AFTER_S = 1.0
Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: Hashable
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float | None


class DynamicBatcher:
    """Merge concurrent requests into model executions.

    Args:
        predict: runs one complete, batch-first set of inputs (called in a worker thread).
        layout: the model's (``batching.Layout``): which requests merge, and how.
        max_batch_size: most rows in one execution (a request's rows are never split).
        max_queue_delay_s: how long the oldest request may wait for others to join it.
        max_queue_size: most requests waiting; past it ``submit`` raises Unavailable (503).
        dynamic: False runs each request alone, in arrival order (no merging).
        adaptive: no window while the server is alone (``request``); False always waits it.
        metrics: where executions are recorded (``metrics.stats``) and the pending gauge set.
    """

    def __init__(
        self,
        predict: Predict,
        layout: Layout,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int = 1024,
        dynamic: bool = True,
        adaptive: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._predict = predict
        self.layout = layout
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.dynamic = dynamic
        self.adaptive = adaptive
        self.metrics = metrics if metrics is not None else Metrics()
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self.in_flight = 0  # requests inside the server (``request``)
        self._crowded_until = 0.0  # perf_counter time until which it is not alone
        self._taken = 0  # requests out of the queue, in the batch being formed or run
        self._task: asyncio.Task[None] | None = None
        # One worker: one execution at a time, as a Triton model instance.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lstm-batcher")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Refuse new requests, run every queued one, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(
        self, inputs: dict[str, np.ndarray], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one complete request; its outputs once its batch has run.

        ``timeout_s``: the request fails with 503 if it has not started running by then.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if len(self._queue) >= self.max_queue_size:
            raise Unavailable(
                f"the request queue is full ({self.max_queue_size} waiting); retry later"
            )
        now = time.perf_counter()
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        deadline = None if timeout_s is None else now + timeout_s
        rows, key = self.layout.rows(inputs), self.layout.key(inputs)
        self._queue.append(_Item(inputs, rows, key, future, now, deadline))
        self._update_pending()
        self._arrived.set()
        return await future

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count a request as in the server while inside (from decoding to its encoded response):
        the window opens only when the server has had two at once in the last ``ALONE_AFTER_S``.
        """
        self.in_flight += 1
        if self.in_flight > 1:
            self._crowded_until = time.perf_counter() + ALONE_AFTER_S
        try:
            yield
        finally:
            self.in_flight -= 1

    def _alone(self) -> bool:
        """One client, one request at a time: nobody could join a batch, so no window."""
        return self.adaptive and self.in_flight <= 1 and time.perf_counter() > self._crowded_until

    def _update_pending(self) -> None:
        self.metrics.pending_request_count = len(self._queue) + self._taken

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            try:
                await self._execute(batch)
            finally:
                self._taken = 0
                self._update_pending()

    async def _gather(self) -> list[_Item]:
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        self._taken = 1
        window_end = first.enqueued + self.max_queue_delay_s
        while self.dynamic:
            for item in self._joining(first.key, self.max_batch_size - rows):
                batch.append(item)
                rows += item.rows
                self._taken += 1
            remaining = window_end - time.perf_counter()
            if rows >= self.max_batch_size or self._queue or remaining <= 0 or self._closing:
                break
            if self._alone():  # waiting would only add latency
                break
            self._arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return batch

    def _joining(self, key: Hashable, room: int) -> list[_Item]:
        """Take from the queue, in order, the requests of ``key`` that fit in ``room`` rows, up
        to the first of ``key`` that does not fit (none passes it); the others keep their places.
        """
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        while self._queue and room > 0:
            item = self._queue.popleft()
            if item.key != key:
                kept.append(item)
            elif item.rows <= room:
                taken.append(item)
                room -= item.rows
            else:
                self._queue.appendleft(item)
                break
        if kept:  # the skipped ones go back in front, in their order
            self._queue.extendleft(reversed(kept))
        return taken

    async def _execute(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        live = []
        for item in batch:
            if item.future.done():  # the caller went away
                continue
            if item.deadline is not None and start > item.deadline:
                item.future.set_exception(Unavailable("request timeout expired in the queue"))
                continue
            live.append(item)
        if not live:
            return
        loop = asyncio.get_running_loop()
        results: list[dict[str, np.ndarray] | ServingError]
        times: tuple[int, int, int] | None = None
        try:
            outputs, times = await loop.run_in_executor(
                self._executor, self._run, [i.inputs for i in live]
            )
            results = list(outputs)
        except ServingError as e:
            results = [e] * len(live)
        except Exception as e:  # a fault in the runtime: every request of the batch fails
            results = [ServerFault(f"inference failed: {type(e).__name__}: {e}")] * len(live)
        if times is not None:
            queued = [int((start - item.enqueued) * 1e9) for item in live]
            self.metrics.stats.record_execution(sum(i.rows for i in live), queued, *times)
        for item, result in zip(live, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _run(
        self, requests: list[dict[str, np.ndarray]]
    ) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
        """The requests' outputs, and the ns spent padding, running and splitting them."""
        t0 = time.perf_counter_ns()
        merged, plan = self.layout.merge(requests)
        t1 = time.perf_counter_ns()
        outputs = self._predict(merged)
        t2 = time.perf_counter_ns()
        results = self.layout.split(outputs, plan)
        return results, (t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
