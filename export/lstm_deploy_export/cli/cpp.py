"""Build the C++ programs of export/cpp (LibTorch for model.pt and model.pt2, the ONNX Runtime C++
API for model.onnx) with CMake, and print their paths. The headers the wheels lack are fetched by
package name (Debian trixie's libonnxruntime-dev and nlohmann-json3-dev) unless
$LSTM_DEPLOY_ORT_INCLUDE_DIR and $LSTM_DEPLOY_JSON_INCLUDE_DIR name directories that have them.
Each program reads the signature from the bundle's manifest.json. The build is cached: about a
minute the first time, a second or two after that.

Exit status: 0 both built, 1 any not built (the reason is printed).

example:
  lstm-deploy cpp                      then: PROGRAM --model bundle/model.pt --inputs in/ ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_deploy.cli_common import EXIT_FAIL, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--build-dir", type=Path, help="where to build (default: ~/.cache/lstm-deploy/cpp)"
    )


def run(args: argparse.Namespace) -> int:
    from lstm_deploy_export.tools import cpp

    programs = cpp.build(args.build_dir, progress=lambda line: print(line, file=sys.stderr))
    for program in cpp.PROGRAMS:
        if program in programs.paths:
            print(f"{program}: {programs.paths[program]}")
        else:
            print(f"{program}: not built: {programs.unavailable[program]}")
    return EXIT_FAIL if programs.unavailable else EXIT_OK
