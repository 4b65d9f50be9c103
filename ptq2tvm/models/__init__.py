"""Model zoo: torchvision-compatible ImageNet CNNs plus small models for 28x28 / 8x8 single-channel data.

Every model is ``torch.fx``-traceable and built only from the layer kinds the quantizer supports. The ImageNet
models have torchvision's parameter/buffer names and shapes, so torchvision checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mnasnet import MNASNet, mnasnet0_5, mnasnet0_75, mnasnet1_0, mnasnet1_3
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .regnet import RegNet, regnet_x_400mf
from .resnet import ResNet, resnet18, resnet50
from .small import mobilenet_v2_small, resnet_small

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mnasnet0_5": mnasnet0_5,
    "mnasnet0_75": mnasnet0_75,
    "mnasnet1_0": mnasnet1_0,
    "mnasnet1_3": mnasnet1_3,
    "regnet_x_400mf": regnet_x_400mf,
    "resnet_small": resnet_small,
    "mobilenet_v2_small": mobilenet_v2_small,
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODEL_REGISTRY)


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                 **kwargs) -> nn.Module:
    """Build zoo model ``name``; ``None`` keeps the model's default classes / input channels.

    Extra ``kwargs`` go to the builder (e.g. ``width_mult`` for the MobileNets, ``dropout``).
    """
    builder = MODEL_REGISTRY.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return builder(**kwargs)


__all__ = [
    "MODEL_REGISTRY", "MNASNet", "MobileNetV2", "RegNet", "ResNet", "create_model", "list_models",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v2_small",
    "regnet_x_400mf", "resnet18", "resnet50", "resnet_small",
]
