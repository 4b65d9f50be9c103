#!/usr/bin/env bash
# The GPU checks, run on the lent GPU machine from the repository root (see README.md here):
#   bash scripts/device/gpu_check.sh [TOTAL_SECONDS] [JOBS]
# needs .devcarry/ (scripts/device/make_carry.py) carried with the call; writes everything under $OUT.
# 1. environment; 2. every CUDA bundle: run_model.py --check (bit-exact vs the reference executor) and
# latency_bundle.py (bundle vs PyTorch FP32 on the GPU); 3. the tests that skip without a CUDA device (pytest);
# 4. resnet_small reconstructions alone on the GPU, one after the other (accuracy_fmnist.py --device cuda, timed, their
# accuracy against the CPU rows; SOLO="BITS:METHOD ...", default "W2A4:qdrop+adaq"); 5. accuracy rows
# (benchmarks/gpu_sweep.py, JOBS at a time; JOBS=0 skips them) until TOTAL_SECONDS less the packing time;
# 6. the rows and checkpoints packed into $OUT/sweep.tgz.part* (< 16 MiB each).
set -u
TOTAL_SECONDS=${1:-540}
JOBS=${2:-14}
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site
# TVM's CUDA runtime needs libcudart.so.13: the toolkit's, else the one in torch's nvidia wheels
CUDART_DIR=$(python3 scripts/device/find_cudart.py)
export LD_LIBRARY_PATH=${CUDART_DIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "libcudart from: $CUDART_DIR"
export PTQ2TVM_FASHION_MNIST_DIR=$PWD/.devcarry/fmnist PTQ2TVM_CACHE=$PWD/.devcarry/cache
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, numpy, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'numpy', numpy.__version__, 'python', platform.python_version())"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > /tmp/env.txt 2>&1
cat /tmp/env.txt

stamp "bundles"
[ "${SKIP_BUNDLES:-0}" = 1 ] && echo "(skipped: SKIP_BUNDLES=1)"
for b in .devcarry/bundles/*/; do
  [ -f "$b/model.so" ] && [ "${SKIP_BUNDLES:-0}" != 1 ] || continue
  tag=$(basename "$b"); model=${tag%%_w*}
  cp -r .devcarry/bundles/lib "$b/lib"
  echo "== $tag"
  timeout 45 python3 "$b/run_model.py" --check 2>&1 | tail -3
  timeout 60 python3 benchmarks/latency_bundle.py --bundle "$b" --model "$model" --repeats 20 --threads 16 \
    --out "/tmp/lat_$tag.json" 2>&1 | tail -6
done
python3 - <<'EOF'
import glob, json, os
rows = {os.path.basename(p)[4:-5]: json.load(open(p)) for p in sorted(glob.glob("/tmp/lat_*.json"))}
json.dump(rows, open(os.path.join(os.environ["OUT"], "latency_bundles.json"), "w"), indent=1)
EOF

stamp "tests/test_recon_runtime.py (its CUDA tests skip without a GPU)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_recon_runtime.py 2>&1 \
  | tee "$OUT/gpu_tests.txt" | tail -8

rm -rf /tmp/sweep && mkdir -p /tmp/sweep/rows
for solo in ${SOLO:-W2A4:qdrop+adaq}; do
  bits=${solo%%:*}; method=${solo#*:}
  stamp "resnet_small $bits $method alone on the GPU (its CPU twin: accuracy_fmnist_fidelity.json)"
  timeout 200 python3 benchmarks/accuracy_fmnist.py --models resnet_small --bits "$bits" --methods "$method" --seeds 0 \
    --multi-seed-bits all --iters 2000 --no-ray --no-so --device cuda --out "/tmp/sweep/rows/solo_${bits}_$method" \
    2>&1 | tee /tmp/solo_full.txt | grep -v '^|' | tail -5 | tee -a /tmp/solo_row.txt
  grep -q Traceback /tmp/solo_full.txt && { echo "the reconstruction failed on the GPU: stopping"; \
    tar czf "$OUT/sweep.tgz.partaa" -C /tmp sweep; exit 1; }
done

SWEEP_SECONDS=$(( TOTAL_SECONDS - ( $(date +%s) - T0 ) - 25 ))
if [ "$JOBS" -gt 0 ]; then
  stamp "accuracy rows for $SWEEP_SECONDS s, $JOBS at a time"
  python3 benchmarks/gpu_sweep.py run --rows scripts/device/rows.txt --jobs "$JOBS" --deadline "$SWEEP_SECONDS" \
    --out /tmp/sweep --min-left 90
fi
cp /tmp/env.txt /tmp/solo_row.txt /tmp/lat_*.json /tmp/sweep/ 2>/dev/null
find /tmp/sweep -name '*.png' -delete
tar czf - -C /tmp sweep | split -b 15M - "$OUT/sweep.tgz.part"
ls -la "$OUT"
stamp "done"
