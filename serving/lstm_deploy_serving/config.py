"""The server's options: what ``lstm-deploy serve`` flags set, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lstm_deploy.bundle import ONNX

DEFAULT_MODEL_NAME = "lstm_onnx"
MODEL_VERSION = "1"
# The line `serve` prints once its socket listens; `launch` reads the address from it.
ANNOUNCE = "lstm-deploy-serving: listening on"
# And the line the gRPC server prints once it listens (HOST:PORT follows).
GRPC_ANNOUNCE = "lstm-deploy-serving: gRPC listening on"


@dataclass(frozen=True)
class ServeOptions:
    """How to serve a bundle.

    ``max_batch_size`` and ``max_queue_delay_us`` default (None) to the bundle's Triton config
    of ``lstm_onnx``; every other default is this server's own.
    """

    bundle: Path
    # The bundle's ONNX graph to run: model.onnx, or model.int8.onnx (int8 weights, CPU only).
    artifact: str = ONNX
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the address is printed once bound)
    # KServe v2 gRPC beside HTTP, on the same service; None: port + 1, as Triton (any free one
    # when port is 0).
    grpc: bool = True
    grpc_port: int | None = None
    model_name: str = DEFAULT_MODEL_NAME
    # More names the same model answers to: a Triton repository's lstm_python and
    # lstm_python_stateful are one model here, so a Triton client's code runs unchanged.
    model_aliases: tuple[str, ...] = ()
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    dynamic_batching: bool = True
    adaptive_window: bool = True  # no window while one request at a time is inside (scheduler)
    max_queue_size: int = 1024
    max_sequence_length: int = 8192
    max_sequences: int = 1024
    sequence_idle_timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024 * 1024
    # A request whose response could be larger (JSON: up to 25 bytes a value) gets 400 up front.
    max_response_bytes: int = 64 * 1024 * 1024
    # Bodies over 256 KiB decoded (or responses encoded) at once, in codecpool.py; more: 503.
    max_codec_requests: int = 4
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    # Connections (see connections.py): SIGTERM drains for at most drain_timeout_s; a request's
    # header must arrive within header_timeout_s of its first byte; an idle keep-alive connection
    # closes after keep_alive_timeout_s; beyond limit_concurrency connections or requests, 503.
    drain_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: int = 5
    max_header_bytes: int = 16 * 1024
    limit_concurrency: int | None = None
    # Opt-in security: a bearer API key on every route but /v2/health/* (never in a repr), TLS.
    api_key: str | None = field(default=None, repr=False)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    log_level: str = "info"
    access_log: bool = False

    @property
    def grpc_address(self) -> tuple[str, int]:
        """Where the gRPC server listens: ``grpc_port``, else the HTTP port + 1."""
        if self.grpc_port is not None:
            return self.host, self.grpc_port
        return self.host, self.port + 1 if self.port else 0
