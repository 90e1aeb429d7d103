"""Connection-level behaviour on top of uvicorn's httptools protocol: limits, timeouts, the drain.

uvicorn gives a keep-alive timeout and a ``server`` header switch. This module adds what it lacks:

- a header timeout: a request's headers must be complete within ``header_timeout_s`` of its first
  byte (of the connection, for a new one), else the connection is closed (slowloris);
- a header size limit, counted as the parser reads the header, whatever the reads' sizes: 431
  with ``Connection: close``, before the header is complete;
- a concurrency limit answered as every other error, Triton's ``{"error": "..."}`` with 503;
- a drain that loses no keep-alive request (``DrainingServer``): see its docstring.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import JSON_CONTENT_TYPE, error_body

logger = logging.getLogger("uvicorn.error")

# On SIGTERM an idle keep-alive connection stays open this long (at most its keep-alive timeout):
# a client between two requests sends its next one within it and gets 503 with Connection: close
# instead of writing into a socket closed under it. A connection idle longer is closed, with the
# same race that every keep-alive timeout has (RFC 9112, section 9.6).
DRAIN_IDLE_GRACE_S = 1.0

_CLOSE = (b"connection", b"close")

Scope = dict[str, Any]
Receive = Any
Send = Any


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a header size limit (431) and
    ``drain``. (httptools, not h11: the C parser costs a fraction of h11's per request.)"""

    header_timeout_s: float = 10.0  # set per server by ``protocol_class``
    max_header_bytes: int = 16384  # likewise
    _header_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _in_header = False  # a request has begun and its header is not complete yet
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # httptools' callbacks: count the header's bytes as they arrive, whatever the reads' sizes.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes, self._in_header = 0, True
        if self._header_timer is None:  # the first byte of the next request on a kept-alive one
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_header = False
        self._cancel_timers()
        super().on_headers_complete()

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            self._too_large = True
            raise ValueError("request header too large")  # httptools: HttpParserCallbackError

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._drain_timer = None

    def _idle(self) -> bool:
        return not self._in_header and (self.cycle is None or self.cycle.response_complete)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if (self._in_header or self.cycle is None) and not self.transport.is_closing():
            logger.debug(
                "closing a connection: no complete request header within %ss", self.header_timeout_s
            )
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parse error with 400; a header over the limit gets its own 431.
        if not self._too_large:
            super().send_400_response(msg)
            return
        body = error_body("the request header is too large")
        head = b"".join(b"%s: %s\r\n" % h for h in [*_json_headers(body), _CLOSE])
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n" + head + b"\r\n" + body
        )
        self.transport.close()

    def drain(self, grace_s: float) -> None:
        """Close once idle: a request in progress finishes first (its response says
        ``Connection: close``); an idle connection gets ``grace_s`` to send one more request."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif self._drain_timer is None:
            self._drain_timer = self.loop.call_later(grace_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._drain_timer = None
        # A request that has begun is bounded by the header timeout, or answered with a close.
        if self._idle():
            self.shutdown()

    def abort(self) -> None:
        self.transport.abort()


def protocol_class(header_timeout_s: float, max_header_bytes: int) -> type[LimitedProtocol]:
    """The protocol class uvicorn instantiates per connection, with this server's limits."""
    limits = {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes}
    return type("LimitedProtocol", (LimitedProtocol,), limits)


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", JSON_CONTENT_TYPE.encode()), (b"content-length", b"%d" % len(body))]


async def _refuse(send: Send, status: int, message: str) -> None:
    body = error_body(message)
    headers = [*_json_headers(body), _CLOSE]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header_bytes(scope: Scope) -> int:
    line = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


