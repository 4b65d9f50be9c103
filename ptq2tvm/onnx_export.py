"""Export the integer graph as an ONNX QDQ model: a second, independent executor of the same integers.

Every IR tensor ``t`` (real = s * (q - z), q in [0, 2^b - 1]) becomes the uint8 output of a ``QuantizeLinear`` with
scale ``s`` and zero point ``z``; every consumer reads it through its own ``DequantizeLinear`` (the QDQ format of the
ONNX spec, https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html, as ONNX Runtime's quantizer writes it). Per op
(one exporter function per IR op, registered in :data:`EXPORTERS`):

conv2d / dense
    ``DQ(q_x) -> Conv|Gemm(DQ(q_w), DQ(bias)) [-> Add(DQ(q_r))] [-> Clip] -> Q(s_out, z_out)``. The weights are the
    graph's exact int8 integers (per output channel, axis 0). The per-channel weight scale is chosen so that the float
    requantization multiplier equals the graph's dyadic one: ``s_w,c = m_c * 2^-n_c * s_out / s_x`` (this carries
    AdaQTransform's xi: the fold merged xi_c > 0 into m_c, and its eta into the bias). The bias is int32 at scale ``s_x * s_w,c`` (float32 product, as consumers
    compute it): the IR bias plus ``z_x * sum(q_w,c)`` (the IR keeps the zero-point correction inside its bias; the
    QDQ Conv subtracts the zero point itself). A fused residual is a float Add of ``DQ(q_r)`` before the Q.
add, avgpool2d
    ``DQ -> Add | AveragePool | GlobalAveragePool -> [Clip] -> Q``; a padded average pool first pads the uint8 codes
    with the zero point (``Pad``: a real 0, as count_include_pad=1 counts it).
maxpool2d, flatten, clamp
    ``DQ -> MaxPool | Flatten | Clip -> Q`` with the input's scale and zero point (Q(DQ(q)) == q exactly).

Clamps: ``[lo, hi]`` of the IR become the Q's own saturation when they are the container's range ([0, 255] for
uint8), otherwise a float ``Clip((lo - z) * s, (hi - z) * s)`` before the Q (exact: Q is monotone and maps the
bounds to lo and hi). Activations below 8 bits are uint8 containers with that Clip. With ``int4=True`` (opset 21)
tensors of <= 4 bits use UINT4 zero points and weights of <= 4 bits (that fit [-8, 7]) INT4 initializers; ONNX
Runtime runs those as float DQ + float Conv (it has no int4 QLinearConv), so the default is 8-bit containers.

The network input is float32 (N, C, H, W), quantized by the first Q; the output ``output`` is the float32
dequantized network output (``output_0``, ``output_1``, ... for a graph with several outputs). The integer codes of IR tensor ``t`` are the ONNX tensor ``q:t``;
``per_layer_outputs=True`` also exposes them all as uint8 graph outputs ``codes:t``, for layer-by-layer parity (:mod:`ptq2tvm.onnx_parity`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import ArtifactError
from .ir.graph import IntegerGraph, IntNode, QTensor
from .onnx_requant import RequantFit, accumulator_range, fit_channel, fit_weight_scales

DEFAULT_OPSET = 17
INT4_OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "output"
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: path, opset, node counts by op type, the containers used."""

    path: str
    opset: int
    weights: str                                              # int8 (zero point 0) | uint8 (zero point 128)
    int4: bool
    int4_activations: bool
    node_counts: dict[str, int] = field(default_factory=dict)
    clips: list[str] = field(default_factory=list)            # IR tensors whose clamp is an explicit Clip
    int4_weights: list[str] = field(default_factory=list)     # layers whose weights are INT4 initializers
    int8_fallback: list[str] = field(default_factory=list)    # <= 4-bit layers kept int8 (a weight outside [-8, 7])
    per_layer_outputs: bool = False
    # layers ORT requantizes in its integer kernels: channels, channels whose float32 multiplier reproduces the dyadic
    # one on every accumulator value the layer can produce, and the count of accumulator values where it cannot
    requant_fit: dict[str, dict[str, int]] = field(default_factory=dict)
    integer_requant: str = "none"                         # which conv2d / dense are written as integer ops
    integer_layers: list[str] = field(default_factory=list)   # layers written as ConvInteger/MatMulInteger + int64

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class _Builder:
    """Accumulates ONNX nodes and initializers; knows the quantized ONNX name of every IR tensor."""

    def __init__(self, graph: IntegerGraph, int4: bool, uint8_weights: bool = False, int4_acts: bool = False):
        from onnx import TensorProto

        self.TP = TensorProto
        self.graph = graph
        self.int4 = int4
        self.uint8_weights = uint8_weights
        self.int4_acts = int4_acts
        self.cut = False
        self.cut_inputs: dict[str, QTensor] = {}
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.q_name: dict[str, str] = {}          # IR tensor -> ONNX name of its integer codes (Q output)
        self.qt: dict[str, QTensor] = {}
        self._uid = 0
        self.report_clips: list[str] = []
        self.int4_weights: list[str] = []
        self.int8_fallback: list[str] = []
        self.requant_fit: dict[str, dict[str, int]] = {}
        self.integer_requant = "none"
        self.fits: dict[str, RequantFit] = {}
        self.integer_layers: list[str] = []

    # ---- helpers ---------------------------------------------------------------------------------------------
    def uid(self, base: str) -> str:
        self._uid += 1
        return f"{base}#{self._uid}"

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def const(self, name: str, value: np.ndarray, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        if dtype is None:
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        else:  # INT4 / UINT4: helper.make_tensor packs two per byte
            v = np.asarray(value)
            self.inits.append(helper.make_tensor(name, dtype, list(v.shape), v.astype(np.int64).ravel().tolist()))
        return name

    def act_type(self, t: QTensor) -> int:
        return self.TP.UINT4 if self.int4_acts and t.bits <= 4 else self.TP.UINT8

    def act_qmax(self, t: QTensor) -> int:
        return 15 if self.act_type(t) == self.TP.UINT4 else 255

    def qparams(self, t: QTensor, tag: str) -> tuple[str, str]:
        """(scale, zero point) initializers of an activation tensor."""
        s = self.const(self.uid(f"{tag}/scale"), np.array(t.scale, dtype=np.float32))
        typ = self.act_type(t)
        if typ == self.TP.UINT8:
            z = self.const(self.uid(f"{tag}/zero_point"), np.array(t.zero_point, dtype=np.uint8))
        else:
            z = self.const(self.uid(f"{tag}/zero_point"), np.array(t.zero_point), typ)
        return s, z

    def src(self, ir_name: str) -> str:
        """The ONNX name a consumer reads IR tensor ``ir_name``'s codes from (a graph input ``in:<tensor>`` when
        layers are cut apart)."""
        if self.cut:
            self.cut_inputs.setdefault(ir_name, self.qt[ir_name])
            return f"in:{ir_name}"
        return self.q_name[ir_name]

    def dq(self, ir_name: str, consumer: str) -> str:
        """A DequantizeLinear of IR tensor ``ir_name`` for one consumer (one DQ per consumer, as QDQ wants)."""
        t = self.qt[ir_name]
        s, z = self.qparams(t, f"{consumer}/dq_{ir_name}")
        out = self.uid(f"{consumer}/dq_{ir_name}")
        self.node("DequantizeLinear", [self.src(ir_name), s, z], [out], name=self.uid(f"{consumer}/DQ"))
        return out

    def clamp_and_quantize(self, y: str, t: QTensor, lo: int, hi: int, tag: str) -> None:
        """Float ``y`` -> Clip (unless [lo, hi] is the container's range) -> Q(t): the codes of IR tensor ``t``."""
        if lo > 0 or hi < self.act_qmax(t):
            s = np.float64(np.float32(t.scale))
            cmin = self.const(self.uid(f"{tag}/clip_min"), np.array((lo - t.zero_point) * s, dtype=np.float32))
            cmax = self.const(self.uid(f"{tag}/clip_max"), np.array((hi - t.zero_point) * s, dtype=np.float32))
            clipped = self.uid(f"{tag}/clipped")
            self.node("Clip", [y, cmin, cmax], [clipped], name=self.uid(f"{tag}/Clip"))
            y = clipped
            self.report_clips.append(t.name)
        s, z = self.qparams(t, tag)
        self.node("QuantizeLinear", [y, s, z], [f"q:{t.name}"], name=self.uid(f"{tag}/Q"))
        self.q_name[t.name] = f"q:{t.name}"
        self.qt[t.name] = t


Exporter = Callable[[_Builder, IntNode], None]


# ---- one exporter per IR op ----------------------------------------------------------------------------------
def _closest_weight_scale(mult: np.ndarray, s_x: float, s_out: float, ulps: int = 8) -> np.ndarray:
    """float32 weight scales whose float32 requantization multiplier ``(s_x * s_w) / s_out`` (as ONNX Runtime's
    QLinearConv computes it) is the float32 closest to the dyadic ``mult``: the nearest float32 of
    ``mult * s_out / s_x`` and its neighbours within ``ulps``, the best per channel."""
    base = (mult * s_out / s_x).astype(np.float32)
    cands = [base]
    up, down = base.copy(), base.copy()
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        cands += [up, down]
    c = np.stack(cands)                                                     # (2 * ulps + 1, C)
    eff = (np.float32(s_x) * c) / np.float32(s_out)                         # float32 arithmetic
    best = np.argmin(np.abs(eff.astype(np.float64) - mult[None, :]), axis=0)
    return c[best, np.arange(c.shape[1])].astype(np.float32)


def _fit(b: _Builder, node: IntNode) -> RequantFit | None:
    """The fitted float32 weight scales (:mod:`ptq2tvm.onnx_requant`) of a conv2d / dense that ORT fuses into
    QLinearConv / QGemm (no residual, clamp = the container's range), else None (memoized per layer)."""
    a, arr = node.attrs, node.arrays
    if not (len(node.inputs) == 1 and (_split_clamp(b, node) or (a["lo"] == 0 and a["hi"] == b.act_qmax(node.out)))):
        return None
    if node.name not in b.fits:
        tin = b.qt[node.inputs[0]]
        acc_lo, acc_hi = accumulator_range(arr["weight"], arr["bias"], 0, tin.qmax)
        b.fits[node.name] = fit_weight_scales(arr["multiplier"], arr["shift"], tin.scale, node.out.scale, acc_lo,
                                              acc_hi, int(node.out.zero_point), a["lo"], a["hi"],
                                              b.act_qmax(node.out))
    return b.fits[node.name]


def _weights_and_bias(b: _Builder, node: IntNode, tin: QTensor, axis_len: int) -> tuple[str, str]:
    """DQ'd weight and bias of a conv2d / dense node (see the module docstring for the scales)."""
    arr, a = node.arrays, node.attrs
    q_w = arr["weight"].astype(np.int64)
    mult = arr["multiplier"].astype(np.float64) * np.ldexp(1.0, -arr["shift"].astype(np.int64))
    fit = _fit(b, node)
    if fit is not None:
        w_scale = fit.scale
        b.requant_fit[node.name] = dict(channels=int(len(fit.scale)), exact_channels=fit.exact_channels,
                                        mismatching_accumulators=int(fit.mismatches.sum()),
                                        checked_accumulators=int(fit.checked.sum()),
                                        max_ulps_from_nearest=int(fit.ulps_from_nearest.max(initial=0)))
    else:  # a float path in ORT (residual Add, Clip): the float32 scale nearest the dyadic multiplier
        w_scale = _closest_weight_scale(mult, tin.scale, node.out.scale)
    if np.any(w_scale <= 0) or not np.all(np.isfinite(w_scale)):
        raise ArtifactError(f"layer '{node.name}': cannot export a zero or non-finite requantization multiplier "
                            "as a positive ONNX weight scale")
    bias = arr["bias"].astype(np.int64) + int(a["input_zero_point"]) * q_w.reshape(len(q_w), -1).sum(axis=1)
    if bias.max(initial=0) > INT32_MAX or bias.min(initial=0) < INT32_MIN:
        raise ArtifactError(f"layer '{node.name}': the QDQ bias (IR bias + z_x * sum(q_w)) overflows int32")
    b_scale = (np.float32(tin.scale) * w_scale).astype(np.float32)
    w_bits = int(a.get("w_bits", 8))
    use_int4 = b.int4 and w_bits <= 4
    if use_int4 and (q_w.min() < -8 or q_w.max() > 7):
        use_int4 = False  # integers outside INT4 (not produced by the fold today): keep this layer in int8
        b.int8_fallback.append(node.name)
    tag = node.name
    if use_int4:
        w = b.const(f"{tag}/weight", q_w, b.TP.INT4)
        wz = b.const(f"{tag}/weight_zero_point", np.zeros(axis_len, dtype=np.int64), b.TP.INT4)
        b.int4_weights.append(node.name)
    elif b.uint8_weights:  # the same integers as uint8 codes around zero point 128 (exact for q_w in [-128, 127])
        w = b.const(f"{tag}/weight", (q_w + 128).astype(np.uint8))
        wz = b.const(f"{tag}/weight_zero_point", np.full(axis_len, 128, dtype=np.uint8))
    else:
        w = b.const(f"{tag}/weight", q_w.astype(np.int8))
        wz = b.const(f"{tag}/weight_zero_point", np.zeros(axis_len, dtype=np.int8))
    ws = b.const(f"{tag}/weight_scale", w_scale)
    w_dq = f"{tag}/weight_dq"
    b.node("DequantizeLinear", [w, ws, wz], [w_dq], name=f"{tag}/weight/DQ", axis=0)
    bq = b.const(f"{tag}/bias", bias.astype(np.int32))
    bs = b.const(f"{tag}/bias_scale", b_scale)
    bz = b.const(f"{tag}/bias_zero_point", np.zeros(axis_len, dtype=np.int32))
    b_dq = f"{tag}/bias_dq"
    b.node("DequantizeLinear", [bq, bs, bz], [b_dq], name=f"{tag}/bias/DQ", axis=0)
    return w_dq, b_dq


def _integer_fits(b: _Builder, node: IntNode) -> bool:
    """Whether the int64 requantization of :func:`_integer_weighted` fits int64 for every input of the layer."""
    return _integer_offsets(b, node) is not None


def _integer_offsets(b: _Builder, node: IntNode) -> np.ndarray | None:
    """Per channel ``OFF`` that keeps the dividend of :func:`_integer_weighted` >= 0, or None on int64 overflow."""
    a, arr = node.attrs, node.arrays
    q_w = arr["weight"].astype(np.int64)
    m, n = arr["multiplier"].astype(np.int64), arr["shift"].astype(np.int64)
    acc_lo, acc_hi = accumulator_range(q_w, arr["bias"], 0, b.qt[node.inputs[0]].qmax)
    lo_sum = np.minimum(acc_lo * m, acc_hi * m) + (np.int64(1) << (n - 1))
    hi_sum = np.maximum(acc_lo * m, acc_hi * m) + (np.int64(1) << (n - 1))
    if len(node.inputs) > 1:
        mr = arr["residual_multiplier"].astype(np.int64)
        r_lo = -int(a["residual_zero_point"])
        r_hi = b.qt[node.inputs[1]].qmax + r_lo
        lo_sum = lo_sum + np.minimum(r_lo * mr, r_hi * mr)
        hi_sum = hi_sum + np.maximum(r_lo * mr, r_hi * mr)
    off = np.maximum(0, -(lo_sum >> n)) + 1
    if float(np.max(hi_sum.astype(np.float64) + off.astype(np.float64) * np.ldexp(1.0, n))) >= 2.0 ** 62:
        return None
    return off


def _integer_weighted(b: _Builder, node: IntNode) -> None:
    """conv2d / dense as ONNX integer ops: ``ConvInteger`` / ``MatMulInteger`` (exact int32 accumulator) + the int32
    bias, then the reference executor's own requantization in int64 (``Mul``, ``Add``, ``Div``: exact integers)::

        q = Clip((acc * m [+ (q_r - z_r) * m_r] + 2^(n-1) + OFF 2^n) / 2^n - OFF + z, lo, hi) -> Cast(uint8)

    (``OFF``, per channel, keeps the dividend >= 0, so ``Div``'s truncation is the floor, i.e. the arithmetic
    shift). Bit-exact by construction in any executor with exact int64 ``Mul``/``Add``/``Div``."""
    a, arr = node.attrs, node.arrays
    tin = b.qt[node.inputs[0]]
    q_w = arr["weight"].astype(np.int64)
    o = len(q_w)
    tag = node.name
    m, n = arr["multiplier"].astype(np.int64), arr["shift"].astype(np.int64)
    bias = arr["bias"].astype(np.int64) + int(a["input_zero_point"]) * q_w.reshape(o, -1).sum(axis=1)
    off = _integer_offsets(b, node)
    if off is None:
        raise ArtifactError(f"layer '{node.name}': its int64 requantization would overflow; export it with "
                            "integer_requant='none'")
    wq = q_w if node.op == "conv2d" else np.ascontiguousarray(q_w.T)   # MatMulInteger: (K, O)
    if b.uint8_weights:
        w = b.const(f"{tag}/weight", (wq + 128).astype(np.uint8))
        wz = b.const(f"{tag}/weight_zero_point", np.array(128, dtype=np.uint8))
    else:
        w = b.const(f"{tag}/weight", wq.astype(np.int8))
        wz = b.const(f"{tag}/weight_zero_point", np.array(0, dtype=np.int8))
    xz = b.const(f"{tag}/input_zero_point", np.array(tin.zero_point, dtype=np.uint8))
    acc = f"{tag}/acc"
    chan = (o, 1, 1) if node.op == "conv2d" else (o,)
    if node.op == "conv2d":
        ph, pw = a["padding"]
        b.node("ConvInteger", [b.src(node.inputs[0]), w, xz, wz], [acc], name=f"{tag}/ConvInteger",
               strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a["dilation"]),
               group=int(a["groups"]), kernel_shape=list(q_w.shape[2:]))
    else:
        b.node("MatMulInteger", [b.src(node.inputs[0]), w, xz, wz], [acc], name=f"{tag}/MatMulInteger")

    def i64(name: str, v: np.ndarray) -> str:
        return b.const(f"{tag}/{name}", np.asarray(v, dtype=np.int64).reshape(chan))

    b.node("Add", [acc, b.const(f"{tag}/bias", bias.astype(np.int32).reshape(chan))], [f"{tag}/acc_b"],
           name=f"{tag}/AddBias")
    b.node("Cast", [f"{tag}/acc_b"], [f"{tag}/acc64"], name=f"{tag}/CastAcc", to=b.TP.INT64)
    b.node("Mul", [f"{tag}/acc64", i64("m", m)], [f"{tag}/t_acc"], name=f"{tag}/MulM")
    t_sum = f"{tag}/t_acc"
    if len(node.inputs) > 1:
        zr = np.array(a["residual_zero_point"], np.int64)
        b.node("Cast", [b.src(node.inputs[1])], [f"{tag}/r64"], name=f"{tag}/CastResidual", to=b.TP.INT64)
        b.node("Sub", [f"{tag}/r64", b.const(f"{tag}/residual_zero_point", zr)], [f"{tag}/r_c"], name=f"{tag}/SubZr")
        b.node("Mul", [f"{tag}/r_c", i64("m_r", arr["residual_multiplier"])], [f"{tag}/t_r"], name=f"{tag}/MulMr")
        b.node("Add", [f"{tag}/t_acc", f"{tag}/t_r"], [f"{tag}/t"], name=f"{tag}/AddTerms")
        t_sum = f"{tag}/t"
    b.node("Add", [t_sum, i64("round_offset", (1 << (n - 1)) + (off << n))], [f"{tag}/t_off"],
           name=f"{tag}/AddRound")
    b.node("Div", [f"{tag}/t_off", i64("two_pow_n", np.int64(1) << n)], [f"{tag}/shifted"], name=f"{tag}/Shift")
    b.node("Add", [f"{tag}/shifted", i64("zero_point_minus_off", int(a["output_zero_point"]) - off)],
           [f"{tag}/q64"], name=f"{tag}/AddZ")
    b.node("Clip", [f"{tag}/q64", b.const(f"{tag}/lo", np.array(a["lo"], np.int64)),
                    b.const(f"{tag}/hi", np.array(a["hi"], np.int64))], [f"{tag}/q64c"], name=f"{tag}/Clip")
    t = node.out
    b.node("Cast", [f"{tag}/q64c"], [f"q:{t.name}"], name=f"{tag}/CastOut", to=b.TP.UINT8)
    b.q_name[t.name], b.qt[t.name] = f"q:{t.name}", t
    b.integer_layers.append(node.name)


