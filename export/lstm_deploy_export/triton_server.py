"""Serve a bundle's Triton repository on a real Triton Inference Server, on loopback.

Starts the `tritonserver` that the nvidia-pytriton wheel bundles (the [triton] extra) on the
bundle's triton/ repository, unchanged, in explicit model-control mode: it loads the
python-backend models lstm_python (dynamic batching) and lstm_python_stateful (sequence
batching), which run model.onnx with ONNX Runtime. That wheel has the python backend but no
onnxruntime or libtorch backend: serve lstm_onnx and lstm_torchscript with NVIDIA's Triton
container or KServe (README.md, "Scale out on Triton / KServe").

The server's Python environment needs nvidia-pytriton (with numpy<2) and onnxruntime:
  python3 -m venv .venv-triton && .venv-triton/bin/pip install -e '.[triton]'
(scripts/setup_triton_venv.sh does this). The command runs Triton from the environment of
--python (default: $LSTM_DEPLOY_TRITON_PYTHON, else this Python), so another environment can
start it. Linux with glibc >= 2.35 only (the wheel's platform).

examples:
  lstm-deploy triton ./bundle --port 8000        # HTTP 8000, gRPC 8001, metrics 8002
  lstm-deploy triton ./bundle --python .venv-triton/bin/python
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lstm_deploy_export._triton_env import (
    ENV_PYTHON,
    TritonEnvironment,
    TritonSetupError,
)

SERVED_MODELS = ("lstm_python", "lstm_python_stateful")
OUTPUT_NAMES = ("output", "hn", "cn")
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# -- the repository --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_repository(bundle: str | Path, models: Iterable[str] = SERVED_MODELS) -> Path:
    """The bundle's triton/ directory, once every file of `models` matches the manifest."""
    root = Path(bundle)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise TritonSetupError(f"{root} is not a bundle (manifest.json: {e})") from None
    files = manifest.get("files", {})
    for model in models:
        if model not in manifest.get("triton", {}):
            raise TritonSetupError(
                f"{root} has no Triton model {model}: re-export it with this lstm-deploy "
                "(with the onnx artifact, which the python-backend models run)"
            )
        prefix = f"triton/{model}/"
        for name, entry in files.items():
            if name.startswith(prefix) and (
                not (root / name).is_file() or _sha256(root / name) != entry["sha256"]
            ):
                raise TritonSetupError(f"{root / name} does not match the manifest's sha256")
    return root / "triton"


# -- the server process ----------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL (Linux).

    tritonserver runs in its own process group (so that stopping it reaches its stubs); this
    keeps it from outliving a killed test run or CLI. Resolved before the fork, called after.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return arm


