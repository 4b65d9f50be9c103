"""The op registry: one :class:`OpDef` per op family holds everything that defines it.

An op family is spelled in one module of :mod:`ptq2tvm.ops` and registered here; every pipeline stage consults the
registry instead of its own ``if op == ...`` chain:

==================  =====================================================================================
stage               OpDef member
==================  =====================================================================================
trace (torch.fx)    ``modules`` / ``functions`` / ``methods`` + :meth:`OpDef.trace` -> FloatNodes
fake-quant model    ``kind`` (where the quantization points are), :meth:`OpDef.nonneg`, :meth:`OpDef.forward`
fold                :meth:`OpDef.fold` -> :class:`~ptq2tvm.ir.graph.IntNode` (integer attributes and arrays)
reference           :meth:`OpDef.reference`: the numpy definition of the integer op (the contract)
TVM, plain          :meth:`OpDef.emit_plain`: NCHW TE compute (``ptq2tvm.backend.te_ops``)
TVM, blocked        :meth:`OpDef.emit_blocked`: kernel choice in the NCHW16c layout (``kernels/``; x86 and CUDA)
reconstruction      ``kind`` (weighted / requant ops carry learnable state)
==================  =====================================================================================

``kind``:

- ``"weighted"``: conv / linear: weights, bias and an output quantizer (fused residual add and clamp).
- ``"requant"``: a new quantization point without weights (add, mul, concat, avgpool, lookup tables): the op's
  output gets its own activation quantizer and the integer op requantizes onto it.
- ``"grid"``: the output lies on the integer grid of the (first) input (maxpool, clamp, flatten, upsample, shuffles,
  slices): no new quantizer, the integer op moves or selects codes.
- ``"trace"``: exists only while tracing (BatchNorm, activations before fusion, identities).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # imported for type hints only: the registry must not import torch.fx / tvm at import time
    import numpy as np
    import torch

    from ..frontend.graph import FloatNode
    from ..ir.graph import IntNode


class Unsupported(Exception):
    """Raised by a trace handler: the fx node cannot be represented (the message says why)."""


class OpDef:
    """Base class of an op family. Subclasses set the class attributes and override the stages they take part in."""

    #: FloatGraph op name (``FloatNode.op``)
    op: ClassVar[str] = ""
    #: IntegerGraph op name (``IntNode.op``); empty for trace-only ops
    ir_op: ClassVar[str] = ""
    #: weighted | requant | grid | trace (see module docstring)
    kind: ClassVar[str] = "grid"
    #: torch modules / functions / Tensor method names this family recognises while tracing
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Callable, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    #: one line for the "Supported:" list of the tracer's error message
    summary: ClassVar[str] = ""
    #: True if the op may produce the network output
    can_be_output: ClassVar[bool] = True

    # ---- trace ---------------------------------------------------------------------------------------------------
    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        """Append the FloatNode(s) for fx ``node`` to ``b.prims`` (``b``: the tracer's builder; ``module`` the
        called nn.Module or None). Raise :class:`Unsupported` with the reason when the node's arguments are not
        supported."""
        raise Unsupported("operation not supported")

    # ---- fake-quant model ----------------------------------------------------------------------------------------
    def nonneg(self, n: "FloatNode", inputs_nonneg: list[bool]) -> bool:
        """Whether the op's output is >= 0 (its quantizer then uses zero point 0)."""
        if n.act is not None:
            return n.act[0] >= 0 or (self.kind == "grid" and inputs_nonneg[0])
        return inputs_nonneg[0] if inputs_nonneg else False

    def forward(self, qm: Any, n: "FloatNode", env: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The float forward of the node (before the output quantizer of ``requant``/``weighted`` ops, which the
        QuantModel applies together with ``n.act`` unless :attr:`quantizes_itself`)."""
        raise NotImplementedError(f"op {self.op!r} has no fake-quant forward")

    #: True when :meth:`forward` applies the output quantizer itself (lookup tables: exact table values)
    quantizes_itself: ClassVar[bool] = False

    def integer_values(self, n: "FloatNode", codes: list["torch.Tensor"], in_scales: list[float], out_scale: float
                       ) -> "torch.Tensor | None":
        """A ``requant`` op's integer requantization as the fake-quant model computes it: from the input codes
        ``q_i - z_i`` (int64 tensors) and the quantizers' scales, the int64 values ``RHU(...)`` before the output zero
        point and the clamp, with the fold's own multipliers (:meth:`fold` and this share one helper). The fake-quant
        model returns them (straight-through gradient of its float path), so the op equals the integer network on
        every element, ties included (``QuantModel._integer_requant``). None: the float path only."""
        return None

    def multiplier_numerator(self, n: "FloatNode", input_scales: list[float]) -> float:
        """The largest requantization multiplier of a ``requant`` node times its output scale, from the scales of its
        data inputs (``n.data_inputs`` order): ``ptq2tvm.fold.bounds.fit_requant_scales`` keeps it below 2^29 s_out.
        Default: the largest input scale (add, concat: s_i / s_out exactly; avgpool: an upper bound)."""
        return max(input_scales, default=0.0)

    def input_bits(self, config: Any) -> int | None:
        """Bits this op wants on the quantization points it reads (None: whatever the config says)."""
        return None

    # ---- fold -----------------------------------------------------------------------------------------------------
    def fold(self, f: Any, n: "FloatNode") -> "IntNode":
        """The integer node (``f``: :class:`ptq2tvm.fold.fold.FoldContext`)."""
        raise NotImplementedError(f"op {self.op!r} cannot be folded")

    # ---- integer semantics --------------------------------------------------------------------------------------
    def reference(self, node: "IntNode", env: dict[str, "np.ndarray"]) -> "np.ndarray":
        """The numpy definition of the integer op on uint8 inputs from ``env`` (the contract every backend meets)."""
        raise NotImplementedError(f"integer op {self.ir_op!r} has no reference")

    # ---- TVM --------------------------------------------------------------------------------------------------------
    def emit_plain(self, e: Any, node: "IntNode") -> Any:
        """Relax expression of the node in NCHW via TE (``e``: the plain builder: ``e.x(i)``, ``e.emit``)."""
        raise NotImplementedError(f"integer op {self.ir_op!r} has no plain TVM compute")

    def emit_blocked(self, b: Any, node: "IntNode") -> tuple[Any, str]:
        """(Relax expression, layout) in the blocked builder. Default: the plain NCHW compute on NCHW inputs (the
        builder converts the inputs and the blocked layout resumes at the next consumer that wants it)."""
        return b.generic(self, node)


#: FloatGraph op name -> OpDef; IntegerGraph op name -> OpDef
FLOAT_OPS: dict[str, OpDef] = {}
IR_OPS: dict[str, OpDef] = {}
#: what the tracer consults: nn.Module type, function, method name -> OpDef (first registration wins)
MODULE_HANDLERS: list[tuple[type, OpDef]] = []
FUNCTION_HANDLERS: dict[Any, OpDef] = {}
METHOD_HANDLERS: dict[str, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: instantiate ``cls`` and enter it in every table it declares."""
    opdef = cls()
    if not opdef.op:
        raise ValueError(f"{cls.__name__} has no op name")
    if opdef.op in FLOAT_OPS:
        raise ValueError(f"op {opdef.op!r} registered twice")
    FLOAT_OPS[opdef.op] = opdef
    if opdef.ir_op:
        IR_OPS[opdef.ir_op] = opdef
    for m in opdef.modules:
        MODULE_HANDLERS.append((m, opdef))
    for fn in opdef.functions:
        FUNCTION_HANDLERS.setdefault(fn, opdef)
    for name in opdef.methods:
        METHOD_HANDLERS.setdefault(name, opdef)
    return cls


def float_op(name: str) -> OpDef:
    try:
        return FLOAT_OPS[name]
    except KeyError:
        raise KeyError(f"unknown float op {name!r}; registered: {', '.join(sorted(FLOAT_OPS))}") from None


def ir_op(name: str) -> OpDef:
    try:
        return IR_OPS[name]
    except KeyError:
        raise KeyError(f"unknown integer op {name!r}; registered: {', '.join(sorted(IR_OPS))}") from None


def ops_of_kind(*kinds: str) -> tuple[str, ...]:
    """FloatGraph op names of the given kinds."""
    return tuple(name for name, d in FLOAT_OPS.items() if d.kind in kinds)


def module_handler(m: Any) -> OpDef | None:
    for cls, opdef in MODULE_HANDLERS:
        if isinstance(m, cls):
            return opdef
    return None
