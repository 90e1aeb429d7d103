"""model.pt2 (torch.export + AOTInductor): parity from Python's loader and from C++
(AOTIModelPackageLoader, export/cpp/lstm_aoti built with CMake), the loop's shape in the generated
code, input checks, and the export without a C++ compiler (skipped, with the reason).

One package is compiled for the session (conftest's `aoti_bundle`: 2 layers, bidirectional,
projected, no bias), one more here (one direction, bias); each ~15-30 s on 2 cores.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AOTI_MODEL
from lstm_deploy_export.check.runners import Context
from lstm_deploy_export.check.runtimes import RUNTIMES
from lstm_deploy_export.check.sweep import Case, make_inputs
from lstm_deploy_export.check.validate import validate
from lstm_deploy_export.cli import main as cli_main
from lstm_deploy_export.export import aoti
from lstm_deploy_export.export.graphs import ExportError
from lstm_deploy_export.export.writer import export_bundle
from lstm_deploy_export.tools import cpp

from lstm_deploy import LSTM
from lstm_deploy.bundle import AOTI, MANIFEST, BundleError, load_bundle

ROWS = ("aoti-cpu", "cpp-aoti")


def rows_of(report, names=ROWS) -> dict:
    return {r.runtime: r for r in report.rows if r.runtime in names}


def test_python_and_cpp_match_both_references(aoti_bundle: Path) -> None:
    # validate's quick sweep: batch 1 to 64, 1 to 1024 steps, variable lengths, random state.
    report = validate(aoti_bundle, quick=True, cpp=True, write=False)
    rows = rows_of(report)
    assert set(rows) == set(ROWS)
    for name, row in rows.items():
        assert row.status == "passed", (name, row.reason, row.failures)
        assert len(row.results) == len(report.cases) >= 4
        assert all(r.error is None for r in row.results)
    assert not [f for f in report.failures if f.runtime in ROWS]


def test_one_direction_with_bias(tmp_path: Path) -> None:
    # The branches the session's package lacks: a one-direction layer, the bias add.
    torch.manual_seed(1)
    model = LSTM(4, 6, num_layers=1, batch_first=True)
    bundle = export_bundle(model, tmp_path / "b", artifacts="aoti")
    rows = rows_of(validate(bundle, quick=True, write=False), ["aoti-cpu"])
    assert rows["aoti-cpu"].status == "passed", rows["aoti-cpu"].failures


def loops(package: Path) -> list[Counter[str]]:
    """The calls inside each `while` loop of the package's generated C++ (one loop a layer)."""
    with zipfile.ZipFile(package) as z:
        name = next(n for n in z.namelist() if n.endswith(".wrapper.cpp"))
        source = z.read(name).decode()
    body = source[source.index("AOTInductorModel::run_impl") :]
    found = []
    for start in (m.end() for m in re.finditer(r"while \(1\) \{", body)):
        depth, end = 1, start
        while depth:
            depth += {"{": 1, "}": -1}.get(body[end], 0)
            end += 1
        found.append(Counter(re.findall(r"\b(cpp_fused_\w+|aoti_torch_\w+)\(", body[start:end])))
    return found


def test_each_step_runs_the_fewest_kernels(aoti_bundle: Path) -> None:
    # Per step and direction: the h @ W_hh^T GEMM, the projection's GEMM, the fused gate math;
    # no copy of the output buffer (each step writes its rows in place), no addmm (its copy of
    # the input projection into its output).
    per_layer = loops(aoti_bundle / AOTI)
    assert len(per_layer) == AOTI_MODEL["num_layers"]
    directions = 2
    for calls in per_layer:
        externs = {k: v for k, v in calls.items() if k.startswith("aoti_torch_cpu_")}
        assert externs == {"aoti_torch_cpu_mm_out": 2 * directions}, externs
        kernels = sum(v for k, v in calls.items() if k.startswith("cpp_fused_"))
        # the loop's condition, per direction the gates and the projected output, the counter
        assert kernels <= 2 + 2 * directions, calls
        copies = [k for k in calls if k.startswith("aoti_torch_") and ("copy" in k or "clone" in k)]
        assert not copies, calls


@pytest.fixture(scope="module")
def programs() -> cpp.CppPrograms:
    built = cpp.build()
    assert cpp.AOTI in built.paths, f"lstm_aoti must build here: {built.unavailable}"
    return built


def inputs_for(bundle: Path, batch: int = 3, steps: int = 4) -> dict[str, np.ndarray]:
    config = load_bundle(bundle, only=[AOTI]).config
    return make_inputs(Case(0, 0, batch, steps, "random", "random"), config)


