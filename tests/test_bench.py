"""`lstm-deploy bench`: it runs, and its outputs hold every row. No timed assertions: the bench is
the measurement; these tests check that it measures every backend of every cell, the C++ programs
in their own processes, the ceilings, and the noise of the machine (against a real busy loop)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lstm_deploy_export.bench import ceilings, noise
from lstm_deploy_export.bench import report as bench_report
from lstm_deploy_export.bench.run import BACKENDS, CPU_BACKENDS, QUICK_GRID, REFERENCE
from lstm_deploy_export.cli import main
from lstm_deploy_export.export.writer import export_bundle

from lstm_deploy import LSTM, LSTMConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    return export_bundle(model, tmp_path_factory.mktemp("bundle")).path


CPP_ROWS = [r.label for r in BACKENDS if r.own_process]
ALWAYS = [REFERENCE, "scratch eager", "model.pt", "model.onnx", "model.scan.onnx"]


def run_bench(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert main(["bench", *args]) == 0
    for name in ("bench.json", "bench.md", *bench_report.FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    return json.loads((out / "bench.json").read_text())


def assert_every_row(
    result: dict, batches: list[int], steps: list[int], hidden: list[int], cpp: bool = False
) -> None:
    """Every backend of the registry is timed in every cell, or skipped with its reason."""
    cells = {(b, t, h) for b in batches for t in steps for h in hidden}
    rows = {(r["batch"], r["steps"], r["hidden"], r["backend"]): r for r in result["rows"]}
    skipped = {s["backend"]: s["reason"] for s in result["skipped"]}
    timed = [name for name in CPU_BACKENDS if name not in skipped]
    assert set(rows) == {(*cell, name) for cell in cells for name in timed}
    assert set(ALWAYS) <= set(timed) and all(skipped.values())
    for name in CPP_ROWS:  # timed with --cpp, where the bundle has their artifact
        if cpp:
            assert name in timed or "not in the bundle" in skipped[name], skipped.get(name)
        else:
            assert "pass --cpp" in skipped[name], skipped[name]
    for key, row in rows.items():
        assert row["median_ms"] > 0 and row["rounds"] >= 1, key
        assert row["sequences_per_s"] > 0 and row["gflops"] > 0 and row["ratio"] > 0, key
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / result["peak_gflops"]), key
        assert not row["mismatch"], f"{key}: max abs error {row['max_abs_err']:.3g} vs nn.LSTM"
        assert row["others_cores"] >= 0, key
    assert all(rows[(*cell, REFERENCE)]["ratio"] == 1.0 for cell in cells)
    assert set(result["summary"]["backends"]) == set(timed)
    for name, target in bench_report.TARGETS.items():
        if name in timed:
            assert result["summary"]["backends"][name]["target"] == target
    measured = {c["name"]: c.get("gflops") for c in result["ceilings"]}
    assert set(measured) == {"torch.mm (MKL)", "oneDNN linear", "nn.LSTM (oneDNN)",
                             "ONNX Runtime MatMul"}, measured  # fmt: skip
    assert all(v and v > 0 for v in measured.values()), measured
    assert result["peak_gflops"] == max(measured.values())
    assert result["peak_ceiling"] == max(measured, key=lambda n: measured[n] or 0)
    assert isinstance(result["noisy"], bool) and result["noise"]["verdict"]
    versions = result["machine"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["onnxruntime"]
    assert not any("cuda" in name for name in skipped), "CUDA rows are --device cuda's"


def test_quick_exports_times_and_writes_every_row(tmp_path: Path, capsys) -> None:
    result = run_bench("--quick", "--out", str(tmp_path))
    assert_every_row(result, QUICK_GRID["batch"], QUICK_GRID["steps"], QUICK_GRID["hidden"])
    assert set(result["memory"]) == {r["backend"] for r in result["rows"]} - set(CPP_ROWS)
    for name, memory in result["memory"].items():
        assert memory.get("peak_rss_mb", 0) > 0, f"{name}: {memory}"
    printed = capsys.readouterr().out
    assert "median ratio" in printed and "model.scan.onnx" in printed
    assert result["noise"]["verdict"] in printed
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Targets" in markdown and "## Peak memory" in markdown
    assert "## Ceilings" in markdown and "oneDNN linear" in markdown


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


# --- the C++ programs, in their own processes -------------------------------------------------


def test_cpp_rows_time_the_programs_inside_their_processes(bundle: Path, tmp_path: Path) -> None:
    result = run_bench(
        str(bundle), "--quick", "--cpp", "--batch", "3", "--steps", "5,9", "--repeat", "3",
        "--warmup", "1", "--no-memory", "--out", str(tmp_path),
    )  # fmt: skip
    assert_every_row(result, [3], [5, 9], [8], cpp=True)
    rows = {(r["steps"], r["backend"]): r for r in result["rows"]}
    for steps in (5, 9):
        for name in ("model.pt (C++ LibTorch)", "model.onnx (C++ ONNX Runtime)"):
            # As many timed runs as bench's rounds, and outputs that match nn.LSTM's.
            assert rows[(steps, name)]["rounds"] == rows[(steps, REFERENCE)]["rounds"] == 3
            assert rows[(steps, name)]["max_abs_err"] < 1e-5
    assert "cpp" in result["method"]


# --- the ceilings and the noise -----------------------------------------------------------------


def test_the_peak_is_the_best_ceiling_that_ran() -> None:
    measured = [
        ceilings.Ceiling("torch.mm (MKL)", "n", 105.0),
        ceilings.Ceiling("oneDNN linear", "n", 196.0),
        ceilings.Ceiling("broken", "n", None, "RuntimeError: not in this build"),
    ]
    assert ceilings.peak(measured).name == "oneDNN linear"
    with pytest.raises(RuntimeError, match="not in this build"):
        ceilings.peak(measured[2:])


def busy_loop() -> subprocess.Popen:
    """A process that spins outside bench's process tree, running before this returns."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    deadline = time.monotonic() + 10
    while _cpu_seconds(child.pid) < 0.2:  # its interpreter has started: it spins
        assert time.monotonic() < deadline, "the busy loop did not start"
        time.sleep(0.05)
    return child


