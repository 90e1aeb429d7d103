"""The server's options: what ``lstm-deploy serve`` flags set, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "lstm_onnx"
MODEL_VERSION = "1"
# The line `serve` prints once its socket listens; `launch` reads the address from it.
ANNOUNCE = "lstm-deploy-serving: listening on"


@dataclass(frozen=True)
class ServeOptions:
    """How to serve a bundle.

    ``max_batch_size`` and ``max_queue_delay_us`` default (None) to the bundle's Triton config
    of ``lstm_onnx``; every other default is this server's own.
    """

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the address is printed once bound)
    model_name: str = DEFAULT_MODEL_NAME
    # More names the same model answers to: a Triton repository's lstm_python and
    # lstm_python_stateful are one model here, so a Triton client's code runs unchanged.
    model_aliases: tuple[str, ...] = ()
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    dynamic_batching: bool = True
    max_queue_size: int = 1024
    max_sequence_length: int = 8192
    max_sequences: int = 1024
    sequence_idle_timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024 * 1024
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    graceful_timeout_s: float = 30.0
    log_level: str = "info"
    access_log: bool = False
