#!/usr/bin/env bash
# The main job on the built-in default: train (or load the cached) Fashion-MNIST ResNet, quantize W8A8 and W4A4,
# compile the .so, evaluate, prove parity, benchmark. Writes runs/demo/summary.json. Extra arguments go to `ptq2tvm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    if [[ -x .venv/bin/ptq2tvm ]]; then exec .venv/bin/ptq2tvm demo --help; fi
    # no environment yet: the options without installing anything (tests/test_firsthour2.py keeps this in sync)
    cat <<'USAGE'
usage: bash scripts/demo.sh [options]   (the first run installs ./.venv: scripts/setup_env.sh)

Train (or load the cached) model on a built-in dataset, quantize it at each --bits setting, compile the .so,
evaluate, prove parity and benchmark it -> runs/demo/summary.json.

options:
  --out OUT              output folder (default: runs/demo)
  --model MODEL          built-in zoo model, e.g. mobilenet_v2_small (default: resnet_small)
  --data {fashion-mnist,digits}
                         built-in dataset (default: fashion-mnist)
  --bits BITS [BITS ...] W/A settings, e.g. 8/8 4/4 2/4 (default: 8/8 4/4)
  --calib-size N         calibration images from the training split (default: 512)
  --threads N            threads of every runtime (default: 2, or 1 when the machine is busy)
  --repeats N            timed turns per runtime in the latency benchmark (default: 30)
  --json PATH            also write the result as JSON to PATH
  --no-progress          no progress bars
USAGE
    exit 0
  fi
done
bash scripts/setup_env.sh
exec .venv/bin/ptq2tvm demo "$@"
