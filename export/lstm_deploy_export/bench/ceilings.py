"""The machine's float32 peak as the best of several measured ceilings, in bench's own run.

One library's GEMM is not the machine's peak. MKL's sgemm (torch.mm) takes a slow path on AMD
CPUs: 97-112 GFLOP/s on one Zen 5 core, where oneDNN (nn.LSTM's kernel) reaches 188-204, about
the core's FMA peak (issue 14); with torch.mm as the ceiling, nn.LSTM read "94% of peak" while it
was at 100% of the real one. So bench measures every library it times, each at a large shape with
the backends' thread count, and divides by the highest:

- torch.mm: (n x n) @ (n x n), MKL (or the build's BLAS) on the CPU, cuBLAS with TF32 off on CUDA;
- oneDNN linear: torch.ops.mkldnn._linear_pointwise, (n x n) @ (n x n)^T;
- nn.LSTM, oneDNN's RNN primitive: batch 64, 16 steps, input = hidden = n / 2, its GFLOP/s
  counted with bench's formula (`LSTMConfig.gemm_flops`), so a backend is compared with what
  nn.LSTM itself reaches at a large cell;
- ONNX Runtime's MatMul: a one-node graph built with onnx.helper, (n x n) @ (n x n).

Each: one untimed call, then the best of 5 (the fastest run is the one least disturbed). A ceiling
that cannot run here (a build without oneDNN) is reported with the reason and left out of the peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lstm_deploy.config import LSTMConfig
from lstm_deploy_export.check.runners import synced

RUNS = 5
LSTM_BATCH, LSTM_STEPS = 64, 16


@dataclass(frozen=True)
class Ceiling:
    name: str  # e.g. "oneDNN linear"
    shape: str  # what was measured, e.g. "(1024 x 1024) @ (1024 x 1024)^T"
    gflops: float | None  # None: it could not run here
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def measure(device: str = "cpu", threads: int = 1, size: int = 1024) -> list[Ceiling]:
    """Every ceiling of `device` at size `size` (torch's threads are the caller's, `threads` is
    ONNX Runtime's). On CUDA only torch.mm (cuBLAS, TF32 off): the CUDA backends are torch's and
    ONNX Runtime's CUDA provider, whose GEMMs are cuBLAS's."""
    square = f"({size} x {size}) @ ({size} x {size})"
    gemm_flops = 2 * size**3
    blas = "MKL" if torch.backends.mkl.is_available() else "BLAS"
    if device == "cuda":
        return [_measure("torch.mm (cuBLAS)", square, gemm_flops, lambda: _torch_mm(size, device))]
    hidden = max(size // 2, 1)
    lstm_flops = LSTMConfig(hidden, hidden).gemm_flops(LSTM_BATCH, LSTM_STEPS)
    return [
        _measure(f"torch.mm ({blas})", square, gemm_flops, lambda: _torch_mm(size, device)),
        _measure("oneDNN linear", square + "^T", gemm_flops, lambda: _onednn_linear(size)),
        _measure(
            "nn.LSTM (oneDNN)",
            f"batch {LSTM_BATCH}, {LSTM_STEPS} steps, input = hidden = {hidden}",
            lstm_flops,
            lambda: _nn_lstm(hidden),
        ),
        _measure("ONNX Runtime MatMul", square, gemm_flops, lambda: _ort_matmul(size, threads)),
    ]


def peak(ceilings: list[Ceiling]) -> Ceiling:
    """The highest ceiling that ran. Raises RuntimeError if none did."""
    ran = [c for c in ceilings if c.gflops is not None]
    if not ran:
        raise RuntimeError("no ceiling could be measured: " + "; ".join(
            f"{c.name}: {c.error}" for c in ceilings))  # fmt: skip
    return max(ran, key=lambda c: c.gflops or 0.0)


def _measure(name: str, shape: str, flops: int, make: Callable[[], Callable[[], Any]]) -> Ceiling:
    try:
        call = make()
        call()  # untimed: oneDNN creates its primitive, ONNX Runtime its buffers
        best = float("inf")
        for _ in range(RUNS):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    except (RuntimeError, ImportError, ValueError) as e:  # a build or a runtime without it
        return Ceiling(name, shape, None, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    return Ceiling(name, shape, flops / best / 1e9)


def _torch_mm(size: int, device: str) -> Callable[[], Any]:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return synced(lambda: torch.mm(a, b), device)  # TF32 off on CUDA


def _onednn_linear(size: int) -> Callable[[], Any]:
    x, w = torch.randn(size, size), torch.randn(size, size)
    linear = torch.ops.mkldnn._linear_pointwise
    # The op is private: check once that it is the product it claims to be.
    if not torch.allclose(linear(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-3, atol=1e-2):
        raise RuntimeError("torch.ops.mkldnn._linear_pointwise does not compute x @ w.T here")
    return lambda: linear(x, w, None, "none", [], "")


def _nn_lstm(hidden: int) -> Callable[[], Any]:
    lstm = torch.nn.LSTM(hidden, hidden, batch_first=True).eval()
    x = torch.randn(LSTM_BATCH, LSTM_STEPS, hidden)

    @torch.inference_mode()
    def call() -> Any:
        return lstm(x)

    return call


def _ort_matmul(size: int, threads: int) -> Callable[[], Any]:
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    from lstm_deploy_export.check import ort_session

    tensor = onnx.TensorProto.FLOAT
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [oh.make_tensor_value_info(n, tensor, [size, size]) for n in ("a", "b")],
        [oh.make_tensor_value_info("c", tensor, [size, size])],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(
        model.SerializeToString(),
        ort_session.session_options(threads),
        providers=[ort_session.CPU],
    )
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size), dtype=np.float32) for n in ("a", "b")}
    (product,) = session.run(None, feeds)
    if not np.allclose(product, feeds["a"] @ feeds["b"], rtol=1e-3, atol=1e-2):
        raise RuntimeError("the MatMul graph does not compute a @ b")
    return lambda: session.run(None, feeds)
