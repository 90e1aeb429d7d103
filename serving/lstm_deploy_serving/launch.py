"""Start ``python -m lstm_deploy_serving serve`` as a child process on a free loopback port.

Used by ``loadtest --bundle`` (to compare server configurations) and by tests that need a real
process (SIGTERM). The child binds port 0 and prints its address; nothing races for a port.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from .config import ANNOUNCE, GRPC_ANNOUNCE


class ServerProcess:
    """A server child process, ready once ``__enter__`` returns; SIGTERM on exit.

    Args:
        bundle: the bundle to serve.
        args: extra ``serve`` flags, e.g. ``["--no-dynamic-batching"]``.
        start_timeout_s: how long to wait for the child to listen and be ready.
        env: extra environment variables of the child, e.g. ``LSTM_DEPLOY_API_KEY``.

    ``url`` is ``host:port`` (what tritonclient takes); ``scheme`` is ``http`` or ``https``;
    ``grpc_url`` is the gRPC server's ``host:port`` (empty with ``--no-grpc``).
    """

    def __init__(
        self,
        bundle: str | Path,
        args: list[str] | tuple[str, ...] = (),
        start_timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "lstm_deploy_serving",
            "serve",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "warning",
            *args,
        ]
        self.start_timeout_s = start_timeout_s
        self.env = dict(env or {})
        self.scheme = "http"
        self.lines: list[str] = []
        self.url = ""
        self.grpc_url = ""
        self._announced = threading.Event()
        self._grpc_announced = threading.Event()
        if "--no-grpc" in self.command:
            self._grpc_announced.set()
        self.process: subprocess.Popen[str] | None = None
        self._pump_thread: threading.Thread | None = None

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(ANNOUNCE):
                self.scheme, _, self.url = line[len(ANNOUNCE) :].split()[0].partition("://")
                self._announced.set()
            elif line.startswith(GRPC_ANNOUNCE):
                self.grpc_url = line[len(GRPC_ANNOUNCE) :].split()[0]
                self._grpc_announced.set()

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        announced = (self._announced, self._grpc_announced)
        while not (all(e.is_set() for e in announced) and self._ready()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        context = None
        if self.scheme == "https":
            # Only asks our own child, on loopback, whether it is up: its certificate (often
            # self-signed in tests) is not what this checks.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        url = f"{self.scheme}://{self.url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait: the exit code (0 after a graceful drain)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._close_pipe()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_pipe()

    def _close_pipe(self) -> None:
        # The child is gone: its output ends, the pump thread finishes, the pipe can close.
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()
