"""The HTTP app: KServe v2 routes that parse, delegate to the service, and format errors.

Routes hold no logic: they read the request (bounded body, optional gzip/deflate), call the
service, and write what it returns. One handler turns every ``ServingError`` into Triton's
``{"error": "..."}`` with the error's status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import api_key_middleware
from .codecpool import Busy, RawBody
from .errors import BadRequest, PayloadTooLarge, ServingError, Unavailable
from .protocol import HEADER_LENGTH, JSON_CONTENT_TYPE, error_body
from .service import InferenceService

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, media_type=JSON_CONTENT_TYPE)


def _error(message: str, status: int) -> Response:
    return Response(error_body(message), status, media_type=JSON_CONTENT_TYPE)


async def _serving_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    response = _error(exc.message, exc.status)
    if isinstance(exc, Busy):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.detail, exc.status_code)


async def read_body(request: Request, limit: int) -> RawBody:
    """The request body as received, refused with 413 as soon as it passes ``limit`` bytes.

    Neither joined nor decompressed here: the codec pool does both, off the event loop when the
    body is large (joining 64 MB alone stops the loop for 40-400 ms).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    encoding = request.headers.get("content-encoding", "identity").lower()
    return RawBody(chunks, size, encoding, limit)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got '{value}'") from None


def create_app(service: InferenceService) -> Starlette:
    """The ASGI app serving ``service``; its lifespan starts and stops the service."""

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

    async def infer(request: Request) -> Response:
        check_model(request)
        header_length = _header_length(request)
        body = await read_body(request, service.options.max_body_bytes)
        model = request.path_params["model"]
        content, headers = await service.infer_body(body, header_length, model)
        return Response(content, 200, headers=headers)

    async def statistics(request: Request) -> Response:
        params = request.path_params
        return _json(service.model_statistics(params.get("model"), params.get("version")))

    async def metrics(request: Request) -> Response:
        return Response(service.render_metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # A fault outside the service's own accounting (reading the body, say): Triton's JSON
        # all the same, and a failed inference request in the metrics.
        if request.url.path.endswith("/infer"):
            service.stats.record_failure(0)
        return _error(f"internal error: {type(exc).__name__}", 500)

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
        *model_route("/infer", infer, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=api_key_middleware(service.options.api_key),
        exception_handlers={
            ServingError: _serving_error,
            HTTPException: _http_error,
            Exception: internal_error,
        },
    )
