"""Quantize your own PyTorch CNN with a folder of unlabeled images and compile it to a .so.

    python deploy_examples/quantize_custom_model.py --images /path/to/images --out runs/mynet --w-bits 4 --a-bits 4

Replace `build_model()` with your model (any torch.fx-traceable CNN of supported layers; see README) and its weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.nn as nn

from ptq2tvm.api import compile_so, quantize, to_integer
from ptq2tvm.backend.runtime import CompiledModel
from ptq2tvm.data import load_dataset
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.reference import run_reference


def build_model() -> nn.Module:
    """Your FP32 model, weights loaded, in eval mode. Here: a zoo ResNet-18 with torchvision parameter names."""
    from ptq2tvm.models import create_model

    model = create_model("resnet18")
    # model.load_state_dict(torch.load("resnet18-f37072fd.pth"))  # a torchvision checkpoint loads as is
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of calibration images (labels not needed)")
    p.add_argument("--n", type=int, default=256, help="number of calibration images")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--out", default="runs/custom")
    args = p.parse_args()

    calib = load_dataset(args.images, limit=args.n).images          # Resize(256) + CenterCrop(224), ImageNet norm
    qm = quantize(build_model(), calib, QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits))
    graph = to_integer(qm)
    out = Path(args.out)
    qm.save(out / "fakequant.pt")
    graph.save(out / "model.qgraph.npz")
    compile_so(graph, out / "model.so", batch=1)

    so = CompiledModel(out / "model.so", threads=2)
    q = graph.input.quantize(calib[:4])
    assert (so.run_int(q) == run_reference(graph, q)).all(), "the .so must equal the reference executor"
    print(f"wrote {out}/model.so (+ model.json); top-1 of the first images: {so(calib[:4]).argmax(1).tolist()}")


if __name__ == "__main__":
    main()
