"""`lstm-deploy`: export, validate, benchmark and serve an LSTM.

One module per command, each with `add_arguments(parser)` and `run(args) -> int`, and whose
docstring is its `--help`. Only the command being run is imported, and each imports what it
needs when it runs: `lstm-deploy serve` never imports torch. Every command reports bad input as
one line, `lstm-deploy COMMAND: error: ...`, with exit status 2 (1: a check failed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lstm_deploy.cli_common import EXIT_USAGE, UsageError

# (name, module, help), in the order of `lstm-deploy --help`.
COMMANDS = (
    ("export", "lstm_deploy_export.cli.export", "export an LSTM into a bundle (TorchScript, ONNX)"),
    ("validate", "lstm_deploy_export.cli.validate", "check every artifact on every runtime"),
    ("demo", "lstm_deploy_export.cli.demo", "export a demo bundle, validate it, print the table"),
    ("bench", "lstm_deploy_export.cli.bench", "time every backend against torch.nn.LSTM"),
    ("triton", "lstm_deploy_export.cli.triton", "serve the bundle on a real Triton server"),
    ("cpp", "lstm_deploy_export.cli.cpp", "build the C++ programs of export/cpp"),
)  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="lstm-deploy",
        description=(
            "Ship an LSTM: export it to TorchScript and ONNX, prove every artifact equal on every "
            "runtime, benchmark it, and serve it over the KServe v2 protocol."
        ),
        epilog="Start with `lstm-deploy demo`; `lstm-deploy COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            p.description = module.__doc__
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    try:
        from lstm_deploy_serving import cli as serving_cli
    except ImportError:  # installed without the [serving] extra
        pass
    else:
        serving_cli.register(sub)
    return parser


# The package a command imports -> the extra that brings it (a serving-only install has no torch).
MISSING_EXTRA = {
    "torch": "export", "safetensors": "export", "onnx": "export", "onnxscript": "export",
    "onnxruntime": "export", "tqdm": "export", "matplotlib": "bench", "tritonclient": "client",
    "uvicorn": "serving", "starlette": "serving", "openvino": "openvino",
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"lstm-deploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:  # an install without the extra this command needs
        extra = MISSING_EXTRA.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"lstm-deploy {args.command}: error: needs {e.name}, which this install lacks: "
            f"pip install 'lstm-deploy[{extra}]' (README: On a fresh machine)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lstm-deploy {args.command}: interrupted", file=sys.stderr)
        return 130
