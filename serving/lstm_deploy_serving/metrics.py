"""``GET /metrics``: Prometheus text format with Triton's metric names.

Triton's names (``nv_inference_*``) keep dashboards built for Triton working against this server.
The counters are read from the model's statistics (``stats.ModelStats``, the one record the
statistics extension serves too), in microseconds where Triton's metrics use them; the gauges
are set where they change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .stats import ModelStats


@dataclass
class Metrics:
    stats: ModelStats = field(default_factory=ModelStats)
    pending_request_count: int = 0  # requests queued or running right now
    sequences_live: int = 0  # sequences holding state right now
    sequences_evicted: int = 0  # sequences freed by idle timeout or the cap

    def render(self, model: str, version: str) -> str:
        """The Prometheus text exposition of every counter and gauge."""
        lines = []
        labels = f'{{model="{model}",version="{version}"}}'
        for name, kind, help_text, read in _SAMPLES:
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} {kind}",
                f"{name}{labels} {read(self)}",
            ]
        return "\n".join(lines) + "\n"


def _us(duration: str) -> Callable[[Metrics], int]:
    return lambda m: m.stats.durations[duration].ns // 1000


# (name, type, help, value)
_SAMPLES: list[tuple[str, str, str, Callable[[Metrics], int]]] = [
    (
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests",
        lambda m: m.stats.durations["success"].count,
    ),
    (
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests",
        lambda m: m.stats.durations["fail"].count,
    ),
    (
        "nv_inference_count",
        "counter",
        "Number of inferences performed (batch rows)",
        lambda m: m.stats.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "counter",
        "Number of model executions (merged batches)",
        lambda m: m.stats.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative time of successful inference requests, us",
        _us("success"),
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative time requests spent queued, us",
        _us("queue"),
    ),
    (
        "nv_inference_compute_input_duration_us",
        "counter",
        "Cumulative time decoding and batching inputs, per request, us",
        _us("compute_input"),
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative time in model executions, per request, us",
        _us("compute_infer"),
    ),
    (
        "nv_inference_compute_output_duration_us",
        "counter",
        "Cumulative time splitting and encoding outputs, per request, us",
        _us("compute_output"),
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        "Requests queued or executing",
        lambda m: m.pending_request_count,
    ),
    (
        "lstm_deploy_sequences_live",
        "gauge",
        "Stateful sequences holding (h, c)",
        lambda m: m.sequences_live,
    ),
    (
        "lstm_deploy_sequences_evicted",
        "counter",
        "Sequences freed by idle timeout or the live-sequence cap",
        lambda m: m.sequences_evicted,
    ),
]
