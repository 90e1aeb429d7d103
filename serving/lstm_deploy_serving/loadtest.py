"""Load test at several concurrency levels; a Markdown table of results.

Each request is one sequence (batch 1) of a random length, ``input`` alone. Two clients (``tool``):

- ``client``: tritonclient (asyncio, HTTP); the inputs are generated once, up front, so the
  client spends its time sending. Throughput is requests per second over the level; latency is
  per request, as the client sees it.
- ``perf_analyzer``: NVIDIA's own benchmarking client (``perf_analyzer.py``), over HTTP or gRPC,
  which measures until its windows are stable; the same table from its figures.

``rows/exec`` is how many requests the server merged into each ONNX Runtime run on average (1.0
without batching): from the server's /metrics for ``client``, its statistics for perf_analyzer.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lstm_deploy.bundle import INPUT, MANIFEST

from . import perf_analyzer
from .launch import ServerProcess

TOOLS = ("client", "perf_analyzer")
# perf_analyzer's --input-data: this many requests of random lengths, sent in turn.
PERF_ANALYZER_REQUESTS = 64


class LoadtestError(Exception):
    """The load test cannot run (no client library, no server, no such model)."""


@dataclass(frozen=True)
class LoadSpec:
    model_name: str = "lstm_onnx"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests: int = 200  # client: requests per level (perf_analyzer measures by time windows)
    min_steps: int = 16
    max_steps: int = 128
    warmup: int = 10  # client: requests before each level (perf_analyzer: its unstable windows)
    seed: int = 0
    tool: str = "client"
    protocol: str = "http"  # perf_analyzer: http or grpc (client: http)
    perf_analyzer: Path | None = None  # None: perf_analyzer.find's search
    measurement_ms: int = 2000
    stability_percent: int = 25


@dataclass(frozen=True)
class LevelResult:
    """One row of the table: a server at one concurrency level."""

    server: str
    concurrency: int
    requests: int
    errors: int
    throughput: float  # successful requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    rows_per_exec: float

    @classmethod
    def from_latencies(
        cls,
        server: str,
        concurrency: int,
        requests: int,
        errors: int,
        seconds: float,
        latencies_ms: np.ndarray,
        executions: float,
        inferences: float,
    ) -> LevelResult:
        def percentile(q: float) -> float:
            return float(np.percentile(latencies_ms, q)) if latencies_ms.size else float("nan")

        return cls(
            server,
            concurrency,
            requests,
            errors,
            (requests - errors) / seconds,
            percentile(50),
            percentile(90),
            percentile(99),
            inferences / executions if executions else float("nan"),
        )


def _scrape(url: str) -> dict[str, float]:
    """Triton-named counters from /metrics (first sample of each)."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values.setdefault(name, float(line.rsplit(" ", 1)[1]))
    return values


