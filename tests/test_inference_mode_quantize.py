"""``quantize`` called inside ``torch.inference_mode()`` (a common wrapper around evaluation code) returns a usable
QuantModel: its tensors were inference tensors, so calling it (even inside inference mode), ``to_integer`` and the
reconstruction methods raised a raw ``RuntimeError: Inference tensors do not track version counter``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.api import quantize, to_integer
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.reference import run_reference


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("model_in_inference_mode", [False, True])
def test_quantize_inside_inference_mode_gives_the_same_usable_model(model_in_inference_mode):
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    want = to_integer(quantize(_model(), x, QuantConfig(8, 8), progress=False))
    model = None if model_in_inference_mode else _model()
    with torch.inference_mode():
        qm = quantize(model if model is not None else _model(), x, QuantConfig(8, 8), progress=False)
        with_im = qm(torch.from_numpy(x))
    with torch.no_grad():
        out = qm(torch.from_numpy(x))
    assert torch.equal(out, with_im)
    graph = to_integer(qm)
    q = graph.input.quantize(x)
    assert np.array_equal(run_reference(graph, q), run_reference(want, q))


def test_reconstruction_inside_inference_mode_runs():
    from ptq2tvm.reconstruct import ReconSettings

    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        qm = quantize(_model(), x, QuantConfig(4, 8), method="adaround", progress=False,
                      settings=ReconSettings(method="adaround", iters=2))
    with torch.no_grad():
        assert torch.isfinite(qm(torch.from_numpy(x))).all()
