"""Model intake: torch.fx trace -> validation -> BN folding -> fusion -> :class:`FloatGraph`."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import operator
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError, first_line
from ..ops.base import FLOAT_OPS, FUNCTION_HANDLERS, METHOD_HANDLERS, Unsupported, module_handler
from ..ops.shape import collapse_channel_shuffles
from .graph import FloatGraph, FloatNode
from .linear_gates import linear_gates_as_convs
from .pointwise import collapse_pointwise_activations

INF = math.inf


def supported_layers() -> str:
    """The "Supported:" line of the tracer's error message, from the op registry."""
    return ", ".join(d.summary for d in FLOAT_OPS.values() if d.summary)


class _Builder:
    """Turns fx nodes into primitive FloatNodes through the op registry (:mod:`ptq2tvm.ops`); op handlers call
    :meth:`add`, :meth:`inp`, :meth:`name`, :meth:`shape` and may set ``alias`` / ``chunks`` entries."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.prims: list[FloatNode] = []
        self.errors: list[str] = []
        self.input_name: str | None = None
        self.outputs: Any = None
        #: fx name -> the node that stands for it (``x.mean([2, 3])`` becomes avgpool + flatten)
        self.alias: dict[str, str] = {}
        #: fx name of a chunk/split -> (input tensor, [(start, stop) channel ranges])
        self.chunks: dict[str, tuple[str, list[tuple[int, int]]]] = {}
        self.names: dict[fx.Node, str] = {}
        taken: set[str] = set()
        # module path for layers (or the name a rewrite gave, meta['layer_name']: an activation spelled out with
        # arithmetic, frontend/pointwise.py); a module called twice gets '#k' on later calls
        for node in gm.graph.nodes:
            base = node.meta.get("layer_name") or (str(node.target) if node.op == "call_module" else node.name)
            name, k = base, 1
            while name in taken:
                name, k = f"{base}#{k}", k + 1
            taken.add(name)
            self.names[node] = name

    # ---- the API op handlers use --------------------------------------------------------------------------------
    def add(self, node: FloatNode) -> None:
        self.prims.append(node)

    def name(self, node: fx.Node) -> str:
        return self.names[node]

    def inp(self, node: fx.Node, idx: int = 0) -> str:
        """Name of the tensor argument ``idx`` of ``node``."""
        a = node.args[idx]
        if not isinstance(a, fx.Node) or "tensor_meta" not in a.meta:
            raise Unsupported(f"argument {idx} is not a tensor ({a!r})")
        if a.op == "get_attr":
            raise Unsupported(f"a constant tensor attribute ({a.target}) as an activation input")
        return self.names[a]

    def constant(self, node: Any) -> torch.Tensor | None:
        """The tensor behind a ``get_attr`` fx node (a parameter or buffer read in forward), None for None;
        raises Unsupported for anything computed."""
        if node is None:
            return None
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise Unsupported(f"{node!r} is not a constant parameter (computed weights are not supported)")
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj.detach().clone().float()

    @staticmethod
    def shape(node: Any) -> torch.Size:
        """Shape (batch dim included) of the tensor an fx node produces, from shape propagation."""
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            raise Unsupported(f"{node!r} is not a tensor")
        return meta.shape

    # ---- traversal -------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self._visit(node)
            except Unsupported as e:
                self.errors.append(f"{self.names[node]} ({self._describe(node)}): {e}")

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        return f"{node.op} {node.target}"

    def _visit(self, node: fx.Node) -> None:
        name = self.names[node]
        if node.op == "placeholder":
            if self.input_name is not None:
                raise Unsupported("a second model input (only single-input models are supported)")
            self.input_name = name
            self.prims.append(FloatNode(name, "input", []))
            return
        if node.op == "output":
            self.outputs = node.args[0]
            return
        if node.op == "get_attr":         # a parameter/buffer read in forward: only conv weights may use it
            return
        if "tensor_meta" not in node.meta:    # shape arithmetic (x.size(), getitem of a size, ints): not a tensor op
            return
        module = self.modules[node.target] if node.op == "call_module" else None
        if module is not None:
            opdef = module_handler(module)
        elif node.op == "call_method":
            opdef = METHOD_HANDLERS.get(node.target)
        elif node.op == "call_function":
            opdef = FUNCTION_HANDLERS.get(node.target)
        else:
            opdef = None
        if opdef is None:
            raise Unsupported("layer type not supported" if module is not None else "operation not supported")
        if node.op in ("call_function", "call_method") and node.kwargs:
            _leading_kwargs_to_args(node)
        _constant_shape_arguments(node)
        try:
            opdef.trace(self, node, name, module)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            # a handler that met an argument spelling it does not read: one line naming the node, not a traceback
            raise Unsupported(f"cannot read its arguments {_arguments_text(node)} ({type(e).__name__}: "
                              f"{first_line(e)})") from e

    def output_names(self) -> list[str]:
        """The graph outputs in order (a tuple / list / dict of tensors is flattened; ``output_keys`` keeps dict
        keys)."""
        out = self.outputs
        if isinstance(out, fx.Node):
            return [self.names[out]]
        if isinstance(out, dict):
            labels, items = [f"key {k!r}" for k in out], list(out.values())
        elif isinstance(out, (tuple, list)):
            labels, items = [f"element {i}" for i in range(len(out))], list(out)
        else:
            raise UnsupportedModelError(f"the model returns {type(out).__name__}, not a tensor or a tuple/list/dict "
                                        "of tensors")
        if not items:
            raise UnsupportedModelError(f"the model returns an empty {_container_name(out)}: it must return a "
                                        "tensor or a flat tuple/list/dict of tensors")
        bad = [(lab, o) for lab, o in zip(labels, items) if not (isinstance(o, fx.Node) and "tensor_meta" in o.meta)]
        if bad:
            what = ", ".join(f"{lab} is {_output_kind(o)}" for lab, o in bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise UnsupportedModelError(f"the model must return a tensor or a flat tuple/list/dict of tensors; in the "
                                        f"{_container_name(out)} it returns, {what} (return the tensors side by "
                                        "side)")
        return [self.names[o] for o in items]

    def output_structure(self) -> Any:
        """None for one tensor, ("tuple", n) / ("list", n) / ("dict", keys) for several."""
        out = self.outputs
        if isinstance(out, dict):
            return ["dict", [str(k) for k in out.keys()]]
        if isinstance(out, (tuple, list)):
            return [type(out).__name__, len(out)]
        return None


def _constant_shape_arguments(node: fx.Node) -> None:
    """Replace the arguments of ``node`` computed from tensor shapes (``F.avg_pool2d(x, x.size()[2:])``,
    ``x[:, :x.shape[1] // 2]``, ``x.split(c // 2, 1)``, ``x.flatten(x.dim() - 3)``) by their values, which the shape
    pass recorded (``py_value``): the op handlers read plain ints, and raised a raw TypeError on the fx node (or
    refused a constant split size). Only values that are the same at batch 2 (:func:`mark_batch_free_values`): one
    computed from the batch size (``x.size(0)``) stays a node."""
    def value(a: fx.Node) -> Any:
        return a.meta["py_value"] if a.meta.get("batch_free") else a

    node.args = fx.node.map_arg(node.args, value)
    node.kwargs = fx.node.map_arg(node.kwargs, value)


def _arguments_text(node: fx.Node) -> str:
    """``(x, 3, stride=2)``: a call's arguments for messages (nodes by name)."""
    parts = [repr(a) for a in node.args] + [f"{k}={v!r}" for k, v in node.kwargs.items()]
    text = f"({', '.join(parts)})"
    return text if len(text) <= 120 else text[:117] + "...)"


def _output_kind(o: Any) -> str:
    """'a dict', 'a tuple', 'an int' ...: what a model returned in place of a tensor."""
    if isinstance(o, fx.Node):
        return "not a tensor"
    name = _container_name(o)
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _container_name(o: Any) -> str:
    """'dict' / 'tuple' / 'list' for those and fx's immutable versions of them, else the type's name."""
    return next((t.__name__ for t in (dict, tuple, list) if isinstance(o, t)), type(o).__name__)


def _rename_inputs(nodes: list[FloatNode], old: str, new: str) -> None:
    for n in nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
        if n.residual == old:
            n.residual = new


def _users(nodes: list[FloatNode], name: str, outputs: list[str]) -> int:
    return sum(n.data_inputs.count(name) for n in nodes) + outputs.count(name)


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


def _bn_as_depthwise_conv(n: FloatNode) -> None:
    """Turn a BatchNorm2d node that follows no foldable conv into the equivalent depthwise 1x1 conv (in place)."""
    bn = n.attrs["module"]
    c = bn.running_mean.numel()
    n.op = "conv"
    n.attrs = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=int(c))
    n.weight = torch.ones(c, 1, 1, 1)
    n.bias = torch.zeros(c)
    _fold_bn(n, bn)


def _depths(nodes: list[FloatNode]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for n in nodes:
        depth[n.name] = 1 + max((depth.get(i, 0) for i in n.data_inputs), default=0)
    return depth


def _fuse(prims: list[FloatNode], outputs: list[str]) -> tuple[list[FloatNode], list[str]]:
    """Remove identities, fold BN, fuse residual adds and activations into their producers."""
    nodes = list(prims)
    out = list(outputs)

    def replace(old: str, new: str) -> None:
        _rename_inputs(nodes, old, new)
        out[:] = [new if o == old else o for o in out]

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
                # pre-activation BN (DenseNet, on a concat or a block input): a per-channel affine map, i.e. a
                # depthwise 1x1 conv (each weight is one value per channel: exact at any weight bits)
                _bn_as_depthwise_conv(n)
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
            if (p is not None and p.op in FLOAT_OPS and (FLOAT_OPS[p.op].kind in ("weighted", "requant")
                                                        or p.op == "clamp")
                    and _users(nodes, p.name, out) == 1):
                plo, phi = p.act if p.act else (-INF, INF)
                # clamp(clamp(x, plo, phi), lo, hi) = clamp(x, clamp(plo, lo, hi), clamp(phi, lo, hi)); (max, min)
                # only when the intervals overlap (disjoint ones gave lo > hi: found by the fuzzer)
                p.act = (min(max(plo, lo), hi), max(min(phi, hi), lo))
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
    model = unwrap_model(model)
    check_single_input(model)
    model = copy.deepcopy(model).eval().float()
    gm = _symbolic_trace(model)
    propagate_shapes(gm, input_shape)
    functionalize_inplace(gm)
    dead = remove_dead_layers(gm)
    mark_batch_free_values(gm)
    _drop_identity_arithmetic(gm)
    collapse_pointwise_activations(gm)
    if linear_gates_as_convs(gm):         # Linear squeeze-excitation gates are 1x1 convs now: their shapes changed
        propagate_shapes(gm, input_shape)
    b = _Builder(gm)
    b.run()
    b.errors += collapse_channel_shuffles(b.prims)
    if b.errors:
        raise UnsupportedModelError(
            f"{len(b.errors)} unsupported node(s) in the model:\n  " + "\n  ".join(b.errors)
            + f"\nSupported: {supported_layers()}.")
    alias = b.alias
    for old, new in alias.items():
        for n in b.prims:
            if n.name != new:
                n.inputs = [new if i == old else i for i in n.inputs]
    outs = [alias.get(o, o) for o in b.output_names()]
    nodes, outs = _fuse(b.prims, outs)
    if len(nodes) < 2:
        raise UnsupportedModelError("the model has no operations to quantize")
    graph = FloatGraph(nodes, b.input_name, outs, tuple(input_shape), b.output_structure())
    graph.dead_layers = dead
    _check_final(graph)
    return graph


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_ONLY_X = "ptq2tvm supports forward(x) (plus arguments with defaults, which take their defaults)"


def _forward_params(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward`` (``self`` excluded), or None when it has no readable signature."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):     # no signature to read (a C extension): the trace decides
        return None


def _signature_text(params: list[inspect.Parameter]) -> str:
    """``forward(x, *args, scale=...)``: the parameter names of ``forward`` (annotations and defaults left out),
    for messages."""
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    names = [prefix.get(p.kind, "") + p.name + ("=..." if p.default is not inspect.Parameter.empty else "")
             for p in params]
    return f"forward({', '.join(names)})"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``nn.DataParallel`` / ``DistributedDataParallel``'s ``.module``, ``torch.compile``'s
    ``._orig_mod`` (their forward is ``forward(*inputs, **kwargs)``, which fx cannot take as one input). Raises
    :class:`UnsupportedModelError` for a TorchScript module (``torch.jit.script`` / ``trace``): it has no Python
    forward for torch.fx to trace."""
    while True:
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script / trace / load): "
                "torch.fx cannot trace it; pass the nn.Module itself, or export it to ONNX (torch.onnx.export) and "
                "quantize the .onnx file")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def check_single_input(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model.forward`` takes one input: a first parameter ``x`` (not
    ``*xs`` / ``**kw``), and beyond it only parameters with defaults (they take their defaults, as at inference),
    ``*args`` or ``**kwargs`` (traced empty: :func:`_symbolic_trace` refuses a model that then uses them). ptq2tvm
    traces and compiles single-input models; wrappers are looked through (:func:`unwrap_model`)."""
    params = _forward_params(unwrap_model(model))
    if params is None:
        return
    if not params:
        raise UnsupportedModelError(f"model forward() takes no input; {_ONLY_X}")
    if params[0].kind in _VAR:
        raise UnsupportedModelError(f"model {_signature_text(params)} takes its input as "
                                    f"{_signature_text(params[:1])[8:-1]}; {_ONLY_X}")
    kinds = _POSITIONAL + (inspect.Parameter.KEYWORD_ONLY,)
    required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if len(required) > 1:
        raise UnsupportedModelError(f"model forward() takes {len(required)} inputs ({', '.join(required)}); ptq2tvm "
                                    "quantizes single-input models (wrap it in a module whose forward(x) supplies "
                                    "the others)")


def _user_line(e: BaseException) -> str:
    """`` at net.py:42 (`if x.sum() > 0:`)``: the innermost frame of ``e``'s traceback outside torch and ptq2tvm
    (the model's own code that fx stopped at); empty when there is none."""
    import traceback

    skip = (str(Path(torch.__file__).parent), str(Path(__file__).resolve().parents[1]))
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not frame.filename.startswith(skip) and not frame.filename.startswith("<"):
            code = f" (`{frame.line.strip()}`)" if frame.line else ""
            return f" at {Path(frame.filename).name}:{frame.lineno}{code}"
    return ""


def _control_flow_hint(e: BaseException) -> str:
    """What to do when fx stopped at Python control flow on a tensor value (its TraceError)."""
    if "control flow" not in str(e):
        return ""
    return ("; the model branches on a tensor's value (`if` / `while` / `bool()` on a tensor), which a traced graph "
            "cannot hold: compute both sides and select with torch.where, or, when every input takes the same "
            "branch, quantize an ONNX export of the model (it records the branch taken)")


#: augmented assignments on a traced tensor -> the in-place function Python calls for them on a real tensor
_AUGMENTED = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
              "__itruediv__": operator.itruediv}


class _Proxy(fx.Proxy):
    """torch.fx's Proxy, tracing ``y += z`` (``-=``, ``*=``, ``/=``) as the in-place ``operator.iadd(y, z)`` that the
    model runs. fx's own Proxy has no ``__iadd__``, so Python falls back to ``y = y + z`` and the graph holds a new
    tensor: a second name of the same tensor (``skip = y; y += z; return conv(skip)``) then read the value before
    the addition (silently wrong numbers). The in-place node lets :func:`functionalize_inplace` route every later
    reader of the written tensor to it."""


for _name, _fn in _AUGMENTED.items():
    def _augmented(self: fx.Proxy, other: Any, _fn: Any = _fn) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", _fn, (self, other), {})
    setattr(_Proxy, _name, _augmented)


class _Tracer(fx.Tracer):
    """fx.Tracer whose proxies are :class:`_Proxy`."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace(model)`` with one placeholder, the input: every parameter of ``forward`` after the first
    that has a default is traced with its default (fx ``concrete_args``; the placeholder fx keeps for it and the
    assertion on its value are removed), and ``*args`` / ``**kwargs`` must go unused (they are traced empty: their
    placeholders are removed). One line naming the parameter when the model needs one of them."""
    params = _forward_params(model)
    concrete = {p.name: p.default for p in (params or [])[1:]
                if p.kind not in _VAR and p.default is not inspect.Parameter.empty}
    var = [p for p in (params or [])[1:] if p.kind in _VAR]
    tracer = _Tracer()
    try:
        with warnings.catch_warnings():     # "Was not able to add assertion ..." for a non-scalar default
            warnings.simplefilter("ignore")
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many exception types
        extra = (f" ({_signature_text(params)}: *args / **kwargs are traced empty; {_ONLY_X})"
                 if var and params is not None else "")
        raise UnsupportedModelError(f"torch.fx cannot trace the model{_user_line(e)}: {first_line(e)}{extra}"
                                    f"{_control_flow_hint(e)}") from e
    # before the GraphModule is made: fx cannot generate code for a placeholder whose default is a tensor
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        for user in list(ph.users):         # the specialization checks fx adds: _assert_is_none(y), _assert(y == 1.0)
            _erase_assertion(graph, user)
        if ph.users:
            raise UnsupportedModelError(f"model {_signature_text(params or [])} uses its argument {ph.target} as a "
                                        f"second input; {_ONLY_X}")
        graph.erase_node(ph)
    graph.lint()
    try:
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # code generation: a constant fx cannot print
        raise UnsupportedModelError(f"torch.fx cannot trace the model: {first_line(e)}") from e


#: (function, identity element, the positions the tensor may take): x * 1, 1 * x, x / 1, x + 0, 0 + x, x - 0 (and
#: x *= 1, x /= 1, x += 0, x -= 0)
_IDENTITY_ARITHMETIC = ((operator.mul, 1, (0, 1)), (torch.mul, 1, (0, 1)), (operator.truediv, 1, (0,)),
                        (torch.div, 1, (0,)), (operator.add, 0, (0, 1)), (torch.add, 0, (0, 1)),
                        (operator.sub, 0, (0,)), (torch.sub, 0, (0,)), (operator.imul, 1, (0,)),
                        (operator.itruediv, 1, (0,)), (operator.iadd, 0, (0,)), (operator.isub, 0, (0,)))


def _drop_identity_arithmetic(gm: fx.GraphModule) -> None:
    """Remove ``x * 1``, ``x / 1``, ``x + 0`` and ``x - 0`` on a float tensor (after :func:`propagate_shapes`): an
    optional argument traced with its default (``forward(x, *, scale=1.0): return y * scale``) leaves them, and they
    compute nothing."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
            continue
        for fn, unit, positions in _IDENTITY_ARITHMETIC:
            if node.target is not fn:
                continue
            for pos in positions:
                t, c = node.args[pos], node.args[1 - pos]
                meta = t.meta.get("tensor_meta") if isinstance(t, fx.Node) else None
                if (meta is not None and getattr(meta, "dtype", None) in (torch.float32, torch.float64)
                        and type(c) in (int, float) and c == unit and tuple(meta.shape) == tuple(
                            getattr(node.meta.get("tensor_meta"), "shape", ()))):
                    node.replace_all_uses_with(t)
                    gm.graph.erase_node(node)
                    changed = True
                    break
            break
    if changed:
        gm.recompile()


def _erase_assertion(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` when it is one of fx's checks on a specialized argument (``_assert_is_none(y, msg)``, or
    ``_assert(y == v, msg)`` with its comparison); leave anything else."""
    asserts = (torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))
    if node.op != "call_function":
        return
    if node.target in asserts and not node.users:
        graph.erase_node(node)
    elif node.target is operator.eq and all(u.op == "call_function" and u.target is torch._assert and not u.users
                                            for u in node.users):
        for u in list(node.users):
            graph.erase_node(u)
        graph.erase_node(node)


def _leading_kwargs_to_args(node: fx.Node) -> None:
    """Move keyword arguments that fill the next positional parameters of a function or method call into
    ``node.args`` (``F.conv2d(input=x, weight=w, padding=1)`` -> ``args (x, w)``, ``padding`` stays a keyword;
    ``x.transpose(dim0=1, dim1=2)`` -> ``args (x, 1, 2)``): the op handlers read a call's tensors positionally
    (``node.args[0]``), which raised a raw IndexError for ``input=x``. The same call; the longest prefix over the
    function's signatures (torch's builtins have several)."""
    from torch.fx.operator_schemas import get_signature_for_torch_op

    if node.op == "call_method":     # x.transpose(dim0=1, dim1=2): torch.transpose's signature, x its input
        fn = getattr(torch, str(node.target), None)
        sigs = (get_signature_for_torch_op(fn) or []) if fn is not None else []
    else:
        try:
            sigs = [inspect.signature(node.target)]
        except (TypeError, ValueError):
            sigs = get_signature_for_torch_op(node.target) or []
    best: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    for sig in sigs:
        args, kwargs = list(node.args), dict(node.kwargs)
        params = [p for p in sig.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for p in params[len(args):]:
            if p.name not in kwargs:
                break
            args.append(kwargs.pop(p.name))
        if best is None or len(args) > len(best[0]):
            best = (tuple(args), kwargs)
    if best is not None and len(best[0]) > len(node.args):
        node.args, node.kwargs = best


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp, remembering the node it runs (for the error message) and, for a node that computes a
    plain Python value (``x.shape[2] * 2``, a scale factor), that value as ``meta['py_value']`` (op handlers that
    must know an argument's value, e.g. :class:`ptq2tvm.ops.shape.Upsample`, read it there)."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        live = [(m, t, v) for m, val in self.env.items() for t in _tensors_in(val) if (v := _version(t)) is not None]
        result = super().run_node(n)
        if _plain_value(result):
            n.meta["py_value"] = result
        # in-place writes: the live values whose data the write reached, and the live value that ``n`` returns
        # itself (``y.relu_()``, ``F.relu(y, inplace=True)``, ``y += z``: the same tensor object); read by
        # :func:`functionalize_inplace`. A write moves the version counter of the tensor written, which its views
        # share: the data written is that tensor's when ``n`` returns it (else, ``y[:, :4] = 0``, every moved
        # tensor's), and the values it reached are the live tensors whose memory overlaps it: not a disjoint view
        # of the same base (``a, b = y.chunk(2, 1); a.relu_()`` leaves ``b`` as it was), and also a tensor with a
        # counter of its own on the same memory (``y.data.clamp_(min=0)`` writes ``y``)
        moved = [t for _, t, v in live if _version(t) != v]
        if moved:
            written = [result] if any(result is t for t in moved) else moved
            mutated = list(dict.fromkeys(m for m, t, _ in live if any(_overlap(t, w) for w in written)))
            if mutated:
                n.meta["mutates"] = mutated
        if isinstance(result, torch.Tensor):
            same = next((m for m, t, _ in live if t is result and isinstance(self.env[m], torch.Tensor)), None)
            if same is not None:
                n.meta["same_tensor_as"] = same
        return result


def _tensors_in(v: Any) -> list[torch.Tensor]:
    """The tensors of an interpreter value: a tensor, or those in a (nested) tuple / list (chunk / split parts)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for u in v for t in _tensors_in(u)]
    return []


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tensors ``a`` and ``b`` share an element of memory (both strided CPU tensors of the shape pass;
    anything not comparable element by element counts as overlapping)."""
    if a is b:
        return True
    try:
        sa, sb = a.untyped_storage(), b.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return True
    if a.numel() == 0 or b.numel() == 0 or sa.data_ptr() != sb.data_ptr():
        return False
    if a.element_size() != b.element_size():
        return True

    def elements(t: torch.Tensor) -> torch.Tensor:
        return torch.arange(sa.nbytes() // t.element_size()).as_strided(t.shape, t.stride(), t.storage_offset())

    return bool(torch.isin(elements(a).flatten(), elements(b).flatten()).any())


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None where there is none: inference tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _plain_value(v: Any) -> bool:
    """A number, None, or a (nested) tuple / list / torch.Size of them."""
    if v is None or isinstance(v, (bool, int, float)):
        return True
    return isinstance(v, (tuple, list)) and all(_plain_value(u) for u in v)


def propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Run ``gm`` once on zeros of shape (1, *input_shape), recording every node's shape. A failure is one line
    naming the node and the first line of the error (ShapeProp prints its own traceback to stderr: withheld; what
    the model itself prints on success is passed on)."""
    sp = _ShapeProp(gm)
    err = io.StringIO()
    try:   # outside inference mode: its tensors have no version counter (functionalize_inplace reads them)
        with contextlib.redirect_stderr(err), torch.inference_mode(False), torch.no_grad():
            sp.propagate(torch.zeros(1, *input_shape))
    except Exception as e:
        cause = e.__cause__ if str(e).startswith("ShapeProp error") and e.__cause__ is not None else e
        text = (str(cause).strip().splitlines() or [""])[0]
        n = sp.node
        where = "" if n is None else f" at layer '{n.target}'" if n.op == "call_module" else f" at node '{n.name}'"
        raise UnsupportedModelError(f"the model does not run on an input of shape "
                                    f"(1, {', '.join(map(str, input_shape))}){where}: {type(cause).__name__}"
                                    + (f": {text}" if text else "")) from e
    sys.stderr.write(err.getvalue())


def functionalize_inplace(gm: fx.GraphModule) -> None:
    """Make in-place writes explicit data flow (after :func:`propagate_shapes`, which records them): torch.fx records
    ``y.relu_()``, ``F.relu(y, inplace=True)``, ``nn.ReLU(inplace=True)(y)``, ``y += z`` as a node whose later readers
    still read ``y``'s node, so the graph (and every stage after it) saw ``y`` before the write while the model reads
    it after: ``y.relu_(); return self.conv(y)`` was quantized without the ReLU, silently. Each reader of the written
    tensor that runs after the write now reads the writing node (whose value is that same tensor). A write the graph
    cannot follow is refused by name: one through another view of the data (``y[:, :4].relu_()``,
    ``y.view(n, -1).relu_()``, ``y[:, :4] = 0``) when the viewed tensor is read again afterwards."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[fx.Node, list[fx.Node]] = {}      # node -> the nodes whose value is the same tensor object
    changed = False
    for n in list(gm.graph.nodes):
        same = n.meta.get("same_tensor_as")
        if same is not None:
            group = groups.setdefault(same, [same])
            group.append(n)
            groups[n] = group
        mutated = n.meta.get("mutates")
        if not mutated:
            continue
        group = groups.get(n, [])
        for m in list(dict.fromkeys(group + mutated)):
            later = [u for u in m.users if order[u] > order[n]]
            if not later or m is n:
                continue
            if m not in group:
                raise UnsupportedModelError(
                    f"node '{n.name}' ({_describe_fx(gm, n)}) writes in place into data that '{m.name}' "
                    f"({_describe_fx(gm, m)}) shares (another view of the same tensor), and '{later[0].name}' reads "
                    f"'{m.name}' after the write; ptq2tvm follows in-place writes only on the tensor itself: write it "
                    "out of place (y = F.relu(y), torch.cat of the parts) instead of through a view or y[...] = ...")
            for u in later:
                u.replace_input_with(m, n)
            changed = True
    if changed:
        gm.recompile()


def _describe_fx(gm: fx.GraphModule, node: fx.Node) -> str:
    """``Conv2d`` / ``relu_`` / ``Tensor.relu_`` / ``placeholder x``: what an fx node is, for messages."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"{node.op} {node.target}"


class _Unknown(Exception):
    pass


def mark_batch_free_values(gm: fx.GraphModule) -> None:
    """Set ``meta['batch_free']`` on each node whose plain value (``py_value``, from :func:`propagate_shapes` at batch
    1) does not depend on the batch size: the node is evaluated again on shape-only (meta) tensors whose first dim
    is 2 (parameters and buffers keep theirs), and the value must come out the same. ``x.size()[2:]``,
    ``x.shape[1] // 2`` are batch-free; ``x.size(0)``, ``x.size()`` are not."""
    values: dict[fx.Node, Any] = {}

    def at_batch_2(a: fx.Node) -> Any:
        if a in values:
            return values[a]
        meta = a.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise _Unknown
        shape = list(meta.shape)
        if a.op != "get_attr" and shape:
            shape[0] *= 2
        return torch.empty(shape, dtype=meta.dtype, device="meta")

    for n in gm.graph.nodes:
        if "py_value" not in n.meta or n.op not in ("call_function", "call_method"):
            continue
        try:
            args, kwargs = fx.node.map_arg(n.args, at_batch_2), fx.node.map_arg(n.kwargs, at_batch_2)
            if n.op == "call_function":
                v = n.target(*args, **kwargs)
            else:
                v = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        except Exception:       # anything the meta tensors cannot answer: not known to be batch-free
            continue
        if not _plain_value(v):
            continue
        values[n] = v
        if v == n.meta["py_value"]:
            n.meta["batch_free"] = True


def remove_dead_layers(gm: fx.GraphModule) -> list[str]:
    """Delete the fx nodes whose results reach no model output (e.g. an auxiliary head that ``forward`` computes and
    then drops: ``return self.head(x)[0]``), so that they are neither quantized nor compiled nor counted; -> the
    names of the removed layers (module paths, or fx node names for functions), in graph order.

    Runs after :func:`functionalize_inplace`: an in-place write (``x.add_(y)``) whose effect is read later has those
    readers as its users by then, so one without users changes nothing the model reads.
    """
    removed: list[str] = []
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.is_impure() and not node.meta.get("mutates"):
            continue
        removed.append(str(node.target) if node.op == "call_module" else node.name)
        gm.graph.erase_node(node)
    if removed:
        gm.recompile()
    return removed[::-1]


def _check_final(graph: FloatGraph) -> None:
    for name in graph.output_names:
        if name == graph.input_name:
            raise UnsupportedModelError("the model returns its input unchanged")
        out = graph.node(name)
        if FLOAT_OPS[out.op].kind == "trace" or not FLOAT_OPS[out.op].can_be_output:
            raise UnsupportedModelError(f"the model output comes from '{out.name}' ({out.op}), which is not a layer")
    if len(set(graph.output_names)) != len(graph.output_names):
        raise UnsupportedModelError("the model returns the same tensor twice")
    if not any(n.op in ("conv", "linear") for n in graph.nodes):
        raise UnsupportedModelError("the model has no Conv2d or Linear layer")
