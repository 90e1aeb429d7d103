#!/usr/bin/env bash
# The GPU checks of lstm-deploy in one go, on a machine with a CUDA device (none here needs a
# network):
#   1. onnxruntime-gpu (and any other missing package) from a directory of wheels, if there is one:
#      $LSTM_DEPLOY_WHEELS, else ./.whl, else /tmp/wheels or /tmp/*wheels*; installed with
#      pip --no-index --target into a private directory put first on PYTHONPATH
#   2. the environment: GPU, torch and onnxruntime versions, execution providers
#   3. `lstm-deploy demo --thorough`: export the demo bundle and validate it with the CUDA rows
#      (TF32 off); then `lstm-deploy validate --quick --tf32` for the TF32 rows, for information
#   4. `pytest -m gpu` on the test modules that have GPU tests
# The project runs from this checkout (PYTHONPATH), not installed. Everything lands in OUT_DIR
# (the first argument, else $OUT, else ./gpu-check): gpu_check.log, report.json, report.md,
# tf32/report.json, tf32/report.md, pytest.log. Each step runs whatever the ones before gave;
# exit status 0 when the demo's validation and pytest passed, else 1.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -u -o pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=${1:-${OUT:-$root/gpu-check}}
python=${PYTHON:-python3}
bundle=${TMPDIR:-/tmp}/lstm-deploy-gpu-bundle
site=${TMPDIR:-/tmp}/lstm-deploy-gpu-site
mkdir -p "$out_dir"
log=$out_dir/gpu_check.log
: >"$log"
status=0
export PYTHONUNBUFFERED=1

step() { printf '\n== %s\n' "$*" | tee -a "$log"; }

wheels=${LSTM_DEPLOY_WHEELS:-}
if [ -z "$wheels" ]; then
    for dir in "$root/.whl" /tmp/wheels /tmp/*wheels*; do
        if compgen -G "$dir/*.whl" >/dev/null; then wheels=$dir; break; fi
    done
fi
if [ -n "$wheels" ]; then
    step "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl 2>&1 | tee -a "$log" || status=1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root:$root/export:$root/serving${PYTHONPATH:+:$PYTHONPATH}"

step "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$python" - <<'PY'
import onnxruntime as ort
import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()}")
print(f"onnxruntime {ort.__version__} from {ort.__file__}")
print(f"providers: {ort.get_available_providers()}")
PY
} 2>&1 | tee -a "$log"

step "lstm-deploy demo $bundle --thorough"
"$python" -m lstm_deploy_export.cli demo "$bundle" --thorough --force --no-progress 2>&1 \
    | tee -a "$log" || status=1
cp "$bundle/report.json" "$bundle/report.md" "$out_dir/" 2>>"$log" || status=1

step "lstm-deploy validate $bundle --quick --tf32 (TF32 rows: for information)"
"$python" -m lstm_deploy_export.cli validate "$bundle" --quick --tf32 --no-progress \
    --report "$out_dir/tf32" 2>&1 | tee -a "$log" || echo "(exit $?: not counted)" | tee -a "$log"

step "pytest -m gpu"
cd "$root" || exit 1
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
"$python" -m pytest -m gpu -p no:cacheprovider -rA "${gpu_tests[@]}" 2>&1 \
    | tee "$out_dir/pytest.log" | tail -n 25 | tee -a "$log"
code=${PIPESTATUS[0]}
if [ "$code" -ne 0 ]; then status=1; fi

step "done: exit $status; reports in $out_dir"
exit "$status"
