"""Serve a bundle's Triton repository on a real Triton Inference Server, on loopback.

Starts the `tritonserver` that the nvidia-pytriton wheel bundles (the [triton] extra) on the
bundle's triton/ repository, unchanged, in explicit model-control mode: it loads the
python-backend models lstm_python (dynamic batching) and lstm_python_stateful (sequence
batching), which run model.onnx with ONNX Runtime. That wheel has the python backend but no
onnxruntime or libtorch backend: serve lstm_onnx and lstm_torchscript with NVIDIA's Triton
container or KServe (README.md, "Scale out on Triton / KServe").

The server's Python environment needs nvidia-pytriton (with numpy<2) and onnxruntime:
  python3 -m venv .venv-triton && .venv-triton/bin/pip install -e '.[triton]'
(scripts/setup_triton_venv.sh does this). The command runs Triton from the environment of
--python (default: $LSTM_DEPLOY_TRITON_PYTHON, else this Python), so another environment can
start it. Linux with glibc >= 2.35 only (the wheel's platform).

examples:
  lstm-deploy triton ./bundle --port 8000        # HTTP 8000, gRPC 8001, metrics 8002
  lstm-deploy triton ./bundle --python .venv-triton/bin/python
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from lstm_deploy.bundle import BundleError, load_bundle
from lstm_deploy.cli_common import EXIT_FAIL, EXIT_OK, UsageError, int_at_least
from lstm_deploy_export.tools.triton_env import ENV_PYTHON, TritonSetupError
from lstm_deploy_export.tools.triton_server import SERVED_MODELS, TritonServer, check_repository


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a bundle directory written by lstm-deploy")
    port = int_at_least(0)
    parser.add_argument("--port", type=port, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument("--grpc-port", type=port, default=None, help="default: --port + 1")
    parser.add_argument("--metrics-port", type=port, default=None, help="default: --port + 2")
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help=f"the Python of the [triton] environment (default: ${ENV_PYTHON}, else this one)",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        help=f"a model to load (repeatable; default: {', '.join(SERVED_MODELS)})",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose")
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        help="keep Triton's log in this file (default: a temp file)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle, only=())  # its files: by check_repository, below
    except BundleError as e:
        raise UsageError(str(e)) from None
    # By default the served models this bundle has (no stateful one if bidirectional).
    exported = bundle.manifest.get("triton", {})
    models = args.models or [m for m in SERVED_MODELS if m in exported]
    if not models:
        raise UsageError(
            f"{args.bundle} has no python-backend Triton model: re-export it with the onnx "
            "artifact, which they run"
        )
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the server as Ctrl-C does
    try:
        server = TritonServer(
            check_repository(bundle, models),
            models,
            python=args.python,
            http_port=args.port,
            grpc_port=_next_port(args.port, args.grpc_port, 1),
            metrics_port=_next_port(args.port, args.metrics_port, 2),
            log_verbose=args.log_verbose,
            log=args.log,
        )
        with server:
            print(
                f"Triton serving {', '.join(models)} from {server.repository}\n"
                f"  HTTP    http://{server.http_url}\n"
                f"  gRPC    {server.grpc_url}\n"
                f"  metrics http://{server.metrics_url}/metrics\n"
                f"  log     {server.log}",
                flush=True,
            )
            code = server.wait()
            print(f"tritonserver exited with {code}:\n{server.log_tail()}", file=sys.stderr)
            return EXIT_FAIL
    except (BundleError, TritonSetupError) as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print("stopped Triton", file=sys.stderr)
        return EXIT_OK


def _next_port(http_port: int, port: int | None, offset: int) -> int:
    if port is not None:
        return port
    return http_port + offset if http_port else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
