"""NVIDIA's perf_analyzer against our server, over HTTP and gRPC, through `lstm-deploy loadtest`.

perf_analyzer (tritonclient 2.41.0's, installed by scripts/setup_perf_analyzer.sh) reads the
model's metadata and config from the server, as it does from Triton, and sends `input` alone:
it completes only if the metadata's shapes are Triton's (`lengths` [-1, 1]) and the config marks
`lengths`, `h0`, `c0` optional (before, it stopped at "missing tensor c0"). Every request it
counts must have succeeded on the server: the server's own counters say so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lstm_deploy_serving import cli
from serving_support import metrics, perf_analyzer_exe, running_servers

QUICK = ["--concurrency", "2", "--measurement-interval", "500", "--stability-percentage", "100"]


@pytest.fixture(scope="module")
def exe() -> Path:
    return perf_analyzer_exe()


@pytest.fixture(scope="module")
def servers(onnx_bundle: Path):
    with running_servers(onnx_bundle, model_name="lstm_python") as urls:
        yield urls


def _row(out: str) -> list[str]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("| server | concurrency | requests | errors | req/s | p50 ms")
    assert len(lines) == 3, out
    return [cell.strip() for cell in lines[2].strip("|").split("|")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_completes_with_input_only(
    exe: Path, servers: tuple[str, str], protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    http_url, grpc_url = servers
    before = metrics(http_url)
    args = ["loadtest", grpc_url if protocol == "grpc" else http_url, "--model-name"]
    args += ["lstm_python", "--tool", "perf_analyzer", "--protocol", protocol, *QUICK]
    assert cli.main([*args, "--perf-analyzer", str(exe)]) == 0, capsys.readouterr().err
    server, concurrency, requests, errors, rate, p50, p90, p99, rows = _row(capsys.readouterr().out)
    after = metrics(http_url)
    assert server == "dynamic batching (max 64)" and concurrency == "2" and errors == "0"
    assert float(rate) > 0 and 0 < float(p50) <= float(p90) <= float(p99)
    # perf_analyzer's count is of its measured windows; the server saw those and its warm-up.
    succeeded = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    assert 0 < int(requests) <= succeeded
    assert after["nv_inference_request_failure"] == before["nv_inference_request_failure"]
    # From the server's statistics extension: 2 clients, so at most 2 requests a run.
    assert 1.0 <= float(rows) <= 2.0


def test_missing_perf_analyzer_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = tmp_path / "perf_analyzer"
    args = ["loadtest", "127.0.0.1:9", "--tool", "perf_analyzer", "--perf-analyzer", str(nowhere)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"no executable perf_analyzer at {nowhere}" in err
    assert "scripts/setup_perf_analyzer.sh" in err
    assert cli.main(["loadtest", "127.0.0.1:9", "--protocol", "grpc"]) == 2
    assert "the built-in client speaks HTTP: use --tool perf_analyzer" in capsys.readouterr().err
    assert cli.main(["loadtest", "127.0.0.1:9", "--against-triton"]) == 2
    assert "--against-triton needs --bundle" in capsys.readouterr().err


SERVERS = ("real", "canned")  # front_end_ceiling's two servers


def test_front_end_ceiling(exe: Path, onnx_bundle: Path) -> None:
    """scripts/front_end_ceiling.py runs both servers under perf_analyzer and reports each
    one's rate, CPU per request and where it went: the canned one skips the model, so it costs
    less CPU and its batcher thread (which calls ONNX Runtime) never runs."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "front_end_ceiling.py"
    command = [sys.executable, str(script), str(onnx_bundle), "--concurrency", "2", "--quick"]
    done = subprocess.run(
        [*command, "--perf-analyzer", str(exe)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()]
    rates = {r[0]: r for r in rows if len(r) == 5 and r[1] == "2"}
    header = next(r for r in rows if r[0] == "server")
    where = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows if r[0] in SERVERS}
    assert set(rates) == {"http", "grpc"}, done.stdout
    assert set(where) == {(s, p) for s in SERVERS for p in ("http", "grpc")}, done.stdout
    for protocol in ("http", "grpc"):
        real, canned = float(rates[protocol][2]), float(rates[protocol][3])
        assert real > 0 and canned > 0
        real_at, canned_at = where["real", protocol], where["canned", protocol]
        assert 0 < float(canned_at["CPU µs / request"]) < float(real_at["CPU µs / request"])
        assert real_at["batcher"] != "0%" and canned_at["batcher"] == "0%", done.stdout
        assert real_at["event loop"] != "0%", done.stdout