class Gate:
    """ASGI middleware in front of the app: header size, concurrency, and the drain.

    While draining every new request is refused with 503 before it reaches the app (so readiness
    answers 503 at once), and every response says ``Connection: close``.
    """

    def __init__(
        self, app: Any, max_header_bytes: int, limit_concurrency: int | None = None
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.limit_concurrency = limit_concurrency
        self.draining = False
        self.state: Any = None  # uvicorn's ServerState (connections, tasks), set by the server

    def _over_limit(self) -> bool:
        limit, state = self.limit_concurrency, self.state
        if limit is None or state is None:
            return False
        # Both sets include this request's connection and task.
        return len(state.connections) > limit or len(state.tasks) > limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await _refuse(send, 503, "the server is shutting down")
            return
        if _header_bytes(scope) > self.max_header_bytes:
            await _refuse(send, 431, "the request header is too large")
            return
        if self._over_limit():
            logger.warning(
                "refused a request: over the concurrency limit of %d", self.limit_concurrency
            )
            await _refuse(send, 503, "the server is at its concurrency limit, retry later")
            return

        async def send_closing_when_draining(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self.draining:
                message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing_when_draining)


class FrontEndError(Exception):
    """Another front end (gRPC) cannot start; the message says why and what to do."""


class FrontEnd(Protocol):
    """Another front end on the HTTP server's event loop (the gRPC server): started before it,
    drained with it, finished before the app's lifespan stops the service."""

    port: int  # the port it listens on, once started

    async def start(self) -> None: ...

    def drain(self, grace_s: float) -> None:
        """Accept no new work; finish what is in flight within ``grace_s``."""

    async def wait_drained(self) -> None: ...


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain that keep-alive clients survive.

    On SIGTERM/SIGINT the gate starts refusing new requests at once (503, ``Connection: close``);
    then the listening socket closes (new connections are refused), requests in progress finish
    and their responses say ``Connection: close``, idle connections get ``DRAIN_IDLE_GRACE_S`` to
    send one more request (answered 503 with a close) before they are closed. After
    ``drain_timeout_s`` what is left is cancelled and closed; then the app's lifespan shuts down.
    uvicorn's own shutdown closes idle keep-alive connections at once: a client that had just
    sent its next request on one lost it (reset, broken pipe). Other front ends (``others``: the
    gRPC server) start before it, begin their drain with it, and are waited for before the
    lifespan stops the service.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        gate: Gate,
        drain_timeout_s: float,
        others: Sequence[FrontEnd] = (),
    ) -> None:
        super().__init__(config)
        self.gate = gate
        self.others = tuple(others)
        gate.state = self.server_state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[socket.socket] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._sockets = asyncio.get_running_loop(), list(sockets or [])
        for other in self.others:
            await other.start()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self.started:  # now, not at the main loop's next tick
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        """Refuse new requests and close the listening sockets in one step: a client that gets
        a ``Connection: close`` then finds the port closed, never a connection accepted by the
        kernel that closing the socket would reset (with its request in it)."""
        if self.gate.draining:
            return
        self.gate.draining = True
        for other in self.others:
            other.drain(self.drain_timeout_s)
        for server in self.servers:
            server.close()
        for sock in self._sockets:
            sock.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        self._start_drain()
        state = self.server_state
        grace = min(DRAIN_IDLE_GRACE_S, float(self.config.timeout_keep_alive))
        for connection in list(state.connections):
            if isinstance(connection, LimitedProtocol):
                connection.drain(grace)
            else:
                connection.shutdown()
        while (state.connections or state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                logger.error(
                    "drain timeout (%ss): closing %d connection(s), cancelling %d request(s)",
                    self.drain_timeout_s,
                    len(state.connections),
                    len(state.tasks),
                )
                for task in list(state.tasks):
                    task.cancel()
                for connection in list(state.connections):
                    if isinstance(connection, LimitedProtocol):
                        connection.abort()
                break
            await asyncio.sleep(0.02)
        if not self.force_exit:
            # Each front end bounds its own drain by the same timeout.
            await asyncio.gather(*(other.wait_drained() for other in self.others))
            await self.lifespan.shutdown()


__all__ = [
    "DRAIN_IDLE_GRACE_S",
    "DrainingServer",
    "FrontEnd",
    "FrontEndError",
    "Gate",
    "LimitedProtocol",
    "protocol_class",
]
