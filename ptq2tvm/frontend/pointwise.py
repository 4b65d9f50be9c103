"""Recognize activations that a model spells out with arithmetic, and trace them as the one activation they are.

Model code in the wild writes Hardswish, Hardsigmoid and SiLU by hand: ``x * F.relu6(x + 3) / 6`` (timm's and the
original MobileNetV3 repositories' ``hard_swish``), ``x * F.hardtanh(x + 3, 0., 6.) / 6.`` (YOLOv5), ``F.relu6(x +
3.) / 6.`` (``h_sigmoid``), ``x * torch.sigmoid(x)`` (``Swish`` in EfficientNet-PyTorch, YOLOv5's ``SiLU``), GELU as
``0.5 * x * (1 + torch.erf(x / math.sqrt(2)))`` or its tanh approximation. Traced op by op, the additions and
divisions by constants are not quantizable ops (refused), and ``x * sigmoid(x)`` costs a lookup table, a multiply
and one more quantized tensor.

:func:`collapse_pointwise_activations` finds each region of element-wise nodes (arithmetic with Python numbers,
powers, clamps, ReLU / ReLU6 / Hardtanh, sigmoid / tanh / erf / exp, and the lookup-table activations, as
functions, methods or modules) that reads exactly one tensor ``x`` of the graph and has one result read elsewhere,
evaluates the region in float64 on a grid of inputs (dense in [-12, 12], then every 5% in magnitude out to
float32's largest values), and where it equals one of the activations below on every point (within 1e-6),
replaces the region by that activation's call on ``x``. A region that equals none stays as it is (and is refused
or traced as before). The model's float function is unchanged: the replacement computes the same values.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

#: what a region may be recognized as: (name, the torch function the graph then calls, its keyword arguments,
#: float64 reference)
_CANDIDATES: tuple[tuple[str, Callable[..., Any], dict[str, Any], Callable[[torch.Tensor], torch.Tensor]], ...] = (
    ("hardswish", F.hardswish, {}, lambda t: t * torch.clamp(t + 3.0, 0.0, 6.0) / 6.0),
    ("hardsigmoid", F.hardsigmoid, {}, lambda t: torch.clamp(t + 3.0, 0.0, 6.0) / 6.0),
    ("silu", F.silu, {}, lambda t: t * torch.sigmoid(t)),
    ("sigmoid", torch.sigmoid, {}, torch.sigmoid),
    ("tanh", torch.tanh, {}, torch.tanh),
    ("gelu", F.gelu, {}, lambda t: 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))),
    ("gelu (tanh approximation)", F.gelu, {"approximate": "tanh"},
     lambda t: 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))),
    ("mish", F.mish, {}, lambda t: t * torch.tanh(F.softplus(t))),
)

_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
              operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub,
              torch.mul, torch.div, torch.neg, torch.clamp, torch.clip, torch.sigmoid, torch.tanh, torch.erf,
              torch.exp, torch.relu, F.relu, F.relu6, F.hardtanh, F.sigmoid, F.tanh, F.hardsigmoid, F.hardswish,
              F.silu, F.softplus, F.mish, F.gelu, torch.special.erf, torch.pow}
_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "clamp", "clip", "sigmoid", "tanh", "erf", "exp", "relu",
            "add_", "sub_", "mul_", "div_", "clamp_", "clip_", "sigmoid_", "tanh_", "relu_", "__add__", "__sub__",
            "__mul__", "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "__pow__"}
_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.Softplus,
            nn.Mish, nn.GELU)

#: how close a region must come to an activation on every grid point: float32 constants of an exported model
#: (sqrt(2) as 1.41421354 in an ONNX GELU) are 2e-8 off; distinct activations differ by far more, and an 8-bit
#: table's step is ~4e-3 of its range
_RTOL = 1e-6

#: the inputs a region is evaluated on: dense over the range activations act in, and far out on both sides up to
#: float32's largest values (every 5% in magnitude): a clamp / hardtanh bound far out (``torch.clamp(x, -1500,
#: 1500) * torch.sigmoid(x)``, a float16 guard ``x.clamp(-65504, 65504)``) changes the region's value everywhere
#: beyond it, so the region equals the activation only where no such bound is (a few points out to 1e3 took it for
#: SiLU: 0.69 relative error off FP32 on activations beyond 1500, silently)
_FAR = torch.logspace(math.log10(12.5), math.log10(3.4e38), 1800, dtype=torch.float64)
_GRID = torch.cat([torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64), _FAR, -_FAR])


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is one of the element-wise calls a region may hold (its tensor arguments are checked by
    the caller)."""
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    if node.op == "call_method":
        return str(node.target) in _METHODS
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return isinstance(mod, _MODULES) and not any(True for _ in mod.parameters())
    return False


