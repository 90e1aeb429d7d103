"""The distribution as a user gets it: built, checked, installed where the source tree is not.

`python -m build` makes the sdist and, from it, the wheel; `twine check --strict` checks both as
PyPI would. The wheel goes into a fresh venv (torch==2.13.0 first, the CPU build, then the wheel
with `[export,serving,client]`), and everything after runs from that venv with the working
directory outside the repository: `lstm-deploy demo` exports and validates a bundle, the installed
package finds the C++ sources and the Triton template inside itself, and `lstm-deploy serve`
answers tritonclient (the venv's) with what a direct ONNX Runtime run of `model.onnx` gives.

Building and installing take most of the time (one to two minutes in all on two cores, once
pip's cache holds the dependencies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lstm_deploy_export.export.triton import PYTHON_MODEL_SOURCE, SERVING_MODULES
from lstm_deploy_serving.config import ANNOUNCE

ROOT = Path(__file__).resolve().parents[1]
CPP_SOURCES = sorted(p.name for p in (ROOT / "export" / "cpp").iterdir() if p.is_file())
# The wheel's paths of what the tools copy at run time.
TEMPLATE_FILES = [f"lstm_deploy_serving/{name}" for name in (PYTHON_MODEL_SOURCE, *SERVING_MODULES)]
CPP_FILES = [f"lstm_deploy_export/cpp/{name}" for name in CPP_SOURCES]
EXTRAS = "export,serving,client"
INSTALL_TIMEOUT_S = 900
SERVER_START_TIMEOUT_S = 60

# Run by the venv's python: one inference through tritonclient, and the same inputs through
# model.onnx directly; both sets of outputs are saved for the test to compare.
CLIENT = """
import json, sys
import numpy as np
import onnxruntime as ort
import tritonclient.http as http

url, bundle, out = sys.argv[1:]
signature = json.load(open(f"{bundle}/manifest.json"))["signature"]
shapes = {t["name"]: t["shape"] for t in signature["inputs"]}
names = [t["name"] for t in signature["outputs"]]
x = np.random.default_rng(0).standard_normal((2, 7, shapes["input"][2]), dtype=np.float32)
lengths = np.array([7, 3], np.int64)

client = http.InferenceServerClient(url)
inputs = [http.InferInput("input", list(x.shape), "FP32"), http.InferInput("lengths", [2], "INT64")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(lengths)
result = client.infer("lstm_onnx", inputs)
client.close()

session = ort.InferenceSession(f"{bundle}/model.onnx", providers=["CPUExecutionProvider"])
zeros = {n: np.zeros((2, *shapes[n][1:]), np.float32) for n in ("h0", "c0")}
direct = session.run(names, {"input": x, "lengths": lengths, **zeros})
np.savez(out, **{f"served_{n}": result.as_numpy(n) for n in names},
         **{f"direct_{n}": a for n, a in zip(names, direct)})
"""


def _run(command: list[str | Path], timeout: float, **kwargs: object) -> str:
    """Run ``command``; on failure, fail the test with the end of its output."""
    try:
        done = subprocess.run(
            [str(c) for c in command],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{command[:4]} did not finish within {timeout:g} s\n{e.output}")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        pytest.fail(f"{command[:4]} exited {done.returncode}:\n{tail}")
    return str(done.stdout)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel (built from the sdist, as `python -m build` does)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, ROOT], timeout=600)
    return {"sdist": next(out.glob("*.tar.gz")), "wheel": next(out.glob("*.whl"))}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, dist: dict[str, Path]) -> dict[str, Any]:
    """A fresh venv with the wheel installed, and the environment to run it in (no source tree)."""
    where = tmp_path_factory.mktemp("wheel-venv")
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join([str(where / "bin"), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    _run([sys.executable, "-m", "venv", where], timeout=120)
    pip = [where / "bin" / "python", "-m", "pip", "install", "-q"]
    # The CPU build, pinned, first: the wheel's torch>=2.9 would otherwise pull the CUDA build.
    _run([*pip, "torch==2.13.0"], timeout=INSTALL_TIMEOUT_S, env=env)
    _run([*pip, f"{dist['wheel']}[{EXTRAS}]"], timeout=INSTALL_TIMEOUT_S, env=env)
    work = tmp_path_factory.mktemp("wheel-work")  # the working directory: outside the repository
    return {"bin": where / "bin", "env": env, "cwd": work, "prefix": where}


def test_sdist_and_wheel_pass_twine_check(dist: dict[str, Path]) -> None:
    _run([sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]], 120)
    with tarfile.open(dist["sdist"]) as sdist_file:
        sdist = sdist_file.getnames()
    top = dist["sdist"].name.removesuffix(".tar.gz")
    for path in ("export/cpp/CMakeLists.txt", "serving/lstm_deploy_serving/triton_model.py"):
        assert f"{top}/{path}" in sdist, f"the sdist lacks {path}"


def test_wheel_carries_the_triton_template_and_the_cpp_sources(dist: dict[str, Path]) -> None:
    assert "CMakeLists.txt" in CPP_SOURCES
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
    missing = [p for p in TEMPLATE_FILES + CPP_FILES if p not in names]
    assert not missing, f"{dist['wheel'].name} lacks {missing}"


def test_installed_wheel_finds_its_files_not_the_checkout(venv: dict[str, Any]) -> None:
    code = (
        "import json, lstm_deploy, lstm_deploy_export, lstm_deploy_serving\n"
        "from lstm_deploy_export.tools.cpp import SOURCE_DIR\n"
        "print(json.dumps({'packages': [m.__file__ for m in (lstm_deploy, lstm_deploy_export,"
        " lstm_deploy_serving)], 'cpp': str(SOURCE_DIR)}))"
    )
    found = json.loads(
        _run([venv["bin"] / "python", "-c", code], 60, env=venv["env"], cwd=venv["cwd"])
    )
    prefix = venv["prefix"].resolve()
    for path in [*found["packages"], found["cpp"]]:
        assert Path(path).resolve().is_relative_to(prefix), f"{path} is not in the venv"
    assert sorted(p.name for p in Path(found["cpp"]).iterdir()) == CPP_SOURCES


def test_demo_then_serve_answers_tritonclient_as_onnxruntime_does(venv: dict[str, Any]) -> None:
    bundle = venv["cwd"] / "bundle"
    run = {"env": venv["env"], "cwd": venv["cwd"]}
    _run([venv["bin"] / "lstm-deploy", "demo", bundle, "--no-progress"], 600, **run)
    assert (bundle / "triton" / "lstm_python" / "1" / "model.py").is_file()

    command = [venv["bin"] / "lstm-deploy", "serve", bundle, "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **run,
    )
    lines: list[str] = []
    announced = threading.Event()

    def pump() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(ANNOUNCE):
                announced.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not announced.wait(0.1):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("lstm-deploy serve did not start:\n" + "\n".join(lines))
        url = next(x for x in lines if x.startswith(ANNOUNCE))[len(ANNOUNCE) :].split()[0]
        out = venv["cwd"] / "outputs.npz"
        client = [venv["bin"] / "python", "-c", CLIENT, url.removeprefix("http://"), bundle, out]
        _run(client, 120, **run)
    finally:
        server.terminate()  # SIGTERM: a graceful drain, exit 0
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        reader.join(5)
        assert server.stdout is not None
        server.stdout.close()
    assert code == 0, "\n".join(lines)
    with np.load(out) as outputs:
        for name in ("output", "hn", "cn"):
            served, direct = outputs[f"served_{name}"], outputs[f"direct_{name}"]
            np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6, err_msg=name)
