"""`lstm-deploy bench`: it runs, and its outputs hold every row. No timed assertions: the bench is
the measurement; these tests only check that it measures every backend of every cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lstm_deploy_export.bench import report as bench_report
from lstm_deploy_export.bench.run import CPU_BACKENDS, QUICK_GRID, REFERENCE
from lstm_deploy_export.cli import main
from lstm_deploy_export.export.writer import export_bundle

from lstm_deploy import LSTM, LSTMConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    return export_bundle(model, tmp_path_factory.mktemp("bundle")).path


def run_bench(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert main(["bench", *args]) == 0
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    return json.loads((out / "bench.json").read_text())


def assert_every_row(result: dict, batches: list[int], steps: list[int], hidden: list[int]) -> None:
    cells = {(b, t, h) for b in batches for t in steps for h in hidden}
    rows = {(r["batch"], r["steps"], r["hidden"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(*cell, name) for cell in cells for name in CPU_BACKENDS}
    for key, row in rows.items():
        assert row["median_ms"] > 0 and row["rounds"] >= 1, key
        assert row["sequences_per_s"] > 0 and row["gflops"] > 0 and row["ratio"] > 0, key
        assert not row["mismatch"], f"{key}: max abs error {row['max_abs_err']:.3g} vs nn.LSTM"
    assert all(rows[(*cell, REFERENCE)]["ratio"] == 1.0 for cell in cells)
    assert set(result["summary"]["backends"]) == set(CPU_BACKENDS)
    for name, target in bench_report.TARGETS.items():
        assert result["summary"]["backends"][name]["target"] == target
    assert result["gemm_peak_gflops"] > 0
    skipped = {s["backend"]: s["reason"] for s in result["skipped"]}
    assert "model.pt (C++ LibTorch)" in skipped and all(skipped.values())
    assert not any("cuda" in name for name in skipped), "CUDA rows are --device cuda's"


def test_quick_exports_times_and_writes_every_row(tmp_path: Path, capsys) -> None:
    result = run_bench("--quick", "--out", str(tmp_path))
    assert_every_row(result, QUICK_GRID["batch"], QUICK_GRID["steps"], QUICK_GRID["hidden"])
    assert set(result["memory"]) == set(CPU_BACKENDS)
    for name, memory in result["memory"].items():
        assert memory.get("peak_rss_mb", 0) > 0, f"{name}: {memory}"
    printed = capsys.readouterr().out
    assert "median ratio" in printed and "model.scan.onnx" in printed
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Targets" in markdown and "## Peak memory" in markdown


def test_bench_of_a_given_bundle(bundle: Path, tmp_path: Path) -> None:
    result = run_bench(
        str(bundle), "--batch", "3", "--steps", "5,9", "--repeat", "2", "--warmup", "1",
        "--no-memory", "--out", str(tmp_path),
    )  # fmt: skip
    assert_every_row(result, [3], [5, 9], [8])
    assert result["memory"] == {}


def test_bad_arguments_are_usage_errors(bundle: Path, tmp_path: Path, capsys) -> None:
    assert main(["bench", "--backends", "model.onnx", "--out", str(tmp_path)]) == 2
    assert main(["bench", str(bundle), "--hidden", "16", "--out", str(tmp_path)]) == 2
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "lstm-deploy bench: error:" in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is here: the GPU run is the test"
)
def test_device_cuda_without_cuda_says_why(bundle: Path, tmp_path: Path, capsys) -> None:
    assert main(["bench", str(bundle), "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the reference torch.nn.LSTM (cuda) cannot run here: no CUDA device" in err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_times_the_cuda_rows_against_cudnn(bundle: Path, tmp_path: Path) -> None:
    result = run_bench(
        str(bundle), "--device", "cuda", "--batch", "3", "--steps", "5,9", "--repeat", "2",
        "--warmup", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert result["reference"] == "torch.nn.LSTM (cuda)" and result["memory"] == {}
    rows = {(r["steps"], r["backend"]): r for r in result["rows"]}
    assert {name for _, name in rows} >= {"torch.nn.LSTM (cuda)", "model.pt (cuda)"}
    assert all(not r["mismatch"] for r in rows.values()), rows
    assert all(rows[(t, "torch.nn.LSTM (cuda)")]["ratio"] == 1.0 for t in (5, 9))


def test_help_is_the_module_docstring(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "Time every backend" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # 2 * T * B * 4H * (I + H): one layer, one direction
        (LSTMConfig(3, 5), 2 * 7 * 2 * 20 * (3 + 5)),
        # layer 2 reads both directions of layer 1 (2H), each direction counted
        (LSTMConfig(3, 5, num_layers=2, bidirectional=True),
         2 * (2 * 7 * 2 * 20 * (3 + 5)) + 2 * (2 * 7 * 2 * 20 * (10 + 5))),
        # with a projection: h is proj_size wide, plus the projection GEMM
        (LSTMConfig(3, 5, proj_size=2), 2 * 7 * 2 * 20 * (3 + 2) + 2 * 7 * 2 * 5 * 2),
    ],
)  # fmt: skip
def test_flop_count(config: LSTMConfig, expected: int) -> None:
    assert config.gemm_flops(batch=2, steps=7) == expected


def test_summary_checks_each_target_and_the_latency_cell() -> None:
    def row(backend: str, ms: float, batch: int = 1) -> dict:
        return {"batch": batch, "steps": 128, "hidden": 256, "backend": backend,
                "median_ms": ms, "ratio": 10.0 / ms}  # fmt: skip

    rows = [row(REFERENCE, 10.0), row("model.pt", 20.0), row("model.onnx", 5.0)]
    rows += [row(REFERENCE, 10.0, batch=2), row("model.pt", 10.0, batch=2)]
    summary = bench_report.summary(rows)
    assert summary["backends"]["model.pt"]["median_ratio"] == pytest.approx(0.75)
    assert summary["backends"]["model.pt"]["met"] is True  # 0.75 >= 0.6
    assert summary["backends"]["model.onnx"]["met"] is True
    latency = summary["latency"]["backends"]
    assert latency["model.pt"]["latency_ratio"] == 2.0 and latency["model.pt"]["met"] is False
    assert latency["model.onnx"]["met"] is True
