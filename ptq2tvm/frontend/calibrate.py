"""Calibration-only PTQ (round to nearest): MSE-searched weight and activation ranges."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DataError
from ..fold.bounds import fit_integer_bounds
from .qmodel import QuantConfig, QuantModel
from .quantizers import NonFiniteActivation
from .trace import trace_model


def validate_calibration(images: np.ndarray, input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Check calibration images: non-empty float (N, C, H, W), finite, matching ``input_shape`` if given."""
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.ndim != 4:
        raise DataError(f"calibration data must be (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError("calibration data is empty (0 images)")
    bad = ~np.isfinite(images)
    if bad.any():
        idx = np.unique(np.nonzero(bad)[0])
        raise DataError(f"calibration data has {int(bad.sum())} NaN/Inf values in {len(idx)} image(s), "
                        f"first at index {int(idx[0])}")
    if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
        raise DataError(f"calibration images have shape {tuple(images.shape[1:])}, the model expects "
                        f"{tuple(input_shape)}")
    return images.astype(np.float32, copy=False)


@torch.no_grad()
def calibrate(qm: QuantModel, images: np.ndarray, batch_size: int = 64, progress: bool = True,
              device: torch.device | str | None = None) -> QuantModel:
    """Set weight scales (per channel, L_p search) and activation ranges (per tensor, L_p search on FP activations).
    ``device``: where the model and the batches run (default: where the model is); the model stays there."""
    images = validate_calibration(images, qm.graph.input_shape)
    if device is not None:
        qm.to(device)
    device = next(qm.parameters()).device
    for layer in qm.layers.values():
        layer.wq.init_scale(layer.weight, qm.config.weight_lp)
    qm.eval().set_quant(weights=False, acts=False)
    qm.set_observing(True)
    try:
        for i in tqdm(range(0, len(images), batch_size), desc="calibrate", disable=not progress, leave=False):
            batch = torch.from_numpy(images[i:i + batch_size]).to(device)
            try:
                qm(batch)
            except NonFiniteActivation:
                qm.set_observing(False)
                raise NonFiniteActivation(describe_nonfinite(qm, batch, first_image=i)) from None
    finally:
        qm.set_observing(False)
    for key, q in qm.act_quant.items():
        lo, hi = (0.0 if q.nonneg else min(q._min, 0.0)), max(q._max, 0.0)
        if hi - lo <= 0.0:
            warnings.warn(f"calibration: the range of tensor '{key.replace('__', '.')}' collapsed to [0, 0] on the "
                          f"{len(images)} calibration images (observed min {q._min:.3g}, max {q._max:.3g}"
                          f"{', after a ReLU' if q.nonneg else ''}): it is quantized as the constant 0 on a 1e-8 "
                          "range; any other value at run time saturates", RuntimeWarning, stacklevel=2)
        q.compute_range(qm.config.act_lp)
    qm.set_quant(weights=True, acts=True)
    fit_integer_bounds(qm)
    return qm


@torch.no_grad()
def describe_nonfinite(qm: QuantModel, batch: torch.Tensor, first_image: int = 0) -> str:
    """The message for a NaN/Inf activation: the first node (in graph order) whose float output is non-finite, and
    why (non-finite parameters, or float32 overflow of finite ones)."""
    was = [(q.enabled, q.observing) for q in qm.act_quant.values()]
    try:
        qm.set_observing(False)
        for q in qm.act_quant.values():
            q.enabled = False
        env = qm(batch, return_all=True)
    finally:
        for q, (e, o) in zip(qm.act_quant.values(), was):
            q.enabled, q.observing = e, o
    for n in qm.graph.nodes:
        y = env.get(n.name)
        if y is None or bool(torch.isfinite(y).all()):
            continue
        bad = ~torch.isfinite(y)
        imgs = torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).flatten()
        where = f"node '{n.name}' ({n.op}) is the first whose output is NaN/Inf (image {first_image + int(imgs[0])}"
        if y.dim() > 1:
            chans = torch.nonzero(bad.transpose(0, 1).reshape(y.shape[1], -1).any(dim=1)).flatten().tolist()
            where += f", channel(s) {chans[:8]}"
        where += ")"
        if n.op in ("conv", "linear"):
            layer = qm.layer(n.name)
            for pname in ("weight", "bias"):
                p = getattr(layer, pname).detach()
                pb = ~torch.isfinite(p)
                if pb.any():
                    ch = torch.nonzero(pb.reshape(p.shape[0], -1).any(dim=1)).flatten().tolist()
                    return (f"non-finite activation seen during calibration: {where}: its {pname} (with any "
                            f"BatchNorm after it folded in) has {int(pb.sum())} NaN/Inf value(s) in output channel(s) {ch[:8]}")
            return (f"non-finite activation seen during calibration: {where}: its parameters are finite (max |weight| "
                    f"{float(layer.weight.detach().abs().max()):.3g}), the float32 result overflows")
        return f"non-finite activation seen during calibration: {where}"
    return "non-finite activation seen during calibration (no node reproduces it in float)"


def quantize_rtn(model: nn.Module, calib_images: np.ndarray, config: QuantConfig | None = None,
                 batch_size: int = 64, progress: bool = True,
                 device: torch.device | str | None = None) -> QuantModel:
    """Trace, fold BN, and calibrate ``model`` into a fake-quant :class:`QuantModel` (on ``device``, default CPU)."""
    config = (config or QuantConfig()).validate()
    calib_images = validate_calibration(calib_images)
    graph = trace_model(model, tuple(calib_images.shape[1:]))
    if graph.dead_layers:
        warnings.warn(f"{len(graph.dead_layers)} layer(s) of the model compute results that reach no output and are "
                      f"left out of the quantized model: {', '.join(graph.dead_layers[:8])}"
                      + (" ..." if len(graph.dead_layers) > 8 else ""), stacklevel=2)
    return calibrate(QuantModel(graph, config), calib_images, batch_size, progress, device)