def _wants_integer(b: _Builder, node: IntNode) -> bool:
    """Whether ``integer_requant`` writes this conv2d / dense as integer ops (:func:`_integer_weighted`): never
    with INT4 weights or UINT4 activations (ConvInteger takes 8-bit only) or when int64 would overflow;
    ``residual``: the layers with a fused residual (ORT has no integer kernel for them, it would run them in float);
    ``inexact``: those and every layer whose fitted float32 multiplier is not exact on every accumulator value."""
    if b.integer_requant == "none" or b.int4_acts or (b.int4 and int(node.attrs.get("w_bits", 8)) <= 4):
        return False
    if len(node.inputs) > 1 or b.integer_requant == "inexact":
        return _integer_fits(b, node)
    return False


def _weighted(b: _Builder, node: IntNode) -> None:
    if _wants_integer(b, node):
        if len(node.inputs) == 1 and b.integer_requant == "inexact":
            fit = _fit(b, node)  # keep the QDQ form where ORT's float multiplier is provably exact
            if fit is not None and int(fit.mismatches.sum()) == 0:
                return _qdq_weighted(b, node)
        return _integer_weighted(b, node)
    return _qdq_weighted(b, node)


def _qdq_weighted(b: _Builder, node: IntNode) -> None:
    a = node.attrs
    tin = b.qt[node.inputs[0]]
    o = node.arrays["weight"].shape[0]
    x = b.dq(node.inputs[0], node.name)
    w_dq, b_dq = _weights_and_bias(b, node, tin, o)
    y = f"{node.name}/acc"
    if node.op == "conv2d":
        ph, pw = a["padding"]
        b.node("Conv", [x, w_dq, b_dq], [y], name=f"{node.name}/Conv", strides=list(a["stride"]),
               pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=int(a["groups"]),
               kernel_shape=list(node.arrays["weight"].shape[2:]))
    else:
        b.node("Gemm", [x, w_dq, b_dq], [y], name=f"{node.name}/Gemm", transB=1)
    if len(node.inputs) > 1:  # fused residual: one rounding of conv + residual, as the IR
        r = b.dq(node.inputs[1], node.name)
        y2 = f"{node.name}/sum"
        b.node("Add", [y, r], [y2], name=f"{node.name}/Add")
        y = y2
    elif _split_clamp(b, node):
        # Q onto the whole container first (ORT fuses DQ -> Conv/Gemm -> Q into QLinearConv / QGemm), then clamp
        # the codes: DQ -> Clip -> Q on the same grid (exact: clamp(round(v)) == round(clamp(v)) for integer bounds)
        t = node.out
        full = QTensor(f"{t.name}/unclamped", t.shape, t.scale, t.zero_point, 8)
        b.clamp_and_quantize(y, full, 0, 255, node.name)
        s_, z_ = b.qparams(full, f"{node.name}/clamp")
        y = f"{node.name}/unclamped_dq"
        b.node("DequantizeLinear", [b.q_name[full.name], s_, z_], [y], name=f"{node.name}/clamp/DQ")
    b.clamp_and_quantize(y, node.out, a["lo"], a["hi"], node.name)


