#!/usr/bin/env bash
# Build deploy_examples/cpp/run_model.cc against a ptq2tvm bundle: BUNDLE/lib/libtvm_runtime.so plus the headers and
# libtvm_ffi.so of the installed apache-tvm-ffi Python package (needed on the build machine only). libtvm_ffi.so is
# copied into BUNDLE/lib and the binary finds both libraries through its rpath ($ORIGIN/lib): BUNDLE then runs on a
# host without Python (the same CPU features, see model.json "cpu_features"). The two added files make the folder
# more than the bundle ptq2tvm wrote, so `ptq2tvm bundle --force` will not overwrite it: bundle into a new folder.
#   bash deploy_examples/cpp/build.sh BUNDLE            (writes BUNDLE/run_model and BUNDLE/lib/libtvm_ffi.so)
set -euo pipefail
bundle="${1:?usage: build.sh BUNDLE}"
out="$bundle/run_model"
PY="${PYTHON:-$(dirname "$0")/../../.venv/bin/python}"
ffi_dir="$("$PY" -c 'import os, tvm_ffi; print(os.path.dirname(tvm_ffi.__file__))')"
lib="$(cd "$bundle/lib" && pwd)"
cp "$ffi_dir/lib/libtvm_ffi.so" "$lib/"
g++ -std=c++17 -O2 -I"$ffi_dir/include" "$(dirname "$0")/run_model.cc" -o "$out" \
  -L"$lib" -ltvm_ffi -ltvm_runtime -Wl,--disable-new-dtags -Wl,-rpath,'$ORIGIN/lib'
echo "built $out"
