"""Time a bundle's artifacts against torch.nn.LSTM with the same weights, in one process.

The backends are the runtime registry's (`check.runtimes.RUNTIMES`, TF32 rows left out), each
named by its bench label; `torch.nn.LSTM` is the reference. Per grid cell, after warm-up, the
backends run interleaved (the order rotates every round) until `Plan.repeat` rounds or the cell's
time budget; then each backend in a process of its own (the C++ programs) runs once, timing as
many runs as the rounds had inside its process. Around it all: the ceilings that make the peak
(`ceilings`) and the noise of the machine (`noise`). `lstm-deploy bench --help` (cli/bench.py)
says what each number means.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
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
from lstm_deploy_export.bench import ceilings, noise
from lstm_deploy_export.bench import report as bench_report
from lstm_deploy_export.check.compare import INT8, TF32, TOLERANCES
from lstm_deploy_export.check.runners import Context, Runner
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
# ... unless its precision is lower by design: model.int8.onnx is within its class's own bound.
MISMATCH_ATOLS = {r.label: TOLERANCES[INT8].atol for r in BACKENDS if r.precision == INT8}

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
    peak_size: int = 1024  # of the GEMMs that measure the ceilings
    device: str = "cpu"  # where the reference and the default backends run: "cpu" or "cuda"
    cpp: bool = False  # build the C++ programs and time their rows
    skipped: list[dict[str, str]] = field(default_factory=list)
    _context: Context | None = field(default=None, init=False, repr=False)

    @property
    def reference(self) -> str:
        return REFERENCES[self.device]

    @property
    def context(self) -> Context:
        """The runtimes' context, one per plan: the C++ programs are built once, in `make`."""
        if self._context is None:
            say = lambda line: print(line, file=sys.stderr)  # noqa: E731 (the C++ build's)
            self._context = Context(threads=self.threads, cpp=self.cpp, say=say)
        return self._context

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
        context = plan.context
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
    start = noise.sample(processes=True)
    machine = machine_info(plan.threads, plan.device)
    measured_ceilings = ceilings.measure(plan.device, plan.threads, plan.peak_size)
    peak = ceilings.peak(measured_ceilings)
    assert peak.gflops is not None
    rows = run_grid(bundles, plan, seed, peak.gflops)
    measured: dict[str, Any] = {}
    if memory and plan.device == "cpu":  # RSS: host memory, not what a CUDA backend holds
        largest = max(_cells(bundles, plan.grid), key=lambda c: c.batch * c.steps * c.hidden)
        measured = measure_memory(bundles[largest.hidden], plan, largest)
    end = noise.sample(processes=True)
    quiet = noise.between(start, end) if start and end else None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "clock": plan.clock,
        "device": plan.device,
        "reference": plan.reference,
        "noisy": quiet.noisy if quiet else None,
        "noise": quiet.to_dict() if quiet else {"verdict": "unknown (no /proc/stat: not Linux)"},
        "peak_gflops": peak.gflops,
        "peak_ceiling": peak.name,
        "ceilings": [c.to_dict() for c in measured_ceilings],
        "grid": plan.grid,
        "models": {str(h): b.config.to_dict() for h, b in bundles.items()},
        "rows": rows,
        "summary": bench_report.summary(rows, plan.reference),
        "memory": measured,
        "skipped": plan.skipped,
        "method": bench_report.method(plan.clock, plan.reference, plan.device, plan.cpp),
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
                start = noise.sample()
                samples, errors = time_cell(backends, inputs, plan)
                end = noise.sample()
                flops = bundle.config.gemm_flops(cell.batch, cell.steps)
                others = noise.between(start, end).others if start and end else None
                for row in summarize(cell, samples, errors, flops, peak, plan.reference):
                    rows.append({**row, "others_cores": others})  # which cells a neighbour hit
                bar.update()
    return rows


def present(bundle: Bundle, plan: Plan) -> list[Runtime]:
    """The plan's backends that can run on `bundle`; the others go to the plan's skipped."""
    context = plan.context
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
    context = plan.context
    return {entry.label: entry.make(bundle, context) for entry in present(bundle, plan)}


def cell_inputs(config: LSTMConfig, cell: Cell, seed: int) -> Arrays:
    """The deployed signature's inputs for a cell: random input and state, full lengths."""
    return make_inputs(Case(0, seed, cell.batch, cell.steps, "full", "random"), config)


def time_cell(
    backends: dict[str, Runner], inputs: Arrays, plan: Plan
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each backend, and each one's max abs error against the reference.

    The backends in bench's process run interleaved rounds; then each one in a process of its own
    (`Runner.timed`: the C++ programs) runs once, with as many timed runs as there were rounds,
    after the same warm-up, and reports the times it took inside its process.
    """
    samples: dict[str, list[float]] = {name: [] for name in backends}
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        calls = {n: r.prepare(inputs) for n, r in backends.items() if r.timed is None}
        for name, call in calls.items():
            for _ in range(plan.warmup):
                result = call()
            outputs[name] = backends[name].outputs(result)[OUTPUT]
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
    rounds = len(samples[plan.reference])
    times = "times_ms" if plan.clock == "wall" else "cpu_times_ms"
    for name, runner in backends.items():
        if runner.timed is not None:
            result, timing = runner.timed(inputs, plan.warmup, rounds)
            outputs[name] = runner.outputs(result)[OUTPUT]
            samples[name] = [ms / 1e3 for ms in timing[times]]
    errors = {n: float(np.abs(o - outputs[plan.reference]).max()) for n, o in outputs.items()}
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
                "mismatch": errors[name] > MISMATCH_ATOLS.get(name, MISMATCH_ATOL),
            }
        )
    return rows


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The CPU (and GPU), the threads, every version that bears on the numbers, the load."""
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
        "versions": versions(),
        **(
            {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
            if device == "cuda"
            else {}
        ),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str | None]:
    """The packages, and the kernels' libraries inside torch (oneDNN, MKL): the C++ programs use
    the same (LibTorch from the torch wheel, the onnxruntime wheel's library)."""
    from lstm_deploy.versions import installed, package_version

    found: dict[str, str | None] = {"lstm-deploy": package_version()}
    found |= {n: installed(n) for n in ("torch", "onnxruntime", "onnx", "openvino", "numpy")}
    config = torch.__config__.show()
    for name, pattern in (("oneDNN", r"MKL-DNN v([\w.]+)"), ("MKL", r"Library Version ([\w.]+)")):
        match = re.search(pattern, config)
        found[name] = match.group(1) if match else None
    return found


def measure_memory(bundle: Bundle, plan: Plan, cell: Cell) -> dict[str, dict[str, Any]]:
    """Peak RSS per backend, each in a fresh child process (see `_memory_child`); the backends in
    a process of their own (the C++ programs) are left out: the child would measure itself."""
    memory: dict[str, dict[str, Any]] = {}
    for name in (entry.label for entry in present(bundle, plan) if not entry.own_process):
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