def _split_clamp(b: _Builder, node: IntNode) -> bool:
    """A conv2d / dense without residual whose clamp is narrower than its uint8 container (ReLU6, sub-8-bit)."""
    a = node.attrs
    return (len(node.inputs) == 1 and not b.int4_acts and b.act_type(node.out) == b.TP.UINT8
            and (a["lo"] > 0 or a["hi"] < 255))


def _add(b: _Builder, node: IntNode) -> None:
    xa, xb = b.dq(node.inputs[0], node.name), b.dq(node.inputs[1], node.name)
    y = f"{node.name}/sum"
    b.node("Add", [xa, xb], [y], name=f"{node.name}/Add")
    b.clamp_and_quantize(y, node.out, node.attrs["lo"], node.attrs["hi"], node.name)


def _avgpool(b: _Builder, node: IntNode) -> None:
    a = node.attrs
    tin = b.qt[node.inputs[0]]
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    n_win = kh * kw
    glob = (kh, kw) == tuple(tin.shape[1:]) and (ph, pw) == (0, 0)
    mult = np.asarray(node.arrays.get("multiplier", [0]))
    if glob and a["lo"] == 0 and a["hi"] == b.act_qmax(node.out) and mult.min() == mult.max() > 0 \
            and b.act_type(tin) == b.TP.UINT8:
        # ORT fuses this into QLinearGlobalAveragePool: M = f32(s_dq / f32(s_out * N)), as MLAS computes it; fit the
        # DQ's scale (only the codes pass between layers) so M requantizes every window sum as the dyadic one does
        sy, m, shift = np.float32(node.out.scale), int(mult[0]), int(node.arrays["shift"][0])
        z = int(tin.zero_point)
        s_dq, _, bad, checked, ulps = fit_channel(
            m, shift, m * 2.0 ** -shift * float(sy) * n_win, lambda c: c / (sy * np.float32(n_win)), -z * n_win,
            (tin.qmax - z) * n_win, int(node.out.zero_point), a["lo"], a["hi"], b.act_qmax(node.out))
        b.requant_fit[node.name] = dict(channels=1, exact_channels=int(bad == 0), mismatching_accumulators=int(bad),
                                        checked_accumulators=int(checked), max_ulps_from_nearest=int(ulps))
        sc = b.const(b.uid(f"{node.name}/dq_scale"), np.array(s_dq, dtype=np.float32))
        zc = b.qparams(tin, f"{node.name}/dq")[1]
        x = b.uid(f"{node.name}/dq_{node.inputs[0]}")
        b.node("DequantizeLinear", [b.src(node.inputs[0]), sc, zc], [x], name=b.uid(f"{node.name}/DQ"))
    elif (ph, pw) == (0, 0):
        x = b.dq(node.inputs[0], node.name)
    else:  # explicit Pad of the codes with the zero point (a real 0), then an unpadded AveragePool: OpenVINO
        # 2026.4 miscounts count_include_pad=1 with pads (25% exact on a 2x2/stride 1/pad 1 pool), ORT is fine either way
        z_code = b.qparams(tin, f"{node.name}/pad")[1]
        pads = b.const(f"{node.name}/pads", np.array([0, 0, ph, pw, 0, 0, ph, pw], dtype=np.int64))
        padded = f"{node.name}/padded"
        b.node("Pad", [b.src(node.inputs[0]), pads, z_code], [padded], name=f"{node.name}/Pad", mode="constant")
        s_, z_ = b.qparams(tin, f"{node.name}/dq_padded")
        x = f"{node.name}/padded_dq"
        b.node("DequantizeLinear", [padded, s_, z_], [x], name=f"{node.name}/DQ")
    y = f"{node.name}/avg"
    if glob:
        b.node("GlobalAveragePool", [x], [y], name=f"{node.name}/GlobalAveragePool")
    else:
        b.node("AveragePool", [x], [y], name=f"{node.name}/AveragePool", kernel_shape=[kh, kw], strides=[sh, sw])
    b.clamp_and_quantize(y, node.out, a["lo"], a["hi"], node.name)


