"""`lstm-deploy`: export, validate, benchmark and serve an LSTM.

This module imports nothing heavy at load time: each subcommand imports what it needs when it runs,
so that `lstm-deploy serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: one or more comma-separated integers, each >= `minimum`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values

    return parse


def _lazy(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        handler: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), attr
        )
        return handler(args)

    return run


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model into a bundle (TorchScript, ONNX, Triton repository)",
        description=(
            "Export an LSTM into a bundle directory: weights.safetensors, model.pt (TorchScript), "
            "model.onnx (native ONNX LSTM op), model.scan.onnx (ONNX Scan), a Triton model "
            "repository, and manifest.json with checksums. The model comes from exactly one of "
            "--weights, --checkpoint or --demo."
        ),
        epilog=(
            "examples:\n"
            "  lstm-deploy export --demo --input-size 32 --hidden-size 64 --out bundle\n"
            "  lstm-deploy export --checkpoint lstm_state_dict.pt --batch-first --out bundle\n"
            "  lstm-deploy export --weights model.safetensors --artifacts onnx --out bundle --force"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="a safetensors file written by lstm_deploy")
    src.add_argument(
        "--checkpoint",
        type=Path,
        help="a PyTorch file holding a torch.nn.LSTM state_dict (loaded with weights_only=True)",
    )
    src.add_argument("--demo", action="store_true", help="a randomly initialised model")
    p.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    p.add_argument(
        "--artifacts",
        default=None,
        help="comma-separated subset of torchscript,onnx,scan (default: all the model supports)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    demo = p.add_argument_group("--demo model")
    demo.add_argument("--input-size", type=int, default=32)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--num-layers", type=int, default=1)
    demo.add_argument("--bidirectional", action="store_true")
    demo.add_argument("--proj-size", type=int, default=0)
    demo.add_argument("--no-bias", action="store_true")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the init")
    ck = p.add_argument_group("--checkpoint model (what the shapes cannot tell)")
    ck.add_argument(
        "--batch-first",
        action="store_true",
        help="the checkpointed nn.LSTM was batch_first (recorded in the config)",
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    import torch

    from lstm_deploy import LSTM, WeightsError, load_checkpoint, load_safetensors
    from lstm_deploy_export.bundle import BundleError, export_bundle
    from lstm_deploy_export.graphs import ExportError

    try:
        if args.demo:
            torch.manual_seed(args.seed)
            model = LSTM(
                args.input_size,
                args.hidden_size,
                num_layers=args.num_layers,
                bias=not args.no_bias,
                batch_first=True,
                bidirectional=args.bidirectional,
                proj_size=args.proj_size,
            )
        elif args.weights is not None:
            model = load_safetensors(args.weights)
        else:
            model = load_checkpoint(args.checkpoint, batch_first=args.batch_first)
        print(f"model: {model}", file=sys.stderr)
        bundle = export_bundle(
            model,
            args.out,
            artifacts=args.artifacts,
            force=args.force,
            progress=lambda line: print(f"  {line}", file=sys.stderr),
        )
    except (WeightsError, BundleError, ExportError, ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {bundle.path}/")
    for name, entry in bundle.manifest["files"].items():
        print(f"  {name:<40} {entry['size']:>12,} B  sha256 {entry['sha256'][:16]}")
    return EXIT_OK


# Subcommands implemented elsewhere: (name, module, help). Each module has add_arguments(parser)
# and main(args) -> int; the module is imported only to build its parser or to run it.
_COMMANDS = (
    ("validate", "lstm_deploy_export.validate", "check every artifact on every runtime"),
    ("demo", "lstm_deploy_export.demo", "export a demo bundle, validate it, print the table"),
    ("bench", "lstm_deploy_export.bench", "time every backend against torch.nn.LSTM"),
    ("triton", "lstm_deploy_export.triton_server", "serve the bundle on a real Triton server"),
)


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
    _add_export(sub)
    for name, module, help_text in _COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == command:
            mod = importlib.import_module(module)
            p.description = mod.__doc__
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            mod.add_arguments(p)
            p.set_defaults(func=_lazy(module, "main"))
    try:
        from lstm_deploy_serving import cli as serving_cli
    except ImportError:  # installed without the [serving] extra
        pass
    else:
        serving_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"lstm-deploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lstm-deploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
