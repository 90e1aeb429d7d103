"""Our server against the real Triton, on the same bundle, with perf_analyzer as the client.

``lstm-deploy loadtest --bundle B --against-triton`` starts both on free loopback ports: Triton
(``lstm-deploy triton``, in its own venv) serving the bundle's ``lstm_python`` (the python
backend running ``model.onnx`` on ONNX Runtime, batched by the same ``batching.py``), and this
server under the same name, with the same config (max batch 64, 500 µs queue delay) and ONNX
Runtime's default threads on both. perf_analyzer then measures both over HTTP and gRPC at each
concurrency level, with the same requests (``input`` alone, batch 1, random lengths), in
interleaved rounds: within a round each level is measured on one server right after the other,
and the order of the two servers alternates between rounds, so that a machine whose load drifts
weighs on both alike. The table gives the median over rounds of each server's throughput and
p99 latency, and the median of the per-round ratios (ours / Triton), with the machine's load
average before and after, and the versions.

Triton is started as a command, not imported: this package never imports lstm_deploy_export.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from lstm_deploy import versions
from lstm_deploy.bundle import MANIFEST

from . import perf_analyzer
from .launch import ServerProcess
from .loadtest import PERF_ANALYZER_REQUESTS, LoadSpec, LoadtestError

MODEL = "lstm_python"


@dataclass(frozen=True)
class Pace:
    """How long and how carefully to measure: rounds, levels, perf_analyzer's windows."""

    rounds: int
    concurrency: tuple[int, ...]
    measurement_ms: int
    stability_percent: int


FULL = Pace(3, (1, 4, 16, 64), 2000, 25)
# A smoke run of a minute or so: one round, two levels, short windows, any measurement that
# completes. Its figures show that everything runs, not how fast.
QUICK = Pace(1, (1, 4), 500, 100)
SERVERS = ("ours", "Triton")
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Comparison:
    bundle: Path
    spec: LoadSpec  # steps, seed, concurrency, perf_analyzer and its windows
    protocols: tuple[str, ...] = perf_analyzer.PROTOCOLS
    rounds: int = 3
    triton_python: Path | None = None  # None: `lstm-deploy triton`'s own default


