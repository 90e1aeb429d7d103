"""perf_analyzer, NVIDIA's benchmarking client for Triton, as the load generator of ``loadtest``.

perf_analyzer reads the model's metadata and config from the server (which inputs there are,
their shapes, which are optional), sends requests at a fixed concurrency until three measurement
windows agree within ``--stability-percentage``, and reports throughput and latency percentiles.
It is the tool a Triton user points at a server first, and it runs unchanged against Triton.

The binary here is the one the tritonclient 2.41.0 wheel ships (newer perf-analyzer wheels need
glibc 2.38): ``scripts/setup_perf_analyzer.sh`` installs it with its two libraries and prints a
wrapper that sets ``LD_LIBRARY_PATH``. ``find`` locates it: ``--perf-analyzer``, then
``$LSTM_DEPLOY_PERF_ANALYZER``, then ``perf_analyzer`` on ``PATH``.

Requests carry ``input`` only (batch 1, a random length per request, from a JSON data file this
module writes): ``lengths``, ``h0`` and ``c0`` are optional in the model's config, so
perf_analyzer leaves them out and the server fills in their defaults. Throughput and p50/p90/p99
come from perf_analyzer's CSV (``-f``); the request count and the server's own inference and
execution counts over the measured windows (Triton's statistics extension) from its report.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV = "LSTM_DEPLOY_PERF_ANALYZER"
SETUP_HINT = (
    "install it with scripts/setup_perf_analyzer.sh, which prints its path, and pass that path "
    f"with --perf-analyzer or ${ENV}"
)
PROTOCOLS = ("http", "grpc")
# Beyond its windows: starting, reading the metadata, and slack on a loaded machine.
_OVERHEAD_S = 30.0


class PerfAnalyzerError(Exception):
    """perf_analyzer is not here or did not complete; the message says why and what to do."""


class Unstable(PerfAnalyzerError):
    """perf_analyzer's windows never agreed within the stability percentage (a busy machine)."""


@dataclass(frozen=True)
class Measurement:
    """One concurrency level, as perf_analyzer measured it over its last (stable) windows."""

    concurrency: int
    throughput: float  # inferences per second (batch 1: requests per second)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    # The server's count of inferences and of model executions over the same windows (its
    # statistics extension); their ratio is how many requests it ran together. 0: not reported.
    inferences: int = 0
    executions: int = 0
    # Measured again with any spread accepted, after the windows never agreed (see Unstable).
    unstable: bool = False

    @property
    def rows_per_exec(self) -> float:
        return self.inferences / self.executions if self.executions else float("nan")


def find(path: str | Path | None = None) -> Path:
    """The perf_analyzer to run: ``path``, else ``$LSTM_DEPLOY_PERF_ANALYZER``, else ``PATH``."""
    chosen = path or os.environ.get(ENV) or shutil.which("perf_analyzer")
    if not chosen:
        raise PerfAnalyzerError(f"perf_analyzer not found: {SETUP_HINT}")
    exe = Path(chosen)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise PerfAnalyzerError(f"no executable perf_analyzer at {exe}: {SETUP_HINT}")
    return exe


def version(exe: Path) -> str:
    """``perf_analyzer --version``'s line; PerfAnalyzerError if it cannot even start."""
    try:
        done = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PerfAnalyzerError(f"cannot run {exe}: {e}; {SETUP_HINT}") from None
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "Version" not in out:
        # The bare binary without its libraries says e.g. "libb64.so.0d: cannot open ...".
        raise PerfAnalyzerError(f"{exe} does not run ({out.splitlines()[-1:]}); {SETUP_HINT}")
    return out.splitlines()[0]


