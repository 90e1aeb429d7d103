"""One output against one reference: the tolerance rule, and the metrics of a comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REL_FLOOR = 1e-3  # max rel divides by max(|reference|, REL_FLOOR)

# The precision classes of the runtimes (check.runtimes), each judged by its own tolerance.
FLOAT32, CUDA_FLOAT32, TF32 = "float32", "cuda-float32", "tf32"
INT8 = "int8"  # model.int8.onnx: int8 weights, uint8 activations (DynamicQuantizeLSTM)


@dataclass(frozen=True)
class Tolerance:
    """|actual - reference| <= atol + rtol * |reference| + f32_factor * eps32, elementwise.

    eps32 is the max abs error of torch.nn.LSTM in float32 against the oracle on the same case,
    the max over the outputs: what float32 arithmetic itself loses on this model and input. It is
    ~1e-7 for a well-conditioned model and grows with T for a long-memory one (large forget-gate
    bias), so the tolerance follows the model's conditioning instead of failing every runtime on it.
    """

    atol: float
    rtol: float
    f32_factor: float

    def allowed(self, reference_abs: np.ndarray, eps32: float) -> np.ndarray:
        return self.atol + self.rtol * reference_abs + self.f32_factor * eps32

    def describe(self) -> str:
        return f"|Δ| <= {self.atol:.0e} + {self.rtol:.0e}·|ref| + {self.f32_factor:g}·eps32"


# Per precision class of a runtime (see runtimes). float32 on CPU, measured on this sweep: ~1e-7
# max abs on a freshly initialised model, T = 1024 included; long-memory models (forget-gate bias
# +3, +5: |c| up to 20, 180) reach 6e-5 and 2.5e-2 on every runtime alike, the eager module too.
# That is what the eps32 term follows; the worst runtime used 0.61 of its allowance. A wrong gate
# order or ignored lengths gives errors of 0.1 to 10, >= 1e3 times the allowance. CUDA float32
# (not measured yet) gets more room for cuBLAS/cuDNN's other summation orders; TF32 rounds the
# products' inputs to 10 mantissa bits (2^13 x float32's unit roundoff).
TOLERANCES = {
    FLOAT32: Tolerance(atol=1e-5, rtol=1e-5, f32_factor=10.0),
    CUDA_FLOAT32: Tolerance(atol=5e-5, rtol=1e-5, f32_factor=10.0),
    TF32: Tolerance(atol=1e-2, rtol=1e-2, f32_factor=1e4),
    INT8: Tolerance(atol=3e-2, rtol=1e-2, f32_factor=0.0),
}
# int8 is a declared bound, not a multiple of eps32 (README "Parity", int8). Every product's
# operands are rounded to 8 bits: a weight by up to 2^-8 of its gate row's largest weight, an input
# by 2^-9 of the range of the GEMM's input. At PyTorch's init (H = 256) that puts a gate's
# pre-activation ~3e-3 (rms) off, the cell state a few times that; f's error is carried in
# proportion to |c| (the rtol term). Measured, validate's thorough sweep (3 seeds, T 1 to 1024,
# variable lengths) on PyTorch-initialised LSTMs, H 8 to 512, 1-2 layers, uni- and bidirectional:
# max abs 1.35e-2 (cn; output and hn <= 6.5e-3), flat in T and |ref|: the bound leaves 2.2x. A
# wrong gate order is 10-50x over it, ignored lengths 24x. It is not widened for models whose gates
# saturate and remember for long: int8 changes their answer (a trained recall model: 0.8 off at
# T = 9, 17 at T = 300; forget-gate bias +3: 0.25 at T = 300), and validate's int8 row says so.
# torch.nn.LSTM float64 against the float64 oracle: two float64 implementations of one function.
REFERENCE_TOLERANCE = Tolerance(atol=1e-9, rtol=1e-9, f32_factor=1e-6)


@dataclass
class Metrics:
    """One output of one run against one reference (float64 differences)."""

    max_abs: float
    max_rel: float  # |Δ| / max(|ref|, REL_FLOOR)
    mean_abs: float
    p99_abs: float
    index: list[int]  # where max_abs is, in the output's shape
    actual: float  # the values at `index`
    reference: float
    allowed: float  # the tolerance at `index`
    max_ratio: float  # max over elements of |Δ| / allowed: > 1 fails
    violations: int  # elements with |Δ| > allowed
    count: int  # elements compared
    nonfinite: int = 0  # NaN or inf in the actual output
    padding_nonzero: int | None = None  # `output` at t >= length that is not exactly 0

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.nonfinite == 0 and not self.padding_nonzero


def compare(
    actual: np.ndarray,
    reference: np.ndarray,
    tolerance: Tolerance,
    eps32: float,
    padding: np.ndarray | None = None,
) -> Metrics:
    """The metrics of `actual` against `reference` (in float64), judged by `tolerance`."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(actual, dtype=np.float64).copy()  # (...) |actual - reference|, in place
    diff -= ref
    np.abs(diff, out=diff)
    nonfinite = 0
    if not np.isfinite(diff.max(initial=0.0)):
        bad = ~np.isfinite(diff)
        nonfinite = int(np.count_nonzero(bad))
        diff[bad] = 0.0  # counted apart; the metrics describe the finite values
    n = diff.size
    flat = diff.ravel()
    worst = int(np.argmax(flat)) if n else 0
    ref_abs = np.abs(ref)
    allowed = tolerance.allowed(ref_abs, eps32)
    with np.errstate(divide="ignore", invalid="ignore"):  # allowed is 0 with --atol 0 --rtol 0
        ratio = diff / allowed  # x/0 is inf (fails), 0/0 is nan (an exact match: 0)
    ratio[np.isnan(ratio)] = 0.0
    return Metrics(
        max_abs=float(flat[worst]) if n else 0.0,
        max_rel=float((diff / np.maximum(ref_abs, REL_FLOOR)).max(initial=0.0)),
        mean_abs=float(flat.mean()) if n else 0.0,
        p99_abs=_p99(flat),
        index=[int(i) for i in np.unravel_index(worst, diff.shape)] if n else [],
        actual=float(np.asarray(actual).ravel()[worst]) if n else 0.0,
        reference=float(ref.ravel()[worst]) if n else 0.0,
        allowed=float(allowed.ravel()[worst]) if n else 0.0,
        max_ratio=float(ratio.max(initial=0.0)),
        violations=int(np.count_nonzero(diff > allowed)),
        count=int(n),
        nonfinite=nonfinite,
        padding_nonzero=None if padding is None else int(np.count_nonzero(actual[padding])),
    )


def _p99(flat: np.ndarray) -> float:
    """The nearest-rank 99th percentile, exactly.

    np.partition over the whole array degrades on long runs of equal values (the exact zeros of
    padded steps) to ~30x its usual time, so it runs on the top few percent only: the elements at
    or above a threshold taken from a strided sample, when they hold the answer (else a sort).
    """
    n = flat.size
    if n == 0:
        return 0.0
    rank = max(math.ceil(0.99 * n) - 1, 0)
    above = n - rank  # the answer is the `above`-th largest
    sample = flat[:: max(1, n // 20_000)]
    threshold = np.quantile(sample, max(0.0, 1.0 - 3.0 * above / n))
    top = flat[flat >= threshold]
    if top.size < above:
        return float(np.sort(flat)[rank])
    return float(np.partition(top, top.size - above)[top.size - above])
