"""The report at the edge: a terminal table, report.json, report.md, the manifest's parity summary.

Nothing here measures or judges: it writes what `report.Report` holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import REPORTS
from lstm_deploy_export.check.report import (
    REFERENCES,
    SKIPPED,
    TORCH_NN,
    Failure,
    Report,
    Row,
)

HEADER = ["runtime", "artifact", "status", "max rel", "of tol", "worst at", "time"]
LEGEND = (
    "columns: per output, max |Δ| vs the float64 oracle over the sweep; max rel = "
    "|Δ|/max(|ref|, 1e-3); of tol = max |Δ|/allowed (> 1 fails); worst at = where max |Δ| is"
)


def failure_line(failure: Failure) -> str:
    """`-[x] model.onnx on onnxruntime-cpu: output: max abs 3.1e-04 > allowed ... (worst: ...)`."""
    output = f"{failure.output}: " if failure.output else ""
    return f"-[x] {failure.subject}: {output}{failure.detail}"


def _header(report: Report) -> list[str]:
    return [*HEADER[:3], *report.outputs, *HEADER[3:]]


def _cells(report: Report, r: Row) -> list[str]:
    """A measured row's cells after runtime, artifact and status."""
    sums = {o: r.summary(o) for o in report.outputs}
    cells = [f"{s['max_abs']:.1e}" if s else "-" for s in sums.values()]
    valid = [(o, s) for o, s in sums.items() if s]
    if valid:
        ratio = max(s["max_ratio"] for _, s in valid)
        out, s = max(valid, key=lambda x: x[1]["max_abs"])
        c = report.case(s["worst_case"])
        cells += [
            f"{max(s['max_rel'] for _, s in valid):.1e}",
            f"{ratio:.2f}" if ratio < 100 else f"{ratio:.0e}",
            f"{out} B={c.batch} T={c.steps} {s['worst_index']}",
        ]
    else:
        cells += ["-", "-", failure_line(r.failures[0]) if r.failures else ""]
    return [*cells, f"{r.seconds:.1f}s"]


