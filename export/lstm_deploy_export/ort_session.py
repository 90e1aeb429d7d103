"""ONNX Runtime sessions for a bundle's ONNX graphs: explicit providers, explicit threads.

The choices, measured with `lstm-deploy bench` and the notes in README "Performance":

- providers are always named (never ONNX Runtime's implicit default), CPU last as the fallback;
- all graph optimizations (ORT_ENABLE_ALL). ONNX Runtime prepacks the constant weights of the LSTM
  op and of MatMul/Gemm at session creation; the levels made no measurable difference on these
  graphs (the LSTM op and the Scan body are already what runs), ALL is kept for other graphs;
- `threads` intra-op threads, one inter-op thread: the graph is a chain, nothing runs in parallel
  between nodes. One thread per session is the measured default of the bench: an LSTM step is too
  small to split well, and a server scales with sessions. With more threads, the pool must spin
  between the per-step kernels (ONNX Runtime's default, kept): on 2 cores, 2 threads without
  spinning were slower than 1 thread (B64 T128 H256: 73 ms against 70 ms; 39 ms spinning).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

__all__ = ["CPU", "CUDA", "make_session", "session_options"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options as in the module docstring; `threads=None`: ORT's default (all cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


def make_session(
    path: str | Path, providers: Sequence[str] = (CPU,), threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession for `path` on exactly `providers` (e.g. ("CUDAExecutionProvider",
    "CPUExecutionProvider")). Raises ValueError for a provider this onnxruntime does not have."""
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(
            f"execution providers {missing} are not available in this onnxruntime "
            f"(available: {available})"
        )
    return ort.InferenceSession(str(path), session_options(threads), providers=list(providers))