def _same_grid(op: str, **fixed: Any) -> Exporter:
    """DQ -> ``op`` -> Q on the input's own grid (maxpool2d, flatten, clamp)."""

    def export(b: _Builder, node: IntNode) -> None:
        x = b.dq(node.inputs[0], node.name)
        y = f"{node.name}/{op.lower()}"
        attrs = dict(fixed)
        lo, hi = 0, node.out.qmax
        if op == "MaxPool":  # ceil_mode is the extra end padding (code 0 = the smallest value = ONNX's -inf)
            a = node.attrs
            ph, pw = a["padding"]
            eh, ew = a.get("padding_end", (0, 0))
            attrs.update(kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=[ph, pw, ph + eh, pw + ew],
                         dilations=list(a["dilation"]))
        if op == "Identity":  # clamp: the Clip of clamp_and_quantize is the op
            lo, hi = node.attrs["lo"], node.attrs["hi"]
        b.node(op, [x], [y], name=f"{node.name}/{op}", **attrs)
        b.clamp_and_quantize(y, node.out, lo, hi, node.name)

    return export


def _mul(b: _Builder, node: IntNode) -> None:
    """Broadcast multiply (squeeze-excitation gate): ``DQ(a) * DQ(b) -> [Clip] -> Q``."""
    xa, xb = b.dq(node.inputs[0], node.name), b.dq(node.inputs[1], node.name)
    y = f"{node.name}/prod"
    b.node("Mul", [xa, xb], [y], name=f"{node.name}/Mul")
    b.clamp_and_quantize(y, node.out, node.attrs["lo"], node.attrs["hi"], node.name)


