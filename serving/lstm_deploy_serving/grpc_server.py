"""The gRPC edge: KServe v2's ``inference.GRPCInferenceService``, as Triton serves it.

A thin front over the same ``InferenceService`` as the HTTP app, on the same event loop
(``grpc.aio``): same batcher, sequences, limits, statistics and API key (metadata
``authorization: Bearer KEY``; ServerLive and ServerReady stay open, as ``/v2/health/*``). Errors
carry the gRPC status Triton gives them (``grpc_codec.STATUS_CODES``). Methods this server has no
use for (repository, shared memory, trace, log settings) answer UNIMPLEMENTED.

``ModelStreamInfer`` runs each request of a stream as it arrives and writes one response per
request, in completion order; the chunks of one sequence run in the order sent. A failed request
answers ``ModelStreamInferResponse.error_message`` and the stream stays open, as Triton's.
On drain new calls get UNAVAILABLE; streams stop reading, finish the requests they hold, and end
with UNAVAILABLE so that a client knows anything it sent later was not run; once no call is in
flight, the port closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2 as pb

from . import grpc_codec
from .auth import bearer_matches
from .config import GRPC_ANNOUNCE, ServeOptions
from .connections import FrontEndError
from .errors import NotFound, ServingError
from .protocol import HeaderCache, InferRequest, InferResponse, RequestHeader
from .service import InferenceService

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
OPEN_METHODS = {f"/{SERVICE.full_name}/{m}" for m in ("ServerLive", "ServerReady")}
# Room in a response beyond --max-response-bytes of tensor data: names, shapes, framing.
RESPONSE_SLACK_BYTES = 1 << 20
# Once the calls in flight are done, how long the refusals being written get to finish.
REFUSING_GRACE_S = 0.5
logger = logging.getLogger(__name__)

R = TypeVar("R")


async def _answer(context: grpc.aio.ServicerContext, call: Awaitable[R]) -> R:
    """``call``'s result, or the RPC aborted with the status Triton gives its error."""
    try:
        return await call
    except ServingError as e:
        await context.abort(grpc_codec.status_code(e), e.message)
    except Exception as e:  # a fault of ours: INTERNAL, logged (infer counted it already)
        logger.exception("gRPC request failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
    raise AssertionError("context.abort returns only by raising")


class Servicer:
    """The RPCs, each a few lines over the service; the HTTP app's twin."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.draining = False
        self.streams: set[asyncio.Task[None]] = set()  # each open stream's reader
        self.idle = asyncio.Event()  # no inference call in flight
        self.idle.set()
        self._calls = 0
        self._headers: HeaderCache[RequestHeader] = HeaderCache()  # by grpc_codec.header_key

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self._calls += 1
        self.idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self.idle.set()

    def _ready(self) -> bool:
        return self.service.ready and not self.draining

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        # As Triton: an unknown model is not ready, not an error.
        try:
            self.service.check_model(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        metadata = self.service.server_metadata()
        return grpc_codec.from_json(metadata, pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return await _answer(context, self._model_metadata(request))

    async def _model_metadata(self, request: Any) -> Any:
        self.service.check_model(request.name, request.version)
        metadata = self.service.model_metadata(request.name)
        return grpc_codec.from_json(metadata, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return await _answer(context, self._model_config(request))

    async def _model_config(self, request: Any) -> pb.ModelConfigResponse:
        self.service.check_model(request.name, request.version)
        return grpc_codec.model_config(self.service.model_config(request.name))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        return await _answer(context, self._statistics(request))

    async def _statistics(self, request: Any) -> Any:
        stats = self.service.model_statistics(request.name or None, request.version or None)
        return grpc_codec.from_json(stats, pb.ModelStatisticsResponse())

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        with self._in_flight():
            return await _answer(context, self.infer(request))

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One request through the service, as HTTP's ``infer`` route does it."""
        service = self.service
        service.check_model(request.model_name, request.model_version)

        async def decode(check: Callable[[RequestHeader], None]) -> InferRequest:
            head = self._checked_header(request, check)
            if grpc_codec.typed_values(request) <= grpc_codec.INLINE_TYPED_VALUES:
                return grpc_codec.decode_inputs(request, head)
            return await service.codec_pool.run_or_refuse(grpc_codec.decode_inputs, request, head)

        async def encode(response: InferResponse) -> pb.ModelInferResponse:
            return grpc_codec.encode_response(response)

        return await service.infer(decode, encode, request.model_name)

    def _checked_header(
        self, request: pb.ModelInferRequest, check: Callable[[RequestHeader], None]
    ) -> RequestHeader:
        """``read_header``, then ``check``: once per distinct header, as HTTP's ``HeaderCache``
        (perf_analyzer, and a service calling one model, send the same header again and again).
        The header is shared between the requests that send it, never changed."""
        key = grpc_codec.header_key(request)
        cached = self._headers.get(key) if key is not None else None
        if cached is not None:
            return cached
        head = grpc_codec.read_header(request, self.service.spec.output_specs)
        check(head)
        if key is not None:
            self._headers.put(key, head)
        return head

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        stream = _Stream(self, self.service.options.max_queue_size)
        reader = asyncio.get_running_loop().create_task(stream.read(requests))
        self.streams.add(reader)
        reader.add_done_callback(self.streams.discard)
        with self._in_flight():
            try:
                while (response := await stream.responses.get()) is not None:
                    yield response
                    stream.slots.release()
            finally:
                reader.cancel()
        if stream.drained:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down: this stream's requests in flight were answered, "
                "any sent after them were not run",
            )


