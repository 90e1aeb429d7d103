"""Time every backend of a bundle against torch.nn.LSTM with the same weights, in one process.

Backends (the runtime registry's, which validate checks too): torch.nn.LSTM (the reference), the
scratch module in eager mode, every artifact of the bundle on each runtime that runs it here
(TorchScript, ONNX Runtime's CPU execution provider, OpenVINO, ...), and with --cpp the C++
programs of export/cpp (LibTorch, the ONNX Runtime C++ API); rows that cannot run here are listed
as skipped, with the reason; the CUDA rows with --device cuda, below.

Every backend runs the deployed signature with full lengths (nn.LSTM unpacked: full lengths need no
packing) on the same inputs, with --threads intra-op threads. Per grid cell, after warm-up, the
backends run interleaved (the order rotates every round) until --repeat rounds or the cell's time
budget; each row reports the median, the spread (interquartile range), sequences/s, the throughput
ratio to nn.LSTM (nn.LSTM's median / the row's median: > 1 is faster), and the achieved GFLOP/s
with its fraction of this machine's peak. FLOPs count the GEMMs: 2 * T * B * 4H * (I_l + H_out)
per layer and direction (+ 2 * T * B * H * P with a projection); the pointwise work is not
counted. Each row also checks the backend's output against nn.LSTM's. Peak memory: each backend in
its own child process running the largest cell; VmHWM of the child, and its growth over the
child's RSS after imports.

The peak is the best of several ceilings measured at the start of the run with the same threads:
torch.mm (MKL), oneDNN's linear, nn.LSTM (oneDNN) at a large cell, ONNX Runtime's MatMul; each is
reported. One library's GEMM is not the machine's: MKL's sgemm runs a slow path on AMD CPUs.

The C++ rows (--cpp) are not interleaved: after a cell's rounds, each C++ program runs once in its
own process with its timing mode (--repeat N --warmup K: the inputs loaded once, as many timed runs
as the rounds had, timed inside the process), and its median is compared with nn.LSTM's from the
rounds just before. Alone in its process a model runs back to back with its weights in cache, which
the interleaved rows share: on small cells that alone favours the C++ rows.

Noise: bench records the load average at the start and end and the CPU time of other processes
during the run (all CPUs' busy time minus bench's own, its children included) and the steal time.
If others or steal used more than 10% of a core on average, it warns on stderr and marks the
report noisy, naming the busiest processes: publish only numbers from a quiet run.

With --device cuda the reference is torch.nn.LSTM on CUDA (cuDNN), the default backends are the
CUDA rows (model.pt on CUDA, the ONNX graphs on ONNX Runtime's CUDA execution provider with their
inputs and outputs bound on the device, as torch's stay there), TF32 off, the peak is the GPU's
(torch.mm on cuBLAS, TF32 off), and no peak RSS is measured (host memory says nothing about the
GPU's).

Without BUNDLE, a temporary bundle is exported per hidden size (a seeded random model). Writes
bench.json (every number), bench.md (the tables), bench.png (throughput against T) and
bench-ratio.png (the ratio to nn.LSTM against T) into --out.

examples:
  lstm-deploy bench --quick
  lstm-deploy bench --cpp --out docs/               the default grid, 27 cells (several minutes)
  lstm-deploy bench bundle/ --batch 1,32 --steps 100 --clock cpu
  lstm-deploy bench --device cuda --batch 1,64,256 --steps 128,1024 --hidden 256,1024
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lstm_deploy.bundle import Bundle, BundleError, load_bundle
from lstm_deploy.cli_common import EXIT_OK, UsageError, int_at_least, int_list, number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bundle", nargs="?", type=Path,
        help="a bundle directory (default: export a temporary one per hidden size)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small grid for CI (seconds)")
    parser.add_argument("--batch", type=int_list(1), help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int_list(1), help="comma-separated sequence lengths T")
    parser.add_argument("--hidden", type=int_list(1), help="hidden sizes (without BUNDLE)")
    parser.add_argument(
        "--input-size", type=int_at_least(1), default=64, help="without BUNDLE (default 64)"
    )
    parser.add_argument(
        "--num-layers", type=int_at_least(1), default=1, help="without BUNDLE (default 1)"
    )
    parser.add_argument(
        "--threads", type=int_at_least(1), default=1,
        help="intra-op threads of every backend (default 1: one model instance per core; with "
        "more, the thread pools of torch and ONNX Runtime spin after their own calls and slow "
        "the next backend down, interleaved in one process)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int_at_least(1), help="timed rounds per cell (default 15, quick 5)"
    )
    parser.add_argument(
        "--warmup", type=int_at_least(1), default=3, help="untimed calls per backend and cell"
    )
    parser.add_argument(
        "--budget", type=number(positive=True),
        help="seconds of timed rounds per cell, after at least 5 rounds (default 20, quick 2)",
    )  # fmt: skip
    parser.add_argument(
        "--backends",
        help="comma-separated backend names, torch.nn.LSTM among them (default: all; the names "
        "are bench.md's columns, e.g. model.onnx,model.pt (cuda))",
    )
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall (default): latency; cpu: the process's CPU time, steadier on a shared machine "
        "(--threads 1 only; with no other load the two agree)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu (default): nn.LSTM on the CPU is the reference; cuda: nn.LSTM on CUDA (cuDNN) "
        "is, and the default backends are the CUDA rows",
    )  # fmt: skip
    parser.add_argument(
        "--cpp", action="store_true",
        help="build the C++ programs (export/cpp; a minute the first time) and time their rows",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS children")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from lstm_deploy_export.bench import report
    from lstm_deploy_export.bench.run import DEFAULT_GRID, QUICK_GRID, Plan
    from lstm_deploy_export.bench.run import run as run_bench

    if args.clock == "cpu" and args.threads > 1:
        # CPU time would count the thread pools' spinning, which is waiting, not work.
        raise UsageError("--clock cpu measures one thread: use it with --threads 1")
    grid = {k: list(v) for k, v in (QUICK_GRID if args.quick else DEFAULT_GRID).items()}
    grid.update({k: getattr(args, k) for k in grid if getattr(args, k)})
    try:
        plan = Plan.make(
            args.backends.split(",") if args.backends else None,
            grid=grid,
            warmup=args.warmup,
            repeat=args.repeat or (5 if args.quick else 15),
            budget=args.budget or (2.0 if args.quick else 20.0),
            threads=args.threads,
            clock=args.clock,
            peak_size=8192 if args.device == "cuda" else 512 if args.quick else 1024,
            device=args.device,
            cpp=args.cpp,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    with _bundles(args, grid) as bundles:
        measured = run_bench(plan, bundles, args.seed, memory=not args.no_memory)
    result = {"command": command_line(args), **measured}
    report.write(result, args.out)
    print(report.terminal(result))
    print(f"wrote {args.out}/bench.json, bench.md, " + ", ".join(report.FIGURES), file=sys.stderr)
    if result["noisy"]:
        print(f"lstm-deploy bench: warning: {result['noise']['verdict']}", file=sys.stderr)
    return EXIT_OK


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
def _bundles(args: argparse.Namespace, grid: dict[str, list[int]]) -> Iterator[dict[int, Bundle]]:
    """{hidden size: Bundle}: the given bundle, or temporary ones exported per hidden size."""
    import torch

    from lstm_deploy.model import LSTM
    from lstm_deploy_export.export.writer import export_bundle

    if args.bundle is not None:
        try:
            bundle = load_bundle(args.bundle)
        except BundleError as e:
            raise UsageError(str(e)) from None
        if bundle.whole:
            raise UsageError(
                f"{bundle.path} is a whole-model bundle; bench times an LSTM against "
                "torch.nn.LSTM over its grid, on LSTM bundles (lstm-deploy export --weights, "
                "--checkpoint or --demo)"
            )
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
