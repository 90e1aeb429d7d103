"""Run the app on uvicorn: in the foreground (``serve``, the CLI) or in a thread (tests, notebooks).

Shutdown is a drain (``connections.DrainingServer``): on SIGTERM or SIGINT readiness and every new
request answer 503 at once, new connections are refused, requests in progress finish with
``Connection: close``, keep-alive clients lose no request; after at most ``drain_timeout_s`` the
app's lifespan runs what is still queued and stops the batcher; the process exits 0.

The connection limits (header timeout and size, keep-alive, concurrency), the opt-in TLS and the
absence of a ``server`` header are set here, on uvicorn's httptools protocol (``connections``).
"""

from __future__ import annotations

import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn

from .app import create_app
from .config import ANNOUNCE, MODEL_VERSION, ServeOptions
from .connections import DrainingServer, FrontEnd, FrontEndError, Gate, protocol_class
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


class TLSError(Exception):
    """The TLS certificate or key cannot be loaded."""


def _grpc(
    service: InferenceService, options: ServeOptions, announce: Callable[[str], Any] | None
) -> list[FrontEnd]:
    """The gRPC front end, unless ``options.grpc`` is off; FrontEndError if it cannot be."""
    if not options.grpc:
        return []
    try:
        from .grpc_server import GrpcServer
    except ModuleNotFoundError as e:  # an install without grpcio or tritonclient[grpc]
        package = {"grpc": "grpcio", "google": "protobuf"}.get(str(e.name).split(".")[0], e.name)
        raise FrontEndError(
            f"gRPC needs {package}, which this install lacks: pip install 'lstm-deploy[serving]', "
            "or pass --no-grpc to serve HTTP only"
        ) from None
    return [GrpcServer(service, options, announce)]


def _uvicorn(
    service: InferenceService,
    options: ServeOptions,
    announce: Callable[[str], Any] | None = None,
) -> DrainingServer:
    """The server, loaded (a bad certificate fails here, before any port is bound)."""
    gate = Gate(create_app(service), options.max_header_bytes, options.limit_concurrency)
    config = uvicorn.Config(
        gate,
        # httptools, always: the limits and the drain live on its protocol (connections).
        http=protocol_class(options.header_timeout_s, options.max_header_bytes),
        loop="auto",  # uvloop where installed (the serving extra installs it), else asyncio
        log_level=options.log_level,
        access_log=options.access_log,
        lifespan="on",
        server_header=False,
        timeout_keep_alive=options.keep_alive_timeout_s,
        ssl_certfile=options.ssl_certfile,
        ssl_keyfile=options.ssl_keyfile,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load the TLS certificate/key: {e}") from None
    others = _grpc(service, options, announce)
    return DrainingServer(config, gate, options.drain_timeout_s, others)


def _scheme(options: ServeOptions) -> str:
    return "https" if options.ssl_certfile is not None else "http"


def serve(options: ServeOptions, announce: Callable[[str], Any] = print) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; the exit code (0 after a clean drain).

    Raises BundleError or TLSError (before binding any port) if the bundle or the certificate
    cannot be served, OSError if the address cannot be bound, FrontEndError if the gRPC server
    cannot start.
    """

    def announce_now(line: str) -> None:
        announce(line)
        sys.stdout.flush()

    service = InferenceService(options)
    server = _uvicorn(service, options, announce_now)
    sock = bind_socket(options.host, options.port)
    host, port = sock.getsockname()[:2]
    # uvicorn restores the signal handlers it found and re-raises the signal it stopped on, so
    # that a default handler kills the process (exit -15). A drained server should exit 0:
    # leave it SIG_IGN to find. That stays after a drain: the process is about to exit 0, and a
    # second signal (a supervisor's repeat, a test's terminate) must not make that -15. (A Python
    # function would not do: interpreter shutdown resets those to SIG_DFL, not SIG_IGN.)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        models = ", ".join(f"'{n}'" for n in service.names)
        address = f"{_scheme(options)}://{host}:{port}"
        announce(f"{ANNOUNCE} {address} (model {models}, version {MODEL_VERSION})")
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        if not server.started:
            for s, handler in previous.items():
                signal.signal(s, handler)
        sock.close()
    return 0 if server.started else 1


class ThreadedServer:
    """The server on uvicorn in a background thread, as a context manager::

    with ThreadedServer(ServeOptions(bundle=path, port=0)) as server:
        url = f"127.0.0.1:{server.port}"  # gRPC: server.grpc_port (0 with grpc=False)
    """

    def __init__(self, options: ServeOptions, start_timeout_s: float = 30.0) -> None:
        self.service = InferenceService(options)
        self._server = _uvicorn(self.service, options)
        self._sock = bind_socket(options.host, options.port)
        self.port: int = self._sock.getsockname()[1]
        self.grpc_port = 0  # the gRPC server's, once started
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
        self.grpc_port = next((other.port for other in self._server.others), 0)
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
