"""Export an LSTM into a bundle directory: weights.safetensors, model.pt (TorchScript), model.onnx
(native ONNX LSTM op), model.scan.onnx (ONNX Scan), a Triton model repository, and manifest.json
with checksums. The model comes from exactly one of --weights, --checkpoint or --demo.

model.pt2 (torch.export + AOTInductor, for C++'s AOTIModelPackageLoader; CPU) is compiled with a
C++ compiler, ~10 s a layer: without one, the default leaves it out and the manifest says why.

examples:
  lstm-deploy export --demo --input-size 32 --hidden-size 64 --out bundle
  lstm-deploy export --checkpoint lstm_state_dict.pt --batch-first --out bundle
  lstm-deploy export --weights model.safetensors --artifacts onnx --out bundle --force
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_deploy.bundle import ARTIFACTS, BundleError
from lstm_deploy.cli_common import EXIT_OK, UsageError, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    width = max(len(name) for name in bundle.manifest["files"])
    for name, entry in bundle.manifest["files"].items():
        print(f"  {name:<{width}}  {entry['size']:>12,} B  sha256 {entry['sha256'][:16]}")
    return EXIT_OK