def test_cpp_refuses_an_input_of_the_wrong_size(
    aoti_bundle: Path, programs: cpp.CppPrograms
) -> None:
    inputs = inputs_for(aoti_bundle)
    inputs["input"] = np.zeros((3, 4, 6), np.float32)  # input_size is 5
    with pytest.raises(cpp.CppError) as e:
        programs.run(cpp.AOTI, aoti_bundle / AOTI, inputs)
    message = str(e.value)
    assert "input.npy: shape (3, 4, 6)" in message and "takes (batch, sequence, 5)" in message
    assert "\n" not in message.split("failed (exit 1): ")[1]


def test_cpp_refuses_a_file_that_is_not_a_package(
    tmp_path: Path, aoti_bundle: Path, programs: cpp.CppPrograms
) -> None:
    fake = tmp_path / AOTI
    fake.write_text("not a zip")
    with pytest.raises(cpp.CppError, match=r"cannot load an AOTInductor package"):
        programs.run(cpp.AOTI, fake, inputs_for(aoti_bundle))


def test_python_refuses_an_input_of_the_wrong_size(aoti_bundle: Path) -> None:
    run = aoti.load_aoti(aoti_bundle / AOTI)
    inputs = [torch.from_numpy(a) for a in inputs_for(aoti_bundle).values()]
    assert [tuple(t.shape) for t in run(inputs)] == [(3, 4, 6), (3, 4, 3), (3, 4, 8)]
    inputs[2] = torch.zeros(3, 2, 3)  # h0 has num_layers * num_directions = 4 states
    with pytest.raises(ValueError, match=r"input h0 has shape \[3, 2, 3\], the package takes"):
        run(inputs)


@pytest.fixture
def no_compiler() -> Iterator[None]:
    """Inductor's compiler search (config.cpp.cxx, from $CXX) finds nothing."""
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-for-lstm-deploy",)}):
        yield


def test_without_a_compiler_the_default_skips_it_with_the_reason(
    tmp_path: Path, no_compiler: None
) -> None:
    model = LSTM(3, 4, proj_size=2)  # the default artifacts of a projected model: few, quick
    bundle = export_bundle(model, tmp_path / "b")
    reason = bundle.manifest["skipped"][AOTI]
    assert "needs a C++ compiler" in reason and "no-such-c++-for-lstm-deploy" in reason
    assert not (tmp_path / "b" / AOTI).exists()
    bundle = load_bundle(bundle.path)  # the manifest's "skipped" is part of the contract
    for row in (r for r in RUNTIMES if r.artifact == AOTI):
        assert (
            row.unavailable(bundle, Context(cpp=True)) == f"{AOTI} is not in the bundle: {reason}"
        )


def test_named_without_a_compiler_is_an_error(
    tmp_path: Path, no_compiler: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ExportError, match=r"needs a C\+\+ compiler"):
        aoti.reason_to_skip(requested=True)
    out = tmp_path / "b"
    assert cli_main(["export", "--demo", "--artifacts", "aoti", "--out", str(out)]) == 2
    assert "needs a C++ compiler for AOTInductor" in capsys.readouterr().err


def test_the_suite_leaves_it_out_of_default_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aoti.SKIP_ENV, "1")  # as conftest.py sets it
    assert aoti.SKIP_ENV in (aoti.reason_to_skip(requested=False) or "")
    assert aoti.reason_to_skip(requested=True) is None  # named, it compiles
    monkeypatch.delenv(aoti.SKIP_ENV)
    assert aoti.reason_to_skip(requested=False) is None


def test_the_manifest_reason_must_be_text(aoti_bundle: Path, tmp_path: Path) -> None:
    manifest = (aoti_bundle / MANIFEST).read_text()
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / MANIFEST).write_text(manifest.replace('"skipped": {}', '"skipped": {"model.pt2": 1}'))
    with pytest.raises(BundleError, match="skipped must map each file name to the reason"):
        load_bundle(bad, only=[])


def test_an_older_torch_leaves_model_pt2_out_or_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11's AOTInductor fails on the scan loop (seen on the GPU machine): the default
    export leaves model.pt2 out with the reason, naming it is an error that says what to do."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    reason = aoti.reason_to_skip(requested=False)
    assert reason is not None and "torch >= 2.13" in reason
    with pytest.raises(ExportError, match=r"torch >= 2\.13"):
        aoti.reason_to_skip(requested=True)
