"""Export an LSTM, or your own model with LSTMs inside, into a bundle directory:
weights.safetensors, model.pt (TorchScript), model.onnx (native ONNX LSTM ops), model.int8.onnx,
model.scan.onnx (ONNX Scan), a Triton model repository, and manifest.json with checksums. The model
comes from exactly one of --weights, --checkpoint, --demo (an LSTM) or --module (your model).

--module package.module:function names a function (or class) that returns your nn.Module, e.g.
Embedding -> nn.LSTM -> Linear; every nn.LSTM in it is converted to lstm_deploy.LSTM. --weights
then loads its state_dict (safetensors, or a torch.save file), and each --example declares one
input of forward, in order: NAME=SHAPE[:DTYPE[:LOW:HIGH]], e.g. tokens=1x16:int64:0:5000 (an
integer input needs its range of values), features=1x100x40 (float32), lengths=1:int64 (an input
named "lengths" carries each sequence's length). Axis 0 is the batch, axis 1 the sequence: both
dynamic in every artifact.

model.pt2 (torch.export + AOTInductor, for C++'s AOTIModelPackageLoader; CPU) is compiled with a
C++ compiler, ~10 s a layer: without one, the default leaves it out and the manifest says why.

examples:
  lstm-deploy export --demo --input-size 32 --hidden-size 64 --out bundle
  lstm-deploy export --checkpoint lstm_state_dict.pt --batch-first --out bundle
  lstm-deploy export --weights model.safetensors --artifacts onnx --out bundle --force
  lstm-deploy export --module examples.tagger:make_model --weights tagger.safetensors \
      --example tokens=1x16:int64:0:100 --example lengths=1:int64 --out tagger-bundle
  lstm-deploy export --module examples.detector:make_model --weights detector.safetensors \
      --example features=1x50x20 --streamable --out detector-bundle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import ARTIFACTS, BundleError
from lstm_deploy.cli_common import EXIT_OK, UsageError, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=Path,
        help="a safetensors file written by lstm_deploy; with --module, your model's state_dict "
        "(safetensors, or a torch.save file)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint",
        type=Path,
        help="a PyTorch file holding a torch.nn.LSTM state_dict (loaded with weights_only=True)",
    )
    src.add_argument("--demo", action="store_true", help="a randomly initialised model")
    src.add_argument(
        "--module",
        metavar="PKG.MOD:FUNCTION",
        help="your model: a function (or class) that returns the nn.Module (see above)",
    )
    p.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    p.add_argument(
        "--artifacts",
        default=None,
        help=f"comma-separated subset of {','.join(ARTIFACTS)} (default: all the model supports)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    demo = p.add_argument_group("--demo model")
    demo.add_argument("--input-size", type=int, default=32)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--num-layers", type=int_at_least(1), default=1)
    demo.add_argument("--bidirectional", action="store_true")
    demo.add_argument("--proj-size", type=int_at_least(0), default=0)
    demo.add_argument("--no-bias", action="store_true")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the init")
    own = p.add_argument_group("--module model")
    own.add_argument(
        "--example",
        action="append",
        default=[],
        metavar="NAME=SHAPE[:DTYPE[:LOW:HIGH]]",
        help="one input of forward, in order (repeat for each)",
    )
    own.add_argument("--lengths", help="the input that carries lengths (default: one so named)")
    own.add_argument(
        "--output-names", help="comma-separated names of the outputs (default output0,output1..)"
    )
    own.add_argument(
        "--streamable",
        action="store_true",
        help="serve it in chunks, carrying each LSTM's state (checked: chunks must equal a run)",
    )
    ck = p.add_argument_group("--checkpoint model (what the shapes cannot tell)")
    ck.add_argument(
        "--batch-first",
        action="store_true",
        help="the checkpointed nn.LSTM was batch_first (recorded in the config)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from lstm_deploy.model import LSTM
    from lstm_deploy.weights import WeightsError, load_checkpoint, load_safetensors
    from lstm_deploy_export.export.graphs import ExportError
    from lstm_deploy_export.export.writer import export_bundle

    if args.module is not None:
        return _run_module(args)
    chosen = [a for a in ("weights", "checkpoint", "demo") if getattr(args, a)]
    if len(chosen) != 1:
        raise UsageError(
            "choose the model with one of --weights, --checkpoint, --demo (an LSTM) or --module "
            f"(your model){'; got ' + ' and '.join('--' + a for a in chosen) if chosen else ''}"
        )
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
    _print_files(bundle)
    return EXIT_OK


def _print_files(bundle: Any) -> None:
    print(f"wrote {bundle.path}/")
    width = max(len(name) for name in bundle.manifest["files"])
    for name, entry in bundle.manifest["files"].items():
        print(f"  {name:<{width}}  {entry['size']:>12,} B  sha256 {entry['sha256'][:16]}")
    for name, reason in bundle.manifest.get("skipped", {}).items():
        print(f"  {name}: not written: {reason}")


_DTYPES = ("float32", "float64", "int64", "int32", "bool")


def parse_example(text: str) -> tuple[str, tuple[int, ...], str, tuple[int, int] | None]:
    """NAME=SHAPE[:DTYPE[:LOW:HIGH]] -> (name, shape, dtype, range)."""
    name, eq, spec = text.partition("=")
    parts = spec.split(":")
    try:
        if not eq or not name or len(parts) not in (1, 2, 4):
            raise ValueError
        shape = tuple(int(d) for d in parts[0].lower().split("x"))
        if any(d < 1 for d in shape):
            raise ValueError
        dtype = parts[1] if len(parts) > 1 else "float32"
        bounds = (int(parts[2]), int(parts[3])) if len(parts) == 4 else None
    except ValueError:
        raise UsageError(
            f"--example {text!r}: expected NAME=SHAPE[:DTYPE[:LOW:HIGH]], e.g. "
            "tokens=1x16:int64:0:5000 or features=1x100x40"
        ) from None
    if dtype not in _DTYPES:
        raise UsageError(f"--example {text!r}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return name, shape, dtype, bounds


def _run_module(args: argparse.Namespace) -> int:
    import inspect

    import torch

    from lstm_deploy.weights import WeightsError
    from lstm_deploy_export.export.graphs import ExportError
    from lstm_deploy_export.export.whole import export_model, load_factory, load_state_dict

    try:
        factory = load_factory(args.module)
        try:
            model = factory()
        except Exception as e:  # the user's own code: its error, in one line
            raise UsageError(f"--module {args.module}: it raised {type(e).__name__}: {e}") from e
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"--module {args.module}: returned a {type(model).__name__}, not an nn.Module"
            )
        if args.weights is not None:
            load_state_dict(model, args.weights)
        if not args.example:
            params = list(inspect.signature(model.forward).parameters)
            raise UsageError(
                f"--module needs an --example for each input of forward({', '.join(params)}), "
                "e.g. --example tokens=1x16:int64:0:5000 --example lengths=1:int64"
            )
        examples, ranges = {}, {}
        for text in args.example:
            name, shape, dtype, bounds = parse_example(text)
            if name in examples:
                raise UsageError(f"--example {name} is given twice")
            examples[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
            if bounds is not None:
                ranges[name] = bounds
        print(f"model: {type(model).__qualname__} from {args.module}", file=sys.stderr)
        bundle = export_model(
            model,
            examples,
            args.out,
            lengths=args.lengths,
            input_ranges=ranges,
            output_names=args.output_names.split(",") if args.output_names else None,
            streamable=args.streamable,
            artifacts=args.artifacts,
            factory=args.module,
            force=args.force,
            progress=lambda line: print(f"  {line}", file=sys.stderr),
        )
    except (WeightsError, BundleError, ExportError) as e:
        raise UsageError(str(e)) from None
    _print_files(bundle)
    return EXIT_OK