def _concat(b: _Builder, node: IntNode) -> None:
    """``Concat(DQ(x_i), axis=1) -> [Clip] -> Q``: each input requantized onto the output grid with one rounding."""
    xs = [b.dq(i, node.name) for i in node.inputs]
    y = f"{node.name}/cat"
    b.node("Concat", xs, [y], name=f"{node.name}/Concat", axis=1)
    b.clamp_and_quantize(y, node.out, node.attrs["lo"], node.attrs["hi"], node.name)


def _lut(b: _Builder, node: IntNode) -> None:
    """Lookup table on the codes: ``Gather(table, int64(q_x))``, the fold's exact uint8 table (no float function)."""
    table = b.const(f"{node.name}/table", np.asarray(node.arrays["table"]).astype(np.uint8))
    idx = f"{node.name}/index"
    b.node("Cast", [b.src(node.inputs[0])], [idx], name=f"{node.name}/Cast", to=b.TP.INT64)
    codes = f"{node.name}/codes"
    b.node("Gather", [table, idx], [codes], name=f"{node.name}/Gather", axis=0)
    t = node.out
    if b.act_type(t) == b.TP.UINT8:
        b.node("Identity", [codes], [f"q:{t.name}"], name=f"{node.name}/Identity")
        b.q_name[t.name], b.qt[t.name] = f"q:{t.name}", t
    else:  # a UINT4 container: re-quantize the (exact) uint8 codes into it
        b.qt[t.name] = QTensor(t.name, t.shape, t.scale, t.zero_point, 8)
        b.q_name[t.name] = codes
        b.clamp_and_quantize(b.dq(t.name, f"{node.name}/u4"), t, 0, b.act_qmax(t), f"{node.name}/u4")


