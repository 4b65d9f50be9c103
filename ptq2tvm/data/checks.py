"""Does the calibration data fit the model? Checks run before tracing, so a mismatch gets one clear line.

- :func:`check_input_channels`: the images' channel count against the model's first ``Conv2d`` (``in_channels``),
  with a hint when the array looks channels-last.
- :func:`check_fixed_input_shape`: the images' (H, W) against a model's fixed input dimensions (an ONNX model's
  input: ``model.fixed_input_shape``, set by :func:`ptq2tvm.onnx_import.onnx_to_torch`); channels are the first
  check's.
- :func:`input_scale_notes`: the scale of the first conv's output on the data against the running statistics of
  the ``BatchNorm2d`` after it, i.e. against the inputs the model saw in training. Raw 0..255 pixels given to a model
  trained on normalized inputs come out ~100x off.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..errors import DataError
from .arrays import looks_nhwc


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``nn.Conv2d`` of ``model`` in registration order (the stem of a usual CNN), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def expected_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: ``in_channels`` of its first Conv2d (None if it has none)."""
    fc = first_conv(model)
    return int(fc[1].in_channels) if fc is not None else None


def check_input_channels(model: nn.Module, images: np.ndarray, what: str = "calibration data",
                         source: str | None = None) -> None:
    """Raise :class:`DataError` when ``images`` (N, C, H, W) do not have the channels of the model's first conv.

    The hint fits where the images came from (``source``): ``"folder"`` (an image folder: ``--channels``),
    ``"preprocess"`` (a ``--preprocess`` function: what it must return), ``"builtin"`` (the 1-channel built-in
    datasets), ``"array"`` or None (an array: convert its channels); an array that looks channels-last gets the
    transpose whatever the source. Then :func:`check_fixed_input_shape` (height and width), so that a channel
    mismatch gets the channel hint even for a model with a fixed input."""
    fc = first_conv(model)
    if fc is not None and images.ndim == 4:
        name, conv = fc
        want, have = int(conv.in_channels), int(images.shape[1])
        if have != want:
            raise DataError(f"the model expects {want}-channel input (its first conv '{name}' has "
                            f"in_channels={want}), the {what} has {have} channel(s) "
                            f"(shape {tuple(images.shape)}){channel_hint(want, have, images.shape, source)}")
    check_fixed_input_shape(model, images, what)


def check_fixed_input_shape(model: nn.Module, images: np.ndarray, what: str = "calibration data") -> None:
    """Raise :class:`DataError` when ``model.fixed_input_shape`` (e.g. an ONNX input's dims: ints where fixed, None
    where dynamic) fixes a height / width that differs from the images' (N, C, H, W). The batch dimension is not
    compared, nor the channels: :func:`check_input_channels` checks them against the first conv, with hints that fit
    the data (channels-last arrays, ``--channels`` for a folder). Models without the attribute pass."""
    fixed = getattr(model, "fixed_input_shape", None)
    if fixed is None or images.ndim != 4 or len(fixed) != 4:
        return
    if all(f is None or int(f) == int(h) for f, h in zip(fixed[2:], images.shape[2:])):
        return
    shown = "(" + ", ".join("?" if f is None else str(f) for f in fixed) + ")"
    source = getattr(model, "fixed_input_source", "the model")
    raise DataError(f"{source} has the fixed input shape {shown}, the {what} has shape {tuple(images.shape)}: give "
                    f"images of that size, or export the model at the data's size (or with dynamic height/width)")


def channel_hint(want: int, have: int, shape: tuple[int, ...], source: str | None) -> str:
    """The '; ...' end of the channel-mismatch message for data from ``source`` (see :func:`check_input_channels`)."""
    nhwc = looks_nhwc(shape) and shape[3] == want
    if source == "preprocess":
        return ("; the --preprocess function returns channels-last (H, W, C) arrays: return arr.transpose(2, 0, 1)"
                if nhwc else f"; the --preprocess function must return ({want}, H, W) arrays (channels first), "
                f"it returned {have} channel(s)")
    if nhwc:
        return "; the array looks channels-last (N, H, W, C): use x.transpose(0, 3, 1, 2)"
    if source == "folder":
        return f"; pass --channels {want}" if want in (1, 3) else \
            f"; a {want}-channel model needs --preprocess file.py:fn returning ({want}, H, W) arrays"
    if source == "builtin":
        return f"; the built-in datasets are 1-channel: give {want}-channel data of your own (--data)"
    how = ("x.mean(1, keepdims=True) for grayscale" if want == 1 else
           "np.repeat(x, 3, axis=1) for grayscale images" if want == 3 and have == 1 else
           f"keep the model's {want} channels")
    return (f"; convert the array's channels before saving it (e.g. {how})" if source == "array" else
            f"; convert the images' channels (e.g. {how})")


@torch.no_grad()
def input_scale_notes(model: nn.Module, images: np.ndarray, max_images: int = 64, factor: float = 4.0) -> list[str]:
    """A warning when the data's scale differs by more than ``factor`` from what the model saw in training, judged
    at the first conv: the RMS of its output on the data (minus the BN running mean) against the BN's running std.
    Empty when the model has no Conv2d followed by a BatchNorm2d, or when the scales agree."""
    mods = list(model.named_modules())
    conv_i = next((i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Conv2d)), None)
    if conv_i is None:
        return []
    cname, conv = mods[conv_i]
    bn = next((m for _, m in mods[conv_i + 1:] if isinstance(m, nn.BatchNorm2d)), None)
    if bn is None or bn.num_features != conv.out_channels or bn.running_var is None:
        return []
    x = torch.from_numpy(np.ascontiguousarray(images[:max_images], dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != conv.in_channels:
        return []
    try:
        y = conv(x)
    except Exception:  # noqa: BLE001 - a shape problem is reported by the trace, not here
        return []
    dev = (y - bn.running_mean.view(1, -1, 1, 1)).pow(2).mean((0, 2, 3))
    var = bn.running_var.clamp_min(1e-12)
    ratio = math.sqrt(float((dev / var).mean()))
    if 1 / factor <= ratio <= factor:
        return []
    return [f"the first conv '{cname}' sees inputs about {ratio:.3g}x {'larger' if ratio > 1 else 'smaller'} than "
            "in training (its output against the running statistics of the BatchNorm after it): the data is probably "
            "not preprocessed like the training data (raw 0..255 pixels? other mean/std?)"]


__all__ = ["channel_hint", "check_fixed_input_shape", "check_input_channels", "expected_channels", "first_conv", "input_scale_notes"]
