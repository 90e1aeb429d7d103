"""The C++ programs of export/cpp: built with CMake for real, run on exported bundles, compared
with Python's runs of the same artifacts (torch.jit.load of model.pt, onnxruntime of model.onnx)
and, for a whole-model bundle (a user's Embedding -> LSTM -> Linear), with the eager module. The
signature, names included, comes from each bundle's manifest.json.

The build is cached in the default build directory (~/.cache/lstm-deploy/cpp): about a minute the
first time on 2 cores, about a second after that. It is never skipped: a failed build fails here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lstm_deploy_export.export.graphs import NativeOnnxLSTM
from lstm_deploy_export.export.writer import export_bundle
from lstm_deploy_export.tools import cpp
from lstm_deploy_export.tools.cpp import AOTI, ONNXRUNTIME, TORCHSCRIPT, CppError, CppPrograms
from torch import Tensor, nn

from lstm_deploy import LSTM
from lstm_deploy.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    Bundle,
    Signature,
    TensorSpec,
    file_entry,
    load_bundle,
)

INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 5, 8, 2
STATE = NUM_LAYERS * 2  # bidirectional
ATOL = 1e-5
MODEL_FILE = {TORCHSCRIPT: "model.pt", ONNXRUNTIME: "model.onnx", AOTI: "model.pt2"}


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
    for word in ("DIR/<name>.npy", "manifest.json", "int64", "float32", "Exit status"):
        assert word in done.stdout
    for word in ("input.npy", "lengths.npy", "h0.npy", "c0.npy", "output.npy"):  # the example
        assert word in done.stdout
    for word in ("--manifest PATH", "--threads N", "--repeat N", "--warmup K"):
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
    "missing-file": (
        lambda x, tmp: {**x, "c0": None},
        f"c0.npy: missing; {{model}} takes input c0 float32 (batch, {STATE}, {HIDDEN_SIZE})",
    ),
    "float64": (
        lambda x, tmp: {**x, "input": x["input"].astype(np.float64)},
        "input.npy: dtype <f8 (float64), expected <f4 (float32): save it with "
        ".astype(numpy.float32)",
    ),
    "int32-lengths": (
        lambda x, tmp: {**x, "lengths": x["lengths"].astype(np.int32)},
        "lengths.npy: dtype <i4 (int32), expected <i8 (int64): save it with .astype(numpy.int64)",
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
        f"input.npy: shape (9, 5), {{model}} takes (batch, sequence, {INPUT_SIZE})",
    ),
    "wrong-size": (
        lambda x, tmp: {**x, "h0": x["h0"][:, :1]},
        f"h0.npy: shape (5, 1, 8), {{model}} takes (batch, {STATE}, {HIDDEN_SIZE})",
    ),
    "empty-batch": (
        lambda x, tmp: {k: v[:0] for k, v in x.items()},
        "input.npy: shape (0, 9, 5), its batch must be at least 1",
    ),
    "batch-mismatch": (
        lambda x, tmp: {**x, "c0": x["c0"][:2]},
        "c0.npy: batch 2, input.npy has batch 5",
    ),
    "length-out-of-range": (
        lambda x, tmp: {**x, "lengths": np.array([10, 1, 1, 1, 1])},
        "lengths.npy: lengths[0] = 10 is outside [1, 9] (sequence = input.npy's dimension 1)",
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
    assert_one_line_error(done, name, message.format(model=model))


def assert_one_line_error(done: subprocess.CompletedProcess[str], name: str, message: str) -> None:
    assert done.returncode == 1 and done.stdout == "", (done.returncode, done.stdout)
    assert done.stderr.startswith(f"{name}: error: ") and message in done.stderr, done.stderr
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
    programs: CppPrograms, bundle_dir: Path, tmp_path: Path
) -> None:
    inputs = make_inputs(4)
    inputs["input"] = np.zeros((5, 4, INPUT_SIZE + 1), np.float32)
    taken = rf"input\.npy: shape \(5, 4, 6\), .* takes \(batch, sequence, {INPUT_SIZE}\)$"
    for program in (TORCHSCRIPT, ONNXRUNTIME):
        with pytest.raises(CppError, match=rf"{program} failed \(exit 1\): .*{taken}"):
            programs.run(program, bundle_dir / MODEL_FILE[program], inputs)
    # A signature that leaves input_size open lets the input through: the runtime's own error
    # then comes back in one line.
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["signature"]["inputs"][0]["shape"][2] = "input_size"
    (tmp_path / "open.json").write_text(json.dumps(manifest))
    for program, message in ((TORCHSCRIPT, "input_size"), (ONNXRUNTIME, "Expected: 5")):
        done = run_program(
            programs.paths[program],
            *("--model", str(bundle_dir / MODEL_FILE[program]), "--outputs", str(tmp_path / "o")),
            *("--inputs", str(write_inputs(tmp_path / program, inputs))),
            *("--manifest", str(tmp_path / "open.json")),
        )
        assert_one_line_error(done, program, message)


# --- any signature: a whole-model bundle, renamed tensors, the manifest's own errors ----------

VOCAB, EMBED, CLASSES = 11, 4, 7


class ScratchCore(nn.Module):
    """The scratch LSTM as a user's module calls it: eager, and scripted into model.pt."""

    def __init__(self, lstm: LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        output, (hn, _) = self.lstm(x, None, lengths)
        return output, hn[-1]  # the last layer's final h


class OnnxCore(nn.Module):
    """The same LSTM as model.onnx expresses it (NativeOnnxLSTM: ONNX LSTM ops; torch.export
    cannot trace the scratch loop over a dynamic sequence length)."""

    def __init__(self, lstm: LSTM) -> None:
        super().__init__()
        self.lstm = NativeOnnxLSTM(lstm)
        self.states, self.hidden_size = lstm.num_layers, lstm.hidden_size

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        zeros = x.new_zeros(x.shape[0], self.states, self.hidden_size)
        output, hn, _ = self.lstm(x, lengths, zeros, zeros)
        return output, hn[:, -1]


class Tagger(nn.Module):
    """A user's module: Embedding -> LSTM -> Linear. Per-step logits, a pooled row per sequence
    (nested in a tuple: results are flattened depth first), and an int64 output: the tokens of
    each sequence that are not padding (id 0)."""

    def __init__(self, embed: nn.Embedding, core: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.embed, self.core, self.head = embed, core, head

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        output, h = self.core(self.embed(tokens), lengths)  # (B, T, H), (B, H)
        return (self.head(output), self.head(h)), (tokens != 0).sum(1)


TAGGER_SIGNATURE = Signature(
    inputs=(
        TensorSpec("tokens", "int64", ("batch", "sequence")),
        TensorSpec("lengths", "int64", ("batch",)),
    ),
    outputs=(
        TensorSpec("logits", "float32", ("batch", "sequence", CLASSES)),
        TensorSpec("pooled", "float32", ("batch", CLASSES)),
        TensorSpec("tokens_used", "int64", ("batch",)),
    ),
)


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    torch.manual_seed(0)
    lstm = LSTM(EMBED, HIDDEN_SIZE, num_layers=NUM_LAYERS, batch_first=True)
    return Tagger(nn.Embedding(VOCAB, EMBED), ScratchCore(lstm), nn.Linear(HIDDEN_SIZE, CLASSES))


@pytest.fixture(scope="module")
def tagger_bundle(tagger: Tagger, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt and model.onnx of `tagger`, exported at batch 2, sequence 3, with its manifest."""
    out = tmp_path_factory.mktemp("tagger")
    torch.jit.save(torch.jit.script(tagger.eval()), str(out / "model.pt"))
    twin = Tagger(tagger.embed, OnnxCore(tagger.core.lstm), tagger.head).eval()
    example = (torch.randint(1, VOCAB, (2, 3)), torch.tensor([3, 2]))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    sig = TAGGER_SIGNATURE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the dynamo exporter's notes about its own internals
        program = torch.onnx.export(
            twin,
            example,
            dynamo=True,
            input_names=sig.input_names,
            output_names=sig.output_names,
            dynamic_shapes={"tokens": {0: batch, 1: sequence}, "lengths": {0: batch}},
        )
    assert program is not None
    program.save(str(out / "model.onnx"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {name: file_entry(out / name) for name in ("model.pt", "model.onnx")},
        "signature": sig.to_json(),
        "model": {"lengths": "lengths", "ranges": {"tokens": [0, VOCAB]}},
    }
    Bundle(out, manifest).write_manifest()
    return out


def signature_inputs(bundle: Path, batch: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a bundle's signature as its manifest declares it: lengths from 1 to the
    full sequence, integers in their declared ranges, floats at a realistic scale."""
    info = load_bundle(bundle, only=()).info
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in info.signature.inputs:
        shape = spec.concrete({"batch": batch, "sequence": steps})
        if spec.name == info.lengths:
            array = rng.integers(1, steps + 1, size=shape)
            array[0], array[-1] = steps, 1
        elif spec.name in info.ranges:
            array = rng.integers(*info.ranges[spec.name], size=shape)
        else:
            array = 0.5 * rng.standard_normal(shape)
        inputs[spec.name] = array.astype(spec.dtype)
    return inputs


@pytest.mark.parametrize("program", [TORCHSCRIPT, ONNXRUNTIME])
def test_a_whole_model_bundle_matches_the_eager_module(
    programs: CppPrograms, tagger: Tagger, tagger_bundle: Path, program: str
) -> None:
    inputs = signature_inputs(tagger_bundle, batch=5, steps=9)  # not the export's 2 and 3
    got = programs.run(program, tagger_bundle / MODEL_FILE[program], inputs)
    with torch.no_grad():
        (logits, pooled), used = tagger(
            *(torch.from_numpy(inputs[n]) for n in ("tokens", "lengths"))
        )
    assert list(got) == TAGGER_SIGNATURE.output_names
    for name, want in (("logits", logits), ("pooled", pooled), ("tokens_used", used)):
        assert got[name].dtype == want.numpy().dtype and got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want.numpy(), rtol=0, atol=ATOL, err_msg=name)


TAGGER_BAD_INPUTS = {
    "missing": (
        lambda x: {**x, "tokens": None},
        "tokens.npy: missing; {model} takes input tokens int64 (batch, sequence) (see --help)",
    ),
    "int32-tokens": (
        lambda x: {**x, "tokens": x["tokens"].astype(np.int32)},
        "tokens.npy: dtype <i4 (int32), expected <i8 (int64): save it with .astype(numpy.int64)",
    ),
    "token-out-of-range": (
        lambda x: {**x, "tokens": np.where(np.arange(9) == 2, VOCAB, x["tokens"])},
        f"tokens.npy: tokens[0, 2] = {VOCAB} is outside [0, {VOCAB}), the range the manifest "
        "declares",
    ),
    "batch-mismatch": (
        lambda x: {**x, "lengths": x["lengths"][:3]},
        "lengths.npy: batch 3, tokens.npy has batch 5",
    ),
    "length-out-of-range": (
        lambda x: {**x, "lengths": np.full(5, 10)},
        "lengths[0] = 10 is outside [1, 9] (sequence = tokens.npy's dimension 1)",
    ),
}


@pytest.mark.parametrize("case", list(TAGGER_BAD_INPUTS))
def test_a_whole_model_refuses_bad_inputs_in_one_line(
    program: tuple[str, Path], tagger_bundle: Path, tmp_path: Path, case: str
) -> None:
    name, exe = program
    change, message = TAGGER_BAD_INPUTS[case]
    inputs = write_inputs(tmp_path / "in", change(signature_inputs(tagger_bundle, 5, 9)))
    model = tagger_bundle / MODEL_FILE[name]
    done = run_program(
        exe, "--model", str(model), "--inputs", str(inputs), "--outputs", str(tmp_path / "out")
    )
    assert_one_line_error(done, name, message.format(model=model))


def changed_manifest(bundle: Path, tmp_path: Path, change: Any) -> Path:
    """A copy of the bundle's manifest, written elsewhere after `change(manifest)`."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(manifest))
    return path


def _outputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return manifest["signature"]["outputs"]  # type: ignore[no-any-return]


# Each case: what the manifest declares instead, the programs it concerns, the error.
OUTPUT_MISMATCHES = {
    "dtype": (
        lambda m: _outputs(m)[2].update(dtype="float32"),
        (TORCHSCRIPT, ONNXRUNTIME),
        "output tokens_used is int64, the signature declares float32",
    ),
    "shape": (
        lambda m: _outputs(m)[0].update(shape=["batch", "sequence", CLASSES + 1]),
        (TORCHSCRIPT, ONNXRUNTIME),
        f"output logits has shape (5, 9, {CLASSES}), the signature declares (batch, sequence, 8)",
    ),
    "count": (
        lambda m: _outputs(m).pop(),
        (TORCHSCRIPT,),  # ONNX Runtime returns the outputs asked for by name
        "the model returned 3 tensors, its signature ({manifest}) has 2 outputs: logits, pooled",
    ),
    "unknown-output": (
        lambda m: _outputs(m)[2].update(name="confidence"),
        (ONNXRUNTIME,),
        "run failed: Invalid output name: confidence",
    ),
}


@pytest.mark.parametrize("case", list(OUTPUT_MISMATCHES))
def test_results_must_match_the_signature(
    programs: CppPrograms, tagger_bundle: Path, tmp_path: Path, case: str
) -> None:
    change, concerned, message = OUTPUT_MISMATCHES[case]
    manifest = changed_manifest(tagger_bundle, tmp_path, change)
    inputs = write_inputs(tmp_path / "in", signature_inputs(tagger_bundle, 5, 9))
    for name in concerned:
        done = run_program(
            programs.paths[name],
            *("--model", str(tagger_bundle / MODEL_FILE[name]), "--manifest", str(manifest)),
            *("--inputs", str(inputs), "--outputs", str(tmp_path / "out")),
        )
        assert_one_line_error(done, name, message.format(manifest=manifest))


RENAMED = {"input": "features", "lengths": "steps", "h0": "lstm.h0", "c0": "lstm.c0"}
RENAMED |= {"output": "y", "hn": "lstm.hn", "cn": "lstm.cn"}


def rename_onnx_tensors(source: Path, dest: Path, names: Mapping[str, str]) -> None:
    proto = onnx.load(str(source))
    graph = proto.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dest))


@pytest.mark.parametrize("program", [TORCHSCRIPT, ONNXRUNTIME, AOTI])
def test_every_name_comes_from_the_manifest(
    programs: CppPrograms, request: pytest.FixtureRequest, tmp_path: Path, program: str
) -> None:
    # An LSTM bundle's model beside a manifest that renames every tensor, in a whole model's form
    # (model.lengths names the lengths input): the same run under the new names.
    bundle = request.getfixturevalue("aoti_bundle" if program == AOTI else "bundle_dir")
    file = MODEL_FILE[program]
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    if program == ONNXRUNTIME:  # the graph names its inputs and outputs itself
        rename_onnx_tensors(bundle / file, renamed / file, RENAMED)
    else:
        shutil.copy(bundle / file, renamed / file)
    sig = load_bundle(bundle, only=()).signature

    def rename(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return tuple(dataclasses.replace(t, name=RENAMED[t.name]) for t in specs)

    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {file: file_entry(renamed / file)},
        "signature": Signature(rename(sig.inputs), rename(sig.outputs)).to_json(),
        "model": {"lengths": "steps"},
    }
    Bundle(renamed, manifest).write_manifest()

    inputs = signature_inputs(bundle, batch=3, steps=9)
    want = programs.run(program, bundle / file, inputs)
    got = programs.run(program, renamed / file, {RENAMED[k]: v for k, v in inputs.items()})
    assert list(got) == [RENAMED[name] for name in want]
    for name, array in want.items():
        np.testing.assert_array_equal(got[RENAMED[name]], array, err_msg=name)
    # The lengths check follows the name too: model.pt2's compiled code would read past the input.
    inputs["lengths"][1] = 10
    with pytest.raises(CppError, match=r"steps\.npy: steps\[1\] = 10 is outside \[1, 9\]"):
        programs.run(program, renamed / file, {RENAMED[k]: v for k, v in inputs.items()})


# Each case: the manifest (a change of the bundle's, or the text itself) and the error.
BAD_MANIFESTS = {
    "not-json": ("{", "not valid JSON ([json.exception.parse_error.101]"),
    "format-version": (
        lambda m: m.update(format_version=FORMAT_VERSION + 1),
        f"format_version is {FORMAT_VERSION + 1}, this program reads {FORMAT_VERSION}; re-export",
    ),
    "no-signature": (lambda m: m.pop("signature"), 'the manifest has no "signature"'),
    "no-outputs": (
        lambda m: m["signature"].update(outputs=[]),
        "signature.outputs must be a non-empty list",
    ),
    "dtype": (
        lambda m: m["signature"]["inputs"][0].update(dtype="complex64"),
        'signature.inputs[0].dtype is "complex64"; expected one of float32, float64, float16, '
        "int64, int32, int8, uint8, bool",
    ),
    "shape": (
        lambda m: m["signature"]["inputs"][1].update(shape=[-1]),
        "signature.inputs[1].shape holds -1; expected a size >= 0 or an axis name",
    ),
    "name-out-of-the-folder": (
        lambda m: _outputs(m)[0].update(name="../output"),
        'signature.outputs[0].name "../output" cannot be a file name',
    ),
    "model-lengths": (
        lambda m: m.update(model={"lengths": "steps"}),
        'model.lengths is "steps"; it must name an input',
    ),
    "model-ranges": (
        lambda m: m.update(model={"ranges": {"lengths": [3, 3]}}),
        'model.ranges["lengths"] must be [low, high) of one of the inputs',
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_manifest_fails_with_one_line(
    program: tuple[str, Path], bundle_dir: Path, tmp_path: Path, case: str
) -> None:
    name, exe = program
    content, message = BAD_MANIFESTS[case]
    if isinstance(content, str):
        manifest = tmp_path / "bad.json"
        manifest.write_text(content)
    else:
        manifest = changed_manifest(bundle_dir, tmp_path, content)
    inputs = write_inputs(tmp_path / "in", make_inputs(3))
    done = run_program(
        exe,
        *("--model", str(bundle_dir / MODEL_FILE[name]), "--manifest", str(manifest)),
        *("--inputs", str(inputs), "--outputs", str(tmp_path / "out")),
    )
    assert_one_line_error(done, name, f"{manifest}: {message}")


def test_the_manifest_is_read_beside_the_model(
    program: tuple[str, Path], bundle_dir: Path, tmp_path: Path
) -> None:
    name, exe = program
    alone = tmp_path / MODEL_FILE[name]
    shutil.copy(bundle_dir / MODEL_FILE[name], alone)
    inputs = write_inputs(tmp_path / "in", make_inputs(3))
    out = tmp_path / "out"
    done = run_program(exe, "--model", str(alone), "--inputs", str(inputs), "--outputs", str(out))
    assert_one_line_error(
        done,
        name,
        f"{tmp_path / MANIFEST}: cannot open the bundle's manifest (missing or unreadable); pass "
        "--manifest PATH if it is not beside --model",
    )
    manifest = ("--manifest", str(bundle_dir / MANIFEST))
    done = run_program(
        exe, "--model", str(alone), "--inputs", str(inputs), "--outputs", str(out), *manifest
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cn.npy", "hn.npy", "output.npy"]


# --- the Python side without a build ---------------------------------------------------------


def test_an_unavailable_program_raises_its_reason() -> None:
    none = CppPrograms(unavailable={ONNXRUNTIME: "ONNX Runtime headers not found"})
    with pytest.raises(CppError, match="lstm_onnxruntime is not available: ONNX Runtime headers"):
        none.run(ONNXRUNTIME, Path("model.onnx"), make_inputs(2))


def test_inputs_are_checked_against_the_signature(programs: CppPrograms, bundle_dir: Path) -> None:
    inputs, model = make_inputs(2), bundle_dir / "model.onnx"
    with pytest.raises(ValueError, match="inputs must be"):
        programs.run(ONNXRUNTIME, model, {"input": inputs["input"]})
    with pytest.raises(ValueError, match="lengths must be int64, got int32"):
        programs.run(ONNXRUNTIME, model, {**inputs, "lengths": inputs["lengths"].astype(np.int32)})


def configure_reasons(tmp_path: Path, *options: str) -> dict[str, str]:
    """CMake's reasons for the programs it skips, configured without LibTorch."""
    binary = tmp_path / "build"
    command = ["cmake", "-S", str(cpp.SOURCE_DIR), "-B", str(binary)]
    command += ["-DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON", *options]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return {p.stem: p.read_text() for p in (binary / "unavailable").iterdir()}


def test_cmake_reports_why_a_program_is_skipped(programs: CppPrograms, tmp_path: Path) -> None:
    # ONNX Runtime headers newer than the library cannot work (the C API only grows).
    include = tmp_path / "include"
    include.mkdir()
    (include / "onnxruntime_cxx_api.h").write_text("")
    (include / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 99\n")
    library = tmp_path / "libonnxruntime.so.1.32.0"
    library.write_bytes(b"")
    json_include = cpp._headers(cpp.default_build_dir(), cpp.JSON_HEADERS, print)  # as built
    reasons = configure_reasons(
        tmp_path,
        f"-DONNXRUNTIME_INCLUDE_DIR={include}",
        f"-DONNXRUNTIME_LIBRARY={library}",
        f"-DNLOHMANN_JSON_INCLUDE_DIR={json_include}",
    )
    assert reasons[TORCHSCRIPT].startswith("LibTorch not found")
    assert "ORT_API_VERSION 99 is newer than the library" in reasons[ONNXRUNTIME]


def test_cmake_needs_nlohmann_json_for_every_program(tmp_path: Path) -> None:
    reasons = configure_reasons(tmp_path, f"-DNLOHMANN_JSON_INCLUDE_DIR={tmp_path}")
    assert set(reasons) == set(cpp.PROGRAMS)
    assert all(r.startswith("nlohmann/json not found") for r in reasons.values()), reasons


@pytest.mark.parametrize("headers", [cpp.ORT_HEADERS, cpp.JSON_HEADERS], ids=lambda h: h.package)
def test_a_bad_header_override_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headers: cpp.Headers
) -> None:
    monkeypatch.setenv(headers.env, str(tmp_path))
    with pytest.raises(CppError, match=f"{headers.env}=.* has no {headers.header}"):
        cpp._headers(tmp_path, headers, print)
