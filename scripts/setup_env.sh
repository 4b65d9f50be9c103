#!/usr/bin/env bash
# Create ./.venv with everything ptq2tvm needs (idempotent; a stamp file skips the work when nothing changed).
# CPU PyTorch is installed first and pinned (torch==2.13.0) so that no dependency can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PTQ2TVM_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.deps-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
  # ONNX models in (ptq2tvm/onnx_import.py): onnx2torch without its torchvision dependency (only its NMS/RoiAlign
  # converters use torchvision; a torchvision wheel would pull another torch)
  "$VENV/bin/python" -m pip install -q --no-deps "onnx2torch==1.5.15"
  touch "$stamp"
fi
# Built-in real data: Debian's Fashion-MNIST package (scikit-learn's digits ship with scikit-learn).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "[setup] installing dataset-fashion-mnist (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
