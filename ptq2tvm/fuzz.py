"""Property-based fuzzing of the whole pipeline on random graphs (issue 11): used by ``tests/test_fuzz.py`` (a seeded
slice) and ``benchmarks/fuzz_graphs.py`` (>= 500 graphs). Needs Hypothesis (the ``test`` extra).

A graph is a JSON-able spec: input shape, calibration-data mode, bit widths (global, per layer, the lookup tables'
input bits), a chain of blocks drawn from :data:`OPS`, and which block outputs are also network outputs (several
outputs: a tuple, list or dict). **Adding an op is one entry** in :data:`OPS`: an :class:`OpEntry` saying after which
tensor shapes it can come (``applies``), how its parameters are drawn (``draw``), how it becomes a torch module
(``build``) and which op families of the registry (:data:`ptq2tvm.ops.FLOAT_OPS`) it exercises (``covers``).
``tests/test_fuzz.py`` derives the op list from the registry: an op registered without a fuzzer entry fails it, and
so does an entry whose drawn graphs never trace to the op it claims.

Checks of :func:`check_spec` on each graph:

1. quantize (calibration) + fold succeed, or fail with a ptq2tvm error whose message names something in quotes
   (an ``UnsupportedModelError`` is a failure: the fuzzer only draws supported ops);
2. every static integer bound of the graph holds (:func:`ptq2tvm.fold.bounds.check_graph_bounds`: int32
   accumulators, int64 requantization, lookup-table indices, pool window sums);
3. the compiled ``.so`` equals the reference executor bit for bit, for every schedule in ``schedules`` ('auto' =
   the blocked x86 kernels, AVX2 on this host, and 'plain'), on quantized calibration images and random codes;
   with ``cuda=True`` also every kernel of the CUDA build in the CPU emulation of the CUDA thread model;
4. integer vs fake-quant within the documented tolerance (docs/integer_arithmetic.md): per node, fed the same
   integer inputs, the fake-quant node's output is within 1 LSB of the integer node's.
"""

from __future__ import annotations

import json
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import LUT_FUNCTIONS

Shape = tuple[int, ...]          # (C, H, W) or (F,)
Draw = Callable[[Any], Any]      # hypothesis' draw

#: size caps of the drawn tensors (small graphs compile in seconds)
MAX_CHANNELS, MAX_HW, MAX_FEATURES = 48, 24, 512
#: per-layer bit lists drawn per graph (layers beyond this many use the global bits)
MAX_LAYERS = 16


@dataclass(frozen=True)
class OpEntry:
    """One block family of the fuzzer: ``applies(shape)``, ``draw(draw, st, shape) -> params`` (JSON-able),
    ``build(params, shape) -> (module, out_shape)`` and ``covers``: the registry op families
    (:data:`ptq2tvm.ops.FLOAT_OPS` names, trace-only ones included) its graphs exercise."""

    applies: Callable[[Shape], bool]
    draw: Callable[[Draw, Any, Shape], dict[str, Any]]
    build: Callable[[dict[str, Any], Shape], tuple[nn.Module, Shape]]
    covers: tuple[str, ...]


def _spatial(shape: Shape) -> bool:
    return len(shape) == 3


def _out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@torch.no_grad()
def _shape_after(m: nn.Module, shape: Shape) -> Shape:
    """The output shape (without batch) of ``m`` on one input of ``shape`` (torch decides, no formula to get wrong)."""
    return tuple(int(v) for v in m.eval()(torch.zeros(1, *shape)).shape[1:])


def _fits(shape: Shape) -> bool:
    if len(shape) == 3:
        return 1 <= shape[0] <= MAX_CHANNELS and 1 <= shape[1] <= MAX_HW and 1 <= shape[2] <= MAX_HW
    return 1 <= shape[0] <= MAX_FEATURES


def _pick(draw: Draw, st: Any, seq: list | tuple) -> Any:
    """A uniform choice (Hypothesis' sampled_from favours the first elements)."""
    return seq[draw(st.integers(0, 1 << 20)) % len(seq)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- activations ------------------------------------------------------------------------------------------------
ACTS = ("none", "relu", "relu6", "hardtanh")


def _act_module(name: str, lo: float = -1.0, hi: float = 1.0) -> nn.Module:
    return {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6()}.get(name) or nn.Hardtanh(lo, hi)


def _draw_act(draw: Draw, st: Any, acts: tuple[str, ...] = ACTS) -> dict[str, Any]:
    a = draw(st.sampled_from(acts))
    lo = draw(st.sampled_from([-1.0, -0.5, 0.0, 0.25]))
    return dict(act=a, lo=lo, hi=lo + draw(st.sampled_from([0.5, 1.0, 2.0])))


# ---- degenerate channels ----------------------------------------------------------------------------------------
def _draw_degenerate(draw: Draw, st: Any, channels: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["none"] * 5 + ["zero", "tiny", "dead"]))
    if kind == "none":
        return dict(degenerate="none", channels=[])
    chans = sorted(set(draw(st.lists(st.integers(0, channels - 1), min_size=1, max_size=min(3, channels)))))
    return dict(degenerate=kind, channels=chans, const=draw(st.sampled_from([0.5, -0.5, 3.0, 1e-3])))


def _apply_degenerate(weight: torch.Tensor, bias: torch.Tensor | None, p: dict[str, Any]) -> None:
    with torch.no_grad():
        for c in p.get("channels", []):
            if p["degenerate"] == "zero":          # pruned channel: a constant
                weight[c] = 0.0
                if bias is not None:
                    bias[c] = p["const"]
            elif p["degenerate"] == "tiny":
                weight[c] *= 1e-9
                if bias is not None:
                    bias[c] = p["const"]
            elif p["degenerate"] == "dead" and bias is not None:   # ReLU after it is 0 on every image
                bias[c] = -1e3