def write_input_data(
    path: Path, input_size: int, min_steps: int, max_steps: int, count: int, seed: int
) -> Path:
    """perf_analyzer's ``--input-data`` file: ``count`` requests of ``input`` alone, each one
    sequence (batch 1) of a random length in [min_steps, max_steps], sent in turn."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(min_steps, max_steps + 1, size=count)
    data = [
        {
            "input": {
                "content": rng.standard_normal(int(t) * input_size, dtype=np.float32).tolist(),
                "shape": [int(t), input_size],  # past the batch axis, which -b 1 gives
            }
        }
        for t in steps
    ]
    path.write_text(json.dumps({"data": data}))
    return path


def _count(text: str, label: str) -> int:
    match = re.search(rf"^\s*{label}: (\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _section(stdout: str, concurrency: int) -> str:
    """The report of one level: from its "Request concurrency: N" line to the next blank line."""
    start = stdout.find(f"Request concurrency: {concurrency}\n")
    if start < 0:
        return ""
    end = stdout.find("\n\n", start)
    return stdout[start : end if end >= 0 else len(stdout)]


def parse(csv_text: str, stdout: str) -> list[Measurement]:
    """The levels of a completed run: its CSV (``-f``) and its report (stdout)."""
    results = []
    for row in csv.DictReader(csv_text.splitlines()):
        concurrency = int(row["Concurrency"])
        section = _section(stdout, concurrency)
        results.append(
            Measurement(
                concurrency,
                float(row["Inferences/Second"]),
                float(row["p50 latency"]) / 1e3,  # microseconds
                float(row["p90 latency"]) / 1e3,
                float(row["p99 latency"]) / 1e3,
                _count(section, "Request count"),
                _count(section, "Inference count"),
                _count(section, "Execution count"),
            )
        )
    return results


def measure(
    exe: Path,
    url: str,
    model: str,
    concurrency: int,
    input_data: Path,
    *,
    protocol: str = "http",
    measurement_ms: int = 2000,
    stability_percent: int = 25,
    max_trials: int = 10,
) -> Measurement:
    """One concurrency level against the server at ``url`` (``host:port`` of its ``protocol``).

    perf_analyzer measures ``measurement_ms`` windows until three agree within
    ``stability_percent`` (its own default, 10, is rarely met on a shared machine), at most
    ``max_trials`` of them; PerfAnalyzerError with its message when it does not complete (a
    failed request, no stable measurement, no server).
    """
    if protocol not in PROTOCOLS:
        raise PerfAnalyzerError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    with tempfile.TemporaryDirectory(prefix="lstm-deploy-pa-") as tmp:
        report = Path(tmp) / "perf.csv"
        command = [
            str(exe),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "-b",
            "1",
            "--input-data",
            str(input_data),
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "--measurement-interval",
            str(measurement_ms),
            "--stability-percentage",
            str(stability_percent),
            "--max-trials",
            str(max_trials),
            "-f",
            str(report),
        ]
        timeout = max_trials * measurement_ms / 1e3 * 1.5 + _OVERHEAD_S
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(
                f"perf_analyzer did not finish within {timeout:.0f} s at concurrency "
                f"{concurrency} against {url}"
            ) from None
        except OSError as e:
            raise PerfAnalyzerError(f"cannot run {exe}: {e}; {SETUP_HINT}") from None
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or not report.is_file():
            unstable = "Failed to obtain stable measurement" in output
            error = Unstable if unstable else PerfAnalyzerError
            raise error(_failure(output, done.returncode, url, protocol, concurrency))
        results = parse(report.read_text(), done.stdout)
    if [r.concurrency for r in results] != [concurrency]:
        raise PerfAnalyzerError(f"perf_analyzer's CSV has no row for concurrency {concurrency}")
    return results[0]


def _failure(output: str, code: int, url: str, protocol: str, concurrency: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    tail = " | ".join((errors or lines)[-3:])
    hint = ""
    if "Failed to obtain stable measurement" in output:
        hint = " (a busy machine: raise --stability-percentage or --measurement-interval)"
    return (
        f"perf_analyzer failed (exit {code}) at concurrency {concurrency} against "
        f"{protocol} {url}: {tail}{hint}"
    )
