"""Check every artifact of a bundle on every runtime against two references, over a sweep.

Rows (runtime x artifact): the scratch module in eager PyTorch (float32), TorchScript on CPU,
ONNX Runtime's CPUExecutionProvider (model.onnx, model.scan.onnx, and model.int8.onnx, judged by
its own int8 tolerance: README "Parity"), and, where present,
TorchScript on CUDA and ONNX Runtime's CUDAExecutionProvider with TF32 off, and (with --cpp) the
C++ programs of export/cpp, and (with --triton) a real tritonserver's python-backend model. A
runtime that is not present is skipped with the reason, never passed.

References: the scratch module in float64 (the oracle) and torch.nn.LSTM in float64 with the same
weights on a packed batch (an independent implementation of `lengths`). Each row's `output`, `hn`
and `cn` must hold elementwise, against both:

    |actual - reference| <= atol + rtol * |reference| + f32_factor * eps32

where eps32 is torch.nn.LSTM's own float32 error on that case (max over the outputs): what float32
itself loses on this model and input (it grows with T for long-memory models). `output` at padded
steps must be exactly 0.

A whole-model bundle (export_model, or export --module: a user's module with LSTMs inside) is
compared with that module, rebuilt with the bundle's weights, in float64: with its LSTMs converted
(the oracle) and with torch.nn.LSTMs (lengths by pack_padded_sequence). The module comes from
--module package.module:function, default the factory its manifest records. Its inputs are drawn
from its signature: token ids in their declared range, lengths where it declares them, each
LSTM's state where it is streamable. Padded steps are not required to be 0 (a head after the LSTMs
may make them nonzero); they are compared like the others.

report.json and report.md go into the bundle (or --report DIR); manifest.json's "parity" is updated.
Exit status: 0 all passed, 1 any failure (all are listed), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_deploy.bundle import REPORTS, BundleError, load_bundle
from lstm_deploy.cli_common import EXIT_FAIL, EXIT_OK, UsageError, int_list, number
from lstm_deploy_export.check.compare import FLOAT32, TOLERANCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the bundle directory (lstm-deploy export --out)")
    parser.add_argument("--quick", action="store_true", help="the quick sweep: seconds, for CI")
    parser.add_argument(
        "--cpp", action="store_true", help="build the C++ programs (export/cpp) and add their rows"
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="start a real tritonserver on the bundle's triton/ and add its row",
    )
    parser.add_argument(
        "--triton-python",
        metavar="PYTHON",
        help="the Python of the [triton] environment (default: $LSTM_DEPLOY_TRITON_PYTHON, "
        "else this one)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="add CUDA rows with TF32 on (judged by the tf32 tolerance)",
    )
    tolerance, defaults = number(positive=False), TOLERANCES[FLOAT32]
    parser.add_argument(
        "--atol",
        type=tolerance,
        help=f"absolute tolerance, every row (float32 default {defaults.atol:g})",
    )
    parser.add_argument(
        "--rtol",
        type=tolerance,
        help=f"relative tolerance, every row (float32 default {defaults.rtol:g})",
    )
    parser.add_argument(
        "--f32-factor",
        type=tolerance,
        help="allowance in units of torch.nn.LSTM's own float32 error on the case "
        f"(default {defaults.f32_factor:g}; 0 for a fixed tolerance)",
    )
    parser.add_argument(
        "--seeds",
        type=int_list(0),
        help="comma-separated seeds (default: 0 with --quick, else 0,1,2)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write report.json and report.md here (default: the bundle)",
    )
    parser.add_argument(
        "--module",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="a whole-model bundle's model: a function (or class) that returns the nn.Module, "
        "loaded with the bundle's weights (default: the factory in its manifest)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """`lstm-deploy validate`: 0 all passed, 1 any failure, 2 usage error."""
    from lstm_deploy import ConversionError
    from lstm_deploy_export.check import render
    from lstm_deploy_export.check.validate import validate
    from lstm_deploy_export.export.graphs import ExportError

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        raise UsageError(str(e)) from None
    try:
        report = validate(
            bundle,
            quick=args.quick,
            cpp=args.cpp,
            tf32=args.tf32,
            triton=args.triton,
            triton_python=args.triton_python,
            atol=args.atol,
            rtol=args.rtol,
            f32_factor=args.f32_factor,
            seeds=args.seeds,
            report_dir=args.report,
            progress=not args.no_progress and sys.stderr.isatty(),
            model=args.module,
        )
    except (BundleError, ExportError, ConversionError) as e:  # the model cannot be had (--module)
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write the report: {e}") from None
    print(render.table(report))
    where = Path(args.report if args.report is not None else bundle.path)
    print("report: " + ", ".join(str(where / name) for name in REPORTS))
    return EXIT_OK if report.passed else EXIT_FAIL