# Straight to the loopback server, whatever http_proxy says.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """A tritonserver child process serving `repository`; ready once `start` returns.

    Args:
        repository: a Triton model repository (a bundle's triton/).
        models: the models to load (explicit model control: the others are not touched).
        python: the Python whose environment has nvidia-pytriton (see `TritonEnvironment.find`).
        host: the address of all three endpoints (HTTP, gRPC, metrics).
        http_port, grpc_port, metrics_port: 0 picks a free port.
        exit_timeout_s: on stop, how long Triton waits for in-flight requests (and for open
            keep-alive connections: close clients first).
        log: a file for Triton's log (appended to); None: a temporary one, removed by close.

    Raises (from `start`): TritonSetupError with the log's tail if it exits or is not ready.
    """

    def __init__(
        self,
        repository: str | Path,
        models: Sequence[str] = SERVED_MODELS,
        *,
        python: str | Path | None = None,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        exit_timeout_s: int = 5,
        log_verbose: int = 0,
        log: Path | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.environment = TritonEnvironment.find(python)
        self.repository = Path(repository).resolve()
        self.models = list(models)
        self.host = host
        self._ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.start_timeout_s = start_timeout_s
        self._workdir = Path(tempfile.mkdtemp(prefix="lstm-deploy-triton-"))
        self.log = log if log is not None else self._workdir / "tritonserver.log"
        self._shm_prefix = f"lstm_deploy_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    def _backends(self) -> Path:
        # The python backend looks for its stub beside itself; the wheel keeps one stub per
        # Python version elsewhere, so the backend directory is assembled from links.
        backend = self._workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        env = self.environment
        for source in (*env.python_backend.iterdir(), env.stub):
            target = backend / source.name
            if source.is_file() and not target.exists():
                target.symlink_to(source)
        return backend.parent

    def command(self) -> list[str]:
        h = self.host
        args = [
            str(self.environment.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends()}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--http-address={h}",
            f"--http-port={self.http_port}",
            f"--grpc-address={h}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={h}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # Unique shared-memory names: several servers may run on one machine.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        return args

    def start(self) -> TritonServer:
        attempts = 3 if not any(self._ports) else 1
        for attempt in range(attempts):
            ports = [p or _free_port(self.host) for p in self._ports]
            self.http_port, self.grpc_port, self.metrics_port = ports
            try:
                self._launch()
                return self
            except TritonSetupError as e:
                self.stop()
                # A free port picked here can be taken before Triton binds it: pick again.
                if attempt + 1 == attempts or "already in use" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        output = self.log.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment.process_env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the stubs are stopped with it
                preexec_fn=_parent_death_signal(),
            )
        finally:
            output.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonSetupError(
                    f"tritonserver exited with {self.process.returncode} while starting:\n"
                    + self.log_tail()
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise TritonSetupError(
            f"tritonserver was not ready after {self.start_timeout_s:.0f} s:\n" + self.log_tail()
        )

    def ready(self) -> bool:
        try:
            with _direct.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus samples, keyed by metric name and labels as written."""
        with _direct.open(f"http://{self.metrics_url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM (Triton drains, up to exit_timeout_s), then SIGKILL what is left of the group."""
        code = None
        if self.process is not None:
            proc, self.process = self.process, None
            if proc.poll() is None:
                proc.terminate()
            try:
                code = proc.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            # The stubs leave by themselves once their parent is gone; make sure of it.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, 0)  # is any process of the group left?
                except ProcessLookupError:
                    break
                os.killpg(proc.pid, sig)
                time.sleep(0.5)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)
        return code

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- clients ---------------------------------------------------------------------------------


def infer(
    client: Any,
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = OUTPUT_NAMES,
    binary: bool = True,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """One request with a `tritonclient.http` or `tritonclient.grpc` client.

    Args:
        inputs: by signature name; any of `lengths`, `h0`, `c0` may be left out.
        binary: over HTTP, the binary tensor extension (else JSON) for inputs and outputs;
            gRPC is always binary.
        kwargs: for `client.infer`, e.g. `sequence_id`, `sequence_start`, `sequence_end`.
    """
    grpc = type(client).__module__.startswith("tritonclient.grpc")
    if grpc:
        import tritonclient.grpc as api
    else:
        import tritonclient.http as api
    wire = []
    for name, value in inputs.items():
        # lengths goes as [batch, 1]: the Triton configs declare it as dims [1], reshaped away.
        array = value.reshape(-1, 1) if name == "lengths" else value
        array = np.ascontiguousarray(array)
        tensor = api.InferInput(name, list(array.shape), "INT64" if name == "lengths" else "FP32")
        if grpc:
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=binary)
        wire.append(tensor)
    if grpc:
        requested = [api.InferRequestedOutput(n) for n in outputs]
    else:
        requested = [api.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    result = client.infer(model, wire, outputs=requested, **kwargs)
    return {name: result.as_numpy(name) for name in outputs}


# -- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a bundle directory written by lstm-deploy")
    parser.add_argument(
        "--port", type=int, default=8000, help="HTTP port (default 8000; 0: a free one)"
    )
    parser.add_argument("--grpc-port", type=int, default=None, help="default: --port + 1")
    parser.add_argument("--metrics-port", type=int, default=None, help="default: --port + 2")
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help=f"the Python of the [triton] environment (default: ${ENV_PYTHON}, else this one)",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        help=f"a model to load (repeatable; default: {', '.join(SERVED_MODELS)})",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose")
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        help="keep Triton's log in this file (default: a temp file)",
    )


def main(args: argparse.Namespace) -> int:
    models = args.models or list(SERVED_MODELS)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the server as Ctrl-C does
    try:
        server = TritonServer(
            check_repository(args.bundle, models),
            models,
            python=args.python,
            http_port=args.port,
            grpc_port=_next_port(args.port, args.grpc_port, 1),
            metrics_port=_next_port(args.port, args.metrics_port, 2),
            log_verbose=args.log_verbose,
            log=args.log,
        )
        with server:
            print(
                f"Triton serving {', '.join(models)} from {server.repository}\n"
                f"  HTTP    http://{server.http_url}\n"
                f"  gRPC    {server.grpc_url}\n"
                f"  metrics http://{server.metrics_url}/metrics\n"
                f"  log     {server.log}",
                flush=True,
            )
            code = server.wait()
            print(f"tritonserver exited with {code}:\n{server.log_tail()}", file=sys.stderr)
            return EXIT_FAIL
    except TritonSetupError as e:
        print(f"lstm-deploy triton: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stopped Triton", file=sys.stderr)
        return EXIT_OK


def _next_port(http_port: int, port: int | None, offset: int) -> int:
    if port is not None:
        return port
    return http_port + offset if http_port else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
