"""Fold a fake-quant :class:`QuantModel` into an :class:`IntegerGraph`.

conv/dense:  acc_c = bias_c + sum q_x * q_w   (q_x padded with z_x, so padding is a real zero)
             bias_c = round((b_c) / (s_w,c * s_x)) - z_x * sum(q_w,c)
             q_out = clamp(z_out + RHU(acc_c * m_c [+ (q_r - z_r) * mr_c], n_c), lo, hi)
with (m_c, mr_c, n_c) the dyadic form of (s_w,c * s_x / s_out, s_r / s_out). RHU(v, n) = (v + 2^(n-1)) >> n.

AdaQTransform layers (y = xi_c * (W_hat * x_hat) + b_c + eta_c) cost nothing extra (Eq. 9): xi_c goes into the
requant multiplier, eta_c into the int32 bias:
             bias_c = round((b_c + eta_c) / (xi_c * s_w,c * s_x)) - z_x * sum(q_w,c),  m_c ~ xi_c * s_w,c * s_x / s_out
xi_c must be > 0 (reconstruction projects it onto [1e-3, inf)): the integer weights are never negated, so b-bit weights
keep their range (and <= 4-bit layers their packed storage); a model with xi_c <= 0 is rejected with the layer name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import QuantConfigError
from ..frontend.qmodel import QuantModel
from ..ir.graph import IntegerGraph, IntNode, QTensor
from ..ops import float_op
from .bounds import check_accumulator, check_graph_bounds
from .dyadic import dyadic_multipliers

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@torch.no_grad()
def _shapes(qm: QuantModel) -> dict[str, tuple[int, ...]]:
    was = [(q.enabled, q.observing) for q in qm.act_quant.values()]
    qm.set_observing(False)
    env = qm(torch.zeros(1, *qm.graph.input_shape), return_all=True)
    for q, (e, o) in zip(qm.act_quant.values(), was):
        q.enabled, q.observing = e, o
    return {k: tuple(v.shape[1:]) for k, v in env.items()}


def _qtensor(qm: QuantModel, name: str, shape: tuple[int, ...]) -> QTensor:
    q = qm.act_quant[name.replace(".", "__")]
    return QTensor(name, shape, float(q.scale.detach()), int(q.zero_point), q.bits)


def _clamp_bounds(qm: QuantModel, node_name: str, act: tuple[float, float] | None) -> tuple[int, int]:
    q = qm.act_quant[node_name.replace(".", "__")]
    return q.grid_bounds(*act) if act else (0, q.qmax)


class FoldContext:
    """What an op's fold (:meth:`ptq2tvm.ops.OpDef.fold`) needs: the fake-quant model, every tensor's shape (batch
    dim dropped) and the integer tensors folded so far (``tensors``)."""

    def __init__(self, qm: QuantModel):
        self.qm = qm
        self.shapes = _shapes(qm)
        g = qm.graph
        self.tensors: dict[str, QTensor] = {g.input_name: _qtensor(qm, g.input_name, self.shapes[g.input_name])}

    def qtensor(self, name: str) -> QTensor:
        """The output tensor of the quant point ``name`` (its own activation quantizer)."""
        return _qtensor(self.qm, name, self.shapes[name])

    def clamp_bounds(self, name: str, act: tuple[float, float] | None) -> tuple[int, int]:
        return _clamp_bounds(self.qm, name, act)

    def grid_node(self, n: Any, ir_op: str, attrs: dict[str, Any]) -> IntNode:
        """An integer node whose output keeps the grid of its first input."""
        tin = self.tensors[n.inputs[0]]
        tout = QTensor(n.name, self.shapes[n.name], tin.scale, tin.zero_point, tin.bits)
        return IntNode(n.name, ir_op, list(n.inputs), tout, attrs)


def weighted_bias(layer: Any, in_scale: float, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integers of conv/linear ``layer`` read at input step ``in_scale`` (module docstring): the integer weights
    ``q_w`` (int64), the bias in accumulator steps ``rint((b + eta) / acc_scale)`` (float64, before the zero-point
    term) and ``acc_scale = s_w * s_x [* xi]`` (float64, per output channel). The fold and the fake-quant model's exact
    path (``QuantModel._integer_weighted``) both use it. Raises QuantConfigError naming layer ``name``."""
    s_w = layer.wq.scale.detach().double().cpu().numpy()
    q_w = layer.wq.integer(layer.weight.detach()).detach().cpu().numpy().astype(np.int64)
    if np.any(s_w <= 0):
        raise QuantConfigError(f"layer '{name}': non-positive weight scale")
    b = layer.bias.detach().double().cpu().numpy()
    acc_scale = s_w * in_scale
    if getattr(layer, "adaq", False):
        xi = layer.xi.detach().double().cpu().numpy()
        if not np.all(np.isfinite(xi)) or np.any(xi <= 0):
            bad = np.flatnonzero(~(np.isfinite(xi) & (xi > 0)))
            raise QuantConfigError(f"layer '{name}': AdaQTransform scale xi must be finite and > 0 (channels "
                                   f"{bad[:8].tolist()}{'...' if bad.size > 8 else ''}: {xi[bad[:3]].tolist()}); a "
                                   f"negative xi would negate integer weights out of their range (reconstruction keeps "
                                   f"xi >= ptq2tvm.reconstruct.adaq.XI_MIN)")
        b = b + layer.eta.detach().double().cpu().numpy()
        acc_scale = acc_scale * xi
    return q_w, np.rint(b / acc_scale), acc_scale


