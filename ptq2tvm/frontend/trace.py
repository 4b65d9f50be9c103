"""Model intake: torch.fx trace -> validation -> BN folding -> fusion -> :class:`FloatGraph`."""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from .graph import FloatGraph, FloatNode

INF = math.inf

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity)
_IDENTITY_FUNCTIONS = (F.dropout, F.dropout2d, torch.nn.functional.dropout)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_FLATTEN_FUNCTIONS = (torch.flatten,)
_MEAN_FUNCTIONS = (torch.mean,)

SUPPORTED_LAYERS = (
    "Conv2d (any groups), BatchNorm2d (after a conv), ReLU, ReLU6, Hardtanh, residual add, MaxPool2d, AvgPool2d, "
    "AdaptiveAvgPool2d, Flatten, mean over (H, W), Linear, Dropout, Identity"
)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Unsupported(Exception):
    pass


def _conv_node(name: str, inp: str, m: nn.Conv2d) -> FloatNode:
    if m.padding_mode != "zeros":
        raise _Unsupported(f"padding_mode={m.padding_mode!r} (only 'zeros')")
    k = _pair(m.kernel_size)
    d = _pair(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0, 0)
        elif all((d[i] * (k[i] - 1)) % 2 == 0 for i in range(2)):
            pad = tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
        else:
            raise _Unsupported("padding='same' with an even kernel (asymmetric padding)")
    else:
        pad = _pair(m.padding)
    w = m.weight.detach().clone().float()
    b = m.bias.detach().clone().float() if m.bias is not None else torch.zeros(w.shape[0])
    attrs = dict(stride=_pair(m.stride), padding=tuple(pad), dilation=d, groups=int(m.groups))
    return FloatNode(name, "conv", [inp], attrs, weight=w, bias=b)


