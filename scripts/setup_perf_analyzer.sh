#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer (Triton's benchmarking client) for `lstm-deploy loadtest --tool
# perf_analyzer` and tests/test_perf_analyzer.py, in a folder of its own, and print its wrapper.
#
#   scripts/setup_perf_analyzer.sh [DIR]       (default: .venv-perf-analyzer, which the tests use)
#
# The binary is the one the tritonclient 2.41.0 wheel ships (bin/perf_analyzer): the newer
# perf-analyzer wheels need glibc 2.38. It goes into its own venv, so it never touches .venv's
# tritonclient (2.73). It needs two shared libraries that no wheel of it brings, installed here by
# package name: libcudart.so.12 (PyPI's nvidia-cuda-runtime-cu12; perf_analyzer links it even
# when no GPU is used) and libb64.so.0d (Debian's libb64-0d, fetched with a private, throw-away
# apt state and unpacked: nothing is installed on the system). DIR/perf_analyzer is a wrapper that
# puts both on LD_LIBRARY_PATH. Running it again re-checks and reuses what is there.
#
# Then: lstm-deploy loadtest --tool perf_analyzer --perf-analyzer .venv-perf-analyzer/perf_analyzer
#   or: export LSTM_DEPLOY_PERF_ANALYZER=$PWD/.venv-perf-analyzer/perf_analyzer
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${1:-.venv-perf-analyzer}"
python="${PYTHON:-python3}"
TRITONCLIENT=2.41.0
CUDART=12.3.101  # CUDA 12.3: what Triton 23.12 (tritonclient 2.41.0) was built with
B64=libb64-0d

if [ ! -x "$dir/bin/python" ]; then
  "$python" -m venv "$dir"
fi
# --no-deps: only the binary and the library are wanted, not tritonclient's Python client.
"$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  "tritonclient==$TRITONCLIENT" "nvidia-cuda-runtime-cu12==$CUDART"
# Where the wheel put libcudart.so.12, relative to the venv (the wrapper finds it from there).
cudart=$("$dir/bin/python" -c 'import os, sys, nvidia.cuda_runtime as m
print(os.path.relpath(os.path.join(m.__path__[0], "lib"), sys.prefix))')
if [ ! -f "$dir/$cudart/libcudart.so.12" ]; then
  echo "no libcudart.so.12 in $dir/$cudart" >&2
  exit 1
fi

lib="$dir/lib"
if [ ! -f "$lib/libb64.so.0d" ]; then
  for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null; then
      echo "$tool not found: perf_analyzer needs libb64.so.0d (Debian's $B64) in $lib" >&2
      exit 1
    fi
  done
  # The Debian archive and release this machine's apt already uses.
  . /etc/os-release
  mirror=$(cat /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  suite="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb ${mirror:?no Debian archive in /etc/apt} $suite main" > "$work/sources.list"
  apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
       -o APT::Update::Error-Mode=any -o Acquire::Retries=2)
  if [ "$(id -u)" = 0 ]; then apt+=(-o APT::Sandbox::User=root); fi
  "${apt[@]}" update >/dev/null
  (cd "$work" && "${apt[@]}" download "$B64" >/dev/null)
  dpkg-deb -x "$work"/${B64}_*.deb "$work/root"
  mkdir -p "$lib"
  cp -L "$work"/root/usr/lib/*/libb64.so.0d "$lib/"
fi

wrapper="$dir/perf_analyzer"
cat > "$wrapper" <<EOF
#!/bin/sh
# perf_analyzer of tritonclient $TRITONCLIENT, with its libraries (scripts/setup_perf_analyzer.sh)
here=\$(CDPATH= cd -- "\$(dirname -- "\$0")" && pwd)
LD_LIBRARY_PATH="\$here/lib:\$here/$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
  exec "\$here/bin/perf_analyzer" "\$@"
EOF
chmod +x "$wrapper"
# Fails here, clearly, if the binary cannot load its libraries.
version=$("$wrapper" --version 2>&1) || { echo "$wrapper does not run: $version" >&2; exit 1; }
echo "perf_analyzer ready: $(cd "$dir" && pwd)/perf_analyzer ($version)"
