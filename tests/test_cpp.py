"""The C++ programs of export/cpp: built with CMake for real, run on an exported bundle, compared
with Python's runs of the same artifacts (torch.jit.load of model.pt, onnxruntime of model.onnx).

The build is cached in the default build directory (~/.cache/lstm-deploy/cpp): about a minute the
first time on 2 cores, about a second after that. It is never skipped: a failed build fails here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from lstm_deploy_export.export.writer import export_bundle
from lstm_deploy_export.tools import cpp
from lstm_deploy_export.tools.cpp import ONNXRUNTIME, TORCHSCRIPT, CppError, CppPrograms

from lstm_deploy import LSTM

INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 5, 8, 2
STATE = NUM_LAYERS * 2  # bidirectional
ATOL = 1e-5
MODEL_FILE = {TORCHSCRIPT: "model.pt", ONNXRUNTIME: "model.onnx"}


@pytest.fixture(scope="module")
def programs() -> CppPrograms:
    built = cpp.build()
    assert not built.unavailable, f"the C++ programs must build here: {built.unavailable}"
    return built


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, bidirectional=True)
    out = tmp_path_factory.mktemp("cpp") / "bundle"
    return export_bundle(model, out, artifacts="torchscript,onnx").path


def make_inputs(steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch 5, realistic scale, variable lengths that include 1 and the full length."""
    rng = np.random.default_rng(seed)
    batch = 5
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0], lengths[1] = steps, 1
    return {
        "input": rng.standard_normal((batch, steps, INPUT_SIZE), dtype=np.float32),
        "lengths": lengths.astype(np.int64),
        "h0": 0.5 * rng.standard_normal((batch, STATE, HIDDEN_SIZE), dtype=np.float32),
        "c0": 0.5 * rng.standard_normal((batch, STATE, HIDDEN_SIZE), dtype=np.float32),
    }


