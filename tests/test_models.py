"""Model zoo: torchvision-compatible names/shapes/parameter counts, fx traceability, allowed ops, small models.

Expected numbers: parameter counts are torchvision's documented ``num_params`` (weights metadata in
torchvision/models/{resnet,mobilenetv2,mnasnet,regnet}.py); the MobileNetV2 width variants, key names, shapes
and the state_dict signatures were read off torchvision 0.29.1's own model classes (same source files).
"""

from __future__ import annotations

import functools
import hashlib
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from ptq2tvm.models import MODEL_REGISTRY, create_model, list_models

BIG = ["resnet18", "resnet50", "mobilenet_v2", "mnasnet1_0", "regnet_x_400mf"]
SMALL = ["resnet_small", "mobilenet_v2_small"]

# name, kwargs -> torchvision parameter count (1000 classes).
PARAMS = {
    ("resnet18", 1.0): 11_689_512,
    ("resnet50", 1.0): 25_557_032,
    ("mobilenet_v2", 1.0): 3_504_872,
    ("mobilenet_v2", 0.75): 2_636_424,
    ("mobilenet_v2", 0.5): 1_968_680,
    ("mobilenet_v2", 0.35): 1_677_128,
    ("mnasnet0_5", 1.0): 2_218_512,
    ("mnasnet0_75", 1.0): 3_170_208,
    ("mnasnet1_0", 1.0): 4_383_312,
    ("mnasnet1_3", 1.0): 6_282_256,
    ("regnet_x_400mf", 1.0): 5_495_976,
}

# sha256 (first 16 hex) of "key:shape" lines of torchvision's state_dict, in order, and the number of entries
# (parameters and buffers, num_batches_tracked included).
SIGNATURES = {
    ("resnet18", 1.0): ("3e58b0798c806a0c", 122),
    ("resnet50", 1.0): ("781bb16f43b8f96f", 320),
    ("mobilenet_v2", 1.0): ("2a375ead3e9604e1", 314),
    ("mobilenet_v2", 0.75): ("f9cfd1f77570e44d", 314),
    ("mobilenet_v2", 0.5): ("ff187c37e6f782c2", 314),
    ("mobilenet_v2", 0.35): ("4090f6e0d2001485", 314),
    ("mnasnet0_5", 1.0): ("76925572e4a8dcad", 314),
    ("mnasnet0_75", 1.0): ("4ad44252e688cda5", 314),
    ("mnasnet1_0", 1.0): ("b168e491e6cb97c0", 314),
    ("mnasnet1_3", 1.0): ("5d46cd13f984e97a", 314),
    ("regnet_x_400mf", 1.0): ("c5218b26738897ed", 428),
}

KEY_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer3.5.bn3.num_batches_tracked": (),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
    },
    "mnasnet1_0": {
        "layers.0.weight": (32, 3, 3, 3),
        "layers.3.weight": (32, 1, 3, 3),
        "layers.6.weight": (16, 32, 1, 1),
        "layers.8.0.layers.0.weight": (48, 16, 1, 1),
        "layers.9.2.layers.3.weight": (120, 1, 5, 5),
        "layers.13.0.layers.7.running_var": (320,),
        "layers.14.weight": (1280, 320, 1, 1),
        "layers.15.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
    },
    "regnet_x_400mf": {
        "stem.0.weight": (32, 3, 3, 3),
        "stem.1.num_batches_tracked": (),
        "trunk_output.block1.block1-0.proj.0.weight": (32, 32, 1, 1),
        "trunk_output.block1.block1-0.f.b.0.weight": (32, 16, 3, 3),
        "trunk_output.block3.block3-6.f.b.0.weight": (160, 16, 3, 3),
        "trunk_output.block4.block4-0.proj.0.weight": (400, 160, 1, 1),
        "trunk_output.block4.block4-11.f.c.1.num_batches_tracked": (),
        "fc.weight": (1000, 400),
    },
    "resnet_small": {
        "conv1.weight": (16, 1, 3, 3),
        "bn1.running_var": (16,),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer1.1.bn2.num_batches_tracked": (),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.0.downsample.1.running_mean": (64,),
        "layer3.1.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (10, 64),
    },
    "mobilenet_v2_small": {
        "features.0.0.weight": (16, 1, 3, 3),
        "features.1.conv.0.0.weight": (16, 1, 3, 3),
        "features.1.conv.1.weight": (8, 16, 1, 1),
        "features.2.conv.0.0.weight": (48, 8, 1, 1),
        "features.9.0.weight": (256, 48, 1, 1),
        "classifier.1.weight": (10, 256),
    },
}

