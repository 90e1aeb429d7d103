"""Command line: ``serve`` and ``loadtest`` (``loadtest_cli.py``) subcommands.

``register(subparsers)`` adds both to any argparse CLI (the top-level ``lstm-deploy`` uses it);
``main`` is the standalone ``python -m lstm_deploy_serving``. Nothing heavy is imported until a
subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import INT8_ONNX
from lstm_deploy.cli_common import EXIT_USAGE, UsageError, int_at_least, number

from .config import DEFAULT_MODEL_NAME, ServeOptions
from .loadtest_cli import add_loadtest
from .model_spec import SERVED_ARTIFACTS

SERVE_HELP = """\
Serve a bundle's model.onnx over HTTP and gRPC with the KServe v2 / Open Inference Protocol, as
Triton speaks it: tritonclient (http and grpc), curl or any KServe v2 client works unchanged.

  GET  /v2/health/live | /v2/health/ready | /v2 | /metrics | /v2/models/stats
  GET  /v2/models/lstm_onnx[/versions/1][/ready|/config|/stats]
  POST /v2/models/lstm_onnx[/versions/1]/infer
  gRPC inference.GRPCInferenceService on --grpc-port (default: --port + 1, as Triton's
       8000/8001): ModelInfer, ModelStreamInfer (sequences), metadata, config, statistics

Concurrent requests are merged into one ONNX Runtime run (dynamic batching, padded to the longest
sequence); requests with sequence_id/sequence_start/sequence_end keep the LSTM state (h, c)
between them. SIGTERM drains in-flight requests and exits 0.

example:
  lstm-deploy serve ./bundle --port 8000
  curl -s localhost:8000/v2/models/lstm_onnx/infer -d '{"inputs": [{"name": "input",
    "datatype": "FP32", "shape": [1, 2, 16], "data": [0.1, ...]}]}'
"""


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)
_positive_float = number(positive=True)


def _add_serve(subparsers: Any) -> None:
    d = ServeOptions(bundle=Path("."))
    p = subparsers.add_parser(
        "serve",
        help="serve a bundle over HTTP and gRPC (KServe v2, Triton-compatible)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="bundle directory (manifest.json + model.onnx)")
    p.add_argument(
        "--artifact",
        choices=SERVED_ARTIFACTS,
        default=d.artifact,
        help=f"the bundle's graph to run (default: %(default)s); {INT8_ONNX} has int8 weights: "
        "faster on the CPU, its outputs within README's int8 tolerance of model.onnx's",
    )
    p.add_argument(
        "--host",
        default=d.host,
        help="address to bind (default: %(default)s; 0.0.0.0 exposes the server to the network)",
    )
    p.add_argument(
        "--port",
        type=_non_negative_int,
        default=d.port,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    p.add_argument(
        "--grpc-port",
        type=_non_negative_int,
        default=None,
        help="port of the gRPC server; 0 picks a free one (default: --port + 1, or a free one "
        "with --port 0)",
    )
    p.add_argument(
        "--no-grpc",
        dest="grpc",
        action="store_false",
        help="serve HTTP only",
    )
    p.add_argument(
        "--model-name",
        dest="model_names",
        action="append",
        metavar="MODEL_NAME",
        help=f"name the model is served under (default: {d.model_name}); repeat it to serve the "
        "model under several names, e.g. the bundle's Triton repository's: --model-name "
        "lstm_python --model-name lstm_python_stateful",
    )
    b = p.add_argument_group("dynamic batching (defaults: the bundle's Triton config)")
    b.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=None,
        help="most rows in one ONNX Runtime run; also the largest batch a request may have",
    )
    b.add_argument(
        "--max-queue-delay-us",
        type=_non_negative_int,
        default=None,
        help="how long the oldest queued request waits for others to join its batch",
    )
    b.add_argument(
        "--no-dynamic-batching",
        dest="dynamic_batching",
        action="store_false",
        help="run every request alone, in arrival order",
    )
    b.add_argument(
        "--fixed-window",
        dest="adaptive_window",
        action="store_false",
        help="always wait --max-queue-delay-us for others to join, as Triton does; by default "
        "a lone client (one request inside the server at a time for a second) pays no window",
    )
    b.add_argument(
        "--max-queue-size",
        type=_positive_int,
        default=d.max_queue_size,
        help="requests waiting beyond this are refused with 503 (default: %(default)s)",
    )
    s = p.add_argument_group("limits and stateful sequences")
    s.add_argument(
        "--max-sequence-length",
        type=_positive_int,
        default=d.max_sequence_length,
        help="longest input (time steps) a request may carry (default: %(default)s)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=d.max_body_bytes,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    s.add_argument(
        "--max-response-bytes",
        type=_positive_int,
        default=d.max_response_bytes,
        help="a request whose response could be larger (from its shapes and the outputs it asks "
        "for; JSON costs up to 25 bytes a value, binary 4) gets 400 before it runs "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--max-codec-requests",
        type=_positive_int,
        default=d.max_codec_requests,
        help="request bodies over 256 KiB being decoded (or responses encoded) at once, off the "
        "event loop; more get 503 with Retry-After (default: %(default)s)",
    )
    s.add_argument(
        "--max-sequences",
        type=_positive_int,
        default=d.max_sequences,
        help="cap on live sequences (sequence_id); at the cap a new one evicts the "
        "one idle the longest (default: %(default)s)",
    )
    s.add_argument(
        "--sequence-idle-timeout",
        type=_positive_float,
        default=d.sequence_idle_timeout_s,
        metavar="SECONDS",
        help="free a sequence's state after this long without a request (default: %(default)s)",
    )
    r = p.add_argument_group("process")
    r.add_argument(
        "--threads",
        type=_non_negative_int,
        default=d.threads,
        help="ONNX Runtime intra-op threads; 0: one per core (default: %(default)s)",
    )
    r.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=d.drain_timeout_s,
        metavar="SECONDS",
        help="on SIGTERM, how long the drain may take before what is left is cancelled and the "
        "process exits 0 (default: %(default)s)",
    )
    # The option's former name, kept working.
    r.add_argument(
        "--graceful-timeout",
        dest="drain_timeout",
        type=_positive_float,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    r.add_argument(
        "--log-level",
        default=d.log_level,
        choices=["critical", "error", "warning", "info", "debug"],
    )
    r.add_argument("--access-log", action="store_true", help="log every request")
    _add_serve_connections(p, d)
    p.set_defaults(func=run_serve)


def _add_serve_connections(p: argparse.ArgumentParser, d: ServeOptions) -> None:
    c = p.add_argument_group("connections")
    c.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=d.header_timeout_s,
        metavar="SECONDS",
        help="close a connection whose request header is not complete this long after its first "
        "byte (default: %(default)s)",
    )
    c.add_argument(
        "--keep-alive-timeout",
        type=_positive_int,
        default=d.keep_alive_timeout_s,
        metavar="SECONDS",
        help="close a keep-alive connection idle this long (default: %(default)s)",
    )
    c.add_argument(
        "--max-header-bytes",
        type=_positive_int,
        default=d.max_header_bytes,
        help="larger request headers get 431 (default: %(default)s)",
    )
    c.add_argument(
        "--limit-concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="beyond N open connections or N requests in progress, requests get 503 "
        "(default: no limit)",
    )
    sec = p.add_argument_group(
        "security (opt-in; by default the server binds 127.0.0.1, plain HTTP, no key)"
    )
    sec.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /v2/health/*; prefer "
        "--api-key-file or the LSTM_DEPLOY_API_KEY environment variable (a flag shows in ps)",
    )
    sec.add_argument(
        "--api-key-file", type=Path, metavar="PATH", help="read the API key from this file"
    )
    sec.add_argument("--ssl-certfile", type=Path, metavar="PATH", help="serve HTTPS: certificate")
    sec.add_argument(
        "--ssl-keyfile",
        type=Path,
        metavar="PATH",
        help="its private key (if not in the certificate file)",
    )


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``loadtest`` to an argparse subparsers object."""
    _add_serve(subparsers)
    add_loadtest(subparsers)


