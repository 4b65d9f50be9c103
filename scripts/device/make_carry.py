"""Build ``.devcarry/``: what the lent GPU machine needs for scripts/device/gpu_check.sh (see README.md here).

    .venv/bin/python scripts/device/make_carry.py [--arch sm_90] [--skip-bundles]

The GPU machine has torch with CUDA, numpy and scikit-learn, but no TVM, no Ray, no datasets and no network; what
travels with a call is at most 64 MiB. So this writes:

- ``whl/``: the apache-tvm-ffi wheel for the machine's Python 3.12 (what a bundle needs besides numpy);
- ``fmnist/``: Fashion-MNIST in its IDX files, the test split whole and the train split with only the calibration
  images of ``calibration_set("fashion-mnist", 1024, seed=0)`` kept (the others zero: gzip makes them nothing), so
  the reconstruction there sees exactly the calibration images it sees here;
- ``cache/checkpoints/``: the trained FP32 checkpoints of the Fashion-MNIST models;
- ``bundles/``: CUDA deployment bundles (``ptq2tvm bundle``) for ``--arch`` with their reference outputs, one copy of
  TVM's runtime libraries in ``lib/`` (the device script copies it into each bundle).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CARRY = ROOT / ".devcarry"
FM_MODELS = ("resnet_small", "mobilenet_v2_small")


def write_fmnist(dst: Path, n_calib: int = 1024) -> None:
    from ptq2tvm.data import calibration_set, subsample_indices
    from ptq2tvm.data.builtin import fashion_mnist_dir, load_fashion_mnist_raw

    src = fashion_mnist_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy2(src / name, dst / name)
    raw = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    images, _ = load_fashion_mnist_raw("train")
    keep = np.zeros(len(images), bool)
    keep[subsample_indices(len(images), n_calib, 0)] = True
    header = len(raw) - images.size
    kept = np.where(keep[:, None, None], images, 0).astype(np.uint8)
    (dst / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:header] + kept.tobytes(), 9))
    # the check: the calibration set read from the new folder is the one read from Debian's
    want = calibration_set("fashion-mnist", n_calib, seed=0)
    os.environ["PTQ2TVM_FASHION_MNIST_DIR"] = str(dst)
    try:                                     # (the per-process cache is keyed by the folder)
        got = calibration_set("fashion-mnist", n_calib, seed=0)
    finally:
        del os.environ["PTQ2TVM_FASHION_MNIST_DIR"]
    if not np.array_equal(want, got):
        raise SystemExit("the reduced train file does not give the same calibration images")
    print(f"fmnist: test split + {n_calib} calibration images, calibration set identical")


def copy_checkpoints(dst: Path) -> None:
    from ptq2tvm.train import default_cache_dir

    dst.mkdir(parents=True, exist_ok=True)
    for name in FM_MODELS:
        for f in default_cache_dir().glob(f"{name}__fashion-mnist__*"):
            shutil.copy2(f, dst / f.name)
    print("checkpoints:", sorted(p.name for p in dst.iterdir()))


def build_bundles(dst: Path, arch: str) -> None:
    import torch

    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.bundle import make_bundle
    from ptq2tvm.data import calibration_set
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.models import create_model
    from ptq2tvm.train import train_builtin

    dst.mkdir(parents=True, exist_ok=True)
    fm = calibration_set("fashion-mnist", 64, seed=0)
    rnd = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    # (what fits the 64 MiB a call carries, with the working tree: ResNet-18 batch 8 and MobileNetV2 W4A4 ran bit-exact
    # on the H200 on 2026-11-30 and gave their place to the squeeze-excitation models)
    specs = [("resnet_small", 8, 8, 1), ("resnet_small", 4, 4, 1), ("resnet_small", 2, 4, 1),
             ("resnet_small", 8, 8, 8), ("mobilenet_v2", 8, 8, 1), ("resnet18", 8, 8, 1),
             ("mobilenet_v3_large", 8, 8, 1), ("efficientnet_b0", 8, 8, 1)]
    lib_done = False
    for name, w, a, batch in specs:
        if name == "resnet_small":
            model, calib = train_builtin("resnet_small", dataset="fashion-mnist", progress=False)[0].eval(), fm
        else:
            torch.manual_seed(0)
            model, calib = create_model(name).eval(), rnd
        graph = to_integer(quantize(model, calib, QuantConfig(w, a), progress=False))
        tag = f"{name}_w{w}a{a}_b{batch}"
        so = dst / f"{tag}.build" / "model.so"
        so.parent.mkdir(parents=True, exist_ok=True)
        compile_so(graph, so, batch=batch, target=f"cuda:{arch}")
        out = dst / tag
        if out.exists():
            shutil.rmtree(out)
        make_bundle(so, out, graph=graph)
        shutil.rmtree(so.parent)
        if not lib_done:
            shutil.rmtree(dst / "lib", ignore_errors=True)
            shutil.copytree(out / "lib", dst / "lib")
            lib_done = True
        shutil.rmtree(out / "lib")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"bundle {tag}: {size / 1e6:.1f} MB")


def download_wheel(dst: Path) -> None:
    import tvm_ffi

    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(dst),
                    f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)
    print("wheels:", sorted(p.name for p in dst.iterdir()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90", help="CUDA arch of the bundles (H100/H200: sm_90)")
    p.add_argument("--skip-bundles", action="store_true")
    args = p.parse_args()
    CARRY.mkdir(exist_ok=True)
    download_wheel(CARRY / "whl")
    write_fmnist(CARRY / "fmnist")
    copy_checkpoints(CARRY / "cache" / "checkpoints")
    if not args.skip_bundles:
        build_bundles(CARRY / "bundles", args.arch)
    total = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {total / 2**20:.1f} MiB (a call carries at most 64 MiB with the working tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