@contextmanager
def triton(bundle: Path, python: Path | None) -> Iterator[dict[str, str]]:
    """``lstm-deploy triton BUNDLE --port 0`` serving lstm_python; its endpoints once ready
    (``HTTP``, ``gRPC``, ``metrics``, as host:port); SIGTERM on exit."""
    command = [sys.executable, "-m", "lstm_deploy_export.cli", "triton", str(bundle)]
    command += ["--port", "0", "--model", MODEL]
    if python is not None:
        command += ["--python", str(python)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip().startswith("metrics "):  # the banner's last endpoint
                ready.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        if not ready.wait(START_TIMEOUT_S) or proc.poll() is not None:
            raise LoadtestError(
                "Triton did not start (it needs its venv: scripts/setup_triton_venv.sh, then "
                "--triton-python .venv-triton/bin/python):\n" + "\n".join(lines[-15:])
            )
        endpoints = {}
        for line in lines:  # "  HTTP    http://127.0.0.1:PORT", "  gRPC    127.0.0.1:PORT", ...
            if line.startswith("  ") and line.strip():
                name, value = line.split(None, 1)
                endpoints[name] = value.strip().removeprefix("http://").removesuffix("/metrics")
        yield endpoints
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        thread.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _measure(
    exe: Path, url: str, protocol: str, concurrency: int, data: Path, spec: LoadSpec
) -> perf_analyzer.Measurement:
    """One level on one server. A level whose windows never agree is measured again, accepting
    any spread, and marked: one noisy minute does not throw away the rounds before it."""

    def run(stability_percent: int) -> perf_analyzer.Measurement:
        return perf_analyzer.measure(
            exe,
            url,
            MODEL,
            concurrency,
            data,
            protocol=protocol,
            measurement_ms=spec.measurement_ms,
            stability_percent=stability_percent,
        )

    try:
        return run(spec.stability_percent)
    except perf_analyzer.Unstable:
        return replace(run(100), unstable=True)


def _triton_version(http_url: str) -> str:
    with urllib.request.urlopen(f"http://{http_url}/v2", timeout=10) as r:
        return str(json.loads(r.read()).get("version", "?"))


def _input_size(bundle: Path) -> int:
    manifest = json.loads((bundle / MANIFEST).read_text())
    if "model" in manifest:
        raise LoadtestError(
            f"--against-triton compares LSTM bundles; {bundle} is a whole-model bundle "
            "(export_model): compare it with perf_analyzer and your own --input-data"
        )
    signature = manifest["signature"]
    return int(next(t for t in signature["inputs"] if t["name"] == "input")["shape"][2])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(job: Comparison, say: Callable[[str], None] = print) -> str:
    """Run the comparison; the Markdown report (``say`` gets a line per measurement)."""
    if not (job.bundle / MANIFEST).is_file():
        raise LoadtestError(f"bundle not found: {job.bundle} has no {MANIFEST}")
    spec = job.spec
    try:
        exe = perf_analyzer.find(spec.perf_analyzer)
        pa_version = perf_analyzer.version(exe)
    except perf_analyzer.PerfAnalyzerError as e:
        raise LoadtestError(str(e)) from None
    # (protocol, concurrency) -> server -> a Measurement per round
    found: dict[tuple[str, int], dict[str, list[perf_analyzer.Measurement]]] = {}
    load_before = _load()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="lstm-deploy-vs-") as tmp:
        data = perf_analyzer.write_input_data(
            Path(tmp) / "input.json",
            _input_size(job.bundle),
            spec.min_steps,
            spec.max_steps,
            PERF_ANALYZER_REQUESTS,
            spec.seed,
        )
        endpoints = stack.enter_context(triton(job.bundle, job.triton_python))
        ours = stack.enter_context(
            ServerProcess(job.bundle, ["--model-name", MODEL, "--threads", "0"], START_TIMEOUT_S)
        )
        urls = {
            ("ours", "http"): ours.url,
            ("ours", "grpc"): ours.grpc_url,
            ("Triton", "http"): endpoints["HTTP"],
            ("Triton", "grpc"): endpoints["gRPC"],
        }
        missing = [f"{s} {p}" for (s, p), u in urls.items() if p in job.protocols and not u]
        if missing:
            raise LoadtestError(f"no endpoint for {', '.join(missing)}")
        for round_ in range(job.rounds):
            order = SERVERS if round_ % 2 == 0 else SERVERS[::-1]
            for protocol in job.protocols:
                for concurrency in spec.concurrency:
                    for server in order:
                        try:
                            url = urls[server, protocol]
                            m = _measure(exe, url, protocol, concurrency, data, spec)
                        except perf_analyzer.PerfAnalyzerError as e:
                            raise LoadtestError(f"{server}: {e}") from None
                        found.setdefault((protocol, concurrency), {}).setdefault(server, []).append(
                            m
                        )
                        say(
                            f"round {round_ + 1}/{job.rounds} {protocol} c={concurrency} "
                            f"{server}: {m.throughput:.1f} infer/s, p99 {m.p99_ms:.2f} ms"
                            + (" (unstable)" if m.unstable else "")
                        )
        triton_version = _triton_version(endpoints["HTTP"])
    header = (
        f"lstm-deploy {versions.package_version()} vs Triton {triton_version} ({MODEL}, python "
        f"backend), {pa_version.lower()}; {job.rounds} interleaved round(s), "
        f"{spec.measurement_ms} ms windows, stability {spec.stability_percent}%, batch-1 "
        f"requests of {spec.min_steps}-{spec.max_steps} steps; load average {load_before} "
        f"before, {_load()} after ({os.cpu_count()} CPUs)"
    )
    return header + "\n\n" + format_table(found)


def _ratios(ours: list[float], theirs: list[float]) -> str:
    """Median of the per-round ratios, and their range when there are several rounds."""
    ratios = [a / b if b else float("nan") for a, b in zip(ours, theirs, strict=True)]
    text = f"{statistics.median(ratios):.2f}"
    return text + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def format_table(found: dict[tuple[str, int], dict[str, list[perf_analyzer.Measurement]]]) -> str:
    columns = [
        "protocol",
        "concurrency",
        "ours infer/s",
        "Triton infer/s",
        "throughput ours/Triton",
        "ours p99 ms",
        "Triton p99 ms",
        "p99 ours/Triton",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    unstable = False
    for (protocol, concurrency), by_server in found.items():
        ours, theirs = by_server["ours"], by_server["Triton"]
        rate = [[m.throughput for m in ms] for ms in (ours, theirs)]
        p99 = [[m.p99_ms for m in ms] for ms in (ours, theirs)]
        mark = "†" if any(m.unstable for m in ours + theirs) else ""
        unstable = unstable or bool(mark)
        lines.append(
            f"| {protocol} | {concurrency}{mark} | {statistics.median(rate[0]):.1f} "
            f"| {statistics.median(rate[1]):.1f} | {_ratios(*rate)} "
            f"| {statistics.median(p99[0]):.2f} | {statistics.median(p99[1]):.2f} "
            f"| {_ratios(*p99)} |"
        )
    if unstable:
        lines.append(
            "\n† a measurement of this level never met the stability percentage and was taken "
            "again accepting any spread: a busy machine; read it with care."
        )
    return "\n".join(lines)


__all__ = ["FULL", "QUICK", "Comparison", "Pace", "compare"]
