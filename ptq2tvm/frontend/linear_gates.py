"""Squeeze-excitation gates written with Linear layers, traced as the 1x1 convs they are.

The classic SENet code (and the d-li14 MobileNetV3 repository's ``SELayer``) squeezes with a pool, flattens, runs
Linear layers and reshapes back::

    y = self.avg_pool(x).view(b, c)           # (N, C, 1, 1) -> (N, C)
    y = self.fc(y).view(b, c, 1, 1)           # Linear, ReLU, Linear, Sigmoid / h_sigmoid; (N, C) -> (N, C, 1, 1)
    return x * y.expand_as(x)                 # or x * y

On a (N, C, 1, 1) map a Linear layer is a 1x1 conv with the same weights, and the two reshapes move nothing, so
:func:`linear_gates_as_convs` rewrites such a chain (a flatten of a (N, C, 1, 1) tensor, Linear layers and
element-wise activations each read once, a reshape back to (N, C', 1, 1)) into 1x1 convs at the Linear layers' own
module paths (``--layer-bits`` names stay), and ``y.expand_as(x)`` read only by a multiply into ``y`` (the multiply
broadcasts). The float function is unchanged. Before, the reshape to (N, C, 1, 1) was refused.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

_RESHAPES = {"view", "reshape", "flatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten}
_MULTIPLIES = {operator.mul, torch.mul, operator.imul}


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and str(node.target) in _RESHAPES) or \
        (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)


def _elementwise_single(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An activation of one tensor that keeps its shape (a module without parameters, or a function / method whose
    only tensor argument is its input)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return not isinstance(mod, nn.Linear) and not any(True for _ in mod.parameters()) \
            and _shape(node) == _shape(node.args[0] if node.args else None)
    if node.op in ("call_function", "call_method"):
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        return len(tensors) == 1 and not _is_reshape(node) and _shape(node) == _shape(tensors[0])
    return False


def _chain(gm: fx.GraphModule, unflatten: fx.Node, calls: dict[str, int]) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the flatten, the nodes between it and ``unflatten`` in graph order) when ``unflatten`` closes a Linear gate
    (module docstring), else None. ``calls``: how many times the graph calls each module."""
    chain: list[fx.Node] = []
    cur = unflatten.args[0]
    while isinstance(cur, fx.Node) and len(cur.users) == 1:
        if _is_reshape(cur):
            s_in, s_out = _shape(cur.args[0]), _shape(cur)
            if s_in is None or s_out is None or len(s_in) != 4 or s_in[2:] != (1, 1) or s_out != s_in[:2]:
                return None
            has_linear = any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear)
                             for n in chain)
            return (cur, chain[::-1]) if has_linear else None
        if cur.op == "call_module" and isinstance(gm.get_submodule(str(cur.target)), nn.Linear):
            if calls.get(str(cur.target), 0) != 1 or len(_shape(cur) or ()) != 2:
                return None
        elif not _elementwise_single(gm, cur) or len(_shape(cur) or ()) != 2:
            return None
        chain.append(cur)
        cur = cur.args[0] if cur.args else None
    return None


def linear_gates_as_convs(gm: fx.GraphModule) -> list[str]:
    """Rewrite, in place, every Linear squeeze-excitation gate (module docstring) into 1x1 convs and drop its two
    reshapes; ``y.expand_as(x)`` read only by multiplies becomes ``y``. Needs the shapes of
    :func:`ptq2tvm.frontend.trace.propagate_shapes` (the caller propagates them again when anything changed).
    -> the module paths of the Linear layers made convs, in graph order."""
    done: list[str] = []
    expanded = False
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and str(node.target) == "expand_as" and node.users \
                and all(u.op in ("call_function", "call_method") and (u.target in _MULTIPLIES or u.target == "mul")
                        for u in node.users):
            s_in, s_out = _shape(node.args[0]), _shape(node)
            if s_in is not None and s_out is not None and len(s_in) == len(s_out) == 4 and s_in[:2] == s_out[:2] \
                    and s_in[2:] == (1, 1):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                expanded = True
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if not _is_reshape(node) or node.op == "call_function" and node.target is torch.flatten:
            continue
        s_in, s_out = _shape(node.args[0] if node.args else None), _shape(node)
        if s_in is None or s_out is None or len(s_in) != 2 or s_out != s_in + (1, 1):
            continue
        found = _chain(gm, node, calls)
        if found is None:
            continue
        flatten, chain = found
        for n in chain:
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear):
                lin = gm.get_submodule(str(n.target))
                conv = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None)
                with torch.no_grad():
                    conv.weight.copy_(lin.weight.view(lin.out_features, lin.in_features, 1, 1))
                    if lin.bias is not None:
                        conv.bias.copy_(lin.bias)
                conv.train(lin.training)
                gm.set_submodule(str(n.target), conv)
                done.append(str(n.target))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        flatten.replace_all_uses_with(flatten.args[0])
        gm.graph.erase_node(flatten)
    if done or expanded:
        gm.graph.lint()
        gm.recompile()
    return done


__all__ = ["linear_gates_as_convs"]
