"""Time a bundle's artifacts against torch.nn.LSTM with the same weights, in one process.

The backends are the runtime registry's (`check.runtimes.RUNTIMES`, TF32 rows left out), each
named by its bench label; `torch.nn.LSTM` is the reference. Per grid cell, after warm-up, the
backends run interleaved (the order rotates every round) until `Plan.repeat` rounds or the cell's
time budget. `lstm-deploy bench --help` (cli/bench.py) says what each number means.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstm_deploy.bundle import OUTPUT, Bundle, load_bundle
from lstm_deploy.config import LSTMConfig
from lstm_deploy_export.bench import report as bench_report
from lstm_deploy_export.check.compare import TF32
from lstm_deploy_export.check.runners import Context, Runner, synced
from lstm_deploy_export.check.runtimes import RUNTIMES, Runtime
from lstm_deploy_export.check.sweep import Case, make_inputs

DEFAULT_GRID = {"batch": [1, 16, 64], "steps": [16, 128, 512], "hidden": [128, 256, 512]}
QUICK_GRID = {"batch": [1, 8], "steps": [8, 32], "hidden": [32]}
REFERENCE = bench_report.REFERENCE
REFERENCES = {"cpu": REFERENCE, "cuda": "torch.nn.LSTM (cuda)"}  # per device: cuDNN on CUDA
BACKENDS = [r for r in RUNTIMES if r.precision != TF32]
TIMED = [r.label for r in BACKENDS if r.untimed is None]
CPU_BACKENDS = [r.label for r in BACKENDS if r.untimed is None and r.device == "cpu"]
MISMATCH_ATOL = 1e-3  # a backend this far from nn.LSTM is timing something else: flagged

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Cell:
    batch: int
    steps: int
    hidden: int


@dataclass
class Plan:
    """What to run: the grid, the backends (bench labels), how long to time each cell."""

    grid: dict[str, list[int]]
    backends: list[str]
    warmup: int = 3
    repeat: int = 15
    budget: float = 20.0  # seconds of timed rounds per cell, after at least 5 rounds
    threads: int = 1
    clock: str = "wall"  # or "cpu": the process's CPU time (one thread only)
    peak_size: int = 1024  # of the GEMM that measures the peak
    device: str = "cpu"  # where the reference and the default backends run: "cpu" or "cuda"
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return REFERENCES[self.device]

    @property
    def timer(self) -> Callable[[], float]:
        return time.perf_counter if self.clock == "wall" else time.process_time

    @classmethod
    def make(cls, backends: Sequence[str] | None, **kwargs: Any) -> Plan:
        """A plan for `backends` (default: all of the plan's device); those that cannot run here go
        to `skipped`. Raises ValueError for unknown names, or a reference that is missing or
        cannot run here."""
        plan = cls(backends=[], **kwargs)
        wanted = list(backends) if backends else [
            r.label for r in BACKENDS if r.untimed is None and r.device == plan.device
        ]  # fmt: skip
        if set(wanted) - set(TIMED) or plan.reference not in wanted:
            raise ValueError(
                f"--backends must include {plan.reference} (the reference on {plan.device}) and "
                f"name only {','.join(TIMED)}"
            )
        context = Context(threads=plan.threads)
        for entry in BACKENDS:
            if entry.label not in wanted and (entry.untimed is None or entry.device != plan.device):
                continue
            reason = entry.untimed or entry.available(context)
            if reason is None:
                plan.backends.append(entry.label)
            else:
                plan.skipped.append({"backend": entry.label, "reason": reason})
        if plan.reference not in plan.backends:
            raise ValueError(
                f"the reference {plan.reference} cannot run here: "
                + next(s["reason"] for s in plan.skipped if s["backend"] == plan.reference)
            )
        return plan


def run(plan: Plan, bundles: dict[int, Bundle], seed: int = 0, memory: bool = True) -> dict:
    """Time every cell of the grid on `bundles` ({hidden size: bundle}); the result as data."""
    torch.set_num_threads(plan.threads)
    peak = gemm_peak_gflops(plan.peak_size, plan.device)
    rows = run_grid(bundles, plan, seed, peak)
    measured: dict[str, Any] = {}
    if memory and plan.device == "cpu":  # RSS: host memory, not what a CUDA backend holds
        largest = max(_cells(bundles, plan.grid), key=lambda c: c.batch * c.steps * c.hidden)
        measured = measure_memory(bundles[largest.hidden], plan, largest)
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(plan.threads, plan.device),
        "clock": plan.clock,
        "device": plan.device,
        "reference": plan.reference,
        "gemm_peak_gflops": peak,
        "grid": plan.grid,
        "models": {str(h): b.config.to_dict() for h, b in bundles.items()},
        "rows": rows,
        "summary": bench_report.summary(rows, plan.reference),
        "memory": measured,
        "skipped": plan.skipped,
        "method": bench_report.method(plan.clock, plan.reference, plan.device),
    }


def _cells(bundles: dict[int, Bundle], grid: dict[str, list[int]]) -> list[Cell]:
    return [Cell(b, t, h) for h in bundles for b in grid["batch"] for t in grid["steps"]]


def run_grid(
    bundles: dict[int, Bundle], plan: Plan, seed: int, peak: float
) -> list[dict[str, Any]]:
    """Every cell of the grid, a progress bar over them; one row per cell and backend."""
    cells = _cells(bundles, plan.grid)
    rows: list[dict[str, Any]] = []
    with bench_report.progress(len(cells)) as bar:
        for hidden, bundle in bundles.items():
            backends = load_backends(bundle, plan)
            for cell in (c for c in cells if c.hidden == hidden):
                bar.set_postfix_str(f"B={cell.batch} T={cell.steps} H={cell.hidden}")
                inputs = cell_inputs(bundle.config, cell, seed)
                samples, errors = time_cell(backends, inputs, plan)
                flops = bundle.config.gemm_flops(cell.batch, cell.steps)
                rows += summarize(cell, samples, errors, flops, peak, plan.reference)
                bar.update()
    return rows


def present(bundle: Bundle, plan: Plan) -> list[Runtime]:
    """The plan's backends that can run on `bundle`; the others go to the plan's skipped."""
    context = Context(threads=plan.threads)
    entries = {r.label: r for r in BACKENDS}
    found = []
    for label in plan.backends:
        reason = entries[label].unavailable(bundle, context)
        if reason is None:
            found.append(entries[label])
        elif not any(s["backend"] == label for s in plan.skipped):
            plan.skipped.append({"backend": label, "reason": reason})
    return found


def load_backends(bundle: Bundle, plan: Plan) -> dict[str, Runner]:
    """{label: runner} for the plan's backends that the bundle has, in the plan's order."""
    context = Context(threads=plan.threads)
    return {entry.label: entry.make(bundle, context) for entry in present(bundle, plan)}


def cell_inputs(config: LSTMConfig, cell: Cell, seed: int) -> Arrays:
    """The deployed signature's inputs for a cell: random input and state, full lengths."""
    return make_inputs(Case(0, seed, cell.batch, cell.steps, "full", "random"), config)


def time_cell(
    backends: dict[str, Runner], inputs: Arrays, plan: Plan
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each backend (interleaved rounds), and each one's max abs error."""
    samples: dict[str, list[float]] = {name: [] for name in backends}
    with torch.inference_mode():
        calls = {name: runner.prepare(inputs) for name, runner in backends.items()}
        outputs = {}
        for name, call in calls.items():
            for _ in range(plan.warmup):
                result = call()
            outputs[name] = backends[name].outputs(result)[OUTPUT]
        errors = {n: float(np.abs(o - outputs[plan.reference]).max()) for n, o in outputs.items()}
        names = list(calls)
        start = time.perf_counter()
        for r in range(plan.repeat):
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotated: no backend always runs first
                t0 = plan.timer()
                calls[name]()
                samples[name].append(plan.timer() - t0)
            if r + 1 >= min(5, plan.repeat) and time.perf_counter() - start > plan.budget:
                break
    return samples, errors


def summarize(
    cell: Cell,
    samples: dict[str, list[float]],
    errors: dict[str, float],
    flops: int,
    peak: float,
    reference_name: str = REFERENCE,
) -> list[dict[str, Any]]:
    """One row per backend of a cell (see `lstm-deploy bench --help` for each number)."""
    reference = float(np.median(samples[reference_name]))
    rows = []
    for name, times in samples.items():
        q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
        rows.append(
            {
                "batch": cell.batch,
                "steps": cell.steps,
                "hidden": cell.hidden,
                "backend": name,
                "median_ms": median * 1e3,
                "p25_ms": q1 * 1e3,
                "p75_ms": q3 * 1e3,
                "rounds": len(times),
                "sequences_per_s": cell.batch / median,
                "ratio": reference / median,
                "gflops": flops / median / 1e9,
                "peak_fraction": flops / median / 1e9 / peak,
                "max_abs_err": errors[name],
                "mismatch": errors[name] > MISMATCH_ATOL,
            }
        )
    return rows


def gemm_peak_gflops(size: int = 1024, device: str = "cpu") -> float:
    """The device's float32 GEMM rate: the best of 5 torch.mm (n x n) @ (n x n); TF32 off."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    mm = synced(lambda: torch.mm(a, b), device)
    mm()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        **(
            {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
            if device == "cuda"
            else {}
        ),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def measure_memory(bundle: Bundle, plan: Plan, cell: Cell) -> dict[str, dict[str, Any]]:
    """Peak RSS per backend, each in a fresh child process (see `_memory_child`)."""
    memory: dict[str, dict[str, Any]] = {}
    for name in (entry.label for entry in present(bundle, plan)):
        spec = json.dumps(
            {"bundle": str(bundle.path), "backend": name, "cell": vars(cell),
             "threads": plan.threads}
        )  # fmt: skip
        code = f"from lstm_deploy_export.bench.run import _memory_child; _memory_child({spec!r})"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["failed"]
            memory[name] = {"error": lines[-1]}
            continue
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return memory


def _memory_child(spec_json: str) -> None:
    """In a fresh process: import everything, note RSS, run the backend twice, print peak RSS."""
    import onnxruntime  # noqa: F401  (every backend's child imports the same: the same baseline)

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    baseline = _status_kb("VmRSS")
    bundle = load_bundle(spec["bundle"])
    plan = Plan({}, [spec["backend"]], threads=spec["threads"])
    (runner,) = load_backends(bundle, plan).values()
    inputs = cell_inputs(bundle.config, Cell(**spec["cell"]), 0)
    with torch.inference_mode():
        call = runner.prepare(inputs)
        for _ in range(2):
            call()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "increase_mb": (peak - baseline) / 1024}))


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