class _Stream:
    """One ``ModelStreamInfer`` call: reads requests, runs them, queues their responses.

    At most ``limit`` requests are held (running, or answered and not yet written): past that
    the reader stops reading, and gRPC's flow control holds the client back.
    """

    def __init__(self, servicer: Servicer, limit: int) -> None:
        self.servicer = servicer
        self.responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(limit)
        self.drained = False
        self._running: set[asyncio.Task[None]] = set()
        self._last: dict[Hashable, asyncio.Task[None]] = {}  # per sequence: its latest chunk

    async def read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        """Run every request until the client closes its side (or the drain stops reading),
        then let those running finish, then end the responses."""
        loop = asyncio.get_running_loop()
        try:
            async for request in requests:
                await self.slots.acquire()
                key = self._sequence_key(request)
                task = loop.create_task(self._run(request, self._last.get(key)))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                if key is not None:
                    self._last[key] = task
                    task.add_done_callback(functools.partial(self._forget, key))
        except asyncio.CancelledError:
            if not self.servicer.draining:  # the client went away: nobody to answer
                for task in self._running:
                    task.cancel()
                raise
            self.drained = True
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # the drain's cancel stopped the reading, not the stream
        if self._running:
            await asyncio.wait(set(self._running))
        self.responses.put_nowait(None)

    @staticmethod
    def _sequence_key(request: pb.ModelInferRequest) -> Hashable | None:
        if "sequence_id" not in request.parameters:
            return None
        value = grpc_codec.parameter_values(request.parameters)["sequence_id"]
        return None if value in (0, "", None) else value  # the service's key too, for any alias

    def _forget(self, key: Hashable, task: asyncio.Task[None]) -> None:
        if self._last.get(key) is task:
            del self._last[key]

    async def _run(
        self, request: pb.ModelInferRequest, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:  # the sequence's chunk sent before this one runs first
            await asyncio.wait({previous})
        try:
            answer = pb.ModelStreamInferResponse(infer_response=await self.servicer.infer(request))
        except ServingError as e:
            answer = pb.ModelStreamInferResponse(error_message=e.message)
        except Exception as e:  # a fault of ours: the stream goes on
            logger.exception("gRPC stream request failed")
            message = f"internal error: {type(e).__name__}"
            answer = pb.ModelStreamInferResponse(error_message=message)
        self.responses.put_nowait(answer)


class _ApiKey(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the metadata carries ``authorization: Bearer KEY``; checked before
    the request is deserialized."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        token = value.encode() if isinstance(value, str) else value
        if bearer_matches(token, self._key):
            return handler
        return _denied(bool(handler.request_streaming))


def _denied(streaming: bool) -> grpc.RpcMethodHandler:
    message = "missing or wrong API key: send the metadata 'authorization: Bearer KEY'"

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def _handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The servicer's RPCs, with the messages grpc_service.proto gives each."""
    handlers = {}
    for method in SERVICE.methods:
        call = getattr(servicer, method.name, None)
        if call is None:
            continue
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            call,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _credentials(options: ServeOptions) -> grpc.ServerCredentials | None:
    """TLS with the HTTP server's certificate, if it has one."""
    if options.ssl_certfile is None:
        return None
    try:
        chain = options.ssl_certfile.read_bytes()
        key = options.ssl_keyfile.read_bytes() if options.ssl_keyfile is not None else chain
    except OSError as e:
        raise FrontEndError(f"cannot load the TLS certificate/key for gRPC: {e}") from None
    return grpc.ssl_server_credentials([(key, chain)])


def _check_free(host: str, port: int) -> None:
    """FrontEndError if the port is taken (gRPC would say so only when started, in a log)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FrontEndError(
                f"cannot listen for gRPC on {host}:{port}: {e.strerror or e}; pass --grpc-port, "
                "or --no-grpc to serve HTTP only"
            ) from None


class GrpcServer:
    """The gRPC server as a front end of ``connections.DrainingServer`` (started, drained and
    waited for with the HTTP server). ``port`` is the bound port once started."""

    def __init__(
        self,
        service: InferenceService,
        options: ServeOptions,
        announce: Callable[[str], Any] | None = None,
    ) -> None:
        self.options = options
        self.servicer = Servicer(service)
        # A bad certificate or a taken port fails here, before the HTTP server listens.
        self._credentials = _credentials(options)
        _check_free(*options.grpc_address)
        self._announce = announce
        self._server: grpc.aio.Server | None = None
        self._stopped: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        opts = self.options
        server = grpc.aio.server(
            interceptors=[_ApiKey(opts.api_key)] if opts.api_key is not None else [],
            maximum_concurrent_rpcs=opts.limit_concurrency,
            options=[
                ("grpc.max_receive_message_length", opts.max_body_bytes),
                ("grpc.max_send_message_length", opts.max_response_bytes + RESPONSE_SLACK_BYTES),
                ("grpc.so_reuseport", 0),  # a port taken by another server is an error
            ],
        )
        server.add_generic_rpc_handlers((_handlers(self.servicer),))
        host, port = opts.grpc_address
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self._credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self._credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise FrontEndError(
                f"cannot listen for gRPC on {address} (is the port taken?): pass --grpc-port, "
                "or --no-grpc to serve HTTP only"
            )
        await server.start()
        self._server = server
        if self._announce is not None:
            tls = " (TLS)" if self._credentials is not None else ""
            self._announce(f"{GRPC_ANNOUNCE} {address.rsplit(':', 1)[0]}:{self.port}{tls}")

    def drain(self, grace_s: float) -> None:
        if self._server is None or self._stopped is not None:
            return
        self.servicer.draining = True
        for reader in list(self.servicer.streams):
            reader.cancel()  # stops reading; its requests in flight still finish
        self._stopped = asyncio.get_running_loop().create_task(self._stop(self._server, grace_s))

    async def _stop(self, server: grpc.aio.Server, grace_s: float) -> None:
        """Refuse new calls with UNAVAILABLE (as Triton does while it exits) until those in
        flight are done, then close the port.

        Stopping gRPC's server at once would cancel the calls that had reached it and not yet
        its handlers: their clients would get CANCELLED, and could not tell if they ran.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.servicer.idle.wait(), grace_s)
        await server.stop(max(0.0, min(REFUSING_GRACE_S, deadline - loop.time())))

    async def wait_drained(self) -> None:
        if self._stopped is not None:
            await self._stopped


__all__ = ["GrpcServer", "Servicer"]