def python_run(program: str, model: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    if program == TORCHSCRIPT:
        module = torch.jit.load(str(model))
        names = ("input", "lengths", "h0", "c0")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the C++ run: on a busy machine a second thread only waits
        try:
            # One call, as the C++ program makes: no profiling run for optimizations never used.
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return [t.numpy() for t in module(*(torch.from_numpy(inputs[n]) for n in names))]
        finally:
            torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.mark.parametrize("steps", [1, 9, 300])
@pytest.mark.parametrize("program", [TORCHSCRIPT, ONNXRUNTIME])
def test_cpp_matches_python(
    programs: CppPrograms, bundle_dir: Path, program: str, steps: int
) -> None:
    model = bundle_dir / MODEL_FILE[program]
    inputs = make_inputs(steps)
    got = programs.run(program, model, inputs)
    expected = python_run(program, model, inputs)
    assert list(got) == ["output", "hn", "cn"]
    for (name, actual), want in zip(got.items(), expected):
        assert actual.dtype == np.float32 and actual.shape == want.shape, name
        np.testing.assert_allclose(actual, want, rtol=0, atol=ATOL, err_msg=f"{program} {name}")
    # The padding is zeros, not merely close: lengths reach the C++ runtime.
    for b, length in enumerate(inputs["lengths"]):
        assert not got["output"][b, length:].any()


def test_cpp_runtimes_agree_with_each_other(programs: CppPrograms, bundle_dir: Path) -> None:
    inputs = make_inputs(9, seed=1)
    a = programs.run(TORCHSCRIPT, bundle_dir / "model.pt", inputs, threads=None)  # the default
    b = programs.run(ONNXRUNTIME, bundle_dir / "model.onnx", inputs, threads=2)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("program", [TORCHSCRIPT, ONNXRUNTIME])
def test_repeat_times_runs_inside_the_process(
    programs: CppPrograms, bundle_dir: Path, program: str
) -> None:
    model, inputs = bundle_dir / MODEL_FILE[program], make_inputs(9, seed=2)
    outputs, timing = programs.time(program, model, inputs, repeat=5, warmup=2)
    # The timing mode leaves the outputs as they were (the optimizing executor is on for LibTorch).
    for name, want in programs.run(program, model, inputs).items():
        np.testing.assert_allclose(outputs[name], want, rtol=0, atol=ATOL, err_msg=name)
    assert timing["program"] == program and timing["threads"] == 1
    assert (timing["repeat"], timing["warmup"]) == (5, 2)
    times, cpu = timing["times_ms"], timing["cpu_times_ms"]
    assert len(times) == len(cpu) == 5 and all(t > 0 for t in times) and min(cpu) >= 0
    # Its statistics are numpy's (printed with 6 decimals).
    for key, q in (("median_ms", 50), ("min_ms", 0), ("p90_ms", 90), ("max_ms", 100)):
        assert timing[key] == pytest.approx(np.percentile(times, q), abs=2e-6), key


def test_second_build_reuses_the_first(programs: CppPrograms) -> None:
    lines: list[str] = []
    again = cpp.build(progress=lines.append)
    assert again.paths == programs.paths and not again.unavailable
    assert not any("configuring" in line or "fetching" in line for line in lines), lines


# --- the programs' command line and errors --------------------------------------------------


@pytest.fixture(params=[TORCHSCRIPT, ONNXRUNTIME])
def program(request: pytest.FixtureRequest, programs: CppPrograms) -> tuple[str, Path]:
    return request.param, programs.paths[request.param]


def run_program(exe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_help_explains_usage(program: tuple[str, Path]) -> None:
    name, exe = program
    done = run_program(exe, "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert f"usage: {name} --model {MODEL_FILE[name]} --inputs DIR --outputs DIR" in done.stdout
    for word in ("input.npy", "lengths.npy", "h0.npy", "c0.npy", "output.npy", "Exit status"):
        assert word in done.stdout
    for word in ("--threads N", "--repeat N", "--warmup K"):
        assert word in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--model is required"),
        (["--model", "m", "--inputs", "i", "--outputs", "o", "--bogus"], "unrecognized argument"),
        (["--model", "m", "--inputs"], "--inputs needs a value"),
        (["--model=m", "--inputs=i", "--outputs=o", "--threads=0"], "--threads needs a positive"),
        (["--model=m", "--inputs=i", "--outputs=o", "--repeat=0"], "--repeat needs a positive"),
        (["--model=m", "--inputs=i", "--outputs=o", "--warmup=2"], "--warmup needs --repeat"),
        (
            ["--model=m", "--inputs=i", "--outputs=o", "--repeat=2", "--warmup=x"],
            "--warmup needs a non-negative integer, got x",
        ),
    ],
)
def test_usage_errors_exit_2(program: tuple[str, Path], args: list[str], message: str) -> None:
    done = run_program(program[1], *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: ") and message in done.stderr


def write_inputs(directory: Path, inputs: Mapping[str, np.ndarray | bytes | None]) -> Path:
    directory.mkdir()
    for name, value in inputs.items():
        if isinstance(value, bytes):
            (directory / f"{name}.npy").write_bytes(value)
        elif value is not None:
            np.save(directory / f"{name}.npy", value)
    return directory


def _truncated(array: np.ndarray, tmp: Path) -> bytes:
    np.save(tmp / "whole.npy", array)
    return (tmp / "whole.npy").read_bytes()[:-3]


# Each case: what to change in a good set of inputs, and the one-line error the program prints.
BAD_INPUTS = {
    "missing-file": (lambda x, tmp: {**x, "c0": None}, "c0.npy: cannot open the file"),
    "float64": (
        lambda x, tmp: {**x, "input": x["input"].astype(np.float64)},
        "input.npy: dtype <f8, expected <f4",
    ),
    "int32-lengths": (
        lambda x, tmp: {**x, "lengths": x["lengths"].astype(np.int32)},
        "lengths.npy: dtype <i4, expected <i8",
    ),
    "big-endian": (
        lambda x, tmp: {**x, "h0": x["h0"].astype(">f4")},
        "h0.npy: dtype >f4, expected <f4",
    ),
    "fortran-order": (
        lambda x, tmp: {**x, "input": np.asfortranarray(x["input"])},
        "input.npy: Fortran order; save a C-order array",
    ),
    "bad-rank": (
        lambda x, tmp: {**x, "input": x["input"][0]},
        "input.npy: shape (9, 5), expected [batch, sequence, input_size]",
    ),
    "batch-mismatch": (
        lambda x, tmp: {**x, "c0": x["c0"][:2]},
        "c0.npy: batch 2, input.npy has batch 5",
    ),
    "length-out-of-range": (
        lambda x, tmp: {**x, "lengths": np.array([10, 1, 1, 1, 1])},
        "lengths[0] = 10 is outside [1, 9]",
    ),
    "not-npy": (lambda x, tmp: {**x, "h0": b"not numpy at all"}, "h0.npy: not a .npy file"),
    "truncated": (
        lambda x, tmp: {**x, "input": _truncated(x["input"], tmp)},
        "input.npy: holds 897 data bytes, shape (5, 9, 5) needs 900",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_with_one_line(
    program: tuple[str, Path], bundle_dir: Path, tmp_path: Path, case: str
) -> None:
    name, exe = program
    change, message = BAD_INPUTS[case]
    inputs = write_inputs(tmp_path / "in", change(make_inputs(9), tmp_path))
    model = bundle_dir / MODEL_FILE[name]
    done = run_program(
        exe, "--model", str(model), "--inputs", str(inputs), "--outputs", str(tmp_path / "out")
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"{name}: error: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_missing_model_fails_with_one_line(program: tuple[str, Path], tmp_path: Path) -> None:
    name, exe = program
    inputs = write_inputs(tmp_path / "in", make_inputs(3))
    missing = tmp_path / MODEL_FILE[name]
    done = run_program(
        exe, "--model", str(missing), "--inputs", str(inputs), "--outputs", str(tmp_path / "out")
    )
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"{name}: error: {missing}: cannot load")


def test_a_model_size_mismatch_is_a_clear_cpp_error(
    programs: CppPrograms, bundle_dir: Path
) -> None:
    inputs = make_inputs(4)
    inputs["input"] = np.zeros((5, 4, INPUT_SIZE + 1), np.float32)
    with pytest.raises(CppError, match=r"lstm_torchscript failed \(exit 1\): .*input_size"):
        programs.run(TORCHSCRIPT, bundle_dir / "model.pt", inputs)
    with pytest.raises(CppError, match=r"lstm_onnxruntime failed \(exit 1\): .*Expected: 5"):
        programs.run(ONNXRUNTIME, bundle_dir / "model.onnx", inputs)


# --- the Python side without a build ---------------------------------------------------------


def test_an_unavailable_program_raises_its_reason() -> None:
    none = CppPrograms(unavailable={ONNXRUNTIME: "ONNX Runtime headers not found"})
    with pytest.raises(CppError, match="lstm_onnxruntime is not available: ONNX Runtime headers"):
        none.run(ONNXRUNTIME, Path("model.onnx"), make_inputs(2))


def test_inputs_are_checked_against_the_signature(programs: CppPrograms) -> None:
    inputs = make_inputs(2)
    with pytest.raises(ValueError, match="inputs must be"):
        programs.run(ONNXRUNTIME, Path("model.onnx"), {"input": inputs["input"]})
    with pytest.raises(ValueError, match="lengths must be int64, got int32"):
        programs.run(
            ONNXRUNTIME,
            Path("model.onnx"),
            {**inputs, "lengths": inputs["lengths"].astype(np.int32)},
        )


def test_cmake_reports_why_a_program_is_skipped(tmp_path: Path) -> None:
    # ONNX Runtime headers newer than the library cannot work (the C API only grows).
    include = tmp_path / "include"
    include.mkdir()
    (include / "onnxruntime_cxx_api.h").write_text("")
    (include / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 99\n")
    library = tmp_path / "libonnxruntime.so.1.32.0"
    library.write_bytes(b"")
    binary = tmp_path / "build"
    command = ["cmake", "-S", str(cpp.SOURCE_DIR), "-B", str(binary)]
    command += ["-DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON", f"-DONNXRUNTIME_INCLUDE_DIR={include}"]
    command += [f"-DONNXRUNTIME_LIBRARY={library}"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    reasons = {p.stem: p.read_text() for p in (binary / "unavailable").iterdir()}
    assert reasons[TORCHSCRIPT].startswith("LibTorch not found")
    assert "ORT_API_VERSION 99 is newer than the library" in reasons[ONNXRUNTIME]


def test_a_bad_header_override_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpp.ORT_INCLUDE_ENV, str(tmp_path))
    with pytest.raises(CppError, match=r"has no onnxruntime_cxx_api\.h"):
        cpp._onnxruntime_headers(tmp_path, print)
