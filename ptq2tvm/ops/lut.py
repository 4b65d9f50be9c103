"""Element-wise nonlinearities (SiLU, Hardswish, Sigmoid, Hardsigmoid, Tanh, GELU, LeakyReLU, ELU, Mish, Softplus)
as exact integer lookup tables.

On a <= 8-bit input grid every input code has one output code, computed once at fold time in float64::

    table[q] = clamp(z_out + rint(f(s_in * (q - z_in)) / s_out), lo, hi)     for q in [0, 2^bits_in)
    q_out = table[q_in]

(``rint``: round half to even). The fake-quant model reads the same table (built by the same function,
:func:`lut_table`) whenever both quantizers are on, so the integer op and the fake-quant model agree bit for bit;
gradients flow through the float path (straight-through), so reconstruction learns both scales as usual.

Where the table's input grid sits: the tensor a table reads gets ``QuantConfig.lut_input_bits`` bits (default 8)
whatever ``a_bits`` is: it is an internal tensor (a conv output read by one table), its uint8 container is the same,
and the table is 256 bytes. The table's output (what the next conv reads) has ``a_bits``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpDef, Unsupported, register
from .common import NCHWC, arg


def _softplus64(x: np.ndarray, beta: float = 1.0, threshold: float = 20.0) -> np.ndarray:
    bx = beta * x
    return np.where(bx > threshold, x, np.log1p(np.exp(np.minimum(bx, threshold))) / beta)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu64(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


#: name -> (torch function, float64 numpy function, output >= 0)
LUT_FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., np.ndarray], bool]] = {
    "silu": (lambda x: F.silu(x), lambda x: x * _sigmoid64(x), False),
    "hardswish": (lambda x: F.hardswish(x), lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, False),
    "sigmoid": (torch.sigmoid, _sigmoid64, True),
    "hardsigmoid": (lambda x: F.hardsigmoid(x), lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0, True),
    "tanh": (torch.tanh, np.tanh, False),
    "gelu": (lambda x, approximate="none": F.gelu(x, approximate=approximate), _gelu64, False),
    "leaky_relu": (lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
                   lambda x, negative_slope=0.01: np.where(x >= 0, x, x * negative_slope), False),
    "elu": (lambda x, alpha=1.0: F.elu(x, alpha), lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(x)), False),
    "mish": (lambda x: F.mish(x), lambda x: x * np.tanh(_softplus64(x)), False),
    "softplus": (lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold), _softplus64, True),
}

_MODULES: dict[type, tuple[str, Callable[[nn.Module], dict[str, Any]]]] = {
    nn.SiLU: ("silu", lambda m: {}),
    nn.Hardswish: ("hardswish", lambda m: {}),
    nn.Sigmoid: ("sigmoid", lambda m: {}),
    nn.Hardsigmoid: ("hardsigmoid", lambda m: {}),
    nn.Tanh: ("tanh", lambda m: {}),
    nn.GELU: ("gelu", lambda m: {"approximate": m.approximate}),
    nn.LeakyReLU: ("leaky_relu", lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.ELU: ("elu", lambda m: {"alpha": float(m.alpha)}),
    nn.Mish: ("mish", lambda m: {}),
    nn.Softplus: ("softplus", lambda m: {"beta": float(m.beta), "threshold": float(m.threshold)}),
}

_FUNCTIONS: dict[Any, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    F.silu: ("silu", lambda n: {}),
    F.hardswish: ("hardswish", lambda n: {}),
    torch.sigmoid: ("sigmoid", lambda n: {}),
    F.sigmoid: ("sigmoid", lambda n: {}),
    F.hardsigmoid: ("hardsigmoid", lambda n: {}),
    torch.tanh: ("tanh", lambda n: {}),
    F.tanh: ("tanh", lambda n: {}),
    F.gelu: ("gelu", lambda n: {"approximate": arg(n, 1, "approximate", "none")}),
    F.leaky_relu: ("leaky_relu", lambda n: {"negative_slope": float(arg(n, 1, "negative_slope", 0.01))}),
    F.elu: ("elu", lambda n: {"alpha": float(arg(n, 1, "alpha", 1.0))}),
    F.mish: ("mish", lambda n: {}),
    F.softplus: ("softplus", lambda n: {"beta": float(arg(n, 1, "beta", 1.0)),
                                        "threshold": float(arg(n, 2, "threshold", 20.0))}),
}

_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}


def lut_table(fn: str, params: dict[str, Any], s_in: float, z_in: int, bits_in: int, s_out: float, z_out: int,
              lo: int, hi: int) -> np.ndarray:
    """The lookup table (uint8, 2^bits_in entries) of ``fn`` from the input grid (s_in, z_in) to the output grid
    (s_out, z_out), clamped to [lo, hi]; float64, round half to even. Raises ValueError for an unknown ``fn``."""
    if fn not in LUT_FUNCTIONS:
        raise ValueError(f"unknown lookup-table function {fn!r}; known: {', '.join(LUT_FUNCTIONS)}")
    q = np.arange(1 << bits_in, dtype=np.float64)
    with np.errstate(over="ignore"):
        y = LUT_FUNCTIONS[fn][1](float(s_in) * (q - z_in), **params)
    code = np.rint(y / float(s_out)) + z_out
    return np.clip(code, lo, hi).astype(np.uint8)


@register
class Lut(OpDef):
    op = ir_op = "lut"
    kind = "requant"
    modules = tuple(_MODULES)
    functions = tuple(_FUNCTIONS)
    methods = tuple(_METHODS)
    quantizes_itself = True
    summary = ("SiLU, Hardswish, Sigmoid, Hardsigmoid, Tanh, GELU, LeakyReLU, ELU, Mish, Softplus "
               "(exact lookup tables)")

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        if module is not None:
            fn, get = next(v for k, v in _MODULES.items() if isinstance(module, k))
            params = get(module)
        elif node.op == "call_method":
            fn, params = _METHODS[node.target], {}
        else:
            fn, get = _FUNCTIONS[node.target]
            params = get(node)
        if fn == "gelu" and params.get("approximate") not in ("none", "tanh"):
            raise Unsupported(f"GELU approximate={params.get('approximate')!r}")
        b.add(FloatNode(name, "lut", [b.inp(node)], dict(fn=fn, params=params)))

    def nonneg(self, n: Any, inputs_nonneg: list[bool]) -> bool:
        fn = n.attrs["fn"]
        if LUT_FUNCTIONS[fn][2] or (n.act is not None and n.act[0] >= 0):
            return True
        # leaky_relu / elu / gelu etc. of a nonnegative input are nonnegative
        return inputs_nonneg[0] and fn in ("leaky_relu", "elu", "gelu", "silu", "hardswish", "mish", "tanh")

    def input_bits(self, config: Any) -> int | None:
        return getattr(config, "lut_input_bits", 8)

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[n.inputs[0]]
        y = LUT_FUNCTIONS[n.attrs["fn"]][0](x, **n.attrs["params"])
        if n.act is not None:
            y = torch.clamp(y, n.act[0], n.act[1])
        q_out = qm.act_quant[qm.key(n.name)]
        out = q_out(y)
        q_in = qm.act_quantizer(n.inputs[0])
        if q_out.enabled and q_in.enabled and not (q_out.drop_prob is not None and q_out.drop_prob < 1.0):
            lo, hi = (q_out.grid_bounds(*n.act) if n.act else (0, q_out.qmax))
            s_in, z_in = float(q_in.scale.detach()), int(q_in.zero_point)
            s_out, z_out = float(q_out.scale.detach()), int(q_out.zero_point)
            table = torch.from_numpy(lut_table(n.attrs["fn"], n.attrs["params"], s_in, z_in, q_in.bits, s_out, z_out,
                                               lo, hi).astype(np.float32)).to(x.device)
            idx = torch.clamp(torch.round(x.detach() / s_in) + z_in, 0, q_in.qmax).long()
            exact = (table[idx] - z_out) * s_out
            out = out + (exact - out).detach()
        return out

    def fold(self, f: Any, n: Any):
        from ..ir.graph import IntNode

        tin, tout = f.tensors[n.inputs[0]], f.qtensor(n.name)
        lo, hi = f.clamp_bounds(n.name, n.act)
        table = lut_table(n.attrs["fn"], n.attrs["params"], tin.scale, tin.zero_point, tin.bits, tout.scale,
                          tout.zero_point, lo, hi)
        return IntNode(n.name, "lut", list(n.inputs), tout,
                       dict(fn=n.attrs["fn"], params=dict(n.attrs["params"]), lo=lo, hi=hi), dict(table=table))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        table = node.arrays["table"]
        x = env[node.inputs[0]]
        if x.size and int(x.max()) >= table.size:
            from ..errors import ArtifactError

            raise ArtifactError(f"lut '{node.name}': input code {int(x.max())} outside its {table.size}-entry table")
        return table[x]

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.lut, e.x(0), e.const(node.arrays["table"]))

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        if b.layout(node.inputs[0]) != NCHWC:
            return b.generic(self, node)
        x, table = b.blocked(node.inputs[0]), node.arrays["table"]
        if b.vbmi_lut(x):      # 64 lookups per 3 vector instructions (kernels/lut_vbmi.py)
            return b.call_prim(K.lut_vbmi_primfunc(b.hint(node), b.shape(x)), [x, b.const(K.pad_lut_table(table))],
                               b.shape(x)), NCHWC
        return b.emit(K.lut_nchwc, x, b.const(table), name=b.hint(node)), NCHWC
