"""Check every artifact of a bundle on every runtime against two references, over a sweep.

Rows (runtime x artifact): the scratch module in eager PyTorch (float32), TorchScript on CPU,
ONNX Runtime's CPUExecutionProvider (model.onnx and model.scan.onnx), and, where present,
TorchScript on CUDA and ONNX Runtime's CUDAExecutionProvider with TF32 off, and (with --cpp) the
C++ programs of export/cpp, and (with --triton) a real tritonserver's python-backend model. A
runtime that is not present is skipped with the reason, never passed.

References: the scratch module in float64 (the oracle) and torch.nn.LSTM in float64 with the same
weights on a packed batch (an independent implementation of `lengths`). Each row's `output`, `hn`
and `cn` must hold elementwise, against both:

    |actual - reference| <= atol + rtol * |reference| + f32_factor * eps32

where eps32 is torch.nn.LSTM's own float32 error on that case (max over the outputs): what float32
itself loses on this model and input (it grows with T for long-memory models). `output` at padded
steps must be exactly 0.

report.json and report.md go into the bundle (or --report DIR); manifest.json's "parity" is updated.
Exit status: 0 all passed, 1 any failure (all are listed), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_deploy_export._sweep import (
    QUICK_SWEEP,
    THOROUGH_SWEEP,
    Case,
    make_inputs,
    padding_mask,
    sweep,
)
from lstm_deploy_export.cli import int_list
from lstm_deploy_export.report import (
    FAILED,
    ORACLE,
    OUTPUTS,
    PASSED,
    REL_FLOOR,
    TORCH_NN,
    CaseResult,
    Metrics,
    Report,
    Row,
    Tolerance,
)

__all__ = [
    "QUICK_SWEEP",
    "THOROUGH_SWEEP",
    "TOLERANCES",
    "Case",
    "add_arguments",
    "compare",
    "main",
    "make_inputs",
    "sweep",
    "validate",
]

if TYPE_CHECKING:
    from lstm_deploy_export import _runtimes
    from lstm_deploy_export.bundle import Bundle

Arrays = dict[str, np.ndarray]

# Per precision class of a runtime (see _runtimes). float32 on CPU, measured on this sweep: ~1e-7
# max abs on a freshly initialised model, T = 1024 included; long-memory models (forget-gate bias
# +3, +5: |c| up to 20, 180) reach 6e-5 and 2.5e-2 on every runtime alike, the eager module too.
# That is what the eps32 term follows; the worst runtime used 0.61 of its allowance. A wrong gate
# order or ignored lengths gives errors of 0.1 to 10, >= 1e3 times the allowance. CUDA float32
# (not measured yet) gets more room for cuBLAS/cuDNN's other summation orders; TF32 rounds the
# products' inputs to 10 mantissa bits (2^13 x float32's unit roundoff).
TOLERANCES = {
    "float32": Tolerance(atol=1e-5, rtol=1e-5, f32_factor=10.0),
    "cuda-float32": Tolerance(atol=5e-5, rtol=1e-5, f32_factor=10.0),
    "tf32": Tolerance(atol=1e-2, rtol=1e-2, f32_factor=1e4),
}
_APPLIES_TO = {
    "float32": "pytorch-eager, torchscript-cpu, onnxruntime-cpu, cpp-*",
    "cuda-float32": "torchscript-cuda, onnxruntime-cuda (TF32 off)",
    "tf32": "torchscript-cuda-tf32, onnxruntime-cuda-tf32 (--tf32)",
}
# torch.nn.LSTM float64 against the float64 oracle: two float64 implementations of one function.
REFERENCE_TOLERANCE = Tolerance(atol=1e-9, rtol=1e-9, f32_factor=1e-6)


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


def _versions() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import torch

    found: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("lstm-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"):
        if version(dist):
            found[dist] = version(dist)
    found["machine"] = platform.machine()
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name()
    return found


def _policy(tolerances: dict[str, Tolerance], overridden: bool) -> dict[str, Any]:
    return {
        "rule": "elementwise |actual - reference| <= atol + rtol*|reference| + f32_factor*eps32, "
        "against each reference",
        "references": "oracle: the scratch module in float64 (weights.safetensors); nn.LSTM: "
        "torch.nn.LSTM in float64, same weights, pack_padded_sequence(enforce_sorted=False)",
        "eps32": "per case: max abs error of torch.nn.LSTM in float32 against the oracle, over "
        "output, hn and cn",
        "padding": "output at t >= length must be exactly 0",
        "max_rel": f"|Δ| / max(|reference|, {REL_FLOOR:g})",
        "p99_abs": "nearest-rank 99th percentile of |Δ| in a case; a row's is the max over cases",
        "mean_abs": "mean |Δ| in a case; a row's is weighted by element count",
        "references_agree": "nn.LSTM vs oracle: " + REFERENCE_TOLERANCE.describe(),
        "cuda": "TF32 off in the parity rows: torch.backends.cuda.matmul.allow_tf32 = "
        "torch.backends.cudnn.allow_tf32 = False, float32 matmul precision 'highest'; the ONNX "
        "Runtime CUDA provider with use_tf32=0. The tf32 rows (--tf32) switch it on.",
        "tolerance_source": "command line (--atol/--rtol/--f32-factor)"
        if overridden
        else "default",
        "tolerances": {
            name: {**dataclasses.asdict(tol), "applies_to": _APPLIES_TO[name]}
            for name, tol in tolerances.items()
        },
    }


def validate(
    bundle: Bundle | str | Path,
    quick: bool = False,
    cpp: bool = False,
    tf32: bool = False,
    triton: bool = False,
    triton_python: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    f32_factor: float | None = None,
    seeds: Sequence[int] | None = None,
    report_dir: str | Path | None = None,
    progress: bool = False,
    write: bool = True,
) -> Report:
    """Run the sweep on every row and return the report (written unless `write` is False).

    Args:
        bundle: a `Bundle` or its directory (loaded and verified with `load_bundle`).
        quick: the quick sweep (seconds, for CI) instead of the thorough one.
        cpp: build the C++ programs (cpp.build) and add their rows.
        tf32: add rows that run CUDA with TF32 on, judged by the tf32 tolerance.
        triton: start a real tritonserver (the [triton] extra) on the bundle's repository and
            add its python-backend row; `triton_python` is the Python of that environment.
        atol, rtol, f32_factor: replace the default tolerances' terms for every precision.
        seeds: the sweep's seeds (default 0 for quick, 0,1,2 otherwise).
        report_dir: where report.json and report.md go (default: the bundle).
        progress: a progress bar (and the C++ build's messages) on stderr.

    Raises:
        BundleError: the bundle cannot be loaded or verified.
        OSError: the report or the manifest cannot be written.
    """
    from tqdm import tqdm

    from lstm_deploy_export import _runtimes
    from lstm_deploy_export.bundle import Bundle, load_bundle

    started = time.perf_counter()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    given = {"atol": atol, "rtol": rtol, "f32_factor": f32_factor}
    overrides = {k: v for k, v in given.items() if v is not None}
    tolerances = {k: dataclasses.replace(t, **overrides) for k, t in TOLERANCES.items()}
    cases = sweep(quick, seeds)
    references = _runtimes.References(bundle.load_model())
    say = (lambda line: print(line, file=sys.stderr)) if progress else None
    servers = contextlib.ExitStack()
    runners = _runtimes.runners(
        bundle, cpp=cpp, tf32=tf32, say=say, triton=triton, triton_python=triton_python,
        stack=servers,
    )  # fmt: skip
    rows = [_row(r, tolerances) for r in runners]
    active = [(r.run, row) for r, row in zip(runners, rows) if r.run is not None]

    checks: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(cases) * len(active), desc="validate", unit="run", file=sys.stderr,
        disable=not progress, leave=False, dynamic_ncols=True,
    )  # fmt: skip
    with servers, _one_thread(), bar:
        for case in cases:
            inputs = make_inputs(case, bundle.config)
            refs, eps32, check = _references(references, inputs, case)
            checks.append(check)
            pad = padding_mask(inputs["lengths"], case.steps)
            for run, row in active:
                bar.set_postfix_str(f"T={case.steps} B={case.batch} {row.runtime} {row.artifact}")
                assert row.tolerance is not None
                row.results.append(_run_case(run, inputs, case, refs, row.tolerance, eps32, pad))
                bar.update()

    by_id = {c.id: c for c in cases}
    failures = [f for check in checks for f in check.pop("failures")]
    for row in rows:
        if row.results:
            row.failures = _row_failures(row, by_id)
            row.status = FAILED if row.failures else PASSED
        failures += row.failures
    report = Report(
        bundle=str(bundle.path),
        created=created,
        quick=quick,
        seeds=sorted({c.seed for c in cases}),
        cases=[c.to_json() for c in cases],
        policy=_policy(tolerances, bool(overrides)),
        references=checks,
        rows=rows,
        failures=failures,
        versions=_versions(),
    )
    report.duration_s = time.perf_counter() - started
    if write:
        _write(report, bundle, Path(report_dir) if report_dir is not None else bundle.path)
    return report


def _row(runner: _runtimes.Runner, tolerances: dict[str, Tolerance]) -> Row:
    row = Row(runner.runtime, runner.artifact, runner.precision, runner.description)
    row.reason = runner.skipped
    if runner.skipped is None:
        row.tolerance = tolerances[runner.precision]
    if runner.error is not None:
        row.status, row.failures = (
            FAILED,
            [f"-[x] {runner.artifact} on {runner.runtime}: {runner.error}"],
        )
    return row


def _references(
    references: _runtimes.References, inputs: Arrays, case: Case
) -> tuple[dict[str, Arrays], float, dict[str, Any]]:
    """Both references on the case, the case's eps32, and whether the references agree."""
    import torch

    oracle = references.run_oracle(inputs)
    nn64 = references.run_torch(inputs, torch.float64)
    nn32 = references.run_torch(inputs, torch.float32)
    f32_errors = {o: float(np.abs(nn32[o] - oracle[o]).max()) for o in OUTPUTS}
    # One number per case, the max over the outputs: hn alone holds a few hundred values, too few
    # for its max to measure the model's conditioning stably.
    eps32 = max(f32_errors.values())
    pad = padding_mask(inputs["lengths"], case.steps)
    agree = {
        o: compare(nn64[o], oracle[o], REFERENCE_TOLERANCE, eps32, pad if o == "output" else None)
        for o in OUTPUTS
    }
    check = {
        "case": case.id,
        "eps32": eps32,
        "nn_lstm_float32_max_abs": f32_errors,
        "nn_lstm_vs_oracle_max_abs": {o: m.max_abs for o, m in agree.items()},
        "passed": all(m.passed for m in agree.values()),
        "failures": [
            f"-[x] references disagree: torch.nn.LSTM float64 vs the float64 oracle, {o}: "
            f"max abs {m.max_abs:.1e} > {m.allowed:.1e} ({case.label()}, at {m.index})"
            for o, m in agree.items()
            if not m.passed
        ],
    }
    return {ORACLE: oracle, TORCH_NN: nn64}, eps32, check


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for torch while the sweep runs.

    The sweep's ops are small (a step is a (B, 4H) GEMM): on a busy machine two threads that
    spin-wait for each other made it up to 10x slower, not faster. ONNX Runtime's sessions are
    made with one thread too (see _runtimes).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_case(
    run: Callable[[Arrays], Arrays],
    inputs: Arrays,
    case: Case,
    refs: dict[str, Arrays],
    tolerance: Tolerance,
    eps32: float,
    pad: np.ndarray,
) -> CaseResult:
    t0 = time.perf_counter()
    try:
        out = run(inputs)
    except Exception as e:  # a runtime error on one case is that row's failure, not the run's
        message = str(e).strip().splitlines()
        return CaseResult(
            case.id,
            time.perf_counter() - t0,
            error=f"{type(e).__name__}: {message[0] if message else ''}",
        )
    seconds = time.perf_counter() - t0
    oracle = refs[ORACLE]
    for o in OUTPUTS:
        got = out.get(o)
        if got is None or got.shape != oracle[o].shape or got.dtype != np.float32:
            what = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
            return CaseResult(
                case.id, seconds, error=f"{o} is {what}, expected float32 {list(oracle[o].shape)}"
            )
    metrics = {
        o: {
            name: compare(out[o], ref[o], tolerance, eps32, pad if o == "output" else None)
            for name, ref in refs.items()
        }
        for o in OUTPUTS
    }
    return CaseResult(case.id, seconds, metrics)


def _row_failures(row: Row, cases: dict[int, Case]) -> list[str]:
    """One line per failing output and kind of failure, naming the worst case."""
    where = f"{row.artifact} on {row.runtime}"
    lines = []
    errors = [r for r in row.results if r.error]
    if errors:
        first = errors[0]
        lines.append(
            f"-[x] {where}: failed in {len(errors)}/{len(row.results)} cases, first "
            f"{cases[first.case].label()}: {first.error}"
        )
    ran = [r for r in row.results if r.metrics]
    for o in OUTPUTS:
        ms = [(r.metrics[o], cases[r.case]) for r in ran]
        # Both references agree to ~1e-15 (checked), so a failure against one is one against the
        # other; the line names those it failed against and details the oracle's (else nn.LSTM's).
        against = [ref for ref in (ORACLE, TORCH_NN) if any(m[ref].violations for m, _ in ms)]
        if against:
            bad = [(m[against[0]], c) for m, c in ms if m[against[0]].violations]
            m, c = max(bad, key=lambda mc: mc[0].max_ratio)
            words = " and ".join(_REF_WORDS[ref] for ref in against)
            lines.append(
                f"-[x] {where}: {o}: max abs {m.max_abs:.1e} > allowed {m.allowed:.1e} vs {words} "
                f"in {len(bad)}/{len(ms)} cases (worst: {c.label()}, at {m.index}: "
                f"{m.actual:.6g} vs {m.reference:.6g})"
            )
        nonfinite = [c for m, c in ms if m[ORACLE].nonfinite]
        if nonfinite:
            lines.append(
                f"-[x] {where}: {o}: NaN or inf in {len(nonfinite)}/{len(ms)} cases "
                f"(first: {nonfinite[0].label()})"
            )
        padded = [(m[ORACLE].padding_nonzero or 0, c) for m, c in ms if m[ORACLE].padding_nonzero]
        if padded:
            lines.append(
                f"-[x] {where}: {o}: {sum(n for n, _ in padded)} values at padded steps "
                f"(t >= length) are not 0, in {len(padded)}/{len(ms)} cases (first: "
                f"{padded[0][1].label()}): lengths are not honoured"
            )
    return lines


_REF_WORDS = {ORACLE: "the float64 oracle", TORCH_NN: "torch.nn.LSTM float64"}


def _write(report: Report, bundle: Any, directory: Path) -> None:
    json_path, _ = report.write(directory)
    try:
        where = json_path.resolve().relative_to(bundle.path.resolve()).as_posix()
    except ValueError:
        where = str(json_path.resolve())
    bundle.manifest["parity"] = report.parity_summary(where)
    bundle.write_manifest()  # not itself in manifest["files"]: the bundle stays verifiable


# --- command line ---------------------------------------------------------------------------


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the bundle directory (lstm-deploy export --out)")
    parser.add_argument("--quick", action="store_true", help="the quick sweep: seconds, for CI")
    parser.add_argument(
        "--cpp", action="store_true", help="build the C++ programs (export/cpp) and add their rows"
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="start a real tritonserver on the bundle's triton/ and add its row",
    )
    parser.add_argument(
        "--triton-python",
        metavar="PYTHON",
        help="the Python of the [triton] environment (default: $LSTM_DEPLOY_TRITON_PYTHON, "
        "else this one)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="add CUDA rows with TF32 on (judged by the tf32 tolerance)",
    )
    defaults = TOLERANCES["float32"]
    parser.add_argument(
        "--atol",
        type=_non_negative,
        help=f"absolute tolerance, every row (float32 default {defaults.atol:g})",
    )
    parser.add_argument(
        "--rtol",
        type=_non_negative,
        help=f"relative tolerance, every row (float32 default {defaults.rtol:g})",
    )
    parser.add_argument(
        "--f32-factor",
        type=_non_negative,
        help="allowance in units of torch.nn.LSTM's own float32 error on the case "
        f"(default {defaults.f32_factor:g}; 0 for a fixed tolerance)",
    )
    parser.add_argument(
        "--seeds",
        type=int_list(0),
        help="comma-separated seeds (default: 0 with --quick, else 0,1,2)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write report.json and report.md here (default: the bundle)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    """`lstm-deploy validate`: 0 all passed, 1 any failure, 2 usage error."""
    from lstm_deploy_export.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        print(f"lstm-deploy validate: error: {e}", file=sys.stderr)
        return 2
    try:
        report = validate(
            bundle,
            quick=args.quick,
            cpp=args.cpp,
            tf32=args.tf32,
            triton=args.triton,
            triton_python=args.triton_python,
            atol=args.atol,
            rtol=args.rtol,
            f32_factor=args.f32_factor,
            seeds=args.seeds,
            report_dir=args.report,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except OSError as e:
        print(f"lstm-deploy validate: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(report.table())
    where = args.report if args.report is not None else bundle.path
    print(f"report: {Path(where) / 'report.json'}, {Path(where) / 'report.md'}")
    return 0 if report.passed else 1
