#!/usr/bin/env bash
# The GPU checks of lstm-deploy in one go, on a machine with a CUDA device (none here needs a
# network):
#   1. onnxruntime-gpu (and any other missing package) into a private directory put first on
#      PYTHONPATH: from the parts of scripts/gpu_carry.sh's archive (in ./.whl or
#      /tmp/lstm-deploy-carry), else from a directory of wheels ($LSTM_DEPLOY_WHEELS, else ./.whl,
#      else /tmp/wheels or /tmp/*wheels*) with pip --no-index --target
#   2. the environment: GPU, torch and onnxruntime versions, execution providers, and whether
#      ONNX Runtime's CUDA provider starts (if it cannot find CUDA's libraries by itself, the
#      nvidia-* wheels' library folders go on LD_LIBRARY_PATH, and the log says so)
#   3. `lstm-deploy demo --thorough`: export the demo bundle and validate it with the CUDA rows
#      (TF32 off); then `lstm-deploy validate --quick --tf32` for the TF32 rows, for information
#   4. `pytest -m gpu` on the test modules that have GPU tests
#   5. `lstm-deploy bench --device cuda` on $GPU_BENCH_GRID (default B 1,64,256, T 128,1024,
#      H 256,1024): nn.LSTM (cuDNN), model.pt on CUDA, the ONNX graphs on ORT's CUDA provider
# The project runs from this checkout (PYTHONPATH), not installed. Everything lands in OUT_DIR
# (the first argument, else $OUT, else ./gpu-check), 8 files: gpu_check.log, report.json,
# report.md, tf32-report.json, tf32-report.md, pytest.log, bench.json, bench.md (bench.png:
# `python -c "from lstm_deploy_export.bench import report; ..."` from bench.json). Each step runs
# whatever the ones before gave; exit status 0 when validation, pytest and bench passed, else 1.
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

step() { printf '\n== %s (%s s)\n' "$*" "$SECONDS" | tee -a "$log"; }

parts=()
for dir in "$root/.whl" /tmp/lstm-deploy-carry; do
    for part in "$dir"/onnxruntime-gpu.tar.xz.part*; do
        [ -f "$part" ] && parts+=("$part")
    done
done
if [ "${#parts[@]}" -gt 0 ]; then
    # one of each part name, in order (a part may lie in both folders)
    mapfile -t parts < <(printf '%s\n' "${parts[@]}" | awk -F/ '!seen[$NF]++' \
        | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2)
    step "unpacking ${#parts[@]} parts (${parts[*]##*/}) into $site"
    mkdir -p "$site"
    cat "${parts[@]}" | "$python" -c \
        "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='data')" \
        "$site" 2>&1 | tee -a "$log" || status=1
fi

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
fi
if [ -d "$site" ]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$root:$root/export:$root/serving${PYTHONPATH:+:$PYTHONPATH}"

step "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$python" - <<'PY'
import onnxruntime as ort
import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()}")
print(f"onnxruntime {ort.__version__} from {ort.__file__}")
print(f"providers: {ort.get_available_providers()}")
PY
    uptime
} 2>&1 | tee -a "$log"

ort_cuda_starts() {
    "$python" - <<'PY'
import sys
import tempfile

import onnx
import torch  # noqa: F401  (as in validate: torch first)
from lstm_deploy_export.check import ort_session
from onnx import TensorProto, helper

if (reason := ort_session.cuda_unavailable()) is not None:
    sys.exit(f"ONNX Runtime's CUDA provider: {reason}")
graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "relu",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
)
with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
    opset = [helper.make_opsetid("", 17)]  # IR 8: what any onnxruntime >= 1.14 reads
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=opset), f.name)
    try:
        session = ort_session.make_session(f.name, ort_session.CUDA)
    except ort_session.ProviderUnavailable as e:
        sys.exit(f"ONNX Runtime's CUDA provider: {e}")
print(f"ONNX Runtime's CUDA provider starts: {session.get_providers()}")
PY
}
if ! ort_cuda_starts 2>&1 | tee -a "$log"; then
    libs=$("$python" -c 'import nvidia, pathlib; print(":".join(sorted({str(p.parent) for r in nvidia.__path__ for p in pathlib.Path(r).rglob("lib*.so*")})))' 2>>"$log")
    if [ -n "$libs" ]; then
        echo "retrying with the nvidia-* wheels' libraries on LD_LIBRARY_PATH: $libs" | tee -a "$log"
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        ort_cuda_starts 2>&1 | tee -a "$log"
    fi
fi

step "lstm-deploy demo $bundle --thorough"
"$python" -m lstm_deploy_export.cli demo "$bundle" --thorough --force --no-progress 2>&1 \
    | tee -a "$log" || status=1
cp "$bundle/report.json" "$bundle/report.md" "$out_dir/" 2>>"$log" || status=1

step "lstm-deploy validate $bundle --quick --tf32 (TF32 rows: for information)"
"$python" -m lstm_deploy_export.cli validate "$bundle" --quick --tf32 --no-progress \
    --report "$bundle/tf32" 2>&1 | tee -a "$log" || echo "(exit $?: not counted)" | tee -a "$log"
cp "$bundle/tf32/report.json" "$out_dir/tf32-report.json" 2>>"$log"
cp "$bundle/tf32/report.md" "$out_dir/tf32-report.md" 2>>"$log"

step "pytest -m gpu"
cd "$root" || exit 1
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
"$python" -m pytest -m gpu -p no:cacheprovider -rA "${gpu_tests[@]}" 2>&1 \
    | tee "$out_dir/pytest.log" | tail -n 25 | tee -a "$log"
code=${PIPESTATUS[0]}
if [ "$code" -ne 0 ]; then status=1; fi

grid=${GPU_BENCH_GRID:---batch 1,64,256 --steps 128,1024 --hidden 256,1024}
step "lstm-deploy bench --device cuda $grid"
# shellcheck disable=SC2086  # the grid is words
"$python" -m lstm_deploy_export.cli bench --device cuda $grid --warmup 2 --repeat 10 --budget 3 \
    --out "$bundle/bench" 2>&1 | tee -a "$log" || status=1
cp "$bundle/bench/bench.json" "$bundle/bench/bench.md" "$out_dir/" 2>>"$log" || status=1

step "done: exit $status; reports in $out_dir"
exit "$status"