def table(report: Report) -> str:
    """The terminal table: per output, max |Δ| against the float64 oracle over the sweep."""
    header = _header(report)
    lead = [[r.runtime, r.artifact, r.status.upper()] for r in report.rows]
    measured = [
        lead[i] + _cells(report, r) for i, r in enumerate(report.rows) if r.status != SKIPPED
    ]
    widths = [max(len(x[i]) for x in [header, *measured]) for i in range(len(header))]
    widths[:3] = [max(len(x[i]) for x in [header, *lead]) for i in range(3)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = []
    for row, first in zip(report.rows, lead):
        if row.status == SKIPPED:  # the reason spans the metric columns
            lines.append(fmt(first) + "  " + (row.reason or ""))
        else:
            lines.append(fmt(first + _cells(report, row)))
    title = (
        f"parity of {report.bundle}: {len(report.cases)} cases ({_sweep_words(report)}), "
        f"max |Δ| vs the float64 oracle"
    )
    rule = "-" * max(sum(widths[:3]) + 24, len(fmt(header)))
    return "\n".join([title, fmt(header), rule, *lines, rule, LEGEND, verdict(report)])


def _sweep_words(report: Report) -> str:
    kind = "quick" if report.quick else "thorough"
    return f"{kind} sweep, seeds {','.join(map(str, report.seeds))}"


def verdict(report: Report) -> str:
    counts = report.counts()
    text = (
        f"{'PASSED' if report.passed else 'FAILED'}: {counts['passed']} passed, "
        f"{counts['failed']} failed, {counts['skipped']} skipped in {report.duration_s:.1f}s"
    )
    return "\n".join([text, *(failure_line(f) for f in report.failures)])


def _oracle_words(report: Report) -> str:
    if report.whole:
        return "the model with its LSTMs converted, in float64"
    return "the scratch module in float64"


def markdown(report: Report) -> str:
    header = _header(report)
    lines = [
        f"# Parity report: `{report.bundle}`",
        "",
        f"{'**PASSED**' if report.passed else '**FAILED**'} · {report.created} · "
        f"{len(report.cases)} cases ({_sweep_words(report)}) · {report.duration_s:.1f}s",
        "",
        f"Max |Δ| per output against the float64 oracle ({_oracle_words(report)}), worst",
        "over the sweep; `of tol` is the largest |Δ| / allowed (> 1 fails).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in report.rows:
        cells = [r.runtime, r.artifact, r.status.upper()]
        if r.status == SKIPPED:  # the reason in the first metric column
            cells += [r.reason or "", *[""] * (len(header) - 4)]
        else:
            cells += _cells(report, r)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Failures", ""]
    lines += [f"- {failure_line(f).removeprefix('-[x] ')}" for f in report.failures] or ["None."]
    lines += [
        "",
        "## Detail",
        "",
        "Per row and output, over the sweep: max abs against each reference; then, against",
        "the oracle: max rel, element-weighted mean abs, max p99 abs, max |Δ| / allowed, and",
        "where the max abs is.",
        "",
        "| runtime | artifact | out | max abs | vs nn.LSTM | max rel | mean abs | p99 abs "
        "| of tol | worst (case: index) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        for o in report.outputs:
            s, t = r.summary(o), r.summary(o, TORCH_NN)
            if s is None or t is None:
                continue
            lines.append(
                f"| {r.runtime} | {r.artifact} | {o} | {s['max_abs']:.2e} | {t['max_abs']:.2e} "
                f"| {s['max_rel']:.2e} | {s['mean_abs']:.2e} | {s['p99_abs']:.2e} "
                f"| {s['max_ratio']:.3g} | {s['worst_case']}: {s['worst_index']} |"
            )
    lines += ["", "## Policy", ""]
    lines += [f"- {key}: {value}" for key, value in report.policy.items() if key != "tolerances"]
    lines += ["", "| precision | atol | rtol | f32_factor | applies to |", "|---|---|---|---|---|"]
    for name, tol in report.policy["tolerances"].items():
        lines.append(
            f"| {name} | {tol['atol']:g} | {tol['rtol']:g} | {tol['f32_factor']:g} | "
            f"{tol['applies_to']} |"
        )
    lines += [
        "",
        "## Sweep",
        "",
        "| case | seed | B | T | lengths | state | eps32 | nn.LSTM vs oracle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, ref in zip(report.cases, report.references):
        agree = max(ref["nn_lstm_vs_oracle_max_abs"].values())
        lines.append(
            f"| {c.id} | {c.seed} | {c.batch} | {c.steps} | {c.lengths} | {c.state} | "
            f"{ref['eps32']:.1e} | {agree:.1e} |"
        )
    lines += ["", f"Versions: `{json.dumps(report.versions)}`", ""]
    return "\n".join(lines)


def _row_json(report: Report, r: Row) -> dict[str, Any]:
    summary = {o: {ref: r.summary(o, ref) for ref in REFERENCES} for o in report.outputs}
    return {
        "runtime": r.runtime,
        "artifact": r.artifact,
        "precision": r.precision,
        "description": r.description,
        "status": r.status,
        "reason": r.reason,
        "tolerance": dataclasses.asdict(r.tolerance) if r.tolerance else None,
        "seconds": round(r.seconds, 3),
        "summary": summary if r.results else None,
        "failures": [failure_line(f) for f in r.failures],
        "cases": [
            {
                "case": c.case,
                "seconds": round(c.seconds, 4),
                "error": c.error,
                "metrics": {
                    out: {ref: dataclasses.asdict(m) for ref, m in refs.items()}
                    for out, refs in c.metrics.items()
                },
            }
            for c in r.results
        ],
    }


def to_json(report: Report) -> dict[str, Any]:
    """report.json: every number. `failures` as lines; `failure_records` as typed records."""
    return {
        "format_version": 1,
        "passed": report.passed,
        "bundle": report.bundle,
        "whole_model": report.whole,
        "created": report.created,
        "duration_s": round(report.duration_s, 2),
        "versions": report.versions,
        "policy": report.policy,
        "sweep": {
            "quick": report.quick,
            "seeds": report.seeds,
            "cases": [c.to_json() for c in report.cases],
        },
        "references": report.references,
        "rows": [_row_json(report, r) for r in report.rows],
        "failures": [failure_line(f) for f in report.failures],
        "failure_records": [dataclasses.asdict(f) for f in report.failures],
    }


def parity_summary(report: Report, report_path: str | None) -> dict[str, Any]:
    """The manifest's "parity": pass/fail per row and where the full report is."""
    rows = []
    for r in report.rows:
        entry: dict[str, Any] = {"runtime": r.runtime, "artifact": r.artifact, "status": r.status}
        if r.status == SKIPPED:
            entry["reason"] = r.reason
        else:
            worst = [s["max_abs"] for s in map(r.summary, report.outputs) if s is not None]
            entry["max_abs"] = max(worst, default=None)
        rows.append(entry)
    return {
        "passed": report.passed,
        "validated": report.created,
        "sweep": "quick" if report.quick else "thorough",
        "cases": len(report.cases),
        "versions": report.versions,
        "report": report_path,
        "failures": len(report.failures),
        "rows": rows,
    }


def write(report: Report, directory: Path) -> tuple[Path, Path]:
    """report.json and report.md into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = (directory / name for name in REPORTS)
    json_path.write_text(json.dumps(_finite(to_json(report)), indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: write them as strings ("inf"), which every reader can parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
