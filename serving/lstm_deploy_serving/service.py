"""The served model: checks requests against the signature, keeps sequences, runs the batcher.

Between the wire (``protocol``) and the runtime (``runtime``): the app hands it a body and gets a
body back, the runtime only ever sees complete, valid, batch-first numpy inputs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from contextlib import suppress
from typing import Any, TypeVar

import numpy as np

from lstm_deploy import versions
from lstm_deploy.bundle import BundleError

from . import model_spec
from .codecpool import CodecPool, RawBody
from .config import MODEL_VERSION, ServeOptions
from .errors import BadRequest, NotFound, ServerFault, ServingError, Unavailable
from .metrics import Metrics
from .protocol import (
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestHeader,
)
from .runtime import OnnxModel
from .scheduler import DynamicBatcher
from .sequences import SequenceStore, check_sequence_id, initial_state
from .stats import ModelStats
from .validation import check_header, check_response_size, input_values

SERVER_NAME = "lstm-deploy-serving"
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "sequence",
    "parameters",
    "statistics",
]
UINT64_MAX = 2**64 - 1  # Triton's timeout parameter: uint64 microseconds
T = TypeVar("T")
logger = logging.getLogger(__name__)


def _sequence_parameters(params: dict[str, Any]) -> tuple[Hashable | None, bool, bool]:
    seq_id = check_sequence_id(params.get("sequence_id", 0))
    flags = [params.get(k, False) for k in ("sequence_start", "sequence_end")]
    if not all(isinstance(f, bool) for f in flags):
        raise BadRequest("sequence_start and sequence_end must be booleans")
    if seq_id in (0, ""):
        if any(flags):
            raise BadRequest("sequence_start/sequence_end need a non-zero sequence_id")
        return None, False, False
    return seq_id, flags[0], flags[1]


def _timeout_s(params: dict[str, Any]) -> float | None:
    timeout = params.get("timeout")
    if timeout is None or timeout == 0:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= UINT64_MAX:
        raise BadRequest(
            "the timeout parameter must be a non-negative integer (microseconds, uint64)"
        )
    return timeout / 1e6


class InferenceService:
    """One model, one version, served from a bundle.

    Construction loads the bundle (so a bad bundle fails before any port is bound); ``start``
    and ``stop`` run inside the server's event loop.
    """

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        artifact = options.artifact  # model.onnx or model.int8.onnx: one signature
        self.bundle, self.spec = model_spec.load(options.bundle, artifact)
        path = self.bundle.file(artifact)
        self.model = OnnxModel(path, self.spec, intra_op_threads=options.threads)
        session = self.model.session
        model_spec.check_graph(
            self.spec, session.get_inputs(), session.get_outputs(), self.bundle.path, artifact
        )
        model_spec.check_config(self.spec, self.bundle.path)
        self.name = options.model_name  # the primary name: logs and metrics use it
        self.names = tuple(dict.fromkeys((self.name, *options.model_aliases)))
        self.max_batch_size = (
            options.max_batch_size
            if options.max_batch_size is not None
            else self.spec.max_batch_size
        )
        if self.max_batch_size < 1:
            raise BundleError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        delay = options.max_queue_delay_us
        self.max_queue_delay_us = self.spec.max_queue_delay_us if delay is None else delay
        self.layout = self.spec.layout
        self.metrics = Metrics()
        # Where bodies are decoded and responses encoded: large ones off the event loop.
        self.codec_pool = CodecPool(options.max_codec_requests)
        self.ready = False
        self._batcher: DynamicBatcher | None = None
        self._sequences: SequenceStore | None = None
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        self._batcher = DynamicBatcher(
            self.model.predict,
            self.layout,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_us / 1e6,
            max_queue_size=opts.max_queue_size,
            dynamic=opts.dynamic_batching,
            adaptive=opts.adaptive_window,
            metrics=self.metrics,
        )
        self._batcher.start()
        self._sequences = SequenceStore(
            self.layout.zero_state,
            max_sequences=opts.max_sequences,
            idle_timeout_s=opts.sequence_idle_timeout_s,
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self.ready = True

    async def stop(self) -> None:
        """Not ready any more; run what is queued, then stop."""
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
        if self._batcher is not None:
            await self._batcher.stop()
        self.codec_pool.close()

    async def _sweep(self) -> None:
        """Free idle sequences even when no request comes to trigger it."""
        assert self._sequences is not None
        period = min(1.0, self._sequences.idle_timeout_s / 2)
        while True:
            await asyncio.sleep(period)
            self._sequences.evict_idle()
            self._count_sequences()

    def _count_sequences(self) -> None:
        store = self._sequences
        if store is not None:
            self.metrics.sequences_live = len(store)
            self.metrics.sequences_evicted = store.evicted_idle + store.evicted_cap

    # -- metadata ----------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None = None) -> None:
        if name not in self.names:
            served = ", ".join(f"'{n}'" for n in self.names)
            raise NotFound(f"unknown model '{name}' (this server serves {served})")
        if version not in (None, "", MODEL_VERSION):
            raise NotFound(
                f"unknown version '{version}' of model '{name}' (served: {MODEL_VERSION})"
            )

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": versions.package_version(),
            "extensions": EXTENSIONS,
        }

    def model_metadata(self, name: str | None = None) -> dict[str, Any]:
        """The metadata, under ``name`` (one of ``names``, checked by the caller) if given:
        Triton's, for the config that ``model_config`` serves."""
        return self.spec.metadata(name or self.name, [MODEL_VERSION])

    def model_config(self, name: str | None = None) -> dict[str, Any]:
        """The bundle's Triton config, with the name and batching this server actually uses,
        completed as Triton completes a config it loads."""
        config = copy.deepcopy(self.spec.triton_config)
        config["name"] = name or self.name
        config["max_batch_size"] = self.max_batch_size
        if self.options.dynamic_batching:
            batching = config.setdefault("dynamic_batching", {})
            batching["max_queue_delay_microseconds"] = self.max_queue_delay_us
        else:
            config.pop("dynamic_batching", None)
        return model_spec.complete_config(config)

    @property
    def stats(self) -> ModelStats:
        """The model's statistics: the one record behind /stats, gRPC and /metrics."""
        return self.metrics.stats

    def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Triton's statistics response: ``{"model_stats": [...]}`` for ``name`` (checked here:
        NotFound if it is not served), or without a name for the served model.

        Aliases share one model, so they share its statistics; unnamed, the primary name
        stands for all of them (listing each would count every request once per name).
        """
        if name:
            self.check_model(name, version)
        elif version:
            raise BadRequest("a model version needs a model name")
        return {"model_stats": [self.stats.to_json(name or self.name, MODEL_VERSION)]}

    def render_metrics(self) -> str:
        self._count_sequences()
        return self.metrics.render(self.name, MODEL_VERSION)

    # -- inference ---------------------------------------------------------------------------

    async def infer_body(
        self, body: RawBody | bytes, header_length: int | None, model: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """An HTTP inference body for ``model``: its response body and headers (see ``infer``)."""
        return await self.infer(
            lambda check: self.codec_pool.decode(body, header_length, check),
            self.codec_pool.encode,
            model,
        )

    async def infer(
        self,
        decode: Callable[[Callable[[RequestHeader], None]], Awaitable[InferRequest]],
        encode: Callable[[InferResponse], Awaitable[T]],
        model: str | None = None,
    ) -> T:
        """Decode, run and encode one inference request for ``model`` (one of ``names``, checked
        by the caller; default the primary name), whatever its wire format.

        ``decode(check)`` makes the typed request, calling ``check`` on its header before any
        tensor is decoded; ``encode`` makes the wire response. Every request is counted in the
        statistics, as a success or a failure, with its time.
        """
        start = time.perf_counter_ns()
        try:
            if not self.ready or self._batcher is None:
                raise Unavailable(f"model '{model or self.name}' is not ready")
            with self._batcher.request():  # how many are inside sets the batching window
                request = await decode(self._check_header)
                decoded = time.perf_counter_ns()
                response = await self._infer(request, model)
                ran = time.perf_counter_ns()
                encoded = await encode(response)
        except ServingError:
            self.stats.record_failure(time.perf_counter_ns() - start)
            raise
        except Exception as e:  # a fault of ours, not the client's: 500, counted, logged
            self.stats.record_failure(time.perf_counter_ns() - start)
            logger.exception("inference request failed")
            raise ServerFault(f"internal error: {type(e).__name__}") from e
        end = time.perf_counter_ns()
        self.stats.record_success(end - start, decoded - start, end - ran)
        return encoded

    async def _infer(self, request: InferRequest, model: str | None = None) -> InferResponse:
        """Run a request whose header ``_check_header`` passed when it was decoded."""
        tensors = input_values(request.inputs, self.spec)
        wanted = self._requested_outputs(request)
        seq_id, start, end = _sequence_parameters(request.parameters)
        timeout = _timeout_s(request.parameters)
        if seq_id is None:
            outputs = await self._run(self.layout.fill_defaults(tensors), timeout)
        else:
            outputs = await self._run_sequence(tensors, seq_id, start, end, timeout)
        return InferResponse(
            model or self.name,
            MODEL_VERSION,
            tuple(OutputTensor(name, outputs[name], binary) for name, binary in wanted),
            request.id,
        )

    def _check_header(self, header: RequestHeader) -> None:
        """Refuse a request from its header alone, before its tensors are decoded."""
        sizes = check_header(
            header.inputs,
            self.spec,
            model=self.name,
            max_batch_size=self.max_batch_size,
            max_steps=self.options.max_sequence_length,
        )
        wanted = self._requested_outputs(header)
        check_response_size(sizes, wanted, self.spec, limit=self.options.max_response_bytes)

    def _requested_outputs(self, request: RequestHeader) -> list[tuple[str, bool]]:
        if request.outputs is None:
            return [(name, request.binary_output) for name in self.spec.output_specs]
        for out in request.outputs:
            if out.name not in self.spec.output_specs:
                raise BadRequest(
                    f"unexpected inference output '{out.name}' for model '{self.name}' "
                    f"(its outputs: {', '.join(self.spec.output_specs)})"
                )
        return [(out.name, out.binary) for out in request.outputs]

    async def _run(
        self, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        if self._batcher is None:
            raise Unavailable(f"model '{self.name}' is not ready")
        return await self._batcher.submit(inputs, timeout)

    async def _run_sequence(
        self,
        tensors: dict[str, np.ndarray],
        seq_id: Hashable,
        start: bool,
        end: bool,
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        if not self.spec.streamable:
            why = (
                "is bidirectional and cannot be streamed: its backward direction starts at a "
                "sequence's last step, which a stream has not sent yet"
                if self.bundle.manifest.get("config", {}).get("bidirectional")
                else "cannot be streamed: its bundle does not declare it streamable (chunks "
                "carrying each LSTM's state would not equal one whole run)"
            )
            raise BadRequest(
                f"model '{self.name}' {why}; send the whole sequence in one request, "
                "without sequence_id"
            )
        if self.layout.rows(tensors) != 1:
            raise BadRequest("a request of a sequence (sequence_id) must have batch size 1")
        initial = initial_state(tensors, self.layout.state_inputs, start)
        store = self._sequences
        assert store is not None
        async with self._sequence_lock(seq_id):
            state = store.acquire(seq_id, start, initial)
            try:
                outputs = await self._run(self.layout.fill_defaults({**tensors, **state}), timeout)
            except BaseException:
                store.cancel(seq_id)
                self._count_sequences()
                raise
            store.release(seq_id, self.layout.carried(outputs), end=end)
            self._count_sequences()
        return outputs

    def _sequence_lock(self, seq_id: Hashable) -> _SequenceLock:
        return _SequenceLock(self._locks, seq_id)


class _SequenceLock:
    """Serialize the chunks of one sequence in arrival order; forget the lock when unused."""

    def __init__(self, locks: dict[Hashable, tuple[asyncio.Lock, int]], key: Hashable) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key, (asyncio.Lock(), 0))
        self._locks[self._key] = (lock, users + 1)
        self._lock = lock
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self._locks[self._key]
        if users <= 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)


__all__ = ["InferenceService"]
