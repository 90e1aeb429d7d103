"""The HTTP app: KServe v2 routes that parse, delegate to the service, and format errors.

Routes hold no logic: they read the request (bounded body, optional gzip/deflate), call the
service, and write what it returns. Every ``ServingError`` becomes Triton's
``{"error": "..."}`` with the error's status.

``POST .../infer``, the one route under load, is a plain ASGI callable (``InferRoute``) that the
app reaches before Starlette: Starlette's middleware, router, request and response objects cost
about a quarter of the event loop's time per request (perf_analyzer, 16 clients: 2,400-2,600 ->
3,400 infer/s without them). The other routes are Starlette's.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import ApiKeyAuth
from .codecpool import Busy, RawBody
from .errors import BadRequest, PayloadTooLarge, ServerFault, ServingError, Unavailable
from .protocol import HEADER_LENGTH, JSON_CONTENT_TYPE, error_body
from .service import InferenceService

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Starlette's {model} and {version}: one path segment each.
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as ASGI gives header names


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, media_type=JSON_CONTENT_TYPE)


def _error(message: str, status: int) -> Response:
    return Response(error_body(message), status, media_type=JSON_CONTENT_TYPE)


def _error_parts(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    """Triton's JSON error for ``exc``: status, body and headers (``Retry-After`` when busy).
    Anything but a ServingError is a fault of ours: 500, naming only its type."""
    if not isinstance(exc, ServingError):
        exc = ServerFault(f"internal error: {type(exc).__name__}")
    headers = {"Content-Type": JSON_CONTENT_TYPE}
    if isinstance(exc, Busy):
        headers["Retry-After"] = str(exc.retry_after_s)
    return exc.status, error_body(exc.message), headers


async def _error_response(request: Request, exc: Exception) -> Response:
    status, body, headers = _error_parts(exc)
    return Response(body, status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.detail, exc.status_code)


class ClientGone(Exception):
    """The client disconnected before its request body had arrived."""


async def read_body(headers: dict[bytes, bytes], receive: Any, limit: int) -> RawBody:
    """The request body as received (ASGI ``receive``), refused with 413 as soon as it passes
    ``limit`` bytes.

    Neither joined nor decompressed here: the codec pool does both, off the event loop when the
    body is large (joining 64 MB alone stops the loop for 40-400 ms).
    """
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit}")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        if chunk:
            chunks.append(bytes(chunk))
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").lower()
    return RawBody(chunks, size, encoding, limit)


def _header_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(_HEADER_LENGTH_KEY)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        text = value.decode("latin-1")
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got '{text}'") from None


class InferRoute:
    """``POST /v2/models/{model}[/versions/{version}]/infer`` as a plain ASGI callable: the
    service's answer, or Triton's JSON error with its status (``Retry-After`` when busy)."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, match: Any) -> None:
        service = self.service
        try:
            model, version = match.groups()
            service.check_model(model, version)
            request_headers = dict(scope["headers"])
            header_length = _header_length(request_headers)
            body = await read_body(request_headers, receive, service.options.max_body_bytes)
            content, extra = await service.infer_body(body, header_length, model)
            status = 200
        except ClientGone:
            service.stats.record_failure(0)
            return
        except ServingError as e:
            status, content, extra = _error_parts(e)
        except Exception as e:  # a fault outside the service's accounting (reading the body)
            service.stats.record_failure(0)
            status, content, extra = _error_parts(e)
        headers = [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        headers.append((b"content-length", b"%d" % len(content)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


class App:
    """The server's ASGI app: inference requests to ``InferRoute``, all else to Starlette."""

    def __init__(self, infer: InferRoute, routes: Starlette) -> None:
        self.infer, self.routes = infer, routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self.infer(scope, receive, send, match)
                return
        await self.routes(scope, receive, send)


async def _post_only(request: Request) -> Response:
    raise AssertionError("POST .../infer is InferRoute's")  # pragma: no cover


def create_app(service: InferenceService) -> Any:
    """The ASGI app serving ``service``; its lifespan starts and stops the service, and with an
    API key set every route but health answers 401 without it."""

    def model_route(
        path: str, endpoint: Callable[[Request], Awaitable[Response]], **kw: Any
    ) -> list[Route]:
        base = "/v2/models/{model}"
        return [
            Route(base + path, endpoint, **kw),
            Route(base + "/versions/{version}" + path, endpoint, **kw),
        ]

    def check_model(request: Request) -> None:
        service.check_model(request.path_params["model"], request.path_params.get("version"))

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        if not service.ready:
            raise Unavailable("the server is not ready")
        return Response(status_code=200)

    async def server_metadata(request: Request) -> Response:
        return _json(service.server_metadata())

    async def model_metadata(request: Request) -> Response:
        check_model(request)
        return _json(service.model_metadata(request.path_params["model"]))

    async def model_ready(request: Request) -> Response:
        check_model(request)
        if not service.ready:
            raise Unavailable(f"model '{request.path_params['model']}' is not ready")
        return Response(status_code=200)

    async def model_config(request: Request) -> Response:
        check_model(request)
        return _json(service.model_config(request.path_params["model"]))

    async def statistics(request: Request) -> Response:
        params = request.path_params
        return _json(service.model_statistics(params.get("model"), params.get("version")))

    async def metrics(request: Request) -> Response:
        return Response(service.render_metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        # Before /v2/models/{model}: "stats" is the statistics of every model, not a model.
        Route("/v2/models/stats", statistics),
        *model_route("/stats", statistics),
        *model_route("", model_metadata),
        *model_route("/ready", model_ready),
        *model_route("/config", model_config),
        # Only other methods get here (405): POST is InferRoute's.
        *model_route("/infer", _post_only, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    app = App(
        InferRoute(service),
        Starlette(
            routes=routes,
            lifespan=lifespan,
            exception_handlers={
                ServingError: _error_response,
                HTTPException: _http_error,
                Exception: _error_response,
            },
        ),
    )
    key = service.options.api_key
    return app if key is None else ApiKeyAuth(app, key)
