"""A real Triton Inference Server on a bundle's Triton repository, on loopback, and a client call.

`TritonServer` starts the `tritonserver` that the nvidia-pytriton wheel bundles (the [triton]
extra) in explicit model-control mode, on an environment found by `triton_env`; `infer` sends one
request with tritonclient, HTTP or gRPC. The `lstm-deploy triton` command (cli/triton.py) and
validate's Triton row use them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
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

from lstm_deploy.bundle import LSTM_OUTPUTS, TRITON_DIR, Bundle, load_bundle
from lstm_deploy_export.tools.triton_env import TritonEnvironment, TritonSetupError

SERVED_MODELS = ("lstm_python", "lstm_python_stateful")


# -- the repository --------------------------------------------------------------------------


def check_repository(bundle: Bundle | str | Path, models: Iterable[str] = SERVED_MODELS) -> Path:
    """The bundle's triton/ directory, once every file of `models` matches the manifest.

    Raises BundleError (through `load_bundle`) or TritonSetupError for a model not exported.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, only=())  # the schema and paths; the files are checked below
    missing = [m for m in models if m not in bundle.manifest.get("triton", {})]
    if missing:
        raise TritonSetupError(
            f"{bundle.path} has no Triton model {', '.join(missing)}: re-export it with this "
            "lstm-deploy (with the onnx artifact, which the python-backend models run)"
        )
    bundle.verify([f"{TRITON_DIR}/{m}/" for m in models])
    return bundle.path / TRITON_DIR


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
    outputs: Sequence[str] = LSTM_OUTPUTS,
    binary: bool = True,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """One request with a `tritonclient.http` or `tritonclient.grpc` client.

    Args:
        inputs: by signature name; any of `lengths`, `h0`, `c0` may be left out. A [batch]
            tensor goes as [batch, 1]: Triton configs declare it as dims [1], reshaped away.
        binary: over HTTP, the binary tensor extension (else JSON) for inputs and outputs;
            gRPC is always binary.
        kwargs: for `client.infer`, e.g. `sequence_id`, `sequence_start`, `sequence_end`.
    """
    grpc = type(client).__module__.startswith("tritonclient.grpc")
    if grpc:
        import tritonclient.grpc as api
    else:
        import tritonclient.http as api
    from tritonclient.utils import np_to_triton_dtype

    wire = []
    for name, value in inputs.items():
        array = np.ascontiguousarray(value.reshape(-1, 1) if value.ndim == 1 else value)
        tensor = api.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
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
