"""Check every artifact of a bundle on every runtime against two references, over a sweep.

The rows are the runtime registry's (`runtimes.RUNTIMES`, bench's references left out); the
references are `references.References` (an LSTM bundle) or `references.ModelReferences` (a
whole-model bundle: the user's module, converted and with torch.nn.LSTMs); the cases
`sweep.sweep`, their inputs built from the bundle's signature. Each row's outputs must hold
elementwise against both references:

    |actual - reference| <= atol + rtol * |reference| + f32_factor * eps32

where eps32 is torch.nn.LSTM's own float32 error on that case (max over the outputs). An LSTM
bundle's `output` at padded steps must be exactly 0 (a whole model's head may well make them
nonzero: its padded steps are judged against the references like the others). The result is a
`report.Report`: rows, typed failures, every number; `render` writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lstm_deploy.bundle import LENGTHS, OUTPUT, Bundle, BundleError, Signature, load_bundle
from lstm_deploy.versions import installed
from lstm_deploy_export.check import render
from lstm_deploy_export.check.compare import (
    REFERENCE_TOLERANCE,
    REL_FLOOR,
    TF32,
    TOLERANCES,
    Tolerance,
    compare,
)
from lstm_deploy_export.check.references import ModelReferences, References
from lstm_deploy_export.check.report import (
    ERROR,
    FAILED,
    LOAD,
    NONFINITE,
    ORACLE,
    PADDING,
    PASSED,
    REFERENCES_DISAGREE,
    TOLERANCE,
    TORCH_NN,
    CaseResult,
    Failure,
    Report,
    Row,
)
from lstm_deploy_export.check.runners import Arrays, Context, Runner, Unavailable
from lstm_deploy_export.check.runtimes import RUNTIMES, Runtime
from lstm_deploy_export.check.sweep import Case, make_inputs, model_inputs, padding_mask, sweep
from lstm_deploy_export.export.writer import load_model

__all__ = ["TOLERANCES", "compare", "validate"]

_REF_WORDS = {ORACLE: "the float64 oracle", TORCH_NN: "torch.nn.LSTM float64"}


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
    model: nn.Module | str | None = None,
) -> Report:
    """Run the sweep on every row and return the report (written unless `write` is False).

    Args:
        bundle: a `Bundle` or its directory (loaded and verified with `load_bundle`).
        quick: the quick sweep (seconds, for CI) instead of the thorough one.
        cpp: build the C++ programs (tools.cpp.build) and add their rows.
        tf32: add rows that run CUDA with TF32 on, judged by the tf32 tolerance.
        triton: start a real tritonserver (the [triton] extra) on the bundle's repository and
            add its python-backend row; `triton_python` is the Python of that environment.
        atol, rtol, f32_factor: replace the default tolerances' terms for every precision.
        seeds: the sweep's seeds (default 0 for quick, 0,1,2 otherwise).
        report_dir: where report.json and report.md go (default: the bundle).
        progress: a progress bar (and the C++ build's messages) on stderr.
        write: write report.json, report.md and the manifest's parity.
        model: a whole-model bundle's model, as the user wrote it (its weights come from the
            bundle): the module, or "package.module:function" that makes it; default the
            factory that the manifest records. Not for an LSTM bundle.

    Raises:
        BundleError: the bundle cannot be loaded or verified, or a whole model's module cannot
            be had (no factory recorded and no `model`; the weights do not fit it).
        ExportError: `model` (or the recorded factory) names nothing importable.
        OSError: the report or the manifest cannot be written.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    given = {"atol": atol, "rtol": rtol, "f32_factor": f32_factor}
    overrides = {k: v for k, v in given.items() if v is not None}
    tolerances = {k: dataclasses.replace(t, **overrides) for k, t in TOLERANCES.items()}
    sig, info = bundle.signature, bundle.info
    user_model = _user_model(bundle, model)
    if user_model is None:
        cases = sweep(quick, seeds)
        references: References = References(load_model(bundle), sig)
    else:
        cases = sweep(quick, seeds, lengths=info.lengths is not None, state=bool(info.state))
        references = ModelReferences(user_model, info)
    axes = (bundle.manifest["model"].get("axes") or {}) if bundle.whole else {}
    say = (lambda line: print(line, file=sys.stderr)) if progress else None
    context = Context(
        cpp=cpp, triton=triton, triton_python=triton_python, say=say, model=user_model
    )
    entries = [r for r in RUNTIMES if not r.reference and (tf32 or r.precision != TF32)]
    checks: list[dict[str, Any]] = []
    failures: list[Failure] = []
    with context.stack:
        loaded = [_load(entry, bundle, context, tolerances) for entry in entries]
        rows = [row for row, _ in loaded]
        active = [(runner, row) for row, runner in loaded if runner is not None]
        bar = tqdm(
            total=len(cases) * len(active), desc="validate", unit="run", file=sys.stderr,
            disable=not progress, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        with _one_thread(), bar:
            for case in cases:
                if bundle.whole:
                    inputs, pad = model_inputs(case, info, axes), None
                else:
                    inputs = make_inputs(case, bundle.config)
                    pad = padding_mask(inputs[LENGTHS], case.steps)
                refs, eps32, check = _references(references, inputs, case, pad)
                checks.append(check)
                failures += check.pop("failures")
                for runner, row in active:
                    bar.set_postfix_str(
                        f"T={case.steps} B={case.batch} {row.runtime} {row.artifact}"
                    )
                    assert row.tolerance is not None
                    result = _run_case(runner, sig, inputs, case, refs, row.tolerance, eps32, pad)
                    row.results.append(result)
                    bar.update()

    by_id = {c.id: c for c in cases}
    for row in rows:
        if row.results:
            row.failures = _row_failures(row, by_id, sig.output_names)
            row.status = FAILED if row.failures else PASSED
        failures += row.failures
    report = Report(
        bundle=str(bundle.path),
        created=created,
        quick=quick,
        outputs=sig.output_names,
        cases=cases,
        policy=_policy(tolerances, bool(overrides), bundle.whole),
        references=checks,
        rows=rows,
        failures=failures,
        versions=_versions(),
        whole=bundle.whole,
    )
    report.duration_s = time.perf_counter() - started
    if write:
        _write(report, bundle, Path(report_dir) if report_dir is not None else bundle.path)
    return report


def _user_model(bundle: Bundle, model: nn.Module | str | None) -> nn.Module | None:
    """A whole-model bundle's module, as the user wrote it, with the bundle's weights."""
    if not bundle.whole:
        if model is not None:
            raise BundleError(
                f"{bundle.path} is an LSTM bundle: its model is its weights; --module (model=) "
                "is for whole-model bundles (export_model)"
            )
        return None
    from lstm_deploy_export.export.whole import load_whole_model

    return load_whole_model(bundle, model)


def _load(
    entry: Runtime, bundle: Bundle, context: Context, tolerances: dict[str, Tolerance]
) -> tuple[Row, Runner | None]:
    """The entry's row, and its runner when it is here and its artifact loads."""
    row = Row(entry.name, entry.artifact, entry.precision, entry.description)
    row.reason = entry.unavailable(bundle, context)
    if row.reason is not None:
        return row, None
    try:
        runner = entry.make(bundle, context)
    except Unavailable as e:
        row.reason = str(e)
        return row, None
    except Exception as e:  # the runtime is here but cannot load the artifact: a failure
        detail = f"could not load {entry.artifact}: {type(e).__name__}: {e}"
        row.status, row.failures = FAILED, [Failure(LOAD, detail, entry.name, entry.artifact)]
        return row, None
    row.tolerance = tolerances[entry.precision]
    return row, runner


def _references(
    references: References, inputs: Arrays, case: Case, pad: np.ndarray | None
) -> tuple[dict[str, Arrays], float, dict[str, Any]]:
    """Both references on the case, the case's eps32, and whether the references agree."""
    oracle = references.run_oracle(inputs)
    nn64 = references.run_torch(inputs, torch.float64)
    eps32, f32_errors = references.eps32(inputs, oracle)
    agree = {
        o: compare(nn64[o], oracle[o], REFERENCE_TOLERANCE, eps32, pad if o == OUTPUT else None)
        for o in oracle
    }
    check = {
        "case": case.id,
        "eps32": eps32,
        "nn_lstm_float32_max_abs": f32_errors,
        "nn_lstm_vs_oracle_max_abs": {o: m.max_abs for o, m in agree.items()},
        "passed": all(m.passed for m in agree.values()),
        "failures": [
            Failure(
                REFERENCES_DISAGREE,
                f"max abs {m.max_abs:.1e} > {m.allowed:.1e} ({case.label()}, at {m.index})",
                output=o,
                case=case.id,
            )
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
    made with one thread too (Context.threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_case(
    run: Callable[[Arrays], Arrays],
    sig: Signature,
    inputs: Arrays,
    case: Case,
    refs: dict[str, Arrays],
    tolerance: Tolerance,
    eps32: float,
    pad: np.ndarray | None,
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
    for spec in sig.outputs:
        o, got = spec.name, out.get(spec.name)
        if got is None or got.shape != oracle[o].shape or got.dtype != np.dtype(spec.dtype):
            what = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
            return CaseResult(
                case.id,
                seconds,
                error=f"{o} is {what}, expected {spec.dtype} {list(oracle[o].shape)}",
            )
    metrics = {
        o: {
            name: compare(out[o], ref[o], tolerance, eps32, pad if o == OUTPUT else None)
            for name, ref in refs.items()
        }
        for o in oracle
    }
    return CaseResult(case.id, seconds, metrics)


def _row_failures(row: Row, cases: dict[int, Case], outputs: Sequence[str]) -> list[Failure]:
    """One failure per failing output and kind, naming the worst case."""
    where = {"runtime": row.runtime, "artifact": row.artifact}
    found = []
    errors = [r for r in row.results if r.error]
    if errors:
        first = errors[0]
        found.append(Failure(
            ERROR,
            f"failed in {len(errors)}/{len(row.results)} cases, first "
            f"{cases[first.case].label()}: {first.error}",
            case=first.case, **where,
        ))  # fmt: skip
    ran = [r for r in row.results if r.metrics]
    for o in outputs:
        ms = [(r.metrics[o], cases[r.case]) for r in ran]
        # Both references agree to ~1e-15 (checked), so a failure against one is one against the
        # other; the line names those it failed against and details the oracle's (else nn.LSTM's).
        against = [ref for ref in (ORACLE, TORCH_NN) if any(m[ref].violations for m, _ in ms)]
        if against:
            bad = [(m[against[0]], c) for m, c in ms if m[against[0]].violations]
            m, c = max(bad, key=lambda mc: mc[0].max_ratio)
            words = " and ".join(_REF_WORDS[ref] for ref in against)
            found.append(Failure(
                TOLERANCE,
                f"max abs {m.max_abs:.1e} > allowed {m.allowed:.1e} vs {words} in "
                f"{len(bad)}/{len(ms)} cases (worst: {c.label()}, at {m.index}: "
                f"{m.actual:.6g} vs {m.reference:.6g})",
                output=o, case=c.id, **where,
            ))  # fmt: skip
        nonfinite = [c for m, c in ms if m[ORACLE].nonfinite]
        if nonfinite:
            found.append(Failure(
                NONFINITE,
                f"NaN or inf in {len(nonfinite)}/{len(ms)} cases (first: {nonfinite[0].label()})",
                output=o, case=nonfinite[0].id, **where,
            ))  # fmt: skip
        padded = [(m[ORACLE].padding_nonzero or 0, c) for m, c in ms if m[ORACLE].padding_nonzero]
        if padded:
            found.append(Failure(
                PADDING,
                f"{sum(n for n, _ in padded)} values at padded steps (t >= length) are not 0, in "
                f"{len(padded)}/{len(ms)} cases (first: {padded[0][1].label()}): lengths are "
                "not honoured",
                output=o, case=padded[0][1].id, **where,
            ))  # fmt: skip
    return found


def _versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("lstm-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"):
        if installed(dist):
            found[dist] = installed(dist)
    found["machine"] = platform.machine()
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name()
    return found


def _policy(tolerances: dict[str, Tolerance], overridden: bool, whole: bool) -> dict[str, Any]:
    applies = {
        p: ", ".join(
            dict.fromkeys(r.name for r in RUNTIMES if r.precision == p and not r.reference)
        )
        for p in tolerances
    }
    return {
        "rule": "elementwise |actual - reference| <= atol + rtol*|reference| + f32_factor*eps32, "
        "against each reference",
        "references": _WHOLE_REFERENCES if whole else _LSTM_REFERENCES,
        "eps32": "per case: max abs error of torch.nn.LSTM in float32 against the oracle, the max "
        "over the outputs",
        "padding": "not checked apart: a head after the LSTMs may make padded steps nonzero; they "
        "are compared with the references like every other value"
        if whole
        else "output at t >= length must be exactly 0",
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
            name: {**dataclasses.asdict(tol), "applies_to": applies[name]}
            for name, tol in tolerances.items()
        },
    }


_LSTM_REFERENCES = (
    "oracle: the scratch module in float64 (weights.safetensors); nn.LSTM: torch.nn.LSTM in "
    "float64, same weights, pack_padded_sequence(enforce_sorted=False)"
)
_WHOLE_REFERENCES = (
    "oracle: the user's module (weights.safetensors) with its LSTMs converted to "
    "lstm_deploy.LSTM, in float64; nn.LSTM: the same module with torch.nn.LSTMs (its own, or "
    "ours replaced, same weights, lengths by pack_padded_sequence(enforce_sorted=False)), in "
    "float64; a streamable model's state in and out through forward hooks on each LSTM"
)


def _write(report: Report, bundle: Bundle, directory: Path) -> None:
    json_path, _ = render.write(report, directory)
    try:
        where = json_path.resolve().relative_to(bundle.path.resolve()).as_posix()
    except ValueError:
        where = str(json_path.resolve())
    bundle.manifest["parity"] = render.parity_summary(report, where)
    bundle.write_manifest()  # not itself in manifest["files"]: the bundle stays verifiable
