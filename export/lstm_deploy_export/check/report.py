"""What `validate` measured, as data: failures, rows, the report. Rendering is `render`'s job.

Every number here comes from a run: `Metrics` (see `compare`) holds one output of one artifact on
one case against one reference; a `Row` (artifact x runtime) holds its cases; the `Report` holds
the rows, the sweep, the policy they were judged by and every `Failure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lstm_deploy_export.check.compare import Metrics, Tolerance
from lstm_deploy_export.check.sweep import Case

# The two references: the scratch module (a whole model: with its LSTMs converted) in float64, and
# torch.nn.LSTM (a whole model: the module with torch.nn.LSTMs) in float64.
ORACLE, TORCH_NN = "oracle", "nn.LSTM"
REFERENCES = (ORACLE, TORCH_NN)
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

# What a failure is about. LOAD: the artifact did not load; ERROR: a run raised; TOLERANCE,
# NONFINITE, PADDING: an output is wrong; REFERENCES: the two references disagree.
LOAD, ERROR, TOLERANCE, NONFINITE, PADDING, REFERENCES_DISAGREE = (
    "load", "error", "tolerance", "nonfinite", "padding", "references",
)  # fmt: skip


@dataclass(frozen=True)
class Failure:
    """One reason validate fails, as data; `render.failure_line` writes it as one line."""

    kind: str  # one of the kinds above
    detail: str  # the evidence, in words (values, counts, the worst case)
    runtime: str | None = None  # None for REFERENCES_DISAGREE
    artifact: str | None = None
    output: str | None = None
    case: int | None = None  # the worst (or first) case it names

    @property
    def subject(self) -> str:
        if self.runtime is None:
            return "references disagree: torch.nn.LSTM float64 vs the float64 oracle"
        return f"{self.artifact} on {self.runtime}"


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
    failures: list[Failure] = field(default_factory=list)

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


@dataclass
class Report:
    bundle: str
    created: str
    quick: bool
    outputs: list[str]  # the signature's outputs, each compared
    cases: list[Case]
    policy: dict[str, Any]
    references: list[dict[str, Any]]  # per case: float32 floor and the references' agreement
    rows: list[Row]
    failures: list[Failure]
    duration_s: float = 0.0
    versions: dict[str, Any] = field(default_factory=dict)
    whole: bool = False  # a whole-model bundle: the oracle is the user's module, converted

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cases})

    def row(self, runtime: str, artifact: str) -> Row:
        return next(r for r in self.rows if r.runtime == runtime and r.artifact == artifact)

    def case(self, case_id: int) -> Case:
        return next(c for c in self.cases if c.id == case_id)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in (PASSED, FAILED, SKIPPED)}
