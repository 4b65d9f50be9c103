"""Model zoo: torchvision-compatible ImageNet CNNs, EDSR, a ResNet-18 FPN backbone, and small models for 28x28 / 8x8
single-channel data.

Every model is ``torch.fx``-traceable (no data-dependent Python control flow). The ImageNet models have
torchvision's parameter/buffer names and shapes, so torchvision checkpoints load with ``strict=True``; EDSR has the
names of the authors' code (sanghyun-son/EDSR-PyTorch). Which of them the quantizer / integer backends support is
listed in the README ("Supported models"); the definitions themselves use SiLU, Hardswish, squeeze-excitation
(``mul``), ``torch.cat``, ``chunk`` + channel shuffle, nearest upsampling and PixelShuffle where the originals do.

Each model has a task (:func:`model_task`): "classification" (logits (N, num_classes)), "super_resolution"
(image (N, C, s*H, s*W)) or "features" (a dict of feature maps); only classifiers take ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .densenet import DenseNet, densenet121
from .edsr import EDSR, edsr_x2, edsr_x4
from .efficientnet import EfficientNet, efficientnet_b0
from .fpn import BackboneWithFPN, resnet18_fpn
from .mnasnet import MNASNet, mnasnet0_5, mnasnet0_75, mnasnet1_0, mnasnet1_3
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from .regnet import RegNet, regnet_x_400mf, regnet_y_400mf
from .resnet import ResNet, resnet18, resnet34, resnet50, resnext50_32x4d
from .shufflenet import ShuffleNetV2, shufflenet_v2_x1_0
from .small import (edsr_small_fm, efficientnet_small_fm, mobilenet_v2_small, mobilenet_v3_small_fm,
                    resnet_small)
from .squeezenet import SqueezeNet, squeezenet1_1

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnext50_32x4d": resnext50_32x4d,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "mnasnet0_5": mnasnet0_5,
    "mnasnet0_75": mnasnet0_75,
    "mnasnet1_0": mnasnet1_0,
    "mnasnet1_3": mnasnet1_3,
    "regnet_x_400mf": regnet_x_400mf,
    "regnet_y_400mf": regnet_y_400mf,
    "shufflenet_v2_x1_0": shufflenet_v2_x1_0,
    "squeezenet1_1": squeezenet1_1,
    "densenet121": densenet121,
    "edsr_x2": edsr_x2,
    "edsr_x4": edsr_x4,
    "resnet18_fpn": resnet18_fpn,
    "resnet_small": resnet_small,
    "mobilenet_v2_small": mobilenet_v2_small,
    "mobilenet_v3_small_fm": mobilenet_v3_small_fm,
    "efficientnet_small_fm": efficientnet_small_fm,
    "edsr_small_fm": edsr_small_fm,
}

MODEL_TASKS: dict[str, str] = {
    "edsr_x2": "super_resolution",
    "edsr_x4": "super_resolution",
    "edsr_small_fm": "super_resolution",
    "resnet18_fpn": "features",
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODEL_REGISTRY)


def model_task(name: str) -> str:
    """"classification" (the default), "super_resolution" or "features" for zoo model ``name``."""
    return MODEL_TASKS.get(name, "classification")


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                 **kwargs) -> nn.Module:
    """Build zoo model ``name``; ``None`` keeps the model's default classes / input channels.

    Extra ``kwargs`` go to the builder (e.g. ``width_mult`` for the MobileNets, ``dropout``). Raises ``ValueError``
    for an unknown name, or for ``num_classes`` given to a model that is not a classifier.
    """
    builder = MODEL_REGISTRY.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if num_classes is not None:
        if model_task(name) != "classification":
            raise ValueError(f"model {name!r} is a {model_task(name).replace('_', '-')} model: it takes no "
                             f"num_classes (got {num_classes})")
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return builder(**kwargs)


__all__ = [
    "MODEL_REGISTRY", "MODEL_TASKS", "BackboneWithFPN", "DenseNet", "EDSR", "EfficientNet", "MNASNet",
    "MobileNetV2", "MobileNetV3", "RegNet", "ResNet", "ShuffleNetV2", "SqueezeNet", "create_model", "densenet121",
    "edsr_small_fm", "edsr_x2", "edsr_x4", "efficientnet_b0", "efficientnet_small_fm", "list_models",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v2_small",
    "mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3_small_fm", "model_task", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnet18_fpn", "resnet34", "resnet50", "resnet_small", "resnext50_32x4d",
    "shufflenet_v2_x1_0", "squeezenet1_1",
]