def _pool_attrs(kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> dict[str, Any]:
    k = _pair(kernel)
    s = _pair(stride if stride not in (None, ()) else kernel)
    return dict(kernel=k, stride=s, padding=_pair(padding), dilation=_pair(dilation))


def _max_pool_node(name: str, inp: str, kernel, stride, padding, dilation, ceil_mode, return_indices) -> FloatNode:
    if ceil_mode:
        raise _Unsupported("MaxPool2d with ceil_mode=True")
    if return_indices:
        raise _Unsupported("MaxPool2d with return_indices=True")
    return FloatNode(name, "maxpool", [inp], _pool_attrs(kernel, stride, padding, dilation))


def _avg_pool_node(name: str, inp: str, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> FloatNode:
    attrs = _pool_attrs(kernel, stride, padding)
    if ceil_mode:
        raise _Unsupported("AvgPool2d with ceil_mode=True")
    if divisor is not None:
        raise _Unsupported("AvgPool2d with divisor_override")
    if not count_include_pad and attrs["padding"] != (0, 0):
        raise _Unsupported("AvgPool2d with padding and count_include_pad=False")
    return FloatNode(name, "avgpool", [inp], attrs)


def _adaptive_avg_node(name: str, inp: str, output_size: Any, in_shape: torch.Size) -> FloatNode:
    h, w = int(in_shape[-2]), int(in_shape[-1])
    oh, ow = _pair(output_size) if output_size is not None else (h, w)
    oh = h if oh is None else oh
    ow = w if ow is None else ow
    if h % oh or w % ow:
        raise _Unsupported(f"AdaptiveAvgPool2d to {(oh, ow)} from {(h, w)} (input size must be a multiple)")
    k = (h // oh, w // ow)
    return FloatNode(name, "avgpool", [inp], dict(kernel=k, stride=k, padding=(0, 0), dilation=(1, 1)))


def _flatten_ok(start: int, end: int) -> None:
    if start != 1 or end != -1:
        raise _Unsupported(f"flatten(start_dim={start}, end_dim={end}) (only start_dim=1, end_dim=-1)")


def _mean_dims_ok(dims: Any, rank: int) -> None:
    dims = [dims] if isinstance(dims, int) else list(dims)
    if sorted(d % rank for d in dims) != [2, 3] or rank != 4:
        raise _Unsupported(f"mean over dims {dims} (only the spatial dims 2 and 3 of a 4-D tensor)")


def _arg(node: fx.Node, idx: int, key: str, default: Any) -> Any:
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(key, default)


class _Builder:
    """Turns fx nodes into primitive FloatNodes (ops conv, bn, act, add, linear, pools, flatten, identity)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.prims: list[FloatNode] = []
        self.errors: list[str] = []
        self.input_name: str | None = None
        self.output_name: str | None = None
        #: fx name -> the node that stands for it (``x.mean([2, 3])`` becomes avgpool + flatten)
        self.alias: dict[str, str] = {}
        self.names: dict[fx.Node, str] = {}
        taken: set[str] = set()
        for node in gm.graph.nodes:  # module path for layers; a module called twice gets '#k' on later calls
            base = str(node.target) if node.op == "call_module" else node.name
            name, k = base, 1
            while name in taken:
                name, k = f"{base}#{k}", k + 1
            taken.add(name)
            self.names[node] = name

    def _name(self, node: fx.Node) -> str:
        return self.names[node]

    def _in(self, node: fx.Node, idx: int = 0) -> str:
        a = node.args[idx]
        if not isinstance(a, fx.Node):
            raise _Unsupported(f"non-tensor input {a!r}")
        return self._name(a)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self._visit(node)
            except _Unsupported as e:
                self.errors.append(f"{self._name(node)} ({self._describe(node)}): {e}")

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {node.target}"

    def _visit(self, node: fx.Node) -> None:
        name = self._name(node)
        if node.op == "placeholder":
            if self.input_name is not None:
                raise _Unsupported("a second model input (only single-input models are supported)")
            self.input_name = name
            self.prims.append(FloatNode(name, "input", []))
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise _Unsupported("the model must return a single tensor")
            self.output_name = self._name(out)
        elif node.op == "get_attr":
            raise _Unsupported("constant tensor attribute used in forward")
        elif node.op == "call_module":
            self._visit_module(node, name, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node, name)
        else:
            raise _Unsupported("unknown fx node kind")

    def _visit_module(self, node: fx.Node, name: str, m: nn.Module) -> None:
        inp = self._in(node)
        shape = node.args[0].meta["tensor_meta"].shape
        if isinstance(m, nn.Conv2d):
            self.prims.append(_conv_node(name, inp, m))
        elif isinstance(m, nn.BatchNorm2d):
            if not m.track_running_stats or m.running_mean is None:
                raise _Unsupported("BatchNorm2d without running statistics")
            self.prims.append(FloatNode(name, "bn", [inp], dict(module=m)))
        elif isinstance(m, nn.ReLU):
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(0.0, INF))))
        elif isinstance(m, nn.ReLU6):
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(0.0, 6.0))))
        elif isinstance(m, nn.Hardtanh):
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(float(m.min_val), float(m.max_val)))))
        elif isinstance(m, nn.MaxPool2d):
            self.prims.append(
                _max_pool_node(name, inp, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                               m.return_indices))
        elif isinstance(m, nn.AvgPool2d):
            self.prims.append(
                _avg_pool_node(name, inp, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                               m.divisor_override))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.prims.append(_adaptive_avg_node(name, inp, m.output_size, shape))
        elif isinstance(m, nn.Flatten):
            _flatten_ok(m.start_dim, m.end_dim)
            self.prims.append(FloatNode(name, "flatten", [inp]))
        elif isinstance(m, nn.Linear):
            if len(shape) != 2:
                raise _Unsupported(f"Linear on a {len(shape)}-D input (only 2-D (N, features))")
            w = m.weight.detach().clone().float()
            b = m.bias.detach().clone().float() if m.bias is not None else torch.zeros(w.shape[0])
            self.prims.append(FloatNode(name, "linear", [inp], {}, weight=w, bias=b))
        elif isinstance(m, _IDENTITY_MODULES):
            self.prims.append(FloatNode(name, "identity", [inp]))
        else:
            raise _Unsupported("layer type not supported")

    def _visit_function(self, node: fx.Node, name: str) -> None:
        t = node.target
        is_method = node.op == "call_method"
        if t in _ADD_FUNCTIONS or (is_method and t in ("add", "add_")):
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                raise _Unsupported("add with a constant (only tensor + tensor residual adds)")
            if node.kwargs.get("alpha", 1) != 1:
                raise _Unsupported("add with alpha != 1")
            self.prims.append(FloatNode(name, "add", [self._name(a), self._name(b)]))
            return
        inp = self._in(node)
        shape = node.args[0].meta["tensor_meta"].shape
        if t in _RELU_FUNCTIONS or (is_method and t in ("relu", "relu_")):
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(0.0, INF))))
        elif t is F.relu6:
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(0.0, 6.0))))
        elif t is F.hardtanh:
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            self.prims.append(FloatNode(name, "act", [inp], dict(bounds=(float(lo), float(hi)))))
        elif t in _IDENTITY_FUNCTIONS or (is_method and t in ("contiguous",)):
            self.prims.append(FloatNode(name, "identity", [inp]))
        elif t in _FLATTEN_FUNCTIONS or (is_method and t == "flatten"):
            _flatten_ok(_arg(node, 1, "start_dim", 0 if not is_method else 0), _arg(node, 2, "end_dim", -1))
            self.prims.append(FloatNode(name, "flatten", [inp]))
        elif t in _MEAN_FUNCTIONS or (is_method and t == "mean"):
            dims = _arg(node, 1, "dim", None)
            if dims is None:
                raise _Unsupported("mean over all dims")
            _mean_dims_ok(dims, len(shape))
            keep = bool(_arg(node, 2, "keepdim", False))
            k = (int(shape[2]), int(shape[3]))
            self.prims.append(FloatNode(name, "avgpool", [inp], dict(kernel=k, stride=k, padding=(0, 0),
                                                                     dilation=(1, 1))))
            if not keep:
                self.prims.append(FloatNode(name + ".flatten", "flatten", [name]))
                self.alias[name] = name + ".flatten"
        elif t is F.adaptive_avg_pool2d:
            self.prims.append(_adaptive_avg_node(name, inp, _arg(node, 1, "output_size", None), shape))
        elif t is F.max_pool2d:
            self.prims.append(_max_pool_node(
                name, inp, _arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None),
                _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False),
                _arg(node, 6, "return_indices", False)))
        elif t is F.avg_pool2d:
            self.prims.append(_avg_pool_node(
                name, inp, _arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None),
                _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False),
                _arg(node, 5, "count_include_pad", True), _arg(node, 6, "divisor_override", None)))
        else:
            raise _Unsupported("operation not supported")


def _rename_inputs(nodes: list[FloatNode], old: str, new: str) -> None:
    for n in nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
        if n.residual == old:
            n.residual = new


def _users(nodes: list[FloatNode], name: str, output_name: str) -> int:
    return sum(n.data_inputs.count(name) for n in nodes) + (1 if name == output_name else 0)


def _check_bn(name: str, bn: nn.BatchNorm2d, conv: str) -> None:
    """Refuse a BatchNorm whose 1 / sqrt(running_var + eps) or parameters are not finite: the FP32 model itself
    outputs NaN/Inf there. The message names the BN, the conv it folds into, the channels and the cause."""
    var = bn.running_var.detach().double()
    params = {"running_var": bn.running_var, "running_mean": bn.running_mean, "weight": bn.weight, "bias": bn.bias}
    for pname, p in params.items():
        if p is not None and not bool(torch.isfinite(p.detach()).all()):
            ch = torch.nonzero(~torch.isfinite(p.detach())).flatten().tolist()
            raise UnsupportedModelError(f"BatchNorm2d '{name}' (folded into conv '{conv}'): {pname} is NaN/Inf in "
                                        f"channel(s) {ch[:8]}")
    bad = ~torch.isfinite(1.0 / torch.sqrt(var + bn.eps))
    if bad.any():
        ch = torch.nonzero(bad).flatten().tolist()
        raise UnsupportedModelError(
            f"BatchNorm2d '{name}' (folded into conv '{conv}'): running_var + eps <= 0 in channel(s) {ch[:8]} "
            f"(eps={bn.eps:g}, running_var={float(var[ch[0]]):g}): 1/sqrt(running_var + eps) is not finite, so the "
            "model's own FP32 output is NaN/Inf there (set eps > 0 or fix the running statistics)")


def _fold_bn(conv: FloatNode, bn: nn.BatchNorm2d) -> None:
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    k = gamma / torch.sqrt(var + bn.eps)
    conv.weight = (conv.weight.double() * k.view(-1, 1, 1, 1)).float()
    conv.bias = ((conv.bias.double() - mean) * k + beta).float()


def _depths(nodes: list[FloatNode]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for n in nodes:
        depth[n.name] = 1 + max((depth.get(i, 0) for i in n.data_inputs), default=0)
    return depth


def _fuse(prims: list[FloatNode], output_name: str) -> tuple[list[FloatNode], str]:
    """Remove identities, fold BN, fuse residual adds and activations into their producers."""
    nodes = list(prims)
    out = output_name

    def replace(old: str, new: str) -> None:
        nonlocal out
        _rename_inputs(nodes, old, new)
        if out == old:
            out = new

    errors: list[str] = []
    i = 0
    while i < len(nodes):
        n = nodes[i]
        by_name = {m.name: m for m in nodes}
        if n.op == "identity":
            nodes.pop(i)
            replace(n.name, n.inputs[0])
            continue
        if n.op == "bn":
            prod = by_name.get(n.inputs[0])
            if prod is None or prod.op != "conv" or prod.act or prod.residual or _users(nodes, prod.name, out) != 1:
                errors.append(f"{n.name} (BatchNorm2d): does not directly follow a Conv2d whose only user it is; "
                              "it cannot be folded")
                i += 1
                continue
            _check_bn(n.name, n.attrs["module"], prod.name)
            _fold_bn(prod, n.attrs["module"])
            nodes.pop(i)
            replace(n.name, prod.name)
            continue
        if n.op == "add":
            depth = _depths(nodes)
            cands = []
            for k, inp in enumerate(n.inputs):
                p = by_name.get(inp)
                other = n.inputs[1 - k]
                if (p is not None and p.op in ("conv", "linear") and p.act is None and p.residual is None
                        and _users(nodes, p.name, out) == 1 and other != p.name):
                    cands.append((depth[p.name], k, p, other))
            if cands:
                _, _, p, other = max(cands, key=lambda c: (c[0], c[1]))
                p.residual = other
                nodes.remove(p)
                idx = nodes.index(n)
                nodes[idx] = p  # the producer now runs where the add ran: both of its inputs exist by then
                replace(n.name, p.name)
                i = idx + 1
                continue
        if n.op == "act":
            p = by_name.get(n.inputs[0])
            lo, hi = n.attrs["bounds"]
            if p is not None and p.op in ("conv", "linear", "add", "clamp") and _users(nodes, p.name, out) == 1:
                plo, phi = p.act if p.act else (-INF, INF)
                p.act = (max(lo, plo), min(hi, phi))
                nodes.pop(i)
                replace(n.name, p.name)
                continue
            n.op, n.act, n.attrs = "clamp", (lo, hi), {}
        i += 1
    if errors:
        raise UnsupportedModelError("cannot quantize the model:\n  " + "\n  ".join(errors))
    return nodes, out


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> FloatGraph:
    """Trace ``model`` (C, H, W input) with torch.fx and return its canonical float graph.

    Raises :class:`UnsupportedModelError` listing every unsupported node by name.
    """
    if len(input_shape) != 3:
        raise UnsupportedModelError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    model = copy.deepcopy(model).eval().float()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many exception types
        raise UnsupportedModelError(f"torch.fx cannot trace the model: {type(e).__name__}: {e}") from e
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as e:
        raise UnsupportedModelError(f"the model does not run on an input of shape (1, {', '.join(map(str, input_shape))})"
                                    f": {type(e).__name__}: {e}") from e
    b = _Builder(gm)
    b.run()
    if b.errors:
        raise UnsupportedModelError(
            f"{len(b.errors)} unsupported node(s) in the model:\n  " + "\n  ".join(b.errors)
            + f"\nSupported: {SUPPORTED_LAYERS}.")
    alias = b.alias
    for old, new in alias.items():
        for n in b.prims:
            if n.name != new:
                n.inputs = [new if i == old else i for i in n.inputs]
    out = alias.get(b.output_name, b.output_name)
    nodes, out = _fuse(b.prims, out)
    if len(nodes) < 2:
        raise UnsupportedModelError("the model has no operations to quantize")
    graph = FloatGraph(nodes, b.input_name, out, tuple(input_shape))
    _check_final(graph)
    return graph


def _check_final(graph: FloatGraph) -> None:
    ok_final = ("conv", "linear", "add", "avgpool", "maxpool", "flatten", "clamp")
    out = graph.node(graph.output_name)
    if out.op not in ok_final:
        raise UnsupportedModelError(f"the model output comes from '{out.name}' ({out.op}), which is not a layer")
    if not any(n.op in ("conv", "linear") for n in graph.nodes):
        raise UnsupportedModelError("the model has no Conv2d or Linear layer")
