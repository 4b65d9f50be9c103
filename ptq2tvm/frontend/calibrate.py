"""Calibration-only PTQ (round to nearest): MSE-searched weight and activation ranges."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DataError
from .qmodel import QuantConfig, QuantModel
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
def calibrate(qm: QuantModel, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> QuantModel:
    """Set weight scales (per channel, L_p search) and activation ranges (per tensor, L_p search on FP activations)."""
    images = validate_calibration(images, qm.graph.input_shape)
    for layer in qm.layers.values():
        layer.wq.init_scale(layer.weight, qm.config.weight_lp)
    qm.eval().set_quant(weights=False, acts=False)
    qm.set_observing(True)
    try:
        for i in tqdm(range(0, len(images), batch_size), desc="calibrate", disable=not progress, leave=False):
            qm(torch.from_numpy(images[i:i + batch_size]))
    finally:
        qm.set_observing(False)
    for q in qm.act_quant.values():
        q.compute_range(qm.config.act_lp)
    return qm.set_quant(weights=True, acts=True)


def quantize_rtn(model: nn.Module, calib_images: np.ndarray, config: QuantConfig | None = None,
                 batch_size: int = 64, progress: bool = True) -> QuantModel:
    """Trace, fold BN, and calibrate ``model`` into a fake-quant :class:`QuantModel`."""
    config = (config or QuantConfig()).validate()
    calib_images = validate_calibration(calib_images)
    graph = trace_model(model, tuple(calib_images.shape[1:]))
    return calibrate(QuantModel(graph, config), calib_images, batch_size, progress)