def _cpu_seconds(pid: int) -> float:
    now = noise.sample(processes=True)
    assert now is not None, "needs /proc (Linux)"
    return now.processes.get(pid, ("", 0.0))[1]


def test_noise_counts_a_busy_process_and_bench_children_as_bench(tmp_path: Path) -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    spin += "print(time.process_time())"
    busy = busy_loop()
    try:
        start = noise.sample(processes=True)
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # bench's own work
            pass
        own = time.process_time() - t0
        done = subprocess.run([sys.executable, "-c", spin], capture_output=True, text=True)
        child = float(done.stdout)  # a finished child of bench: bench's work too
        end = noise.sample(processes=True)
    finally:
        busy.kill()
        busy.wait()
    assert start is not None and end is not None, "needs /proc (Linux)"
    measured = noise.between(start, end)
    # os.times ticks at 10 ms: a little below the children's own clocks at most.
    assert measured.ours * measured.seconds >= own + child - 0.05
    busy_cores = (end.processes[busy.pid][1] - start.processes[busy.pid][1]) / measured.seconds
    assert busy_cores > noise.LIMIT  # it spun: on 2 busy cores it still gets a fair share
    assert measured.others >= busy_cores and measured.noisy
    assert measured.verdict().startswith("NOISY: other processes")


def test_a_busy_process_during_bench_marks_the_report_noisy(
    bundle: Path, tmp_path: Path, capsys
) -> None:
    busy = busy_loop()
    try:
        result = run_bench(
            str(bundle), "--quick", "--backends", f"{REFERENCE},model.onnx", "--batch", "2",
            "--steps", "4", "--repeat", "2", "--warmup", "1", "--no-memory", "--out", str(tmp_path),
        )  # fmt: skip
    finally:
        busy.kill()
        busy.wait()
    assert result["noisy"] is True and result["noise"]["others_cores"] > noise.LIMIT
    assert "lstm-deploy bench: warning: NOISY" in capsys.readouterr().err
    assert "Machine: NOISY" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    ("others", "steal", "noisy"),
    # cores: a quiet run; one measured here beside another pytest (1.01 cores of others); a
    # hypervisor that took a quarter of a CPU
    [(0.03, 0.0, False), (1.01, 0.004, True), (0.02, 0.25, True)],
)
def test_verdict(others: float, steal: float, noisy: bool) -> None:
    top = [("python", 4242, others)]
    measured = noise.Noise(60.0, others, steal, 1.0, 0.52, 1.03, top)
    assert measured.noisy is noisy and measured.to_dict()["noisy"] is noisy
    verdict = measured.verdict()
    if noisy:
        assert verdict.startswith("NOISY: ") and "python [pid 4242]" in verdict
    else:
        assert verdict == (
            "quiet (other processes 3% of a core, steal 0%, load 0.52 at the start and 1.03 at "
            "the end, over 60 s)"
        )
