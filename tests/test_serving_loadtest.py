"""The load test, in a tiny mode: against a running server, and starting its own two servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from lstm_deploy_serving import cli
from serving_support import running_server

TINY = [
    "--concurrency",
    "1,4",
    "--requests",
    "8",
    "--warmup",
    "2",
    "--min-steps",
    "2",
    "--max-steps",
    "8",
]


def _rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("| server | concurrency | requests | errors | req/s | p50 ms")
    assert set(lines[1]) <= {"|", "-"}
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_loadtest_against_a_running_server(
    onnx_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_server(onnx_bundle) as url:
        assert cli.main(["loadtest", f"http://{url}", *TINY]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("dynamic batching (max 64)", "1", "8", "0"),
        ("dynamic batching (max 64)", "4", "8", "0"),
    ]
    assert all(float(r[4]) > 0 and float(r[5]) <= float(r[7]) for r in rows)


def test_loadtest_compares_batching_on_and_off(
    onnx_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["loadtest", "--bundle", str(onnx_bundle), *TINY]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["dynamic batching"] * 2 + ["no batching"] * 2
    assert all(r[3] == "0" for r in rows)
    assert [float(r[8]) for r in rows[2:]] == [1.0, 1.0]  # without batching: one request a run


def test_loadtest_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["loadtest", "--bundle", str(tmp_path), *TINY]) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert cli.main(["loadtest", "127.0.0.1:9", *TINY]) == 2
    assert "no server at 127.0.0.1:9" in capsys.readouterr().err
    assert cli.main(["loadtest", "x:1", "--min-steps", "9", "--max-steps", "3"]) == 2
