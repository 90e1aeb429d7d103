"""The parity report: what `validate` measured, as data, a terminal table, JSON and Markdown.

Every number here comes from a run: `Metrics` holds one output of one artifact on one case against
one reference; a `Row` (artifact x runtime) holds its cases; the `Report` holds the rows, the sweep,
the policy they were judged by and every failure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

OUTPUTS = ("output", "hn", "cn")
ORACLE, TORCH_NN = "oracle", "nn.LSTM"  # the two references: scratch float64, torch.nn.LSTM float64
REL_FLOOR = 1e-3  # max rel divides by max(|reference|, REL_FLOOR)
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Tolerance:
    """|actual - reference| <= atol + rtol * |reference| + f32_factor * eps32, elementwise.

    eps32 is the max abs error of torch.nn.LSTM in float32 against the oracle on the same case and
    output: what float32 arithmetic itself loses on this model and input. It is ~1e-7 for a
    well-conditioned model and grows with T for a long-memory one (large forget-gate bias), so the
    tolerance follows the model's conditioning instead of failing every runtime on it.
    """

    atol: float
    rtol: float
    f32_factor: float

    def allowed(self, reference_abs: np.ndarray, eps32: float) -> np.ndarray:
        return self.atol + self.rtol * reference_abs + self.f32_factor * eps32

    def describe(self) -> str:
        return f"|Δ| <= {self.atol:.0e} + {self.rtol:.0e}·|ref| + {self.f32_factor:g}·eps32"


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


@dataclass
class CaseResult:
    """One row's run of one case: its metrics per output and reference, or the error it raised."""

    case: int
    seconds: float
    metrics: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Row:
    runtime: str
    artifact: str
    precision: str
    description: str
    status: str = SKIPPED
    reason: str | None = None  # why skipped
    tolerance: Tolerance | None = None
    results: list[CaseResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def worst(self, output: str, reference: str = ORACLE) -> tuple[Metrics, int] | None:
        """The metrics of the case with the largest max abs, and that case's id."""
        found = [(r.metrics[output][reference], r.case) for r in self.results if r.metrics]
        return max(found, key=lambda m: m[0].max_abs) if found else None

    def summary(self, output: str, reference: str = ORACLE) -> dict[str, Any] | None:
        """Over all cases: max of max abs / max rel / p99, element-weighted mean abs, the worst."""
        ms = [r.metrics[output][reference] for r in self.results if r.metrics]
        worst = self.worst(output, reference)
        if not ms or worst is None:
            return None
        count = sum(m.count for m in ms)
        return {
            "max_abs": max(m.max_abs for m in ms),
            "max_rel": max(m.max_rel for m in ms),
            "mean_abs": sum(m.mean_abs * m.count for m in ms) / max(count, 1),
            "p99_abs": max(m.p99_abs for m in ms),
            "max_ratio": max(m.max_ratio for m in ms),
            "worst_case": worst[1],
            "worst_index": worst[0].index,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "artifact": self.artifact,
            "precision": self.precision,
            "description": self.description,
            "status": self.status,
            "reason": self.reason,
            "tolerance": asdict(self.tolerance) if self.tolerance else None,
            "seconds": round(self.seconds, 3),
            "summary": {
                out: {ref: self.summary(out, ref) for ref in (ORACLE, TORCH_NN)} for out in OUTPUTS
            }
            if self.results
            else None,
            "failures": self.failures,
            "cases": [
                {
                    "case": r.case,
                    "seconds": round(r.seconds, 4),
                    "error": r.error,
                    "metrics": {
                        out: {ref: asdict(m) for ref, m in refs.items()}
                        for out, refs in r.metrics.items()
                    },
                }
                for r in self.results
            ],
        }


@dataclass
class Report:
    bundle: str
    created: str
    quick: bool
    seeds: list[int]
    cases: list[dict[str, Any]]  # the sweep, as validate.Case.to_json()
    policy: dict[str, Any]
    references: list[dict[str, Any]]  # per case: float32 floor and the references' agreement
    rows: list[Row]
    failures: list[str]
    duration_s: float = 0.0
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def row(self, runtime: str, artifact: str) -> Row:
        return next(r for r in self.rows if r.runtime == runtime and r.artifact == artifact)

    def case(self, case_id: int) -> dict[str, Any]:
        return next(c for c in self.cases if c["id"] == case_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "passed": self.passed,
            "bundle": self.bundle,
            "created": self.created,
            "duration_s": round(self.duration_s, 2),
            "versions": self.versions,
            "policy": self.policy,
            "sweep": {"quick": self.quick, "seeds": self.seeds, "cases": self.cases},
            "references": self.references,
            "rows": [r.to_json() for r in self.rows],
            "failures": self.failures,
        }

    def parity_summary(self, report_path: str | None) -> dict[str, Any]:
        """The manifest's "parity": pass/fail per row and where the full report is."""
        rows = []
        for r in self.rows:
            entry: dict[str, Any] = {
                "runtime": r.runtime,
                "artifact": r.artifact,
                "status": r.status,
            }
            if r.status == SKIPPED:
                entry["reason"] = r.reason
            else:
                worst = [s for s in (r.summary(o) for o in OUTPUTS) if s is not None]
                entry["max_abs"] = max((s["max_abs"] for s in worst), default=None)
            rows.append(entry)
        return {
            "passed": self.passed,
            "validated": self.created,
            "sweep": "quick" if self.quick else "thorough",
            "cases": len(self.cases),
            "versions": self.versions,
            "report": report_path,
            "failures": len(self.failures),
            "rows": rows,
        }

    # --- rendering ------------------------------------------------------------------------------

    def _table_rows(self) -> list[list[str]]:
        lines = []
        for r in self.rows:
            if r.status == SKIPPED:
                lines.append([r.runtime, r.artifact, r.status.upper(), r.reason or ""])
                continue
            cells = [r.runtime, r.artifact, r.status.upper()]
            sums = {o: r.summary(o) for o in OUTPUTS}
            for o in OUTPUTS:
                s = sums[o]
                cells.append(f"{s['max_abs']:.1e}" if s else "-")
            valid = [s for s in sums.values() if s]
            if valid:
                cells.append(f"{max(s['max_rel'] for s in valid):.1e}")
                ratio = max(s["max_ratio"] for s in valid)
                cells.append(f"{ratio:.2f}" if ratio < 100 else f"{ratio:.0e}")
                out, s = max(((o, s) for o, s in sums.items() if s), key=lambda x: x[1]["max_abs"])
                c = self.case(s["worst_case"])
                cells.append(f"{out} B={c['batch']} T={c['steps']} {s['worst_index']}")
            else:
                cells += ["-", "-", r.failures[0] if r.failures else ""]
            cells.append(f"{r.seconds:.1f}s")
            lines.append(cells)
        return lines

    HEADER: ClassVar[list[str]] = [
        "runtime",
        "artifact",
        "status",
        "output",
        "hn",
        "cn",
        "max rel",
        "of tol",
        "worst at",
    ]

    def table(self) -> str:
        """The terminal table: per output, max |Δ| against the float64 oracle over the sweep."""
        body = self._table_rows()
        header = [*self.HEADER, "time"]
        full = [row for row in body if len(row) == len(header)]
        widths = [max(len(x[i]) for x in [header, *full]) for i in range(len(header))]
        widths[:3] = [max(len(x[i]) for x in [header, *body]) for i in range(3)]
        lead = sum(widths[:3]) + 4

        def fmt(row: list[str]) -> str:
            if len(row) == 4:  # skipped: the reason spans the metric columns
                return "  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3]
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

        title = (
            f"parity of {self.bundle}: {len(self.cases)} cases ({self._sweep_words()}), "
            f"max |Δ| vs the float64 oracle"
        )
        rule = "-" * max(lead + 20, len(fmt(header)))
        lines = [title, fmt(header), rule, *(fmt(row) for row in body), rule]
        lines.append(self.verdict())
        return "\n".join(lines)

    def _sweep_words(self) -> str:
        kind = "quick" if self.quick else "thorough"
        return f"{kind} sweep, seeds {','.join(map(str, self.seeds))}"

    def verdict(self) -> str:
        counts = {s: sum(r.status == s for r in self.rows) for s in (PASSED, FAILED, SKIPPED)}
        head = "PASSED" if self.passed else "FAILED"
        text = (
            f"{head}: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
        )
        text += f" in {self.duration_s:.1f}s"
        if self.failures:
            text += "\n" + "\n".join(self.failures)
        return text

    def markdown(self) -> str:
        header = [*self.HEADER, "time"]
        lines = [
            f"# Parity report: `{self.bundle}`",
            "",
            f"{'**PASSED**' if self.passed else '**FAILED**'} · {self.created} · "
            f"{len(self.cases)} cases ({self._sweep_words()}) · {self.duration_s:.1f}s",
            "",
            "Max |Δ| per output against the float64 oracle (the scratch module in float64), worst",
            "over the sweep; `of tol` is the largest |Δ| / allowed (> 1 fails).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in self._table_rows():
            if len(row) == 4:  # skipped: the reason in the first metric column
                row = [*row, *[""] * (len(header) - 4)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        lines += ["", "## Failures", ""]
        lines += [f"- {f.removeprefix('-[x] ')}" for f in self.failures] or ["None."]
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
        for r in self.rows:
            for o in OUTPUTS:
                s, t = r.summary(o, ORACLE), r.summary(o, TORCH_NN)
                if s is None or t is None:
                    continue
                lines.append(
                    f"| {r.runtime} | {r.artifact} | {o} | {s['max_abs']:.2e} | {t['max_abs']:.2e} "
                    f"| {s['max_rel']:.2e} | {s['mean_abs']:.2e} | {s['p99_abs']:.2e} "
                    f"| {s['max_ratio']:.3g} | {s['worst_case']}: {s['worst_index']} |"
                )
        lines += ["", "## Policy", ""]
        lines += [f"- {key}: {value}" for key, value in self.policy.items() if key != "tolerances"]
        lines += [
            "",
            "| precision | atol | rtol | f32_factor | applies to |",
            "|---|---|---|---|---|",
        ]
        for name, tol in self.policy["tolerances"].items():
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
        for c, ref in zip(self.cases, self.references):
            agree = max(ref["nn_lstm_vs_oracle_max_abs"].values())
            lines.append(
                f"| {c['id']} | {c['seed']} | {c['batch']} | {c['steps']} | {c['lengths']} | "
                f"{c['state']} | {ref['eps32']:.1e} | {agree:.1e} |"
            )
        lines += ["", f"Versions: `{json.dumps(self.versions)}`", ""]
        return "\n".join(lines)

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "report.json", directory / "report.md"
        json_path.write_text(json.dumps(_finite(self.to_json()), indent=1, allow_nan=False) + "\n")
        md_path.write_text(self.markdown())
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
