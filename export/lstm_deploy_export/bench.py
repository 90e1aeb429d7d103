"""Time every backend of a bundle against torch.nn.LSTM with the same weights, in one process.

Backends: torch.nn.LSTM (the reference), the scratch module in eager mode, model.pt (TorchScript),
model.onnx and model.scan.onnx on ONNX Runtime's CPU execution provider, and CUDA rows where a
CUDA device is available (rows that cannot run are listed as skipped, with the reason).

Every backend runs the deployed signature with full lengths (nn.LSTM unpacked: full lengths need no
packing) on the same inputs, with --threads intra-op threads. Per grid cell, after warm-up, the
backends run interleaved (the order rotates every round) until --repeat rounds or the cell's time
budget; each row reports the median, the spread (interquartile range), sequences/s, the throughput
ratio to nn.LSTM (nn.LSTM's median / the row's median: > 1 is faster), and the achieved GFLOP/s
with its fraction of this machine's GEMM peak (torch.mm, measured at the start of the run, same
threads). FLOPs count the GEMMs: 2 * T * B * 4H * (I_l + H_out) per layer and direction
(+ 2 * T * B * H * P with a projection); the pointwise work is not counted. Each row also checks
the backend's output against nn.LSTM's. Peak memory: each backend in its own child process
running the largest cell; VmHWM of the child, and its growth over the child's RSS after imports.

Without BUNDLE, a temporary bundle is exported per hidden size (a seeded random model). Writes
bench.json (every number), bench.md (the tables) and bench.png (throughput vs T) into --out.

examples:
  lstm-deploy bench --quick
  lstm-deploy bench --out docs/                     the default grid, 27 cells (several minutes)
  lstm-deploy bench bundle/ --batch 1,32 --steps 100 --clock cpu
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lstm_deploy_export import bench_report
from lstm_deploy_export.cli import int_list

DEFAULT_GRID = {"batch": [1, 16, 64], "steps": [16, 128, 512], "hidden": [128, 256, 512]}
QUICK_GRID = {"batch": [1, 8], "steps": [8, 32], "hidden": [32]}
REFERENCE = bench_report.REFERENCE
CPU_BACKENDS = [REFERENCE, "scratch eager", "model.pt", "model.onnx", "model.scan.onnx"]
CUDA_BACKENDS = ["torch.nn.LSTM (cuda)", "model.pt (cuda)", "model.onnx (ORT CUDA)"]
CPP_BACKENDS = ["model.pt (C++ LibTorch)"]
MISMATCH_ATOL = 1e-3  # a backend this far from nn.LSTM is timing something else: flagged
SIGNATURE_INPUTS = ("input", "lengths", "h0", "c0")

Inputs = dict[str, np.ndarray]
Prepare = Callable[[Inputs], Callable[[], Any]]


@dataclass(frozen=True)
class Cell:
    batch: int
    steps: int
    hidden: int


@dataclass(frozen=True)
class Backend:
    """A way to run a bundle: `prepare(inputs)` returns a call that runs one forward."""

    name: str
    prepare: Prepare


@dataclass(frozen=True)
class Plan:
    """What to run, from the command line."""

    grid: dict[str, list[int]]
    backends: list[str]
    skipped: list[dict[str, str]]
    warmup: int
    repeat: int
    budget: float
    clock: Callable[[], float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bundle", nargs="?", type=Path,
        help="a bundle directory (default: export a temporary one per hidden size)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small grid for CI (seconds)")
    parser.add_argument("--batch", type=int_list(1), help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int_list(1), help="comma-separated sequence lengths T")
    parser.add_argument("--hidden", type=int_list(1), help="hidden sizes (without BUNDLE)")
    parser.add_argument("--input-size", type=int, default=64, help="without BUNDLE (default 64)")
    parser.add_argument("--num-layers", type=int, default=1, help="without BUNDLE (default 1)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads of every backend (default 1: one model instance per core; with "
        "more, the thread pools of torch and ONNX Runtime spin after their own calls and slow "
        "the next backend down, interleaved in one process)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, help="timed rounds per cell (default 15, quick 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per backend and cell")
    parser.add_argument(
        "--budget", type=float,
        help="seconds of timed rounds per cell, after at least 5 rounds (default 20, quick 2)",
    )  # fmt: skip
    parser.add_argument(
        "--backends",
        help=f"comma-separated subset of {','.join(CPU_BACKENDS + CUDA_BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall (default): latency; cpu: the process's CPU time, steadier on a shared machine "
        "(--threads 1 only; with no other load the two agree)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS children")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    import torch

    plan = make_plan(args)
    torch.set_num_threads(args.threads)
    with _bundles(args, plan.grid) as bundles:
        peak = gemm_peak_gflops(size=512 if args.quick else 1024)
        rows = run_grid(bundles, plan, args.threads, args.seed, peak)
        memory: dict[str, Any] = {}
        if not args.no_memory:
            largest = max(_cells(bundles, plan.grid), key=lambda c: c.batch * c.steps * c.hidden)
            memory = measure_memory(bundles[largest.hidden], plan.backends, largest, args.threads)
        models = {str(h): b.config.to_dict() for h, b in bundles.items()}
    result = {
        "command": command_line(args),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(args.threads),
        "clock": args.clock,
        "gemm_peak_gflops": peak,
        "grid": plan.grid,
        "models": models,
        "rows": rows,
        "summary": bench_report.summary(rows),
        "memory": memory,
        "skipped": plan.skipped,
        "method": bench_report.method(args.clock),
    }
    bench_report.write(result, args.out)
    print(bench_report.terminal(result))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png", file=sys.stderr)
    return 0


def make_plan(args: argparse.Namespace) -> Plan:
    from lstm_deploy_export.cli import UsageError

    grid = {k: list(v) for k, v in (QUICK_GRID if args.quick else DEFAULT_GRID).items()}
    for key in grid:
        if getattr(args, key):
            grid[key] = getattr(args, key)
    known = CPU_BACKENDS + CUDA_BACKENDS
    wanted = args.backends.split(",") if args.backends else known
    if set(wanted) - set(known) or REFERENCE not in wanted:
        raise UsageError(f"--backends must include {REFERENCE} and name only {','.join(known)}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.clock == "cpu" and args.threads > 1:
        # CPU time would count the thread pools' spinning, which is waiting, not work.
        raise UsageError("--clock cpu measures one thread: use it with --threads 1")
    reasons = unavailable()
    return Plan(
        grid=grid,
        backends=[n for n in wanted if n not in reasons],
        skipped=[
            {"backend": n, "reason": r} for n, r in reasons.items() if n in wanted + CPP_BACKENDS
        ],
        warmup=max(args.warmup, 1),
        repeat=args.repeat or (5 if args.quick else 15),
        budget=args.budget or (2.0 if args.quick else 20.0),
        clock=time.perf_counter if args.clock == "wall" else time.process_time,
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (the options that differ from their defaults)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    words = ["lstm-deploy", "bench"] + ([str(args.bundle)] if args.bundle else [])
    for action in defaults._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value == action.default or action.dest == "help":
            continue
        if isinstance(value, bool):
            words.append(action.option_strings[0])
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [action.option_strings[0], text]
    return " ".join(words)


@contextlib.contextmanager
def _bundles(args: argparse.Namespace, grid: dict[str, list[int]]) -> Iterator[dict[int, Any]]:
    """{hidden size: Bundle}: the given bundle, or temporary ones exported per hidden size."""
    import torch

    from lstm_deploy import LSTM
    from lstm_deploy_export.bundle import BundleError, export_bundle, load_bundle
    from lstm_deploy_export.cli import UsageError

    if args.bundle is not None:
        try:
            bundle = load_bundle(args.bundle)
        except BundleError as e:
            raise UsageError(str(e)) from None
        hidden = bundle.config.hidden_size
        if args.hidden and args.hidden != [hidden]:
            raise UsageError(f"--hidden: the bundle's hidden size is {hidden}, not {args.hidden}")
        grid["hidden"] = [hidden]
        yield {hidden: bundle}
        return
    with tempfile.TemporaryDirectory(prefix="lstm-deploy-bench-") as tmp:
        bundles = {}
        for hidden in grid["hidden"]:
            print(f"exporting a temporary bundle, hidden size {hidden}", file=sys.stderr)
            torch.manual_seed(args.seed)
            model = LSTM(args.input_size, hidden, args.num_layers, batch_first=True)
            bundles[hidden] = export_bundle(model, Path(tmp) / f"h{hidden}")
        yield bundles


def _cells(bundles: dict[int, Any], grid: dict[str, list[int]]) -> list[Cell]:
    return [Cell(b, t, h) for h in bundles for b in grid["batch"] for t in grid["steps"]]


def run_grid(
    bundles: dict[int, Any], plan: Plan, threads: int, seed: int, peak: float
) -> list[dict[str, Any]]:
    """Every cell of the grid, a progress bar over them; one row per cell and backend."""
    cells = _cells(bundles, plan.grid)
    rows: list[dict[str, Any]] = []
    with bench_report.progress(len(cells)) as bar:
        for hidden, bundle in bundles.items():
            backends = load_backends(bundle, plan.backends, threads)
            for cell in (c for c in cells if c.hidden == hidden):
                bar.set_postfix_str(f"B={cell.batch} T={cell.steps} H={cell.hidden}")
                inputs = make_inputs(bundle.config, cell, seed)
                samples, errors = time_cell(backends, inputs, plan)
                rows += summarize(cell, samples, errors, lstm_flops(bundle.config, cell), peak)
                bar.update()
    return rows


def load_backends(bundle: Any, names: Sequence[str], threads: int) -> list[Backend]:
    """The backends named, in the order named, that the bundle has."""
    from torch import nn

    from lstm_deploy import LSTM

    config = replace(bundle.config, batch_first=True, dropout=0.0)
    scratch = LSTM.from_config(config).eval()
    scratch.load_state_dict(bundle.load_model().state_dict())
    reference = nn.LSTM(**config.to_dict()).eval()
    reference.load_state_dict(scratch.state_dict())
    makers: dict[str, Callable[[], Prepare]] = {
        REFERENCE: lambda: _nn_lstm(reference, "cpu"),
        "scratch eager": lambda: _scratch(scratch),
        "model.pt": lambda: _torchscript(bundle.file("model.pt"), "cpu"),
        "model.onnx": lambda: _onnxruntime(bundle.file("model.onnx"), threads, cuda=False),
        "model.scan.onnx": lambda: _onnxruntime(bundle.file("model.scan.onnx"), threads, False),
        "torch.nn.LSTM (cuda)": lambda: _nn_lstm(copy.deepcopy(reference), "cuda"),
        "model.pt (cuda)": lambda: _torchscript(bundle.file("model.pt"), "cuda"),
        "model.onnx (ORT CUDA)": lambda: _onnxruntime(bundle.file("model.onnx"), threads, True),
    }
    return [Backend(n, makers[n]()) for n in names if _has(bundle, n)]


def _has(bundle: Any, backend: str) -> bool:
    return not backend.startswith("model.") or bundle.has(backend.split(" ")[0])


def _tensors(inputs: Inputs, device: str) -> list[Any]:
    import torch

    return [torch.from_numpy(inputs[k]).to(device) for k in SIGNATURE_INPUTS]


def _synced(call: Callable[[], Any], device: str) -> Callable[[], Any]:
    """A CUDA call that returns when the device is done (kernels run asynchronously)."""
    import torch

    if device == "cpu":
        return call

    def call_and_sync() -> Any:
        result = call()
        torch.cuda.synchronize()
        return result

    return call_and_sync


def _nn_lstm(reference: Any, device: str) -> Prepare:
    module = reference.to(device)

    def prepare(inputs: Inputs) -> Callable[[], Any]:
        # nn.LSTM's (L*D, B, H) state, made before timing: not part of the forward.
        x, _, h0, c0 = _tensors(inputs, device)
        hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())
        return _synced(lambda: module(x, hx), device)

    return prepare


def _scratch(scratch: Any) -> Prepare:
    def prepare(inputs: Inputs) -> Callable[[], Any]:
        x, lengths, h0, c0 = _tensors(inputs, "cpu")
        hx = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())
        return lambda: scratch(x, hx, lengths)

    return prepare


def _torchscript(path: Path, device: str) -> Prepare:
    import torch

    module = torch.jit.load(str(path), map_location=device)

    def prepare(inputs: Inputs) -> Callable[[], Any]:
        tensors = _tensors(inputs, device)
        return _synced(lambda: module(*tensors), device)

    return prepare


def _onnxruntime(path: Path, threads: int, cuda: bool) -> Prepare:
    from lstm_deploy_export.ort_session import CPU, CUDA, make_session

    session = make_session(path, (CUDA, CPU) if cuda else (CPU,), threads=threads)
    return lambda inputs: lambda: session.run(None, inputs)  # numpy in and out, as a user calls it


def _output(result: Any) -> np.ndarray:
    """The batch-first `output` of any backend's result."""
    out = result[0]
    return out if isinstance(out, np.ndarray) else out.cpu().numpy()


