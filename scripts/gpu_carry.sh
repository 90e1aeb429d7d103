#!/usr/bin/env bash
# Packs the onnxruntime-gpu wheel for the lent GPU machine, which has no network and takes at most
# 64 MiB per call: the wheel unpacked (without its TensorRT provider, which nothing here uses),
# as one xz tarball (about 200 MB from the 255 MB wheel) split into 51 MB parts under .whl/.
# Carry one part per call while the machine is warm, each copied to /tmp/lstm-deploy-carry there;
# scripts/gpu_check.sh unpacks the parts it finds (there and in .whl/) before it starts.
#
#   bash scripts/gpu_carry.sh [VERSION]     default 1.31.1 (CUDA 13, cuDNN 9; Python 3.12)
set -euo pipefail

version=${1:-1.31.1}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$root/.whl"
rm -f "$root"/.whl/onnxruntime-gpu.tar.xz.part*

echo "downloading onnxruntime-gpu==$version (cp312, manylinux x86-64)" >&2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work" "onnxruntime-gpu==$version"
unzip -q "$work"/onnxruntime_gpu-*.whl -d "$work/site"
rm -f "$work"/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
echo "packing with xz -9 (a few minutes on 2 cores)" >&2
tar -C "$work/site" -cf - . | xz -9 -T0 >"$work/onnxruntime-gpu.tar.xz"
split -n 4 -d "$work/onnxruntime-gpu.tar.xz" "$root/.whl/onnxruntime-gpu.tar.xz.part"
ls -l "$root"/.whl/onnxruntime-gpu.tar.xz.part*
