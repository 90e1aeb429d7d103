#!/usr/bin/env bash
# Create the Triton venv: a second Python environment whose nvidia-pytriton wheel brings a real
# tritonserver (with its python backend) for `lstm-deploy triton` and tests/test_triton.py.
# It is separate from .venv because nvidia-pytriton needs numpy<2.
#
#   scripts/setup_triton_venv.sh [VENV]        (default: .venv-triton, which the tests look for)
#
# Then: lstm-deploy triton BUNDLE --python .venv-triton/bin/python
#   or: export LSTM_DEPLOY_TRITON_PYTHON=$PWD/.venv-triton/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.venv-triton}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# The [triton] extra: nvidia-pytriton (tritonserver + python backend, numpy<2) and onnxruntime,
# which the python-backend models run model.onnx with; no torch.
"$venv/bin/python" -m pip install -q -e ".[triton]"
"$venv/bin/python" - <<'PY'
import sys

import numpy, onnxruntime, pytriton  # noqa: F401  fails here, clearly, if the extra was not installed

from lstm_deploy_export.tools.triton_env import TritonEnvironment

env = TritonEnvironment.find(sys.executable)
print(f"Triton venv ready: {env.python} (Python {env.version}, numpy {numpy.__version__}, "
      f"onnxruntime {onnxruntime.__version__}), tritonserver {env.tritonserver}")
PY
