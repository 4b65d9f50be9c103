#!/usr/bin/env bash
# The main job on the built-in default: train (or load the cached) Fashion-MNIST ResNet, quantize W8A8 and W4A4,
# compile the .so, evaluate, prove parity, benchmark. Writes runs/demo/summary.json. Extra arguments go to `ptq2tvm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/ptq2tvm demo "$@"
