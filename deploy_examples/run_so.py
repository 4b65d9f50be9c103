"""Run a ptq2tvm .so with nothing but numpy and TVM's runtime (no torch, no ptq2tvm needed on the target).

    python deploy_examples/run_so.py runs/demo/w8a8/model.so input.npy

The sidecar model.json (written by `ptq2tvm compile`) gives the input shape, scale and zero point, and the output's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tvm
from tvm import relax


def main(so_path: str, npy_path: str) -> None:
    meta = json.loads(Path(so_path).with_suffix(".json").read_text())
    inp, out = meta["input"], meta["output"]
    x = np.load(npy_path).astype(np.float32)                     # (N, C, H, W), preprocessed like training data
    q = np.clip(np.rint(x / inp["scale"]) + inp["zero_point"], 0, (1 << inp["bits"]) - 1).astype(np.uint8)
    dev = tvm.cuda(0) if meta["target"].get("kind") == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(so_path), dev)
    batch = meta["batch"]
    results = []
    for i in range(0, len(q), batch):
        chunk = q[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        results.append(vm["main"](tvm.runtime.tensor(chunk, dev)).numpy()[:n])
    y = (np.concatenate(results).astype(np.float32) - out["zero_point"]) * out["scale"]
    print("top-1:", y.argmax(1).tolist())


if __name__ == "__main__":
    main(*sys.argv[1:3])