def _reshape_chain(b: _Builder, node: IntNode, x: str, shapes: list[list[int]], perm: list[int]) -> str:
    """Reshape(shapes[0]) -> Transpose(perm) -> Reshape(shapes[1]); 0 keeps the (dynamic) batch dim."""
    r1, t1, r2 = (f"{node.name}/{k}" for k in ("split", "transposed", "merged"))
    b.node("Reshape", [x, b.const(f"{node.name}/shape0", np.array(shapes[0], dtype=np.int64))], [r1],
           name=f"{node.name}/Reshape0")
    b.node("Transpose", [r1], [t1], name=f"{node.name}/Transpose", perm=perm)
    b.node("Reshape", [t1, b.const(f"{node.name}/shape1", np.array(shapes[1], dtype=np.int64))], [r2],
           name=f"{node.name}/Reshape1")
    return r2


def _grid_op(emit: Callable[[_Builder, IntNode, str], str]) -> Exporter:
    """A data-movement op between a DQ and a Q on the input's own grid (exact: Q(DQ(q)) == q)."""

    def export(b: _Builder, node: IntNode) -> None:
        y = emit(b, node, b.dq(node.inputs[0], node.name))
        b.clamp_and_quantize(y, node.out, 0, node.out.qmax, node.name)

    return export


