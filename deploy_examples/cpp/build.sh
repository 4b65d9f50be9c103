#!/usr/bin/env bash
# Build deploy_examples/cpp/run_model.cc against a ptq2tvm bundle: BUNDLE/lib/libtvm_runtime.so plus the headers and
# libtvm_ffi.so of the Python packages apache-tvm / apache-tvm-ffi (build machine only; the binary needs the two .so
# files at run time, found through its rpath: BUNDLE/lib and the directory of libtvm_ffi.so, or copy that one into
# BUNDLE/lib too).
#   bash deploy_examples/cpp/build.sh BUNDLE [OUT]      (OUT default: BUNDLE/run_model)
set -euo pipefail
bundle="${1:?usage: build.sh BUNDLE [OUT]}"
out="${2:-$bundle/run_model}"
PY="${PYTHON:-$(dirname "$0")/../../.venv/bin/python}"
ffi_dir="$("$PY" -c 'import os, tvm_ffi; print(os.path.dirname(tvm_ffi.__file__))')"
lib="$(cd "$bundle/lib" && pwd)"
g++ -std=c++17 -O2 -I"$ffi_dir/include" "$(dirname "$0")/run_model.cc" -o "$out" \
  -L"$ffi_dir/lib" -L"$lib" -ltvm_ffi -ltvm_runtime -Wl,-rpath,"$lib" -Wl,-rpath,"$ffi_dir/lib"
echo "built $out"