async def _drive(
    client: Any, http: Any, model: str, arrays: list[np.ndarray], concurrency: int
) -> tuple[list[float], int]:
    """Send every array, ``concurrency`` at a time; latencies (ms) of successes, error count."""
    latencies: list[float] = []
    errors = 0
    todo = iter(arrays)

    async def worker() -> None:
        nonlocal errors
        for x in todo:
            item = http.InferInput(INPUT, list(x.shape), "FP32")
            item.set_data_from_numpy(x)
            start = time.perf_counter()
            try:
                await client.infer(model, [item])
            except Exception:  # counted and reported: a load test reports failures, not raises
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def _measure_async(url: str, spec: LoadSpec, label: str) -> list[LevelResult]:
    try:
        import tritonclient.http.aio as http
    except ImportError as e:
        raise LoadtestError(
            f"loadtest needs tritonclient[http] ({e}); pip install 'tritonclient[http]'"
        ) from None
    client = http.InferenceServerClient(url, conn_limit=max(spec.concurrency))
    try:
        try:
            ready = await client.is_model_ready(spec.model_name)
        except Exception as e:
            raise LoadtestError(f"no server at {url}: {e}") from None
        if not ready:
            raise LoadtestError(f"model '{spec.model_name}' is not ready at {url}")
        metadata = await client.get_model_metadata(spec.model_name)
        feature = _input_size(metadata, spec.model_name)
        rng = np.random.default_rng(spec.seed)

        def sample(n: int) -> list[np.ndarray]:
            steps = rng.integers(spec.min_steps, spec.max_steps + 1, size=n)
            return [rng.standard_normal((1, int(t), feature), dtype=np.float32) for t in steps]

        results = []
        for concurrency in spec.concurrency:
            await _drive(client, http, spec.model_name, sample(spec.warmup), concurrency)
            arrays = sample(spec.requests)
            before = await asyncio.to_thread(_scrape, url)
            start = time.perf_counter()
            latencies, errors = await _drive(client, http, spec.model_name, arrays, concurrency)
            seconds = time.perf_counter() - start
            after = await asyncio.to_thread(_scrape, url)

            def delta(
                name: str, a: dict[str, float] = after, b: dict[str, float] = before
            ) -> float:
                return a.get(name, 0.0) - b.get(name, 0.0)

            results.append(
                LevelResult.from_latencies(
                    label,
                    concurrency,
                    spec.requests,
                    errors,
                    seconds,
                    np.array(latencies),
                    delta("nv_inference_exec_count"),
                    delta("nv_inference_count"),
                )
            )
        return results
    finally:
        await client.close()


def _model_info(url: str, spec: LoadSpec) -> tuple[int, dict[str, Any]]:
    """The model's input size (its metadata) and its config, over ``spec.protocol``."""
    try:
        if spec.protocol == "grpc":
            import tritonclient.grpc as api
        else:
            import tritonclient.http as api
    except ImportError as e:
        raise LoadtestError(
            f"loadtest needs tritonclient[{spec.protocol}] ({e}); "
            f"pip install 'tritonclient[{spec.protocol}]'"
        ) from None
    client = api.InferenceServerClient(url)
    try:
        kwargs = {"as_json": True} if spec.protocol == "grpc" else {}
        metadata = client.get_model_metadata(spec.model_name, **kwargs)
        config = client.get_model_config(spec.model_name, **kwargs)
    except Exception as e:  # tritonclient's own exception types, per protocol
        raise LoadtestError(
            f"no server at {url} ({spec.protocol}) with model '{spec.model_name}': {e}"
        ) from None
    finally:
        client.close()
    config = config.get("config", config)  # gRPC wraps it
    return _input_size(metadata, spec.model_name), config


def _input_size(metadata: dict[str, Any], model: str) -> int:
    """The feature size of an LSTM's ``input`` (FP32 [batch, sequence, features]), from the
    model's metadata; LoadtestError for any other model (a whole-model bundle's, say)."""
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
    datatype, shape = shapes.get(INPUT, ("", []))
    if datatype != "FP32" or len(shape) != 3 or shape[2] < 1:
        raise LoadtestError(
            f"loadtest drives LSTM models (input '{INPUT}' FP32 [batch, sequence, features]); "
            f"model '{model}' takes {', '.join(shapes)}: load it with perf_analyzer and your "
            "own --input-data"
        )
    return shape[2]


