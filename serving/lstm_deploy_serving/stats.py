"""Per-model inference statistics, as Triton's statistics extension reports them.

One record per served model, written by the service and the batcher, read by every front end:
``GET /v2/models[/{m}[/versions/{v}]]/stats`` (``to_json``, Triton's JSON), the gRPC
``ModelStatistics`` (the same JSON parsed into the protobuf message) and ``/metrics`` (the
Prometheus counters, Triton's names). Durations are nanoseconds, as Triton's.

What each duration covers here, per Triton's definitions:

- ``success`` / ``fail``: a request's whole time in the service, from its arrival to its encoded
  response (or its error). Every request that reached a served model counts, whatever failed.
- ``queue``: the time a request waited in the dynamic batcher before its execution began.
- ``compute_input``: decoding the request's tensors, plus padding and merging its execution's
  batch; ``compute_infer``: the ONNX Runtime run; ``compute_output``: splitting the execution's
  outputs, plus encoding the request's response. A request gets the whole time of the execution
  it ran in (as Triton reports it), so these count successful requests, not executions.
- ``batch_stats``: per execution, keyed by its batch size (the rows of the requests merged into
  it): how many executions ran at that size and their pad/run/split times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# The inference_stats durations, in Triton's order (cache_hit/cache_miss: no response cache here).
INFER_DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
COMPUTE = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """Triton's ``StatisticDuration``: how many, and their cumulative nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    """Executions of one batch size: Triton's ``InferBatchStatistics``."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """The statistics of one model; every method runs on the event loop (no locking)."""

    inference_count: int = 0  # rows (batch size summed) of the requests executed
    execution_count: int = 0  # model executions: one per merged batch
    last_inference_ms: int = 0  # when the last execution ended, ms since the epoch
    durations: dict[str, Duration] = field(
        default_factory=lambda: {name: Duration() for name in INFER_DURATIONS}
    )
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(
        self, rows: int, queued_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model execution of ``rows`` rows that ran the requests queued ``queued_ns`` each.

        Each of those requests is counted with the execution's compute times; its own decode
        and encode times are added by ``record_success``.
        """
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        batch = self.batches.setdefault(rows, BatchStats())
        for name, ns in zip(COMPUTE, (input_ns, infer_ns, output_ns), strict=True):
            getattr(batch, name).add(ns)
            self.durations[name].add(ns * len(queued_ns), len(queued_ns))
        for ns in queued_ns:
            self.durations["queue"].add(ns)

    def record_success(self, total_ns: int, decode_ns: int = 0, encode_ns: int = 0) -> None:
        """A request answered with outputs; its decode and encode times join its compute times
        (counted already by its execution)."""
        self.durations["success"].add(total_ns)
        self.durations["compute_input"].add(decode_ns, 0)
        self.durations["compute_output"].add(encode_ns, 0)

    def record_failure(self, total_ns: int) -> None:
        self.durations["fail"].add(total_ns)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` as JSON (the HTTP extension's entry of ``model_stats``)."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: d.to_json() for k, d in self.durations.items()},
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    **{k: getattr(self.batches[size], k).to_json() for k in COMPUTE},
                }
                for size in sorted(self.batches)
            ],
            "memory_usage": [],
        }


__all__ = ["BatchStats", "Duration", "ModelStats"]
