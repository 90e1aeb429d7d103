"""Command line of ``loadtest``: its arguments and ``run_loadtest``; ``cli.register`` adds it.

Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lstm_deploy.cli_common import UsageError, int_at_least, int_list

from .config import DEFAULT_MODEL_NAME

LOADTEST_HELP = """\
Drive a server with tritonclient at several concurrency levels and print throughput and
p50/p90/p99 latency as a Markdown table. Each request is one sequence (batch 1) of a random
length in [--min-steps, --max-steps], `input` alone.

Either point it at a running server (URL), or give --bundle: it then starts the server itself
twice on free loopback ports, with dynamic batching and without, and compares them.

--tool perf_analyzer measures with NVIDIA's perf_analyzer instead, over HTTP or gRPC (install
it with scripts/setup_perf_analyzer.sh). --against-triton starts the real Triton (lstm-deploy
triton, from its venv: scripts/setup_triton_venv.sh) and this server on the bundle, both serving
lstm_python, and measures both with perf_analyzer over HTTP and gRPC at concurrency 1,4,16,64,
in interleaved rounds: a table of throughput and p99 latency, ours / Triton. It takes about 10
minutes (--quick: under 1).

examples:
  lstm-deploy loadtest 127.0.0.1:8000 --concurrency 1,8,32
  lstm-deploy loadtest --bundle ./bundle --concurrency 1,8,32 --requests 400
  lstm-deploy loadtest 127.0.0.1:8001 --tool perf_analyzer --protocol grpc
  lstm-deploy loadtest --bundle ./bundle --against-triton --triton-python .venv-triton/bin/python
"""

_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def add_loadtest(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "loadtest",
        help="measure a server's throughput and latency, with and without dynamic batching",
        description=LOADTEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", nargs="?", help="a running server, e.g. 127.0.0.1:8000")
    p.add_argument(
        "--bundle",
        type=Path,
        help="start the server from this bundle instead, with and without batching",
    )
    p.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help="model to call (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency",
        type=int_list(1),
        default=None,
        help="comma-separated numbers of requests in flight (default: 1,8,32; with "
        "--against-triton: 1,4,16,64)",
    )
    p.add_argument(
        "--requests",
        type=_positive_int,
        default=200,
        help="requests per concurrency level (default: %(default)s)",
    )
    p.add_argument(
        "--min-steps",
        type=_positive_int,
        default=16,
        help="shortest sequence, time steps (default: %(default)s)",
    )
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=128,
        help="longest sequence, time steps (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=10,
        help="requests sent before measuring each level (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        help="with --bundle: ONNX Runtime threads of each server it starts; they share the "
        "machine with this client, so 1 avoids oversubscribing it (default: %(default)s)",
    )
    _add_perf_analyzer(p)
    p.set_defaults(func=run_loadtest)


def _add_perf_analyzer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perf_analyzer and Triton")
    g.add_argument(
        "--tool",
        choices=["client", "perf_analyzer"],
        default="client",
        help="the load generator: tritonclient (default) or NVIDIA's perf_analyzer, which "
        "measures in time windows instead of --requests, its first, unstable ones its --warmup",
    )
    g.add_argument(
        "--protocol",
        choices=["http", "grpc"],
        default="http",
        help="perf_analyzer's protocol; a URL given is then that endpoint (default: http)",
    )
    g.add_argument(
        "--perf-analyzer",
        type=Path,
        metavar="PATH",
        help="the perf_analyzer to run (default: $LSTM_DEPLOY_PERF_ANALYZER, else the PATH's)",
    )
    g.add_argument(
        "--measurement-interval",
        type=_positive_int,
        default=None,
        metavar="MS",
        help="perf_analyzer's measurement window (default: 2000; --quick: 500)",
    )
    g.add_argument(
        "--stability-percentage",
        type=_positive_int,
        default=None,
        metavar="PCT",
        help="how far perf_analyzer's last three windows may differ (its own default, 10, is "
        "rarely met on a shared machine; default: 25; --quick: 100)",
    )
    g.add_argument(
        "--against-triton",
        action="store_true",
        help="with --bundle: this server against the real Triton, both serving lstm_python "
        "with ONNX Runtime's default threads (not --threads)",
    )
    g.add_argument(
        "--triton-python",
        type=Path,
        metavar="PATH",
        help="the Python of Triton's venv, e.g. .venv-triton/bin/python (default: "
        "$LSTM_DEPLOY_TRITON_PYTHON)",
    )
    g.add_argument(
        "--protocols",
        type=lambda v: tuple(v.split(",")),
        default=("http", "grpc"),
        help="with --against-triton: comma-separated (default: http,grpc)",
    )
    g.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help="with --against-triton: interleaved rounds (default: 3; --quick: 1)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="with --against-triton: a smoke run (1 round, concurrency 1,4, short windows) whose "
        "figures show that it runs, not how fast",
    )


def run_loadtest(args: argparse.Namespace) -> int:
    if (args.url is None) == (args.bundle is None):
        raise UsageError("give either a server URL or --bundle, not both and not neither")
    if args.min_steps > args.max_steps:
        raise UsageError(f"--min-steps {args.min_steps} is above --max-steps {args.max_steps}")
    if args.against_triton and args.bundle is None:
        raise UsageError("--against-triton needs --bundle: it starts both servers on it")
    if not set(args.protocols) <= {"http", "grpc"}:
        raise UsageError(f"--protocols takes http and grpc, got {','.join(args.protocols)}")
    from .loadtest import LoadSpec, LoadtestError, run
    from .vs_triton import FULL, QUICK, Comparison, compare

    pace = QUICK if args.quick else FULL
    default_concurrency = list(pace.concurrency) if args.against_triton else [1, 8, 32]
    spec = LoadSpec(
        model_name=args.model_name,
        concurrency=args.concurrency or default_concurrency,
        requests=args.requests,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        warmup=args.warmup,
        seed=args.seed,
        tool="perf_analyzer" if args.against_triton else args.tool,
        protocol=args.protocol,
        perf_analyzer=args.perf_analyzer,
        measurement_ms=args.measurement_interval or pace.measurement_ms,
        stability_percent=args.stability_percentage or pace.stability_percent,
    )
    try:
        if args.against_triton:
            rounds = args.rounds or pace.rounds
            job = Comparison(args.bundle, spec, args.protocols, rounds, args.triton_python)
            table = compare(job, say=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            table = run(spec, url=args.url, bundle=args.bundle, threads=args.threads)
    except LoadtestError as e:
        raise UsageError(str(e)) from None
    print(table)
    return 0
