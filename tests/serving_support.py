"""Shared helpers for the serving tests: the test bundle, a live server, the reference run.

The bundle is a small LSTM (hidden 16, two layers) exported once per test session with the real
``export_bundle``; servers are started for real on a free loopback port; every expected value
comes from a direct ONNX Runtime run of the bundle's ``model.onnx``.

tests/conftest.py turns the bundle and the reference into the `onnx_bundle` and `reference` fixtures.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

INPUT_SIZE = 8
HIDDEN_SIZE = 16
NUM_LAYERS = 2


def export_onnx_bundle(out: Path) -> Path:
    """The serving tests' bundle: model.onnx (and model.int8.onnx, which `serve --artifact`
    runs) of a small 2-layer LSTM (see tests/conftest.py)."""
    import torch
    from lstm_deploy_export.export.writer import export_bundle

    import lstm_deploy

    torch.manual_seed(0)
    model = lstm_deploy.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, batch_first=True)
    return export_bundle(model, out, artifacts=("onnx", "int8")).path


class Reference:
    """A direct ONNX Runtime run of the bundle's model.onnx: the oracle for every server test."""

    def __init__(self, bundle: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        manifest = json.loads((bundle / "manifest.json").read_text())
        shapes = {t["name"]: t["shape"] for t in manifest["signature"]["inputs"]}
        self.input_size: int = shapes["input"][2]
        self.h_shape: tuple[int, ...] = tuple(shapes["h0"][1:])
        self.c_shape: tuple[int, ...] = tuple(shapes["c0"][1:])

    def run(
        self,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        b, t = x.shape[:2]
        feeds = {
            "input": x,
            "lengths": np.full(b, t, np.int64) if lengths is None else lengths,
            "h0": np.zeros((b, *self.h_shape), np.float32) if h0 is None else h0,
            "c0": np.zeros((b, *self.c_shape), np.float32) if c0 is None else c0,
        }
        names = ["output", "hn", "cn"]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def random_input(self, rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
        return rng.standard_normal((batch, steps, self.input_size), dtype=np.float32)


@contextmanager
def running_server(bundle: Path, **overrides: object) -> Iterator[str]:
    """Serve ``bundle`` with uvicorn in a thread on a free loopback port; yield ``host:port``."""
    from lstm_deploy_serving.config import ServeOptions
    from lstm_deploy_serving.server import ThreadedServer

    overrides.setdefault("log_level", "warning")
    options = ServeOptions(bundle=bundle, host="127.0.0.1", port=0, **overrides)  # type: ignore[arg-type]
    with ThreadedServer(options) as server:
        yield f"127.0.0.1:{server.port}"


@contextmanager
def running_servers(bundle: Path, **overrides: object) -> Iterator[tuple[str, str]]:
    """``running_server`` with its gRPC server too; yield the HTTP and the gRPC ``host:port``."""
    from lstm_deploy_serving.config import ServeOptions
    from lstm_deploy_serving.server import ThreadedServer

    overrides.setdefault("log_level", "warning")
    options = ServeOptions(bundle=bundle, host="127.0.0.1", port=0, **overrides)  # type: ignore[arg-type]
    with ThreadedServer(options) as server:
        assert server.grpc_port, "the gRPC server did not start"
        yield f"127.0.0.1:{server.port}", f"127.0.0.1:{server.grpc_port}"


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples by metric name."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def perf_analyzer_exe() -> Path:
    """perf_analyzer: $LSTM_DEPLOY_PERF_ANALYZER, else scripts/setup_perf_analyzer.sh's wrapper in
    .venv-perf-analyzer; without it a skip saying how to install it, and a failure on CI (CI=true),
    whose .ci/run installs it."""
    import os

    import pytest
    from lstm_deploy_serving.perf_analyzer import ENV

    root = Path(__file__).resolve().parents[1]
    exe = Path(os.environ.get(ENV) or root / ".venv-perf-analyzer" / "perf_analyzer")
    if not exe.is_file():
        message = f"no perf_analyzer at {exe}: run scripts/setup_perf_analyzer.sh (or set {ENV})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def triton_python() -> Path:
    """The Python of the Triton venv (scripts/setup_triton_venv.sh's .venv-triton, or
    $LSTM_DEPLOY_TRITON_PYTHON); without it a skip saying how to create it, and a failure on CI
    (CI=true), which installs it. Where the platform cannot run Triton's wheel: a skip."""
    import os

    import pytest
    from lstm_deploy_export.tools.triton_env import ENV_PYTHON, TritonSetupError, check_platform

    try:
        check_platform()
    except TritonSetupError as e:
        pytest.skip(str(e))
    root = Path(__file__).resolve().parents[1]
    python = Path(os.environ.get(ENV_PYTHON) or root / ".venv-triton" / "bin" / "python")
    if not python.is_file():
        message = (
            f"no Triton venv at {python}: run scripts/setup_triton_venv.sh "
            f"(or set {ENV_PYTHON} to the Python of an environment with lstm-deploy[triton])"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python
