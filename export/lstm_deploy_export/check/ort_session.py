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

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

__all__ = [
    "CPU",
    "CUDA",
    "ProviderUnavailable",
    "cuda_unavailable",
    "device_call",
    "make_session",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ProviderUnavailable(Exception):
    """The execution provider asked for cannot run here; the message says why."""


def cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot use CUDAExecutionProvider here, or None when it can."""
    providers = ort.get_available_providers()
    if CUDA not in providers:
        return (
            f"{CUDA} not available (onnxruntime {ort.__version__} has "
            f"{', '.join(providers)}; install onnxruntime-gpu)"
        )
    return None


@functools.cache
def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu's own loader for CUDA and cuDNN from the nvidia-* wheels (torch's, where
    torch is imported): without it the CUDA provider finds them only on LD_LIBRARY_PATH."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        preload()


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options as in the module docstring; `threads=None`: ORT's default (all cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: node placement notes are not findings
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


def make_session(
    path: str | Path, provider: str = CPU, threads: int | None = None, tf32: bool = False
) -> ort.InferenceSession:
    """An InferenceSession for `path` on `provider` (CPU the fallback of CUDA, as ORT requires).

    On CUDA, TF32 is what `tf32` says: the provider's use_tf32 defaults to 1, which parity runs
    must switch off. Raises ProviderUnavailable if `provider` is not the one that runs.
    """
    if provider == CUDA and (reason := cuda_unavailable()) is not None:
        raise ProviderUnavailable(reason)
    if provider == CUDA:
        _preload_cuda_libraries()
    providers: list[Any] = [CPU]
    if provider == CUDA:
        providers.insert(0, (CUDA, {"use_tf32": str(int(tf32))}))
    session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    if provider not in session.get_providers():  # onnxruntime logged why (CUDA libraries?)
        raise ProviderUnavailable(
            f"{provider} failed to initialise; the session fell back to {session.get_providers()}"
        )
    return session


def device_call(
    session: ort.InferenceSession, feeds: dict[str, Any], outputs: list[str], device: str
) -> Callable[[], list[Any]]:
    """A call of `session` with its inputs and outputs on `device` (I/O binding), as the torch rows
    run on CUDA: the inputs are copied there once, now; each call runs the graph alone and returns
    the binding, whose `copy_outputs_to_cpu()` gives the outputs (the Runner's untimed `outputs`).
    """
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for name in outputs:
        binding.bind_output(name, device)

    def call() -> Any:
        session.run_with_iobinding(binding)  # returns when the device is done (ORT syncs the EP)
        return binding

    return call
