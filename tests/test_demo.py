"""`lstm-deploy demo`: export the demo bundle, validate it, print the table and where it is."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lstm_deploy_export.cli import main
from lstm_deploy_export.cli.demo import DEMO_MODEL
from serving_support import Reference, running_server

from lstm_deploy.bundle import load_bundle


def run_demo(*argv: str) -> int:
    return main(["demo", *argv, "--no-progress"])


def test_demo_exports_validates_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo-bundle"
    assert run_demo(str(out)) == 0
    printed = capsys.readouterr().out
    bundle = load_bundle(out)  # every file verifies
    assert {k: bundle.manifest["config"][k] for k in DEMO_MODEL} == DEMO_MODEL
    assert {"model.pt", "model.onnx", "model.scan.onnx", "weights.safetensors"} <= set(
        bundle.manifest["files"]
    )
    parity = bundle.manifest["parity"]
    assert parity["passed"] is True and parity["report"] == "report.json"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["sweep"]["quick"]
    cpu = {(r["runtime"], r["artifact"]): r["status"] for r in report["rows"]}
    cpu = {key: status for key, status in cpu.items() if key[0].endswith("-cpu")}
    # OpenVINO ignores sequence_lens, which model.int8.onnx relies on: skipped, with that reason
    assert cpu.pop(("openvino-cpu", "model.int8.onnx")) == "skipped"
    # The suite leaves model.pt2 out of default exports (conftest.py): skipped, with that reason
    assert cpu.pop(("aoti-cpu", "model.pt2")) == "skipped"
    assert set(cpu.values()) == {"passed"}
    # the table, the verdict and where everything is
    assert "onnxruntime-cpu" in printed and "PASSED:" in printed
    assert f"the bundle: {out.resolve()}/" in printed and "model.onnx" in printed
    assert f"lstm-deploy serve {out}" in printed
    # README's demo table lists the rows this run prints, with the same statuses (figures differ)
    live = [(r["runtime"], r["artifact"], r["status"].upper()) for r in report["rows"]]
    cuda = torch.cuda.is_available()  # README's table is of a machine without CUDA
    # README's aoti-cpu row is a user's run (model.pt2 compiled: PASSED), this one's is skipped
    live = [r if r[:2] != ("aoti-cpu", "model.pt2") else (*r[:2], "PASSED") for r in live]
    assert [r for r in readme_demo_rows() if not (cuda and "cuda" in r[0])] == [
        r for r in live if not (cuda and "cuda" in r[0])
    ]
    # next: the printed curl command works against the served bundle, and answers what ORT does
    lines = printed.splitlines()
    commands = [line.strip() for line in lines[lines.index("next:") + 1 :] if "#" not in line]
    assert [c.split()[:2] for c in commands] == [
        ["lstm-deploy", "validate"], ["lstm-deploy", "serve"], ["curl", "-s"],
        ["lstm-deploy", "bench"],
    ]  # fmt: skip
    with running_server(out) as url:
        curl = shlex.split(commands[2].replace("localhost:8000", url))
        answer = json.loads(subprocess.run(curl, capture_output=True, check=True).stdout)
    body = json.loads(curl[-1])["inputs"][0]
    x = np.array(body["data"], np.float32).reshape(body["shape"])
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    for name, want in Reference(out).run(x).items():
        np.testing.assert_allclose(outputs[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_demo_refuses_a_directory_that_is_not_a_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert run_demo(str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and holds no bundle" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    assert run_demo(str(tmp_path / "file")) == 2
    assert "is not a directory" in capsys.readouterr().err


def readme_demo_rows() -> list[tuple[str, str, str]]:
    """(runtime, artifact, status) of each row of the demo table in README.md's Parity section."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    after = text.split("`lstm-deploy demo` on this machine", 1)[1]
    table = after.split("```\n", 2)[1]  # the first fenced block after that sentence
    lines = [
        line.split() for line in table.splitlines() if not line.startswith(("---", "columns:"))
    ]
    assert lines[0][:3] == ["runtime", "artifact", "status"], lines[0]
    assert lines[-1][0] == "PASSED:", lines[-1]  # the verdict line
    return [(words[0], words[1], words[2]) for words in lines[1:-1]]