def _proj(shape: Shape, out: int | None = None, k: int = 1) -> nn.Module:
    """A shape-preserving (or ``out``-channel) 1x1 conv, or a Linear for a flat tensor."""
    c = shape[0]
    return nn.Conv2d(c, out or c, k, 1, k // 2) if _spatial(shape) else nn.Linear(c, out or c)


# ---- conv / residual / linear -------------------------------------------------------------------------------------
class _ConvBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: bool, act: nn.Module, drop: bool = False):
        super().__init__()
        self.conv, self.bn, self.act = conv, (nn.BatchNorm2d(conv.out_channels) if bn else nn.Identity()), act
        self.drop = nn.Dropout(0.1) if drop else nn.Identity()

    def forward(self, x):
        return self.drop(self.act(self.bn(self.conv(x))))


def _draw_conv(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    c, h, w = shape
    k = draw(st.sampled_from([1, 1, 3, 3, 5]))
    k = min(k, 2 * min(h, w) + 1 - (1 - min(h, w) % 2) if min(h, w) < k else k)
    d = draw(st.sampled_from([1, 1, 1, 2])) if k > 1 and min(h, w) >= 2 * k else 1
    p = draw(st.integers(0, k // 2)) if k > 1 else 0
    s = draw(st.sampled_from([1, 1, 2]))
    mode = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    if mode == "depthwise":
        cout, groups = c * draw(st.sampled_from([1, 1, 2])), c
    else:
        cout = draw(st.integers(1, 13))
        divs = [g for g in range(2, 5) if c % g == 0 and cout % g == 0] if mode == "grouped" else []
        groups = draw(st.sampled_from(divs)) if divs else 1
        if mode == "grouped" and not divs:
            groups, cout = c, c                 # fall back to depthwise
    if _out(h, k, s, p, d) < 1 or _out(w, k, s, p, d) < 1:
        k, p, s, d = 1, 0, 1, 1
    return dict(cout=cout, k=k, stride=s, padding=p, dilation=d, groups=groups,
                bias=draw(st.booleans()), bn=draw(st.booleans()), drop=draw(st.sampled_from([False] * 4 + [True])),
                **_draw_act(draw, st), **_draw_degenerate(draw, st, cout))


def _build_conv(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    conv = nn.Conv2d(c, p["cout"], p["k"], p["stride"], p["padding"], p["dilation"], p["groups"], bias=p["bias"])
    _apply_degenerate(conv.weight, conv.bias, p)
    m = _ConvBlock(conv, p["bn"], _act_module(p["act"], p["lo"], p["hi"]), p.get("drop", False))
    if p["bn"] and p["degenerate"] == "zero":
        with torch.no_grad():                   # BN gamma 0, beta = const: the same constant channel
            for ch in p["channels"]:
                m.bn.weight[ch] = 0.0
                m.bn.bias[ch] = p["const"]
    oh = _out(h, p["k"], p["stride"], p["padding"], p["dilation"])
    ow = _out(w, p["k"], p["stride"], p["padding"], p["dilation"])
    return m, (p["cout"], oh, ow)


class _Residual(nn.Module):
    """x + f(x) (f: one or two shape-preserving convs), or g(x) + f(x) with a 1x1 conv shortcut; optional act."""

    def __init__(self, c: int, two: bool, shortcut: bool, act: nn.Module, depthwise: bool):
        super().__init__()
        g = c if depthwise else 1
        self.f1 = nn.Conv2d(c, c, 3, 1, 1, groups=g)
        self.relu = nn.ReLU()
        self.f2 = nn.Conv2d(c, c, 1) if two else None
        self.short = nn.Conv2d(c, c, 1) if shortcut else None
        self.act = act

    def forward(self, x):
        y = self.f1(x)
        if self.f2 is not None:
            y = self.f2(self.relu(y))
        s = self.short(x) if self.short is not None else x
        return self.act(y + s)


def _draw_residual(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    return dict(two=draw(st.booleans()), shortcut=draw(st.booleans()), depthwise=draw(st.booleans()),
                **_draw_act(draw, st), **_draw_degenerate(draw, st, shape[0]))


def _build_residual(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _Residual(shape[0], p["two"], p["shortcut"], _act_module(p["act"], p["lo"], p["hi"]), p["depthwise"])
    _apply_degenerate(m.f1.weight, m.f1.bias, p)
    return m, shape


def _build_linear(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    lin = nn.Linear(shape[0], p["out"], bias=p["bias"])
    _apply_degenerate(lin.weight, lin.bias, p)
    return nn.Sequential(lin, _act_module(p["act"], p["lo"], p["hi"])), (p["out"],)


def _draw_linear(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    out = draw(st.integers(1, 12))
    return dict(out=out, bias=draw(st.booleans()), **_draw_act(draw, st), **_draw_degenerate(draw, st, out))


# ---- pools ------------------------------------------------------------------------------------------------------
def _draw_maxpool(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    _, h, w = shape
    k = min(draw(st.sampled_from([2, 3])), h, w)
    s = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([1, 1, 2])) if min(h, w) >= 2 * k + 1 else 1
    p = dict(k=k, stride=s, padding=draw(st.integers(0, k // 2)), dilation=d, ceil_mode=draw(st.booleans()),
             fn=draw(st.booleans()))
    try:
        _build_maxpool(p, shape)
    except RuntimeError:
        p.update(padding=0, dilation=1, ceil_mode=False)
    return p


def _build_maxpool(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    if p.get("fn"):
        m: nn.Module = _Fn(lambda x: F.max_pool2d(x, p["k"], p["stride"], p["padding"], p.get("dilation", 1),
                                                  ceil_mode=p.get("ceil_mode", False)))
    else:
        m = nn.MaxPool2d(p["k"], p["stride"], p["padding"], p.get("dilation", 1), ceil_mode=p.get("ceil_mode", False))
    return m, _shape_after(m, shape)


def _draw_avgpool(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    _, h, w = shape
    k = min(draw(st.sampled_from([2, 3])), h, w)
    return dict(k=k, stride=draw(st.sampled_from([1, 2])), padding=draw(st.integers(0, k // 2)), fn=draw(st.booleans()))


def _build_avgpool(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    if p.get("fn"):
        m: nn.Module = _Fn(lambda x: F.avg_pool2d(x, p["k"], p["stride"], p["padding"]))
    else:
        m = nn.AvgPool2d(p["k"], p["stride"], p["padding"])
    return m, _shape_after(m, shape)


class _Fn(nn.Module):
    """A functional spelling inside a block (traced through by torch.fx)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


GAP_MODES = ("adaptive", "adaptive_fn", "mean", "mean_keepdim", "torch_mean")


def _draw_gap(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    _, h, w = shape
    how = draw(st.sampled_from(GAP_MODES))
    oh = draw(st.sampled_from(_divisors(h) + [1, 1]))
    ow = draw(st.sampled_from(_divisors(w) + [1, 1]))
    return dict(how=how, size=[oh, ow], keepdim=draw(st.booleans()))


def _build_gap(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    how, size = p["how"], tuple(p.get("size", (1, 1)))
    m: nn.Module
    if how == "adaptive":
        m = nn.AdaptiveAvgPool2d(size if size[0] != size[1] else size[0])
    elif how == "adaptive_fn":
        m = _Fn(lambda x: F.adaptive_avg_pool2d(x, size))
    elif how == "mean":
        m = _Fn(lambda x: x.mean((2, 3)))
    elif how == "mean_keepdim":
        m = _Fn(lambda x: x.mean((2, 3), keepdim=True))
    else:
        keep = bool(p.get("keepdim"))
        m = _Fn(lambda x: torch.mean(x, dim=[-2, -1], keepdim=keep))
    return m, _shape_after(m, shape)


# ---- flatten / clamp ----------------------------------------------------------------------------------------------
FLATTENS = ("module", "torch", "method", "view", "reshape")


def _build_flatten(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    how = p.get("how", "module")
    m = {"module": lambda: nn.Flatten(),
         "torch": lambda: _Fn(lambda x: torch.flatten(x, 1)),
         "method": lambda: _Fn(lambda x: x.flatten(1)),
         "view": lambda: _Fn(lambda x: x.view(x.size(0), -1)),
         "reshape": lambda: _Fn(lambda x: x.reshape(x.shape[0], -1))}[how]()
    return m, (int(np.prod(shape)),)


def _draw_clamp(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    d = _draw_act(draw, st)
    if d["act"] == "none":
        d["act"] = "relu"
    return d


# ---- lookup-table nonlinearities ----------------------------------------------------------------------------------
#: parameter choices per LUT function (the default first)
LUT_PARAMS: dict[str, list[dict[str, Any]]] = {
    "gelu": [{"approximate": "none"}, {"approximate": "tanh"}],
    "leaky_relu": [{"negative_slope": 0.01}, {"negative_slope": 0.2}],
    "elu": [{"alpha": 1.0}, {"alpha": 0.5}],
    "softplus": [{"beta": 1.0, "threshold": 20.0}, {"beta": 2.0, "threshold": 1.0}],
}
_LUT_MODULES: dict[str, Callable[..., nn.Module]] = {
    "silu": nn.SiLU, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "mish": nn.Mish,
    "softplus": nn.Softplus,
}


def lut_module(fn: str, params: dict[str, Any], spelling: str = "module") -> nn.Module:
    """``fn`` (a :data:`ptq2tvm.ops.LUT_FUNCTIONS` name) as an nn.Module, a functional call or a Tensor method."""
    if spelling == "module":
        return _LUT_MODULES[fn](**params)
    if spelling == "method" and fn in ("sigmoid", "tanh"):
        return _Fn(lambda x: getattr(x, fn)())
    torch_fn = LUT_FUNCTIONS[fn][0]
    return _Fn(lambda x: torch_fn(x, **params))


def _draw_lut(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    fn = _pick(draw, st, sorted(LUT_FUNCTIONS))
    params = draw(st.sampled_from(LUT_PARAMS.get(fn, [{}])))
    return dict(fn=fn, params=params, spelling=draw(st.sampled_from(["module", "function", "method"])),
                **_draw_act(draw, st, ("none", "none", "none", "relu6", "hardtanh")))


def _build_lut(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    return nn.Sequential(lut_module(p["fn"], p["params"], p["spelling"]),
                         _act_module(p["act"], p["lo"], p["hi"])), shape


# ---- multiply: squeeze-excitation gate (broadcast) and same-shape -------------------------------------------------
class _SE(nn.Module):
    def __init__(self, c: int, r: int, gate: str, pool: str, gate_first: bool):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.gate, self.pool, self.gate_first = gate, pool, gate_first

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.pool == "mean" else F.adaptive_avg_pool2d(x, 1)
        s = self.expand(F.relu(self.reduce(s)))
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return s * x if self.gate_first else x * s


def _draw_se(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    return dict(r=draw(st.integers(1, max(1, shape[0]))), gate=draw(st.sampled_from(["sigmoid", "hardsigmoid"])),
                pool=draw(st.sampled_from(["mean", "adaptive"])), gate_first=draw(st.booleans()))


def _build_se(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    return _SE(shape[0], p["r"], p["gate"], p["pool"], p["gate_first"]), shape


class _Mul(nn.Module):
    """Same-shape products: x * x, x * f(x), f(x) * g(x), f(x) * sigmoid(g(x)) (f, g: 1x1 conv or Linear)."""

    def __init__(self, shape: Shape, how: str, spelling: str):
        super().__init__()
        self.how, self.spelling = how, spelling
        self.f, self.g = _proj(shape), _proj(shape)

    def _mul(self, a, b):
        return {"op": lambda: a * b, "torch": lambda: torch.mul(a, b), "method": lambda: a.mul(b)}[self.spelling]()

    def forward(self, x):
        if self.how == "x_x":
            return self._mul(x, x)
        if self.how == "x_f":
            return self._mul(x, self.f(x))
        if self.how == "f_g":
            return self._mul(self.f(x), self.g(x))
        if self.how == "disjoint":           # relu(f) * relu(-f): 0 on every input, each factor a wide range
            return self._mul(F.relu(self.f(x)), F.relu(self.g(x)))
        return self._mul(self.f(x), torch.sigmoid(self.g(x)))


def _draw_mul(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    return dict(how=draw(st.sampled_from(["x_x", "x_f", "f_g", "gated", "disjoint"])),
                gain=draw(st.sampled_from([1.0, 1.0, 30.0, 1e3])),
                spelling=draw(st.sampled_from(["op", "torch", "method"])),
                **_draw_degenerate(draw, st, shape[0]))


def _build_mul(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _Mul(shape, p["how"], p["spelling"])
    with torch.no_grad():
        m.f.weight.mul_(p.get("gain", 1.0))
        m.f.bias.mul_(p.get("gain", 1.0))
        if p["how"] == "disjoint":
            m.g.weight.copy_(-m.f.weight)
            m.g.bias.copy_(-m.f.bias)
    _apply_degenerate(m.f.weight, m.f.bias, p)
    return m, shape


# ---- add of two non-conv tensors (a standalone integer add) -------------------------------------------------------
class _Add(nn.Module):
    def __init__(self, other: str, spelling: str, act: nn.Module):
        super().__init__()
        self.other, self.spelling, self.act = other, spelling, act
        self.lut = lut_module(other, {}, "function") if other in LUT_FUNCTIONS else None

    def forward(self, x):
        if self.other == "maxpool":
            y = F.max_pool2d(x, 3, 1, 1)
        elif self.other == "clamp":
            y = F.relu(x)
        else:
            y = self.lut(x)
        s = {"op": lambda: x + y, "torch": lambda: torch.add(x, y), "method": lambda: x.add(y)}[self.spelling]()
        return self.act(s)


def _draw_add(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    others = ["clamp", *sorted(LUT_FUNCTIONS)] + (["maxpool"] * 2 if _spatial(shape) else [])
    return dict(other=_pick(draw, st, others), spelling=draw(st.sampled_from(["op", "torch", "method"])),
                **_draw_act(draw, st, ("none", "none", "relu", "relu6")))


def _build_add(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    return _Add(p["other"], p["spelling"], _act_module(p["act"], p["lo"], p["hi"])), shape


# ---- concat of very different scales ------------------------------------------------------------------------------
class _Concat(nn.Module):
    def __init__(self, shape: Shape, branches: list[dict[str, Any]], fn: str):
        super().__init__()
        self.kinds = [b["kind"] for b in branches]
        mods = []
        for b in branches:
            if b["kind"] == "proj":
                m = _proj(shape, b["cout"], b.get("k", 1) if _spatial(shape) else 1)
                with torch.no_grad():
                    m.weight.mul_(b["gain"])
                    m.bias.mul_(b["gain"])
            elif b["kind"] == "pool":
                m = _Fn(lambda x: F.max_pool2d(x, 3, 1, 1))
            else:
                m = nn.Identity()
            mods.append(m)
        self.branches = nn.ModuleList(mods)
        self.fn = {"cat": torch.cat, "concat": torch.concat, "concatenate": torch.concatenate}[fn]

    def forward(self, x):
        return self.fn([b(x) for b in self.branches], 1)


def _draw_concat(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    branches = []
    for _ in range(draw(st.integers(2, 3))):
        kind = draw(st.sampled_from(["proj", "proj", "x"] + (["pool"] if _spatial(shape) else [])))
        b: dict[str, Any] = dict(kind=kind)
        if kind == "proj":
            b.update(cout=draw(st.integers(1, 9)), k=draw(st.sampled_from([1, 3])),
                     gain=draw(st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 1.0, 10.0, 100.0, 1e3])))
        branches.append(b)
    return dict(branches=branches, fn=draw(st.sampled_from(["cat", "cat", "concat", "concatenate"])))


def _concat_channels(p: dict[str, Any], shape: Shape) -> int:
    return sum(b["cout"] if b["kind"] == "proj" else shape[0] for b in p["branches"])


def _build_concat(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    return _Concat(shape, p["branches"], p["fn"]), (_concat_channels(p, shape), *shape[1:])


# ---- chunk / split / channel slice --------------------------------------------------------------------------------
class _Split(nn.Module):
    def __init__(self, shape: Shape, p: dict[str, Any]):
        super().__init__()
        self.p = p
        self.f = _proj((p["sizes"][p["proj"]], *shape[1:])) if p["mode"] != "slice" else None

    def _parts(self, x):
        p = self.p
        if p["mode"] == "chunk":
            return x.chunk(p["chunks"], 1) if p["spelling"] == "method" else torch.chunk(x, p["chunks"], 1)
        return x.split(p["sizes"], 1) if p["spelling"] == "method" else torch.split(x, p["sizes"], 1)

    def forward(self, x):
        p = self.p
        if p["mode"] == "slice":
            return x[:, p["start"]:p["stop"]]
        ps = self._parts(x)
        parts = [ps[i] for i in range(len(p["sizes"]))]
        if p["use"] == "pick":
            return parts[p["pick"]]
        parts[p["proj"]] = self.f(parts[p["proj"]])          # ShuffleNet-style: one branch transformed
        return torch.cat(parts[::-1], 1)


def _chunk_sizes(c: int, chunks: int) -> list[int]:
    step = -(-c // chunks)
    return [min(step, c - s) for s in range(0, c, step)]


def _draw_split(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    c = shape[0]
    mode = draw(st.sampled_from(["chunk", "split", "slice"]))
    if mode == "slice":
        start = draw(st.integers(0, c - 1))
        return dict(mode=mode, start=start, stop=draw(st.integers(start + 1, c)))
    if mode == "chunk":
        chunks = draw(st.integers(2, min(4, c)))
        sizes = _chunk_sizes(c, chunks)
        extra: dict[str, Any] = dict(chunks=chunks)
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, c - 1), min_size=1, max_size=3))))
        sizes = np.diff([0, *cuts, c]).tolist()
        extra = {}
    return dict(mode=mode, sizes=sizes, spelling=draw(st.sampled_from(["method", "torch"])),
                use=draw(st.sampled_from(["pick", "cat"])), pick=draw(st.integers(0, len(sizes) - 1)),
                proj=draw(st.integers(0, len(sizes) - 1)), **extra)


def _build_split(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _Split(shape, p)
    if p["mode"] == "slice":
        c = p["stop"] - p["start"]
    elif p["use"] == "pick":
        c = p["sizes"][p["pick"]]
    else:
        c = sum(p["sizes"])
    return m, (c, *shape[1:])


# ---- channel shuffle ----------------------------------------------------------------------------------------------
class _Shuffle(nn.Module):
    def __init__(self, groups: int, spelling: str):
        super().__init__()
        self.groups, self.spelling = groups, spelling
        self.m = nn.ChannelShuffle(groups) if spelling == "module" else None

    def forward(self, x):
        if self.m is not None:
            return self.m(x)
        if self.spelling == "function":
            return F.channel_shuffle(x, self.groups)
        n, c, h, w = x.size()
        y = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2)
        return y.contiguous().view(n, -1, h, w) if self.spelling == "view" else y.reshape(n, c, h, w)


def _build_shuffle(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    return _Shuffle(p["groups"], p["spelling"]), shape


# ---- nearest upsampling, PixelShuffle / PixelUnshuffle ------------------------------------------------------------
def _draw_upsample(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    _, h, w = shape
    sh = draw(st.sampled_from([f for f in (1, 2, 3) if h * f <= MAX_HW]))
    sw = draw(st.sampled_from([f for f in (1, 2, 3) if w * f <= MAX_HW]))
    if sh == sw == 1:
        sh, sw = (2, 1) if h * 2 <= MAX_HW else (1, 2) if w * 2 <= MAX_HW else (1, 1)
    spelling = draw(st.sampled_from(["module", "scale", "size", "nearest2d"]))
    if spelling == "nearest2d" and sh != sw:
        spelling = "module"
    return dict(scale=[sh, sw], spelling=spelling)


def _build_upsample(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    sh, sw = p["scale"]
    c, h, w = shape
    m: nn.Module = {
        "module": lambda: nn.Upsample(scale_factor=(float(sh), float(sw)), mode="nearest"),
        "scale": lambda: _Fn(lambda x: F.interpolate(x, scale_factor=(sh, sw), mode="nearest")),
        "size": lambda: _Fn(lambda x: F.interpolate(x, size=(h * sh, w * sw))),
        "nearest2d": lambda: nn.UpsamplingNearest2d(scale_factor=sh),
    }[p["spelling"]]()
    return m, (c, h * sh, w * sw)


class _PixelShuffle(nn.Module):
    def __init__(self, shape: Shape, r: int, k: int, pre: bool, fn: bool):
        super().__init__()
        self.pre = nn.Conv2d(shape[0], r * r * k, 1) if pre else nn.Identity()
        self.r, self.fn = r, fn
        self.ps = nn.PixelShuffle(r)

    def forward(self, x):
        x = self.pre(x)
        return F.pixel_shuffle(x, self.r) if self.fn else self.ps(x)


def _draw_pixel_shuffle(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    c, h, w = shape
    r = draw(st.sampled_from([f for f in (2, 3) if max(h, w) * f <= MAX_HW] or [2]))
    pre = c % (r * r) != 0 or draw(st.booleans())
    return dict(r=r, k=draw(st.integers(1, 3)), pre=pre, fn=draw(st.booleans()))


def _build_pixel_shuffle(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    r = p["r"]
    cin = r * r * p["k"] if p["pre"] else c
    return _PixelShuffle(shape, r, p["k"], p["pre"], p["fn"]), (cin // (r * r), h * r, w * r)


def _unshuffle_factors(shape: Shape) -> list[int]:
    c, h, w = shape
    return [r for r in (2, 3) if h % r == 0 and w % r == 0 and c * r * r <= MAX_CHANNELS]


def _build_pixel_unshuffle(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    r = p["r"]
    m = _Fn(lambda x: F.pixel_unshuffle(x, r)) if p.get("fn") else nn.PixelUnshuffle(r)
    return m, (c * r * r, h // r, w // r)


class _Stem(nn.Module):
    """A classifier's first block: a k x k / 2 conv (+ BN) + ReLU + a 3x3 / 2 max pool (ResNet's stem). On the network
    input with 1-4 channels the x86 build runs it as the row-layout conv fused with its pool
    (:func:`kernels.rows_conv_maxpool_primfunc`), its input through :func:`kernels.nchw_to_rows_primfunc` when the width
    is a multiple of 16."""

    def __init__(self, c: int, cout: int, k: int, bn: bool, pool_pad: int):
        super().__init__()
        self.conv = nn.Conv2d(c, cout, k, 2, k // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.pool = nn.MaxPool2d(3, 2, pool_pad)

    def forward(self, x):
        return self.pool(F.relu(self.bn(self.conv(x))))


def _stem_applies(shape: Shape) -> bool:
    return _spatial(shape) and shape[0] <= 4 and min(shape[1:]) >= 5


def _draw_stem(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    cout = draw(st.integers(1, 40))
    return dict(cout=cout, k=draw(st.sampled_from([3, 5, 7])), bn=draw(st.booleans()),
                pool_pad=draw(st.sampled_from([0, 1, 1])), **_draw_degenerate(draw, st, cout))


def _build_stem(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _Stem(shape[0], p["cout"], p["k"], p["bn"], p["pool_pad"])
    _apply_degenerate(m.conv.weight, m.conv.bias, p)
    return m, _shape_after(m, shape)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (x t) + BN + ReLU6, depthwise k x k / s + BN + ReLU6, 1x1 project + BN, plus the
    input when the shape is kept. From 16 or fewer channels the AVX-512 VNNI build fuses the expand into the depthwise
    kernel (:func:`kernels.expand_depthwise_primfunc`)."""

    def __init__(self, c: int, t: int, k: int, stride: int, cout: int):
        super().__init__()
        mid = c * t
        self.expand = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cout == c

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.skip else y


def _draw_inverted_residual(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    c = shape[0]
    t = draw(st.sampled_from([t for t in (1, 2, 3, 4, 6) if c * t <= MAX_CHANNELS] or [1]))
    return dict(t=t, k=draw(st.sampled_from([3, 3, 5])), stride=draw(st.sampled_from([1, 1, 2])),
                cout=c if draw(st.booleans()) else draw(st.integers(1, 16)), **_draw_degenerate(draw, st, c * t))


def _build_inverted_residual(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _InvertedResidual(shape[0], p["t"], p["k"], p["stride"], p["cout"])
    _apply_degenerate(m.expand[0].weight, None, p)
    return m, _shape_after(m, shape)


# ---- the table --------------------------------------------------------------------------------------------------
def _grows(shape: Shape, cout: int = 0, hw: int = 1) -> bool:
    return _spatial(shape) and shape[0] + cout <= MAX_CHANNELS and max(shape[1:]) * hw <= MAX_HW


OPS: dict[str, OpEntry] = {
    "conv": OpEntry(_spatial, _draw_conv, _build_conv, ("conv", "bn", "act", "clamp", "identity")),
    "residual": OpEntry(_spatial, _draw_residual, _build_residual, ("conv", "add", "act")),
    "stem": OpEntry(_stem_applies, _draw_stem, _build_stem, ("conv", "bn", "act", "maxpool")),
    "inverted_residual": OpEntry(lambda s: _spatial(s) and s[0] <= 16, _draw_inverted_residual,
                                 _build_inverted_residual, ("conv", "bn", "act", "add")),
    "maxpool": OpEntry(_spatial, _draw_maxpool, _build_maxpool, ("maxpool",)),
    "avgpool": OpEntry(_spatial, _draw_avgpool, _build_avgpool, ("avgpool",)),
    "gap": OpEntry(_spatial, _draw_gap, _build_gap, ("avgpool", "flatten")),
    "flatten": OpEntry(lambda s: _spatial(s) and int(np.prod(s)) <= MAX_FEATURES,
                       lambda draw, st, s: dict(how=draw(st.sampled_from(FLATTENS))), _build_flatten,
                       ("flatten", "reshape")),
    # an activation that cannot be fused into a producer (after a pool / flatten): a standalone integer clamp
    "clamp": OpEntry(lambda s: True, _draw_clamp, lambda p, s: (_act_module(p["act"], p["lo"], p["hi"]), s),
                     ("act", "clamp")),
    "linear": OpEntry(lambda s: len(s) == 1, _draw_linear, _build_linear, ("linear", "act")),
    "lut": OpEntry(lambda s: True, _draw_lut, _build_lut, ("lut",)),
    "se": OpEntry(_spatial, _draw_se, _build_se, ("avgpool", "conv", "act", "lut", "mul")),
    "mul": OpEntry(lambda s: True, _draw_mul, _build_mul, ("mul", "lut")),
    "add": OpEntry(lambda s: True, _draw_add, _build_add, ("add", "lut", "maxpool", "act")),
    "concat": OpEntry(lambda s: s[0] * 3 <= (MAX_CHANNELS if _spatial(s) else MAX_FEATURES),
                      _draw_concat, _build_concat, ("concat", "conv", "linear", "maxpool", "identity")),
    "split": OpEntry(lambda s: s[0] >= 2, _draw_split, _build_split, ("chunks", "slice", "concat")),
    "shuffle": OpEntry(lambda s: _spatial(s) and s[0] >= 2,
                       lambda draw, st, s: dict(groups=draw(st.sampled_from(_divisors(s[0])[1:])),
                                                spelling=draw(st.sampled_from(["module", "function", "view",
                                                                               "reshape"]))),
                       _build_shuffle, ("channel_shuffle", "reshape", "transpose", "identity", "split_groups",
                                        "swap_groups", "merge_groups")),
    "upsample": OpEntry(lambda s: _spatial(s) and min(s[1:]) * 2 <= MAX_HW, _draw_upsample, _build_upsample,
                        ("upsample",)),
    "pixel_shuffle": OpEntry(lambda s: _grows(s, 0, 2), _draw_pixel_shuffle, _build_pixel_shuffle,
                             ("pixel_shuffle", "conv")),
    "pixel_unshuffle": OpEntry(lambda s: _spatial(s) and bool(_unshuffle_factors(s)),
                               lambda draw, st, s: dict(r=draw(st.sampled_from(_unshuffle_factors(s))),
                                                        fn=draw(st.booleans())),
                               _build_pixel_unshuffle, ("pixel_unshuffle",)),
}
#: blocks a graph must contain at least one of (the pipeline needs a conv or linear)
WEIGHTED = ("conv", "residual", "linear", "stem", "inverted_residual")


class FuzzNet(nn.Module):
    """The chain of blocks; ``outputs``: indices of blocks whose outputs are also returned (after the last block's),
    as a ``kind`` = tuple | list | dict."""

    def __init__(self, blocks: list[nn.Module], outputs: list[int] | None = None, kind: str = "tuple"):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.outputs, self.kind = list(outputs or []), kind

    def forward(self, x):
        extra = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.outputs:
                extra.append(x)
        if not self.outputs:
            return x
        outs = [x, *extra]
        if self.kind == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return outs if self.kind == "list" else tuple(outs)


def graph_specs(max_ops: int = 6, ops: tuple[str, ...] | None = None):
    """Hypothesis strategy of graph specs (JSON-able dicts)."""
    from hypothesis import strategies as st

    names = tuple(ops or OPS)

    @st.composite
    def spec(draw: Draw) -> dict[str, Any]:
        c = draw(st.sampled_from([1, 2, 3, 4, 5]))
        h = draw(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 12, 16]))
        w = draw(st.sampled_from([h, h, 1, 4, 9, 16]))      # (16: the row-layout shuffle kernel's widths)
        shape: Shape = (c, h, w)
        chain: list[dict[str, Any]] = []
        for i in range(draw(st.sampled_from([k for k in range(1, max_ops + 1) for _ in range(min(k, 3))]))):
            ok = [n for n in names if OPS[n].applies(shape)]
            if i == 0:
                ok = [n for n in ok if n in WEIGHTED] or ok
            if "linear" in ok:       # flat tensors allow few ops: favour the classifier layer there
                ok += ["linear"] * 3
            name = _pick(draw, st, ok)
            params = OPS[name].draw(draw, st, shape)
            _, new = OPS[name].build(params, shape)
            if not _fits(new):
                continue
            shape = new
            chain.append(dict(op=name, **params))
        if not any(b["op"] in WEIGHTED for b in chain):
            name = "conv" if len(shape) == 3 else "linear"
            chain.append(dict(op=name, **OPS[name].draw(draw, st, shape)))
        n_out = draw(st.sampled_from([0, 0, 0, 1, 2])) if len(chain) > 1 else 0
        outputs = (sorted(set(draw(st.lists(st.integers(0, len(chain) - 2), min_size=n_out, max_size=n_out))))
                   if n_out else [])
        return dict(
            input_shape=[c, h, w], chain=chain, seed=draw(st.integers(0, 2 ** 16)),
            outputs=outputs, output_kind=draw(st.sampled_from(["tuple", "list", "dict"])),
            a_bits=draw(st.integers(2, 8)), w_bits=[draw(st.integers(2, 8)) for _ in range(MAX_LAYERS)],
            layer_a_bits=(draw(st.lists(st.integers(2, 8), min_size=MAX_LAYERS, max_size=MAX_LAYERS))
                          if draw(st.booleans()) else []),
            lut_input_bits=draw(st.sampled_from([8, 8, 8, None, 6, 4])),
            first_last_8bit=draw(st.booleans()),
            data=draw(st.sampled_from(["normal"] * 6 + ["uniform01", "zeros", "const_channel", "large"])))

    return spec()


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The torch model of ``spec`` (seeded weights; BN statistics randomized)."""
    torch.manual_seed(spec["seed"])
    shape: Shape = tuple(spec["input_shape"])
    blocks = []
    for b in spec["chain"]:
        params = {k: v for k, v in b.items() if k != "op"}
        m, shape = OPS[b["op"]].build(params, shape)
        blocks.append(m)
    model = FuzzNet(blocks, spec.get("outputs"), spec.get("output_kind", "tuple")).eval()
    g = torch.Generator().manual_seed(spec["seed"])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            keep = m.weight.data == 0          # a degenerate channel set by the builder
            m.weight.data.copy_(torch.where(keep, m.weight.data, torch.rand(c, generator=g) + 0.5))
            m.bias.data.copy_(torch.where(keep, m.bias.data, torch.rand(c, generator=g) - 0.5))
    return model


def calibration_data(spec: dict[str, Any], n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    shape = (n, *spec["input_shape"])
    kind = spec["data"]
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "uniform01":
        return rng.uniform(0, 1, shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "const_channel":
        x[:, 0] = 0.0
    if kind == "large":
        x *= 1e3
    return x


def quant_config(spec: dict[str, Any], float_graph: Any):
    """The QuantConfig of ``spec`` on its traced graph: per-layer weight bits in layer order; per-layer input bits
    (``layer_a_bits``) given once per input tensor (layers reading the same tensor share its bits)."""
    from .frontend.qmodel import QuantConfig

    layers = [n for n in float_graph.nodes if n.op in ("conv", "linear")]
    wb = {n.name: b for n, b in zip(layers, spec["w_bits"])}
    ab: dict[str, int] = {}
    by_input: dict[str, int] = {}
    for n, b in zip(layers, spec.get("layer_a_bits") or []):
        ab[n.name] = by_input.setdefault(n.inputs[0], b)
    return QuantConfig(spec["w_bits"][0], spec["a_bits"], spec["first_last_8bit"], layer_w_bits=wb, layer_a_bits=ab,
                       lut_input_bits=spec.get("lut_input_bits", 8))


def _named(msg: str) -> bool:
    return "'" in msg or '"' in msg


@dataclass
class FuzzResult:
    """The outcome of one graph: ``status`` ok | named_error | failure, with details."""

    spec: dict[str, Any]
    status: str
    stage: str = ""
    message: str = ""
    ops: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    int_ops: list[str] = field(default_factory=list)
    lut_functions: list[str] = field(default_factory=list)
    outputs: int = 1
    seconds: float = 0.0
    max_local_lsb: int = 0
    exact_fraction_vs_fakequant: float | None = None
    schedules: list[str] = field(default_factory=list)
    cuda_kernels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@torch.no_grad()
def local_lsb(qm, graph, q_in: np.ndarray) -> int:
    """Max |integer - fake-quant| in output LSBs over every node, each node fed the same (integer) inputs."""
    from .ir.reference import run_reference
    from .parity import to_grid

    ref = run_reference(graph, q_in, return_all=True)
    tensors = {graph.input.name: graph.input, **{n.name: n.out for n in graph.nodes}}
    env = {k: torch.from_numpy(tensors[k].dequantize(v)) for k, v in ref.items()}
    worst = 0
    fnodes = {n.name: n for n in qm.graph.nodes}
    for node in graph.nodes:
        y = qm._run_node(fnodes[node.name], env).numpy()
        d = np.abs(to_grid(y, node.out) - ref[node.name].astype(np.int64))
        worst = max(worst, int(d.max(initial=0)))
    return worst


def check_spec(spec: dict[str, Any], work: Path, schedules: tuple[str, ...] = ("auto", "plain"),
               lsb_tolerance: int = 1, cuda: bool = False) -> FuzzResult:
    """Run the checks of the module docstring on one spec; never raises (the result says what happened)."""
    from .api import quantize, to_integer
    from .backend.compile import compile_graph
    from .backend.runtime import CompiledModel
    from .errors import Ptq2TvmError, UnsupportedModelError
    from .fold.bounds import check_graph_bounds
    from .frontend.trace import trace_model
    from .ir.reference import run_reference
    from .parity import fakequant_outputs, to_grid

    t0 = time.perf_counter()
    res = FuzzResult(spec, "ok", ops=sorted({b["op"] for b in spec["chain"]}))
    stage = "build"
    try:
        model = build_model(spec)
        calib = calibration_data(spec)
        stage = "trace"
        fg = trace_model(model, tuple(spec["input_shape"]))
        res.float_ops = sorted({n.op for n in fg.nodes})
        res.lut_functions = sorted({n.attrs["fn"] for n in fg.nodes if n.op == "lut"})
        stage = "quantize"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = quantize(model, calib, quant_config(spec, fg), progress=False)
            stage = "fold"
            graph = to_integer(qm)
        res.int_ops = sorted({n.op for n in graph.nodes})
        res.outputs = len(graph.output_names)
        stage = "bound"
        check_graph_bounds(graph)
        rng = np.random.default_rng(spec["seed"])
        q = np.concatenate([graph.input.quantize(calib[:4]),
                            rng.integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)])
        stage = "reference"
        ref = _as_list(run_reference(graph, q))
        for sched in schedules:
            stage = f"compile:{sched}"
            so = work / f"fuzz_{sched}.so"
            compile_graph(graph, so, batch=3, schedule=sched)
            stage = f"run:{sched}"
            out = _as_list(CompiledModel(so).run_int(q))
            if len(out) != len(ref):
                raise AssertionError(f"schedule '{sched}': {len(out)} outputs, the reference has {len(ref)}")
            for name, o, r in zip(graph.output_names, out, ref):
                if o.shape != r.shape or not np.array_equal(o, r):
                    raise AssertionError(f"schedule '{sched}', output '{name}': "
                                         f"{int((o != r).sum()) if o.shape == r.shape else 'shape'} of {r.size} "
                                         f"elements differ from the reference")
            res.schedules.append(sched)
        if cuda:
            from .backend.cuda_emulation import emulate_every_kernel

            stage = "cuda"
            res.cuda_kernels = len(emulate_every_kernel(graph, batch=1, seed=spec["seed"]))
        stage = "fakequant"
        res.max_local_lsb = local_lsb(qm, graph, q[:4])
        fq = _as_list(fakequant_outputs(qm, calib[:4]))
        res.exact_fraction_vs_fakequant = float(np.mean([(to_grid(f, t) == r[:4]).mean()
                                                         for f, t, r in zip(fq, graph.outputs, ref)]))
        if res.max_local_lsb > lsb_tolerance:
            raise AssertionError(f"integer vs fake-quant: {res.max_local_lsb} LSB on one node (tolerance "
                                 f"{lsb_tolerance})")
    except UnsupportedModelError as e:          # the fuzzer draws supported ops only: a generator or tracer bug
        res.status, res.stage, res.message = "failure", stage, f"UnsupportedModelError: {e}"[:600]
    except Ptq2TvmError as e:
        named = _named(str(e)) and stage in ("quantize", "fold")
        res.status, res.stage, res.message = ("named_error" if named else "failure"), stage, str(e)[:600]
    except Exception as e:  # noqa: BLE001 - a fuzzer records every other exception as a failure
        res.status, res.stage = "failure", stage
        res.message = f"{type(e).__name__}: {e}"[:600] + "\n" + traceback.format_exc(limit=4)[-800:]
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def dump(results: list[FuzzResult], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in results], indent=1))


def fresh_specs(seed: int, n: int, max_ops: int = 6) -> list[dict[str, Any]]:
    """``n`` independent graph specs, each the second example of its own seeded Hypothesis run (the first example
    of a run is the minimal graph, and the examples after it are mutations of each other: one run per graph keeps
    the structures diverse). Deterministic in ``seed``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[dict[str, Any]] = []
    for i in range(n):
        got: list[dict[str, Any]] = []

        @hseed(seed * 100_003 + i)
        @settings(max_examples=2, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(graph_specs(max_ops))
        def one(spec: dict[str, Any]) -> None:
            got.append(spec)

        one()
        out.append(got[-1])
    return out
