"""How fast could our server be on this machine if batching and the model cost nothing?

Serves a bundle twice, one after the other, on free loopback ports: as it is, and with the model
step (``InferenceService._infer``: batching and ONNX Runtime) replaced by the first answer it
gave, repeated. HTTP, gRPC, the wire codecs, header validation and the statistics stay real.
perf_analyzer (through ``lstm-deploy loadtest --tool perf_analyzer``) measures both over HTTP
and gRPC; the table gives each one's throughput and the ratio real / canned. The canned server's
figure is the most the front ends allow here: when it is below another server's throughput,
no work on batching or the model closes that gap. It also prints the server's CPU time per
request (all its threads, over every level: /proc and the server's own count of requests). On
N cores no number of processes serves more than N / (CPU per request), the client aside.

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


def serve(bundle: Path, port: int, canned: bool) -> int:
    """``lstm-deploy serve`` in this process, as users run it: ``--serve`` mode of this script."""
    from lstm_deploy_serving import cli, service

    if canned:
        real = service.InferenceService._infer
        first: dict[str, object] = {}

        async def _infer(self, request, model=None):  # type: ignore[no-untyped-def]
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


def measure(url: str, protocol: str, args: argparse.Namespace) -> list[float]:
    """Throughput at each concurrency level: ``lstm-deploy loadtest --tool perf_analyzer``'s."""
    from lstm_deploy_serving.loadtest import LoadSpec, LoadtestError
    from lstm_deploy_serving.loadtest import measure as run_levels

    spec = LoadSpec(
        model_name=MODEL,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        tool="perf_analyzer",
        protocol=protocol,
        perf_analyzer=args.perf_analyzer,
        measurement_ms=500 if args.quick else 2000,
        stability_percent=100 if args.quick else 25,
    )
    try:
        return [level.throughput for level in run_levels(url, spec, protocol)]
    except LoadtestError as e:
        sys.exit(f"front_end_ceiling: {e}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    results: dict[tuple[str, str], list[float]] = {}
    cpu_us: dict[tuple[str, str], float] = {}  # the server's CPU per request, over all levels
    for mode in ("real", "canned"):
        port = free_port()
        command = [sys.executable, __file__, str(args.bundle), "--serve", mode, "--port", str(port)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            wait_ready(port, server)
            for protocol, at in (("http", port), ("grpc", port + 1)):
                print(f"{mode} {protocol} ...", file=sys.stderr, flush=True)
                cpu, served = cpu_seconds(server.pid), requests_served(port)
                url = f"127.0.0.1:{at}"
                results[mode, protocol] = measure(url, protocol, args)
                cpu, served = cpu_seconds(server.pid) - cpu, requests_served(port) - served
                cpu_us[mode, protocol] = 1e6 * cpu / served
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        time.sleep(1)
    levels = args.concurrency.split(",")
    print("| protocol | concurrency | real infer/s | canned infer/s | real / canned |")
    print("|---|---|---|---|---|")
    for protocol in ("http", "grpc"):
        for level, real, canned in zip(
            levels, results["real", protocol], results["canned", protocol], strict=True
        ):
            print(f"| {protocol} | {level} | {real:.1f} | {canned:.1f} | {real / canned:.2f} |")
    cores = os.cpu_count() or 1
    print(
        "\n| protocol | server CPU µs per request, real | canned | at most, canned, on "
        f"{cores} cores |"
    )
    print("|---|---|---|---|")
    for protocol in ("http", "grpc"):
        real, canned = cpu_us["real", protocol], cpu_us["canned", protocol]
        print(f"| {protocol} | {real:.0f} | {canned:.0f} | {cores * 1e6 / canned:.0f} infer/s |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