_ALLOWED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.Dropout, nn.Identity)
_ALLOWED_FUNCTIONS = (operator.add, operator.iadd, torch.add, torch.flatten)
_ALLOWED_METHODS = ("add", "add_", "flatten", "mean")


@functools.lru_cache(maxsize=None)
def _model(name: str, width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"width_mult": width} if width != 1.0 else {}
    return create_model(name, **kwargs).eval()


def _signature(model: nn.Module) -> tuple[str, int]:
    sd = model.state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16], len(sd)


# ---- registry ------------------------------------------------------------------------------------------------
def test_registry_and_list():
    assert list_models() == sorted(MODEL_REGISTRY)
    assert set(BIG + SMALL) <= set(list_models())


def test_unknown_model_lists_available_names():
    with pytest.raises(ValueError) as e:
        create_model("resnet19")
    assert "resnet18" in str(e.value) and "mobilenet_v2_small" in str(e.value)


def test_create_model_overrides():
    m = create_model("resnet_small", num_classes=7, in_channels=3)
    assert m.conv1.weight.shape == (16, 3, 3, 3) and m.fc.out_features == 7
    m = create_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=0.5)
    assert m.features[0][0].weight.shape == (16, 1, 3, 3) and m.classifier[1].out_features == 5
    assert create_model("resnet_small").fc.out_features == 10  # None keeps the defaults
    assert create_model("resnet18").conv1.in_channels == 3


# ---- torchvision compatibility ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,width", sorted(PARAMS))
def test_param_count(name, width):
    assert sum(p.numel() for p in _model(name, width).parameters()) == PARAMS[(name, width)]


@pytest.mark.parametrize("name,width", sorted(SIGNATURES))
def test_state_dict_signature(name, width):
    assert _signature(_model(name, width)) == SIGNATURES[(name, width)]


@pytest.mark.parametrize("name", sorted(KEY_SHAPES))
def test_key_shapes(name):
    sd = _model(name).state_dict()
    for key, shape in KEY_SHAPES[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


def test_mnasnet_state_dict_version():
    # torchvision's MNASNet reads this metadata; 2 = stem scaled by alpha (our layout).
    assert _model("mnasnet0_5").state_dict()._metadata[""]["version"] == 2


def test_strict_round_trip():
    src, dst = _model("regnet_x_400mf"), create_model("regnet_x_400mf")
    dst.load_state_dict(src.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


# ---- tracing and ops ----------------------------------------------------------------------------------------------
def _check_ops(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], _ALLOWED_MODULES), (node.target, type(modules[node.target]))
        elif node.op == "call_function":
            assert node.target in _ALLOWED_FUNCTIONS, node.target
        elif node.op == "call_method":
            assert node.target in _ALLOWED_METHODS, node.target
            if node.target == "mean":
                assert list(node.args[1]) == [2, 3]


@pytest.mark.parametrize("name", BIG)
def test_big_trace_224(name):
    model = _model(name)
    gm = fx.symbolic_trace(model)
    _check_ops(gm)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = gm(x)  # one 224x224 forward (the traced graph calls the model's own submodules)
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all() and 1e-3 < y.std().item() < 1e3  # random init gives sane activations


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [28, 8])
def test_small_trace(name, hw):
    model = _model(name)
    gm = fx.symbolic_trace(model)
    _check_ops(gm)
    x = torch.randn(2, 1, hw, hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, y_fx = model(x), gm(x)
    assert y.shape == (2, 10)
    assert torch.equal(y, y_fx)
    assert torch.isfinite(y).all() and 1e-3 < y.std().item() < 1e3


def test_small_structure():
    rs = _model("resnet_small")
    assert isinstance(rs.maxpool, nn.Identity) and rs.conv1.stride == (1, 1) and not hasattr(rs, "layer4")
    assert rs.layer1[0].downsample is None and rs.layer2[0].downsample is not None
    mb = _model("mobilenet_v2_small")
    with torch.no_grad():
        assert mb.features(torch.zeros(1, 1, 28, 28)).shape[-2:] == (4, 4)
        assert mb.features(torch.zeros(1, 1, 8, 8)).shape[-2:] == (1, 1)
    assert sum(p.numel() for p in mb.parameters()) < 100_000


def test_small_models_backward():
    torch.manual_seed(0)
    for name in SMALL:
        model = create_model(name).train()
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- optional: exact parity with torchvision when it happens to be installed -------------------------------------
@pytest.mark.parametrize("name", BIG)
def test_matches_torchvision(name):
    tv_models = pytest.importorskip("torchvision.models")
    ref = getattr(tv_models, name)().eval()
    mine = create_model(name).eval()
    g = torch.Generator().manual_seed(3)
    for m in mine.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    ref.load_state_dict(mine.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=0)
