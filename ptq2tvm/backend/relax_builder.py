"""Build a Relax IRModule directly from an :class:`IntegerGraph` (no frontend importer in between)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

import kernels as K

from ..ir.graph import IntegerGraph, IntNode
from . import te_ops

_WEIGHTED = ("conv2d", "dense")


def _const(a: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(a))


def _emit_node(bb: relax.BlockBuilder, node: IntNode, env: dict[str, relax.Expr]) -> relax.Expr:
    a, arr = node.attrs, node.arrays
    x = env[node.inputs[0]]
    if node.op in _WEIGHTED:
        args = [x, _const(arr["weight"]), _const(arr["bias"]), _const(arr["multiplier"]), _const(arr["shift"])]
        kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                  hi=a["hi"])
        if len(node.inputs) > 1:
            args += [env[node.inputs[1]], _const(arr["residual_multiplier"])]
            kw["residual_zero_point"] = a["residual_zero_point"]
        if node.op == "conv2d":
            kw.update(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
            return bb.emit_te(te_ops.conv2d_requant, *args, **kw, primfunc_name_hint=_hint(node))
        return bb.emit_te(te_ops.dense_requant, *args, **kw, primfunc_name_hint=_hint(node))
    if node.op == "add":
        return bb.emit_te(te_ops.add_requant, x, env[node.inputs[1]], _const(arr["multiplier_a"]),
                          _const(arr["multiplier_b"]), _const(arr["shift"]), zero_points=a["zero_points"],
                          output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"],
                          primfunc_name_hint=_hint(node))
    if node.op == "avgpool2d":
        return bb.emit_te(te_ops.avgpool_requant, x, _const(arr["multiplier"]), _const(arr["shift"]),
                          kernel=a["kernel"], stride=a["stride"], padding=a["padding"],
                          input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"],
                          lo=a["lo"], hi=a["hi"], primfunc_name_hint=_hint(node))
    if node.op == "maxpool2d":
        return bb.emit_te(te_ops.maxpool, x, kernel=a["kernel"], stride=a["stride"], padding=a["padding"],
                          dilation=a["dilation"], primfunc_name_hint=_hint(node))
    if node.op == "flatten":
        return bb.emit_te(te_ops.flatten, x, primfunc_name_hint=_hint(node))
    if node.op == "clamp":
        return bb.emit_te(te_ops.clamp, x, lo=a["lo"], hi=a["hi"], primfunc_name_hint=_hint(node))
    raise ValueError(f"unknown op {node.op!r} at '{node.name}'")


def _hint(node: IntNode) -> str:
    return "q_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)


def build_relax_module(graph: IntegerGraph, batch: int = 1, outputs: list[str] | None = None) -> tvm.IRModule:
    """Relax module ``main(x: uint8[batch, *input_shape]) -> uint8 output`` (a tuple if several ``outputs``)."""
    x = relax.Var("x", relax.TensorType((batch, *graph.input.shape), "uint8"))
    bb = relax.BlockBuilder()
    wanted = outputs or [graph.output_name]
    with bb.function("main", [x]):
        with bb.dataflow():
            env: dict[str, relax.Expr] = {graph.input.name: x}
            for node in graph.nodes:
                env[node.name] = _emit_node(bb, node, env)
            res = env[wanted[0]] if len(wanted) == 1 else relax.Tuple([env[w] for w in wanted])
            out = bb.emit_output(res)
        bb.emit_func_output(out)
    return bb.get()


FLOAT_ENTRY = "main_float"


def add_float_entry(mod: tvm.IRModule, graph: IntegerGraph, batch: int) -> tvm.IRModule:
    """Add ``main_float``: float32 input -> the input quantization (``kernels.quantize_input``, bit-identical to
    ``QTensor.quantize``) -> ``main``. Saves the numpy quantization pass (about 2% of ResNet-18 at batch 1)."""
    bb = relax.BlockBuilder(mod)
    main = mod.get_global_var("main")
    xf = relax.Var("x", relax.TensorType((batch, *graph.input.shape), "float32"))
    with bb.function(FLOAT_ENTRY, [xf]):
        with bb.dataflow():
            q = bb.emit_output(bb.emit_te(K.quantize_input, xf, scale=graph.input.scale,
                                          zero_point=graph.input.zero_point, qmax=graph.input.qmax,
                                          primfunc_name_hint="quantize_input"))
        bb.emit_func_output(bb.emit(relax.Call(main, [q])))
    return bb.get()