def unavailable() -> dict[str, str]:
    """{backend: why it cannot run here} for the CUDA and C++ rows."""
    from lstm_deploy_export._runtimes import cuda_unavailable, ort_cuda_unavailable

    reasons = {}
    torch_reason = cuda_unavailable()
    if torch_reason is not None:
        reasons.update(dict.fromkeys(CUDA_BACKENDS[:2], torch_reason))
    ort_reason = ort_cuda_unavailable()
    if ort_reason is not None:
        reasons[CUDA_BACKENDS[2]] = ort_reason
    reasons[CPP_BACKENDS[0]] = (
        "the C++ programs of export/cpp have no timing mode (one forward per process, inputs "
        "through .npy files: process start and file I/O would dominate)"
    )
    return reasons


def make_inputs(config: Any, cell: Cell, seed: int) -> Inputs:
    """The deployed signature's inputs: random input and state, full lengths."""
    rng = np.random.default_rng(seed)
    d = 2 if config.bidirectional else 1
    h_out = config.proj_size or config.hidden_size
    states = config.num_layers * d
    b, t = cell.batch, cell.steps

    def randn(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    return {
        "input": randn(b, t, config.input_size),
        "lengths": np.full(b, t, dtype=np.int64),
        "h0": randn(b, states, h_out),
        "c0": randn(b, states, config.hidden_size),
    }


def time_cell(
    backends: list[Backend], inputs: Inputs, plan: Plan
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each backend (interleaved rounds), and each one's max abs error."""
    import torch

    samples: dict[str, list[float]] = {b.name: [] for b in backends}
    with torch.inference_mode():
        calls = {b.name: b.prepare(inputs) for b in backends}
        outputs = {}
        for name, call in calls.items():
            for _ in range(plan.warmup):
                result = call()
            outputs[name] = _output(result)
        errors = {n: float(np.abs(o - outputs[REFERENCE]).max()) for n, o in outputs.items()}
        names = list(calls)
        start = time.perf_counter()
        for r in range(plan.repeat):
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotated: no backend always runs first
                t0 = plan.clock()
                calls[name]()
                samples[name].append(plan.clock() - t0)
            if r + 1 >= min(5, plan.repeat) and time.perf_counter() - start > plan.budget:
                break
    return samples, errors


def lstm_flops(config: Any, cell: Cell) -> int:
    """The GEMM FLOPs of one forward (multiply + add = 2), as in the module docstring."""
    d = 2 if config.bidirectional else 1
    h, h_out = config.hidden_size, config.proj_size or config.hidden_size
    rows = cell.steps * cell.batch
    total = 0
    for layer in range(config.num_layers):
        layer_input = config.input_size if layer == 0 else d * h_out
        per_direction = 2 * rows * 4 * h * (layer_input + h_out)
        if config.proj_size:
            per_direction += 2 * rows * h * h_out
        total += d * per_direction
    return total


def summarize(
    cell: Cell, samples: dict[str, list[float]], errors: dict[str, float], flops: int, peak: float
) -> list[dict[str, Any]]:
    """One row per backend of a cell (see the module docstring for each number)."""
    reference = float(np.median(samples[REFERENCE]))
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


def gemm_peak_gflops(size: int = 1024) -> float:
    """This machine's float32 GEMM rate: the best of 5 torch.mm (n x n) @ (n x n)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

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
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def measure_memory(
    bundle: Any, names: Sequence[str], cell: Cell, threads: int
) -> dict[str, dict[str, Any]]:
    """Peak RSS per backend, each in a fresh child process (see `_memory_child`)."""
    memory: dict[str, dict[str, Any]] = {}
    for name in (n for n in names if _has(bundle, n)):
        spec = json.dumps(
            {"bundle": str(bundle.path), "backend": name, "cell": vars(cell), "threads": threads}
        )
        code = f"from lstm_deploy_export.bench import _memory_child; _memory_child({spec!r})"
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
    import torch

    from lstm_deploy_export.bundle import load_bundle

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    baseline = _status_kb("VmRSS")
    bundle = load_bundle(spec["bundle"])
    (backend,) = load_backends(bundle, [spec["backend"]], spec["threads"])
    inputs = make_inputs(bundle.config, Cell(**spec["cell"]), 0)
    with torch.inference_mode():
        call = backend.prepare(inputs)
        for _ in range(2):
            call()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "increase_mb": (peak - baseline) / 1024}))


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