def run_serve(args: argparse.Namespace) -> int:
    from lstm_deploy.bundle import BundleError

    from .auth import ApiKeyError, resolve_api_key
    from .connections import FrontEndError
    from .server import TLSError, serve

    if args.ssl_keyfile is not None and args.ssl_certfile is None:
        raise UsageError("--ssl-keyfile needs --ssl-certfile")
    if not args.grpc and args.grpc_port is not None:
        raise UsageError("--grpc-port and --no-grpc contradict each other: give one")
    if args.grpc and args.grpc_port is None and args.port == 65535:
        raise UsageError("--port 65535 leaves no port + 1 for gRPC: pass --grpc-port")
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as e:
        raise UsageError(str(e)) from None

    names = args.model_names or [DEFAULT_MODEL_NAME]
    options = ServeOptions(
        bundle=args.bundle,
        artifact=args.artifact,
        host=args.host,
        port=args.port,
        grpc=args.grpc,
        grpc_port=args.grpc_port,
        model_name=names[0],
        model_aliases=tuple(names[1:]),
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        dynamic_batching=args.dynamic_batching,
        adaptive_window=args.adaptive_window,
        max_queue_size=args.max_queue_size,
        max_sequence_length=args.max_sequence_length,
        max_sequences=args.max_sequences,
        sequence_idle_timeout_s=args.sequence_idle_timeout,
        max_body_bytes=args.max_body_bytes,
        max_response_bytes=args.max_response_bytes,
        max_codec_requests=args.max_codec_requests,
        threads=args.threads,
        drain_timeout_s=args.drain_timeout,
        header_timeout_s=args.header_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout,
        max_header_bytes=args.max_header_bytes,
        limit_concurrency=args.limit_concurrency,
        api_key=api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    try:
        return serve(options)
    except BundleError as e:
        raise UsageError(str(e)) from None
    except (TLSError, FrontEndError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_deploy_serving",
        description="Serve an lstm-deploy bundle over KServe v2 (Triton-compatible) HTTP and gRPC.",
    )
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:  # the same one line as `lstm-deploy serve` prints
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
