"""The main job in one command: export a demo LSTM into a bundle, validate it, say where it is.

The demo model is LSTM(input_size=32, hidden_size=64, num_layers=2, bidirectional=True,
batch_first=True) with torch.nn.LSTM's init from a fixed seed: small, but with every part a real
model has (stacked layers, a reverse direction, variable lengths). It is exported to DIR (default
./demo-bundle) and validated on every runtime present, with the quick sweep (T up to 1024, batch up
to 64; seconds) unless --thorough. Exit status: 0 all passed, 1 any failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lstm_deploy.bundle import INPUT, KSERVE_DIR, MANIFEST, REPORTS, TRITON_DIR, BundleError
from lstm_deploy.cli_common import EXIT_FAIL, EXIT_OK, UsageError

DEFAULT_DIR = Path("demo-bundle")
DEMO_MODEL: dict[str, Any] = {
    "input_size": 32,
    "hidden_size": 64,
    "num_layers": 2,
    "bidirectional": True,
    "batch_first": True,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=DEFAULT_DIR,
        help=f"the bundle directory (default: {DEFAULT_DIR})",
    )
    parser.add_argument(
        "--thorough", action="store_true", help="validate with the thorough sweep (under a minute)"
    )
    parser.add_argument(
        "--cpp", action="store_true", help="also build and validate the C++ programs (export/cpp)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the demo model's init")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into DIR even if it holds something other than a bundle",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """`lstm-deploy demo`: 0 all passed, 1 any failure, 2 usage error."""
    out: Path = args.dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another DIR")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not args.force:
        raise UsageError(
            f"{out} is not empty and holds no bundle; choose another DIR or pass --force"
        )

    import torch

    from lstm_deploy.model import LSTM
    from lstm_deploy_export.check import render
    from lstm_deploy_export.check.validate import validate
    from lstm_deploy_export.export.writer import export_bundle

    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = LSTM(**DEMO_MODEL)
    print(f"demo model: {model}", file=sys.stderr)
    try:
        bundle = export_bundle(
            model, out, force=True, progress=lambda line: print(f"  {line}", file=sys.stderr)
        )
    except (BundleError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"validating {'(thorough sweep)' if args.thorough else '(quick sweep)'}", file=sys.stderr)
    try:
        report = validate(
            bundle,
            quick=not args.thorough,
            cpp=args.cpp,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except OSError as e:
        raise UsageError(f"cannot write the report: {e}") from None

    print(render.table(report))
    print()
    print(f"the bundle: {bundle.path.resolve()}/")
    listing = [
        *(
            (name, f"{entry['size']:>10,} B")
            for name, entry in sorted(bundle.manifest["files"].items())
            if "/" not in name
        ),
        (f"{TRITON_DIR}/", "a Triton model repository (onnxruntime, libtorch, python backends)"),
        (f"{KSERVE_DIR}/", f"a KServe InferenceService for {TRITON_DIR}/"),
        (MANIFEST, "versions, signature, sha256 of every file, parity summary"),
        (", ".join(REPORTS), "this parity report in full"),
    ]
    width = max(len(name) for name, _ in listing) + 2
    for name, what in listing:
        print(f"  {name:<{width}}{what}")
    print()
    print("next:")
    for command, what in next_steps(out, bundle.config.input_size, args):
        print(f"  # {what}\n  {command}")
    return EXIT_OK if report.passed else EXIT_FAIL


def next_steps(out: Path, input_size: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The commands a user runs next on the demo bundle, each with what it does."""
    from lstm_deploy_serving.config import DEFAULT_MODEL_NAME  # numpy-free, torch-free

    steps = [] if args.thorough else [
        (f"lstm-deploy validate {out}{' --cpp' if args.cpp else ''}",
         "the thorough sweep (under a minute)"),
    ]  # fmt: skip
    request = json.dumps(
        {"inputs": [{"name": INPUT, "shape": [1, 2, input_size], "datatype": "FP32",
                     "data": [round(0.1 * (i % 7), 1) for i in range(2 * input_size)]}]},
        separators=(",", ":"),
    )  # fmt: skip
    return [
        *steps,
        (f"lstm-deploy serve {out}", "serve it: KServe v2 (Triton-compatible) HTTP on port 8000"),
        (f"curl -s localhost:8000/v2/models/{DEFAULT_MODEL_NAME}/infer -d '{request}'",
         "in another terminal: one inference (batch 1, 2 steps; only input is required)"),
        (f"lstm-deploy bench {out} --quick", "time every artifact against torch.nn.LSTM"),
    ]  # fmt: skip
