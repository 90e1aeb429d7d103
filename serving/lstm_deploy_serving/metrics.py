"""Counters for ``GET /metrics``, in Prometheus text format with Triton's metric names.

Triton's names (``nv_inference_*``) keep dashboards built for Triton working against this server.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Metrics:
    request_success: int = 0  # inference requests answered with outputs
    request_failure: int = 0  # inference requests answered with an error
    inference_count: int = 0  # inferences performed (batch rows, summed over requests)
    exec_count: int = 0  # model executions (one per merged batch)
    queue_duration_us: int = 0  # time requests waited in the batcher's queue, summed
    compute_infer_duration_us: int = 0  # time in ONNX Runtime, summed over executions
    pending_request_count: int = 0  # requests queued or running right now
    sequences_live: int = 0  # sequences holding state right now
    sequences_evicted: int = 0  # sequences freed by idle timeout or the cap

    def render(self, model: str, version: str) -> str:
        """The Prometheus text exposition of every counter and gauge."""
        lines = []
        labels = f'{{model="{model}",version="{version}"}}'
        for f in fields(self):
            name, kind, help_text = _DESCRIPTIONS[f.name]
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} {kind}",
                f"{name}{labels} {getattr(self, f.name)}",
            ]
        return "\n".join(lines) + "\n"


_DESCRIPTIONS: dict[str, tuple[str, str, str]] = {
    "request_success": (
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests",
    ),
    "request_failure": (
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests",
    ),
    "inference_count": (
        "nv_inference_count",
        "counter",
        "Number of inferences performed (batch rows)",
    ),
    "exec_count": (
        "nv_inference_exec_count",
        "counter",
        "Number of model executions (merged batches)",
    ),
    "queue_duration_us": (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative time requests spent queued, us",
    ),
    "compute_infer_duration_us": (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative time in model executions, us",
    ),
    "pending_request_count": (
        "nv_inference_pending_request_count",
        "gauge",
        "Requests queued or executing",
    ),
    "sequences_live": ("lstm_deploy_sequences_live", "gauge", "Stateful sequences holding (h, c)"),
    "sequences_evicted": (
        "lstm_deploy_sequences_evicted",
        "counter",
        "Sequences freed by idle timeout or the live-sequence cap",
    ),
}