def weighted_multipliers(acc_scale: np.ndarray, out_scale: float, res_scale: float | None, name: str
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Dyadic mantissas (1 or 2, C) and shifts (C,) of ``acc_scale / s_out`` [and the fused residual's ``s_r / s_out``]
    (the fold and ``QuantModel._integer_weighted``)."""
    terms = [acc_scale / out_scale]
    if res_scale is not None:
        terms.append(np.full_like(acc_scale, res_scale / out_scale))
    return dyadic_multipliers(np.stack(terms), f"layer '{name}'")


def fold_weighted(f: FoldContext, n: Any) -> IntNode:
    """conv / linear -> ``conv2d`` / ``dense`` integer node (module docstring)."""
    qm = f.qm
    tin = f.tensors[n.inputs[0]]
    tres = f.tensors[n.residual] if n.residual else None
    tout = f.qtensor(n.name)
    layer = qm.layer(n.name)
    q_w, bias, acc_scale = weighted_bias(layer, tin.scale, n.name)
    bias = bias - tin.zero_point * q_w.reshape(q_w.shape[0], -1).sum(axis=1)
    if not np.all(np.isfinite(bias)) or np.abs(bias).max(initial=0) > 1 << 62:
        raise QuantConfigError(f"layer '{n.name}': the int32 bias is not representable ({np.abs(bias).max():.3g} "
                               f"accumulator steps); ptq2tvm.fold.bounds.fit_integer_bounds(model) fits it")
    check_accumulator(n.name, q_w, bias.astype(np.int64), tin.qmax)  # proves every input fits int32, or raises
    mant, shift = weighted_multipliers(acc_scale, tout.scale, tres.scale if tres is not None else None, n.name)
    lo, hi = _clamp_bounds(qm, n.name, n.act)
    arrays = dict(weight=q_w.astype(np.int8), bias=bias.astype(np.int32), multiplier=mant[0], shift=shift)
    attrs: dict[str, Any] = dict(input_zero_point=tin.zero_point, output_zero_point=tout.zero_point, lo=lo, hi=hi,
                                 w_bits=layer.wq.bits)
    if tres is not None:
        arrays["residual_multiplier"] = mant[1]
        attrs["residual_zero_point"] = tres.zero_point
    if n.op == "conv":
        a = n.attrs
        attrs.update(stride=list(a["stride"]), padding=list(a["padding"]), dilation=list(a["dilation"]),
                     groups=int(a["groups"]))
    inputs = [n.inputs[0]] + ([n.residual] if n.residual else [])
    return IntNode(n.name, "conv2d" if n.op == "conv" else "dense", inputs, tout, attrs, arrays)


def fold_to_integer(qm: QuantModel) -> IntegerGraph:
    """Build the integer graph from a calibrated (or reconstructed) fake-quant model: each node folded by its op
    family (:meth:`ptq2tvm.ops.OpDef.fold`)."""
    g = qm.graph
    f = FoldContext(qm)
    nodes: list[IntNode] = []
    for n in g.nodes:
        if n.op == "input":
            continue
        opdef = float_op(n.op)
        if not opdef.ir_op:
            raise QuantConfigError(f"cannot fold op {n.op!r} at '{n.name}'")
        node = opdef.fold(f, n)
        f.tensors[n.name] = node.out
        nodes.append(node)
    cfg = qm.config
    meta = dict(ptq2tvm_version=__version__, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                first_last_8bit=cfg.first_last_8bit)
    if g.output_structure is not None:
        meta["output_structure"] = g.output_structure
    if any(getattr(layer, "adaq", False) for layer in qm.layers.values()):
        meta["adaqtransform"] = True
    graph = IntegerGraph(f.tensors[g.input_name], nodes, list(g.output_names), meta)
    check_graph_bounds(graph)        # every int32 / int64 / table-index bound, or a refusal naming the node
    return graph
