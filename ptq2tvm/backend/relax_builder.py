"""Build a Relax IRModule directly from an :class:`IntegerGraph` (no frontend importer in between)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

import kernels as K

from ..ir.graph import IntegerGraph, IntNode
from ..ops import ir_op

def _const(a: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(a))


def _hint(node: IntNode) -> str:
    return "q_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)


class PlainEmitter:
    """What :meth:`ptq2tvm.ops.OpDef.emit_plain` sees: the node's inputs (``x(i)``), constants and ``emit`` (a
    TE compute emitted as one PrimFunc named after the node)."""

    def __init__(self, bb: relax.BlockBuilder, node: IntNode, inputs: list[relax.Expr], prefix: str = "q_"):
        self.bb, self.node, self.inputs, self.prefix = bb, node, inputs, prefix

    def x(self, i: int) -> relax.Expr:
        return self.inputs[i]

    @staticmethod
    def const(a: np.ndarray) -> relax.Constant:
        return _const(a)

    def emit(self, fn: Any, *args: Any, **kw: Any) -> relax.Expr:
        name = self.prefix + "".join(ch if ch.isalnum() else "_" for ch in self.node.name)
        return self.bb.emit_te(fn, *args, **kw, primfunc_name_hint=name)


def _emit_node(bb: relax.BlockBuilder, node: IntNode, env: dict[str, relax.Expr]) -> relax.Expr:
    return ir_op(node.op).emit_plain(PlainEmitter(bb, node, [env[i] for i in node.inputs]), node)


def build_relax_module(graph: IntegerGraph, batch: int = 1, outputs: list[str] | None = None) -> tvm.IRModule:
    """Relax module ``main(x: uint8[batch, *input_shape])`` returning the graph output (a tuple for several
    outputs, or for several ``outputs`` asked for)."""
    x = relax.Var("x", relax.TensorType((batch, *graph.input.shape), "uint8"))
    bb = relax.BlockBuilder()
    wanted = outputs or list(graph.output_names)
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


CHECKED_FLOAT_ENTRY = "main_float_checked"


def add_checked_float_entry(mod: tvm.IRModule, graph: IntegerGraph, batch: int,
                            threads: int | None = None) -> tvm.IRModule:
    """Add ``main_float_checked``: float32 input (any 4-byte alignment) -> (``main``'s output, int32 non-finite
    flags): the input quantized and checked for NaN / Inf in one pass (:func:`kernels.quantize_checked_primfunc`;
    x86 builds), then ``main`` on the codes, in one VM call. ``CompiledModel`` calls it on the caller's array without
    copying it and raises when a flag is set (the output is then meaningless): the copy into an aligned tensor and
    numpy's NaN / Inf check had cost 8% of ResNet-18 at batch 8 on the 2-core Xeon."""
    from kernels.quantize_checked import quantize_checked_chunks, quantize_checked_primfunc

    shape = (batch, *(int(v) for v in graph.input.shape))
    name = "quantize_input_checked"
    prim = quantize_checked_primfunc(name, shape, graph.input.scale, graph.input.zero_point, graph.input.qmax,
                                     threads)
    chunks = quantize_checked_chunks(int(np.prod(shape)), threads)
    bb = relax.BlockBuilder(mod)
    gv = bb.add_func(prim, name)
    main = mod.get_global_var("main")
    xf = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function(CHECKED_FLOAT_ENTRY, [xf]):
        with bb.dataflow():
            qf = bb.emit_output(relax.call_tir(gv, relax.Tuple([xf]), [relax.TensorType(shape, "uint8"),
                                                                        relax.TensorType((chunks,), "int32")]))
        out = bb.emit(relax.Call(main, [bb.emit(relax.TupleGetItem(qf, 0))]))
        bb.emit_func_output(bb.emit(relax.Tuple([out, bb.emit(relax.TupleGetItem(qf, 1))])))
    return bb.get()
