"""How fast could our server be on this machine if batching and the model cost nothing?

Serves a bundle twice, one after the other, on free loopback ports: as it is, and with the model
step (``InferenceService._infer``: batching and ONNX Runtime) replaced by the first answer it
gave, repeated. HTTP, gRPC, the wire codecs, header validation and the statistics stay real.
perf_analyzer (through ``lstm-deploy loadtest --tool perf_analyzer``) measures both over HTTP
and gRPC; the first table gives each one's throughput and the ratio real / canned. The canned
server's figure is the most the front ends allow here: when it is below another server's
throughput, no work on batching or the model closes that gap.

The second table says where the server's time goes at each level: its CPU time per request (all
its threads: /proc, and the server's own count of requests), the share of a core each of its
threads used (the event loop; the batcher's worker, which calls ONNX Runtime; ONNX Runtime's
pool and any other thread; gRPC's threads) and how much of the machine stayed idle. A thread
near 100% is the bound; a server with no such thread on a machine with idle cores is bound by
the hand-offs between its threads and the client instead. On N cores no number of processes
serves more than N / (CPU per request), the client aside.

    python scripts/front_end_ceiling.py ./loadtest-bundle --concurrency 16,64

Run it on a quiet machine: the client and the server share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".venv-perf-analyzer" / "perf_analyzer"
MODEL = "lstm_python"
PR_SET_NAME = 15  # prctl(2)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
# The server's threads, by the name /proc gives them: (column, its threads' name prefixes).
THREADS = (
    ("batcher", ("lstm-batcher",)),
    ("gRPC", ("event_engine", "grpc")),
    ("codecs", ("lstm-codec",)),
)
LOOP, OTHER = "event loop", "ORT pool, other"


def serve(bundle: Path, port: int, canned: bool) -> int:
    """``lstm-deploy serve`` in this process, as users run it: ``--serve`` mode of this script.

    Each Python thread gives the operating system its name (as Python 3.14 does by itself), so
    that /proc tells the batcher's and the codec pool's threads from ONNX Runtime's."""
    import ctypes
    import threading

    from lstm_deploy_serving import cli, service

    prctl = ctypes.CDLL(None).prctl
    run_thread = threading.Thread.run

    def named_run(self: threading.Thread) -> None:
        prctl(PR_SET_NAME, self.name.encode()[:15], 0, 0, 0)
        run_thread(self)

    threading.Thread.run = named_run  # type: ignore[method-assign]

    if canned:
        real = service.InferenceService._infer
        first: dict[str, object] = {}

        async def _infer(self, request, model=None):
            if "answer" not in first:
                first["answer"] = await real(self, request, model)
            else:  # an execution of one row, taking no time (perf_analyzer reads the counts)
                self.stats.record_execution(1, [0], 0, 0, 0)
            return first["answer"]

        service.InferenceService._infer = _infer  # type: ignore[method-assign]
    args = ["serve", str(bundle), "--port", str(port), "--model-name", MODEL]
    return cli.main([*args, "--log-level", "warning"])


def wait_ready(port: int, server: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("front_end_ceiling: the server did not start")


def measure(url: str, protocol: str, level: int, args: argparse.Namespace) -> float:
    """Throughput at one concurrency level: ``lstm-deploy loadtest --tool perf_analyzer``'s."""
    from lstm_deploy_serving.loadtest import LoadSpec, LoadtestError
    from lstm_deploy_serving.loadtest import measure as run_levels

    spec = LoadSpec(
        model_name=MODEL,
        concurrency=[level],
        tool="perf_analyzer",
        protocol=protocol,
        perf_analyzer=args.perf_analyzer,
        measurement_ms=500 if args.quick else 2000,
        stability_percent=100 if args.quick else 25,
    )
    try:
        (result,) = run_levels(url, spec, protocol)
    except LoadtestError as e:
        sys.exit(f"front_end_ceiling: {e}")
    return result.throughput


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid``'s threads, summed by ``THREADS`` column;
    its main thread is the event loop (Linux /proc)."""
    seconds = dict.fromkeys([LOOP, *(column for column, _ in THREADS), OTHER], 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that has just ended
            continue
        column = next((c for c, prefixes in THREADS if name.startswith(prefixes)), OTHER)
        if task.name == str(pid):
            column = LOOP
        seconds[column] += (int(fields[11]) + int(fields[12])) / CLOCK_TICK
    return seconds


def machine_idle() -> tuple[int, int]:
    """The machine's idle and total CPU time so far, in ticks (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])  # idle + iowait; user .. steal


def requests_served(port: int) -> int:
    """The server's count of successful inference requests (its statistics extension)."""
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/stats"
    with urllib.request.urlopen(url, timeout=10) as r:
        (entry,) = json.loads(r.read())["model_stats"]
    return int(entry["inference_stats"]["success"]["count"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("bundle", type=Path, help="an LSTM bundle (lstm-deploy export --demo)")
    parser.add_argument("--concurrency", default="16,64", help="levels (default: 16,64)")
    parser.add_argument("--perf-analyzer", type=Path, default=PERF_ANALYZER)
    parser.add_argument(
        "--quick", action="store_true", help="500 ms windows, any that complete: to see it run"
    )
    parser.add_argument("--serve", choices=("real", "canned"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.bundle, args.port, args.serve == "canned")
    if not args.perf_analyzer.exists():
        sys.exit(f"front_end_ceiling: no {args.perf_analyzer}: bash scripts/setup_perf_analyzer.sh")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",")]
    rates: dict[tuple[str, str, int], float] = {}
    where: dict[tuple[str, str, int], list[str]] = {}  # the second table's cells
    for mode in ("real", "canned"):
        port = free_port()
        command = [sys.executable, __file__, str(args.bundle), "--serve", mode, "--port", str(port)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            wait_ready(port, server)
            for protocol, at in (("http", port), ("grpc", port + 1)):
                for level in levels:
                    print(f"{mode} {protocol} {level} ...", file=sys.stderr, flush=True)
                    before, served = thread_seconds(server.pid), requests_served(port)
                    idle, total = machine_idle()
                    start = time.monotonic()
                    rates[mode, protocol, level] = measure(f"127.0.0.1:{at}", protocol, level, args)
                    wall = time.monotonic() - start
                    after, served = thread_seconds(server.pid), requests_served(port) - served
                    idle, total = (now - then for now, then in zip(machine_idle(), (idle, total)))
                    used = {k: after[k] - before[k] for k in before}
                    where[mode, protocol, level] = [
                        f"{1e6 * sum(used.values()) / served:.0f}",
                        *(f"{100 * t / wall:.0f}%" for t in used.values()),
                        f"{100 * idle / total:.0f}%",
                    ]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        time.sleep(1)
    print("| protocol | concurrency | real infer/s | canned infer/s | real / canned |")
    print("|---|---|---|---|---|")
    for protocol in ("http", "grpc"):
        for level in levels:
            real, canned = rates["real", protocol, level], rates["canned", protocol, level]
            print(f"| {protocol} | {level} | {real:.1f} | {canned:.1f} | {real / canned:.2f} |")
    columns = [LOOP, *(column for column, _ in THREADS), OTHER]
    print(
        f"\n| server | protocol | concurrency | CPU µs / request | {' | '.join(columns)} | "
        f"machine idle ({os.cpu_count()} cores) |"
    )
    print("|---|---|---|---|" + "---|" * (len(columns) + 1))
    for (mode, protocol, level), cells in where.items():
        print(f"| {mode} | {protocol} | {level} | {' | '.join(cells)} |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