def _float_meta(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or getattr(meta, "dtype", None) not in (torch.float32, torch.float64):
        return None
    return tuple(meta.shape)


def _constant(v: Any) -> bool:
    """A plain argument a region's node may take besides its tensors: a number, a flag, None or a mode string
    (``approximate="tanh"``)."""
    return v is None or type(v) in (int, float, bool, str)


def _regions(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(x, the region's nodes in graph order) for every connected region of element-wise nodes that reads only
    ``x`` (every other argument a :func:`_constant`) and keeps x's shape."""
    root: dict[fx.Node, fx.Node] = {}          # member -> the one tensor its region reads
    for node in gm.graph.nodes:
        if not _elementwise(gm, node) or _float_meta(node) is None:
            continue
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
        if not tensors or not all(_constant(a) for a in others):
            continue
        roots = {root.get(a, a) for a in tensors}
        if len(roots) != 1:
            continue
        (r,) = roots
        if _float_meta(r) is None or _float_meta(r) != _float_meta(node):
            continue
        root[node] = r
    # connected components among members (edges: a member reading another member)
    parent: dict[fx.Node, fx.Node] = {n: n for n in root}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in root:
        for a in n.all_input_nodes:
            if a in root:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in root:                              # graph order
        groups.setdefault(find(n), []).append(n)
    return [(root[members[0]], members) for members in groups.values()]


def _evaluate(gm: fx.GraphModule, x: fx.Node, members: list[fx.Node], sink: fx.Node, t: torch.Tensor) -> torch.Tensor:
    """The region's result for ``x`` = ``t`` (float64), computed node by node like the graph does."""
    env: dict[fx.Node, Any] = {x: t}

    def val(a: Any) -> Any:
        return env[a] if isinstance(a, fx.Node) else a

    for n in members:
        # copies: an in-place op (y.relu_(), operator.iadd, inplace=True) then changes only its own result
        args = [val(a).clone() if isinstance(val(a), torch.Tensor) else val(a) for a in n.args]
        kwargs = {k: val(v) for k, v in n.kwargs.items()}
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        else:
            env[n] = gm.get_submodule(str(n.target)).double()(*args, **kwargs)
    return env[sink]


def _sub_regions(x: fx.Node, members: list[fx.Node]) -> Any:
    """(root, sink, nodes in graph order) for every part of one region that could be collapsed on its own: the
    nodes between a root (``x`` or a member) and a sink that only the part reads (every node but the sink read
    only inside it, every tensor read the root or a node of the part), two nodes or more; per sink (graph order),
    the farthest root first. ``x * F.relu6(x + 3) / 6`` followed by ``F.silu``: the hardswish part, then (once
    collapsed) the SiLU part."""
    inside = set(members)
    ancestors: dict[fx.Node, set[fx.Node]] = {}
    for m in members:
        ancestors[m] = set()
        for a in m.all_input_nodes:
            if a in inside:
                ancestors[m] |= {a} | ancestors[a]
    for sink in members:
        for root in [x] + [m for m in members if m in ancestors[sink]]:
            part = [m for m in members if (m is sink or m in ancestors[sink]) and (root is x or root in ancestors[m])]
            chosen = set(part)
            if len(part) < 2 or root in chosen:
                continue
            if all(set(m.all_input_nodes) <= chosen | {root} for m in part) and all(
                    set(m.users) <= chosen for m in part if m is not sink):
                yield root, sink, part


def _layer_name(gm: fx.GraphModule, part: list[fx.Node]) -> str | None:
    """The layer name the collapsed activation gets: the innermost module that holds every node of the part and
    nothing else (fx's ``nn_module_stack``: ``act`` for an ``HSwish`` module at ``self.act``, ``features.3.act``
    deeper down; not a block whose forward also runs its convs), else the one module the part calls (``block.act``:
    an imported ONNX model's Sigmoid of ``x * Sigmoid(x)``), else None (the fx node's own name)."""
    stacks = [list(n.meta.get("nn_module_stack", {}) or {}) for n in part]
    common: list[str] = []
    for level in zip(*stacks):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    inside = set(part)
    if common and all(stacks) and not any(
            common[-1] in (n.meta.get("nn_module_stack", {}) or {}) for n in gm.graph.nodes if n not in inside):
        return common[-1]
    modules = [str(n.target) for n in part if n.op == "call_module"]
    return modules[0] if len(modules) == 1 else None


def _replace(gm: fx.GraphModule, root: fx.Node, part: list[fx.Node], sink: fx.Node, fn: Callable[..., Any],
             kwargs: dict[str, Any]) -> None:
    """``fn(root, **kwargs)`` in place of ``part``; the new node carries the layer name of :func:`_layer_name` as
    ``meta['layer_name']``, which the tracer names the layer by."""
    label = _layer_name(gm, part)
    with gm.graph.inserting_after(sink):
        new = gm.graph.call_function(fn, (root,), dict(kwargs))
    new.meta = dict(sink.meta)
    new.meta.pop("layer_name", None)
    if label:
        new.meta["layer_name"] = label
    sink.replace_all_uses_with(new)
    for n in reversed(part):
        gm.graph.erase_node(n)


def _collapse_one(gm: fx.GraphModule, tried: set[tuple[fx.Node, ...]]) -> tuple[str, str] | None:
    """Collapse the first part of a region (:func:`_sub_regions`) that equals one of the activations; -> (the
    replaced result's node name, the activation), or None when no part does. ``tried``: the parts (root, sink,
    nodes) found to be no activation by earlier calls, skipped (a collapse leaves the other regions' parts as they
    were; one that takes a new node is a new key), and those found here added."""
    for x, members in _regions(gm):
        if len(members) < 2:
            continue
        for root, sink, part in _sub_regions(x, members):
            key = (root, sink, *part)
            if key in tried:
                continue
            tried.add(key)
            try:
                with torch.no_grad():
                    got = _evaluate(gm, root, part, sink, _GRID.clone())
            except Exception:  # noqa: BLE001 - a part that does not evaluate on a 1-D grid is no activation
                continue
            if not isinstance(got, torch.Tensor) or got.shape != _GRID.shape:
                continue
            for name, fn, kwargs, ref in _CANDIDATES:
                if torch.allclose(got, ref(_GRID), rtol=_RTOL, atol=_RTOL):
                    _replace(gm, root, part, sink, fn, kwargs)
                    return sink.name, name
    return None


def collapse_pointwise_activations(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Replace, in place, every part of the graph of two or more element-wise nodes that computes Hardswish,
    Hardsigmoid, SiLU, sigmoid, tanh, GELU or Mish of one tensor (module docstring) by that activation's call,
    one part at a time until none is left (``x * F.relu6(x + 3) / 6`` followed by ``y * torch.sigmoid(y)``: two
    activations). Needs the shapes of :func:`ptq2tvm.frontend.trace.propagate_shapes` and the explicit in-place data
    flow of :func:`ptq2tvm.frontend.trace.functionalize_inplace` (``x.mul_(inner)``: the layers that read ``x``
    after the write read the ``mul_`` node, those before it ``x``, so the activation computed out of place gives
    both what they read). -> [(the replaced result's node name, the activation)], in the order replaced."""
    done: list[tuple[str, str]] = []
    # parts already evaluated: each collapse starts the search over, and evaluating every region that is no
    # activation again after each one took time quadratic in the model (200 spelled Hardswish, each followed by a
    # ReLU-of-Hardtanh region: 33 s to trace, 1 s without those regions)
    tried: set[tuple[fx.Node, ...]] = set()
    while (hit := _collapse_one(gm, tried)) is not None:
        done.append(hit)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


__all__ = ["collapse_pointwise_activations"]
