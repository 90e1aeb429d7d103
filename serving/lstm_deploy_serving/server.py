"""Run the app on uvicorn: in the foreground (``serve``, the CLI) or in a thread (tests, notebooks).

Shutdown is graceful: on SIGTERM or SIGINT uvicorn stops accepting connections, lets in-flight
requests finish (up to ``graceful_timeout_s``), then the app's lifespan runs what is still queued
and stops the batcher; the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn

from .app import create_app
from .config import ANNOUNCE, MODEL_VERSION, ServeOptions
from .service import InferenceService


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it a response's header and body writes stall 40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn(service: InferenceService, options: ServeOptions) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(service),
        log_level=options.log_level,
        access_log=options.access_log,
        timeout_graceful_shutdown=int(options.graceful_timeout_s),
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(options: ServeOptions, announce: Callable[[str], Any] = print) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; the exit code (0 after a clean drain).

    Raises BundleError (before binding any port) if the bundle cannot be served, OSError if
    the address cannot be bound.
    """
    service = InferenceService(options)
    sock = bind_socket(options.host, options.port)
    server = _uvicorn(service, options)
    host, port = sock.getsockname()[:2]
    # uvicorn restores the signal handlers it found and re-raises the signal it stopped on, so
    # that a default handler kills the process (exit -15). A drained server should exit 0:
    # leave it no-op handlers to find.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        models = ", ".join(f"'{n}'" for n in service.names)
        announce(f"{ANNOUNCE} http://{host}:{port} (model {models}, version {MODEL_VERSION})")
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    return 0 if server.started else 1


class ThreadedServer:
    """The server on uvicorn in a background thread, as a context manager::

    with ThreadedServer(ServeOptions(bundle=path, port=0)) as server:
        url = f"127.0.0.1:{server.port}"
    """

    def __init__(self, options: ServeOptions, start_timeout_s: float = 30.0) -> None:
        self.service = InferenceService(options)
        self._sock = bind_socket(options.host, options.port)
        self.port: int = self._sock.getsockname()[1]
        self._server = _uvicorn(self.service, options)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