def _upsample(b: _Builder, node: IntNode, x: str) -> str:
    sh, sw = node.attrs["scale"]
    y = f"{node.name}/resized"
    scales = b.const(f"{node.name}/scales", np.array([1, 1, sh, sw], dtype=np.float32))
    b.node("Resize", [x, "", scales], [y], name=f"{node.name}/Resize", mode="nearest",
           coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return y


def _pixel_shuffle(b: _Builder, node: IntNode, x: str) -> str:
    y = f"{node.name}/d2s"  # torch's pixel_shuffle is DepthToSpace in CRD order
    b.node("DepthToSpace", [x], [y], name=f"{node.name}/DepthToSpace", blocksize=int(node.attrs["factor"]),
           mode="CRD")
    return y


def _pixel_unshuffle(b: _Builder, node: IntNode, x: str) -> str:
    r = int(node.attrs["factor"])  # SpaceToDepth is DCR-ordered only; torch's order as reshape/transpose/reshape
    c, h, w = b.qt[node.inputs[0]].shape
    return _reshape_chain(b, node, x, [[0, c, h // r, r, w // r, r], [0, c * r * r, h // r, w // r]],
                          [0, 1, 3, 5, 2, 4])


def _channel_shuffle(b: _Builder, node: IntNode, x: str) -> str:
    g = int(node.attrs["groups"])
    c, h, w = b.qt[node.inputs[0]].shape
    return _reshape_chain(b, node, x, [[0, g, c // g, h, w], [0, c, h, w]], [0, 2, 1, 3, 4])


def _slice(b: _Builder, node: IntNode, x: str) -> str:
    y = f"{node.name}/sliced"
    a = node.attrs
    b.node("Slice", [x, b.const(f"{node.name}/starts", np.array([a["start"]], dtype=np.int64)),
                     b.const(f"{node.name}/ends", np.array([a["stop"]], dtype=np.int64)),
                     b.const(f"{node.name}/axes", np.array([1], dtype=np.int64))], [y], name=f"{node.name}/Slice")
    return y


#: IR op -> exporter. A new IR op is one entry here (and a case in the parity tests).
EXPORTERS: dict[str, Exporter] = {
    "conv2d": _weighted,
    "dense": _weighted,
    "add": _add,
    "avgpool2d": _avgpool,
    "maxpool2d": _same_grid("MaxPool"),
    "flatten": _same_grid("Flatten", axis=1),
    "clamp": _same_grid("Identity"),
    "mul": _mul,
    "concat": _concat,
    "lut": _lut,
    "upsample": _grid_op(_upsample),
    "pixel_shuffle": _grid_op(_pixel_shuffle),
    "pixel_unshuffle": _grid_op(_pixel_unshuffle),
    "channel_shuffle": _grid_op(_channel_shuffle),
    "slice": _grid_op(_slice),
}


WEIGHT_CONTAINERS = ("int8", "uint8")
INTEGER_REQUANT = ("none", "residual", "inexact")


def graph_output_names(graph: IntegerGraph) -> list[str]:
    """The IR tensors the graph outputs (``output_names`` of multi-output graphs, else ``[output_name]``)."""
    names = getattr(graph, "output_names", None)
    return list(names) if names else [graph.output_name]


def onnx_output_names(graph: IntegerGraph) -> list[str]:
    """The float outputs of the exported model: ``output`` for one output, ``output_0``, ``output_1``, ... else."""
    n = len(graph_output_names(graph))
    return [OUTPUT_NAME] if n == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(n)]


def build_onnx(graph: IntegerGraph, *, weights: str = "int8", int4: bool = False, int4_activations: bool = False,
               per_layer_outputs: bool = False, opset: int | None = None,
               cut_layers: bool = False, integer_requant: str = "none",
               output_codes: bool = False) -> tuple[Any, ExportReport]:
    """The ONNX ModelProto of ``graph`` (not written) and its :class:`ExportReport`; see :func:`export_onnx`.

    ``output_codes``: the output tensors' integer codes as uint8 outputs ``codes:<tensor>`` too.
    ``cut_layers`` (for parity): every op reads its inputs' codes from uint8 graph inputs ``in:<tensor>`` instead of
    from the ops before it, so one run measures each layer on the same inputs as the reference (its local error,
    not the drift it inherits); implies ``per_layer_outputs``."""
    import onnx
    from onnx import helper

    if weights not in WEIGHT_CONTAINERS:
        raise ArtifactError(f"ONNX weight container must be one of {WEIGHT_CONTAINERS}, got {weights!r}")
    if integer_requant not in INTEGER_REQUANT:
        raise ArtifactError(f"integer_requant must be one of {INTEGER_REQUANT}, got {integer_requant!r}")
    int4 = int4 or int4_activations
    opset = opset or (INT4_OPSET if int4 else DEFAULT_OPSET)
    if int4 and opset < INT4_OPSET:
        raise ArtifactError(f"INT4/UINT4 tensors need ONNX opset >= {INT4_OPSET}, got {opset}")
    unknown = sorted({n.op for n in graph.nodes if n.op not in EXPORTERS})
    if unknown:
        bad = [f"'{n.name}' ({n.op})" for n in graph.nodes if n.op in unknown]
        raise ArtifactError(f"no ONNX exporter for IR op(s) {', '.join(unknown)}: layers {', '.join(bad[:8])}")
    if cut_layers and int4_activations:
        raise ArtifactError("cut_layers needs uint8 activation containers (not int4_activations)")
    per_layer_outputs = per_layer_outputs or cut_layers
    b = _Builder(graph, int4, weights == "uint8", int4_activations)
    b.cut = cut_layers
    b.integer_requant = integer_requant
    tin = graph.input
    # network input: float -> [Clip to the input's range when < 8 bit] -> Q
    b.clamp_and_quantize(INPUT_NAME, tin, 0, tin.qmax, "input")
    for node in graph.nodes:
        EXPORTERS[node.op](b, node)
    f32 = onnx.TensorProto.FLOAT
    outputs = []
    for oname, t in zip(onnx_output_names(graph), [graph.tensor(n) for n in graph_output_names(graph)]):
        s, z = b.qparams(t, oname)
        b.node("DequantizeLinear", [b.q_name[t.name], s, z], [oname], name=f"{oname}/DQ")
        outputs.append(helper.make_tensor_value_info(oname, f32, ["batch", *t.shape]))
    inputs = [helper.make_tensor_value_info(INPUT_NAME, f32, ["batch", *tin.shape])]
    inputs += [helper.make_tensor_value_info(f"in:{k}", onnx.TensorProto.UINT8, ["batch", *t.shape])
               for k, t in b.cut_inputs.items()]
    code_names = ([tin.name] + [n.name for n in graph.nodes] if per_layer_outputs
                  else graph_output_names(graph) if output_codes else [])
    if code_names:
        for name in code_names:
            t = b.qt[name]
            src = b.q_name[name]
            if b.act_type(t) != onnx.TensorProto.UINT8:  # uint4 codes: widen for numpy
                src = b.uid(f"{name}/codes")
                b.node("Cast", [b.q_name[name]], [src], name=b.uid(f"{name}/Cast"), to=onnx.TensorProto.UINT8)
            out_name = f"codes:{name}"
            b.node("Identity", [src], [out_name], name=b.uid(f"{name}/out"))
            outputs.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.UINT8, ["batch", *t.shape]))
    used = {name for n in b.nodes for name in n.input}
    # an initializer no node reads (e.g. the quantization parameters of a tensor that is only consumed in its integer
    # form) made ONNX Runtime print "Removing initializer ... It is not used by any node" on every load
    inits = [t for t in b.inits if t.name in used]
    g = helper.make_graph(b.nodes, "ptq2tvm_integer_graph", inputs, outputs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="ptq2tvm",
                              producer_version=__version__)
    model.ir_version = min(model.ir_version, 10)  # readable by ONNX Runtime >= 1.18 and OpenVINO
    helper.set_model_props(model, {"ptq2tvm_graph_sha256": graph.digest(), "ptq2tvm_input_tensor": tin.name,
                                   "ptq2tvm_output_tensors": ",".join(graph_output_names(graph)),
                                   "ptq2tvm_weights": weights, "ptq2tvm_int4": str(bool(int4)).lower(),
                                   "ptq2tvm_int4_activations": str(bool(int4_activations)).lower()})
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"the exported ONNX model fails onnx.checker: {e}") from e
    counts: dict[str, int] = {}
    for n in b.nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    rep = ExportReport("", opset, weights, bool(int4), bool(int4_activations), counts, b.report_clips,
                       b.int4_weights, b.int8_fallback, per_layer_outputs, b.requant_fit, integer_requant,
                       b.integer_layers)
    return model, rep


def export_onnx(graph: IntegerGraph, path: str | Path, *, weights: str = "auto", int4: bool = False,
                int4_activations: bool = False, per_layer_outputs: bool = False,
                opset: int | None = None, integer_requant: str = "none") -> ExportReport:
    """Write ``graph`` as an ONNX QDQ model to ``path`` (atomic: nothing is written if anything fails).

    ``weights``: ``int8`` (symmetric, zero point 0: what TensorRT / OpenVINO expect; ONNX Runtime's u8 x s8 kernels
    saturate on x86 CPUs without VNNI, see docs/onnx.md), ``uint8`` (the same integers + 128, zero point 128:
    ONNX Runtime's exact u8 x u8 kernels everywhere) or ``auto`` (the default, as ``ptq2tvm export``:
    :func:`choose_weights`: int8 on hosts with VNNI, else uint8; ``ExportReport.weights`` says which). ``int4``: opset 21 INT4 initializers for weights of <= 4
    bits; ``int4_activations``: UINT4 zero points for activations of <= 4 bits (ONNX Runtime 1.32 rejects those at
    its full graph optimisation). Default: 8-bit containers with the exact clamp, opset 17.
    ``per_layer_outputs``: every IR tensor's uint8 codes become graph outputs ``codes:<tensor>``.
    The model's input ``input`` is float32 (batch, C, H, W); its output ``output`` is float32 (dequantized).

    Raises :class:`ArtifactError` for an IR op without an exporter, an int32 bias overflow, or a model that fails
    ``onnx.checker`` (full check, with shape inference)."""
    import onnx

    weights = choose_weights(weights)[0]
    model, rep = build_onnx(graph, weights=weights, int4=int4, int4_activations=int4_activations,
                            per_layer_outputs=per_layer_outputs, opset=opset, integer_requant=integer_requant)
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    rep.path = str(path)
    return rep


def choose_weights(weights: str) -> tuple[str, str]:
    """(container, why) for ``weights`` = ``int8`` | ``uint8`` | ``auto``. ``auto``: int8 where ONNX Runtime's u8 x s8
    kernels are exact (x86 with AVX-512 VNNI or AVX-VNNI: ``vpdpbusd``), else uint8 (without VNNI they use the
    saturating ``vpmaddubsw``; docs/onnx.md): the one rule of ``export``, ``parity --onnx`` and ``bench``
    (:mod:`ptq2tvm.onnx_parity`). Raises :class:`ArtifactError` for another value."""
    from .bench.baselines import host_has_vnni

    if weights not in ("auto", *WEIGHT_CONTAINERS):
        raise ArtifactError(f"weights must be auto, {' or '.join(WEIGHT_CONTAINERS)}, got {weights!r}")
    vnni = host_has_vnni()
    if weights != "auto":
        return weights, "chosen"
    if vnni:
        return "int8", ("auto: this CPU has VNNI, so ONNX Runtime's u8 x s8 kernels are exact here; shipping the "
                        "file to CPUs without VNNI (AVX2 only) for ONNX Runtime? there those kernels saturate: "
                        "--weights uint8 is exact on every CPU")
    return "uint8", ("auto: this CPU has no VNNI, where ONNX Runtime's u8 x s8 (int8-weight) kernels saturate; uint8 "
                     "weights run its exact u8 x u8 kernels (--weights int8 for TensorRT / OpenVINO)")


# ONNX files a run directory holds besides ptq2tvm's own exports: bench's FP32 baseline and ORT's INT8 model of it
BENCH_BASELINES = ("onnx/fp32.onnx", "onnx/fp32.int8.onnx")


def remove_stale_exports(run_dir: str | Path, digest: str) -> list[str]:
    """Before a new integer graph (``digest``) is saved into ``run_dir``: remove the ONNX exports of another graph
    (``RUN/*.onnx``, ``RUN/onnx/*.onnx`` whose ``ptq2tvm_graph_sha256`` differs: ``export``, ``bench``'s
    ``onnx/ptq2tvm_qdq.onnx``) and bench's FP32 / INT8 baselines (built from the old model and calibration images;
    every bench writes them anew). ONNX files ptq2tvm did not write are kept. Returns the names removed (relative
    to ``run_dir``)."""
    import onnx

    run = Path(run_dir)
    removed: list[str] = []
    if not run.is_dir():
        return removed
    for f in sorted([*run.glob("*.onnx"), *(run / "onnx").glob("*.onnx")]):
        name = f.relative_to(run).as_posix()
        if name in BENCH_BASELINES:
            stale = True
        else:
            try:
                props = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
            except Exception:  # noqa: BLE001 - not an ONNX file ptq2tvm wrote: not ours to remove
                continue
            stale = "ptq2tvm_graph_sha256" in props and props["ptq2tvm_graph_sha256"] != digest
        if stale:
            f.unlink()
            removed.append(name)
    if (run / "onnx").is_dir() and not any((run / "onnx").iterdir()):
        (run / "onnx").rmdir()
    return removed