def _measure_perf_analyzer(url: str, spec: LoadSpec, label: str) -> list[LevelResult]:
    try:
        exe = perf_analyzer.find(spec.perf_analyzer)
        input_size, _ = _model_info(url, spec)
        with tempfile.TemporaryDirectory(prefix="lstm-deploy-loadtest-") as tmp:
            data = perf_analyzer.write_input_data(
                Path(tmp) / "input.json",
                input_size,
                spec.min_steps,
                spec.max_steps,
                PERF_ANALYZER_REQUESTS,
                spec.seed,
            )
            found = [
                perf_analyzer.measure(
                    exe,
                    url,
                    spec.model_name,
                    concurrency,
                    data,
                    protocol=spec.protocol,
                    measurement_ms=spec.measurement_ms,
                    stability_percent=spec.stability_percent,
                )
                for concurrency in spec.concurrency
            ]
    except perf_analyzer.PerfAnalyzerError as e:
        raise LoadtestError(str(e)) from None
    # perf_analyzer stops at the first failed request: a completed level had no errors.
    return [
        LevelResult(
            server=label,
            concurrency=m.concurrency,
            requests=m.requests,
            errors=0,
            throughput=m.throughput,
            p50_ms=m.p50_ms,
            p90_ms=m.p90_ms,
            p99_ms=m.p99_ms,
            rows_per_exec=m.rows_per_exec,
        )
        for m in found
    ]


def measure(url: str, spec: LoadSpec, label: str) -> list[LevelResult]:
    """Run every concurrency level of ``spec`` against the server at ``url`` (host:port of
    ``spec.protocol``)."""
    if spec.tool == "perf_analyzer":
        return _measure_perf_analyzer(url, spec, label)
    return asyncio.run(_measure_async(url, spec, label))


def _server_label(url: str, spec: LoadSpec) -> str:
    _, config = _model_info(url, spec)
    batching = config.get("dynamic_batching")
    if batching is None:
        return "no batching"
    return f"dynamic batching (max {config.get('max_batch_size')})"


def format_table(results: list[LevelResult]) -> str:
    columns = [
        "server",
        "concurrency",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "rows/exec",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.requests} | {r.errors} | {r.throughput:.1f} "
            f"| {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.rows_per_exec:.2f} |"
        )
    return "\n".join(lines)


def run(
    spec: LoadSpec, url: str | None = None, bundle: Path | None = None, threads: int = 1
) -> str:
    """Load-test a running server (``url``), or start ``bundle``'s server with and without
    dynamic batching (each with ``threads`` ONNX Runtime threads) and compare; the results as a
    Markdown table."""
    if spec.tool not in TOOLS or spec.protocol not in perf_analyzer.PROTOCOLS:
        raise LoadtestError(f"tool must be one of {TOOLS}, protocol one of http, grpc")
    if spec.tool == "client" and spec.protocol != "http":
        raise LoadtestError("the built-in client speaks HTTP: use --tool perf_analyzer for gRPC")
    if spec.tool == "perf_analyzer":  # found (or not) before any server is asked or started
        try:
            spec = replace(spec, perf_analyzer=perf_analyzer.find(spec.perf_analyzer))
        except perf_analyzer.PerfAnalyzerError as e:
            raise LoadtestError(str(e)) from None
    results: list[LevelResult] = []
    if url is not None:
        url = url.removeprefix("http://").rstrip("/")
        results += measure(url, spec, _server_label(url, spec))
    else:
        assert bundle is not None
        if not (bundle / MANIFEST).is_file():
            raise LoadtestError(f"bundle not found: {bundle} has no {MANIFEST}")
        modes = [("dynamic batching", []), ("no batching", ["--no-dynamic-batching"])]
        flags = ["--model-name", spec.model_name, "--threads", str(threads)]
        with ExitStack() as stack:
            servers = [
                (
                    label,
                    stack.enter_context(ServerProcess(bundle, [*flags, *args])),
                )
                for label, args in modes
            ]
            # Level by level, alternating servers: on a shared machine whose load drifts, both
            # modes of one level are measured close together in time.
            by_mode: dict[str, list[LevelResult]] = {label: [] for label, _ in modes}
            for concurrency in spec.concurrency:
                one_level = replace(spec, concurrency=[concurrency])
                for label, server in servers:
                    address = server.grpc_url if spec.protocol == "grpc" else server.url
                    by_mode[label] += measure(address, one_level, label)
        results = [r for label, _ in modes for r in by_mode[label]]
    return format_table(results)
