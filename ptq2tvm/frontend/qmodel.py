"""The fake-quant model: an nn.Module interpreting a :class:`FloatGraph` with quantizers at the integer points."""

from __future__ import annotations

import json
import pickle
import re
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..atomic import atomic_path
from ..errors import ArtifactError, InputShapeError, QuantConfigError
from ..model_outputs import arrange_outputs
from ..ops import float_op, ops_of_kind
from .fused_quant import act_clamp
from .graph import OPS_WITH_WEIGHTS, FloatGraph, FloatNode, repeated_call_of
from .quantizers import ActQuantizer, WeightQuantizer, check_bits

FAKEQUANT_FORMAT = "ptq2tvm-fakequant"
FAKEQUANT_VERSION = 1
#: ops whose output carries an activation quantizer (from the op registry: weighted and requantizing ops)
QUANT_POINT_OPS = ops_of_kind("weighted", "requant")


@dataclass
class QuantConfig:
    """Bit widths and calibration settings.

    ``first_last_8bit``: the first conv (weights and its input) and the last layer (weights, its input and the network
    output) stay at 8 bit, as BRECQ/QDrop deploy them. With it, ``first_layer_output_bits`` (default 8) is the bits of
    the first layer's output: the first conv's quant point and the outputs of the single-input ops that follow it
    (its ReLU/table nonlinearity, a max-pool), i.e. what the second layer reads. 8 is BRECQ's convention
    (``set_first_last_layer_to_8bit`` sets ``module_list[0].act_quantizer``, the quantizer after the first module's
    activation, to 8 bits); None gives it ``a_bits`` (QDrop's code keeps only the last layer's input at 8 bits). The
    stem's output is where a per-tensor 4-bit grid hurts most: its few channels have very different ranges (no later
    layer has mixed them yet) and a depthwise conv reads each channel alone (measured: benchmarks/results/
    coverage_fmnist_first8.md).

    Per-layer bits (mixed precision), keyed by conv/linear layer name (the model's module path, e.g.
    ``layer1.0.conv1``; :func:`ptq2tvm.mixed.layerbits.resolve_layer_bits` expands globs): ``layer_w_bits`` the
    layer's weight bits, ``layer_a_bits`` the bits of the layer's INPUT quantization point (the activation tensor it
    reads). An explicit per-layer entry wins over ``first_last_8bit``. Layers reading the same tensor (a residual
    block's conv1 and its downsample) share that tensor's bits: conflicting entries are an error. Names are checked
    against the model when the :class:`QuantModel` is built (an unknown name raises QuantConfigError listing the valid
    ones).
    """

    w_bits: int = 8
    a_bits: int = 8
    first_last_8bit: bool = True
    weight_lp: float = 2.0
    act_lp: float = 2.0
    layer_w_bits: dict[str, int] = field(default_factory=dict)
    layer_a_bits: dict[str, int] = field(default_factory=dict)
    #: bits of a tensor read by a lookup-table nonlinearity (SiLU, Sigmoid, ...); None: a_bits (ptq2tvm.ops.lut)
    lut_input_bits: int | None = 8
    #: bits of the first layer's output when ``first_last_8bit`` (BRECQ's convention); None: a_bits
    first_layer_output_bits: int | None = 8

    def validate(self) -> "QuantConfig":
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.lut_input_bits is not None:
            check_bits(self.lut_input_bits, "lut_input_bits")
        if self.first_layer_output_bits is not None:
            check_bits(self.first_layer_output_bits, "first_layer_output_bits")
        for k, v in self.layer_w_bits.items():
            check_bits(v, f"weight bits of layer '{k}'")
        for k, v in self.layer_a_bits.items():
            check_bits(v, f"input activation bits of layer '{k}'")
        for name in ("weight_lp", "act_lp"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 1.0 <= v <= 8.0):
                raise QuantConfigError(f"{name} must be in [1, 8], got {v!r}")
        return self


def _key(name: str) -> str:
    return name.replace(".", "__")


class QLayer(nn.Module):
    """A conv or linear layer with folded BN, a weight quantizer and an optional fused residual + clamp."""

    def __init__(self, node: FloatNode, w_bits: int):
        super().__init__()
        self.op = node.op
        self.attrs = dict(node.attrs)
        self.weight = nn.Parameter(node.weight.clone())
        self.bias = nn.Parameter(node.bias.clone())
        self.wq = WeightQuantizer(w_bits, node.weight.shape[0])
        self.adaq = False

    def enable_adaq(self) -> "QLayer":
        """AdaQTransform (Case 2.2 + shift): y = xi * (W_hat * x_hat) + b + eta, xi (de-quant step s_w' / s_w) and
        eta per output channel, initialised to the identity (xi = 1, eta = 0). The fold merges both (Eq. 9)."""
        if not self.adaq:
            c, dev = self.weight.shape[0], self.weight.device       # on the layer's device (reconstruction on a GPU)
            self.xi = nn.Parameter(torch.ones(c, device=dev))
            self.eta = nn.Parameter(torch.zeros(c, device=dev))
            self.adaq = True
        return self

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale``: the input's quantization step. When given (and weights are quantized), the bias is rounded
        to the int32 accumulator grid |xi| * s_w * s_x exactly as the fold does, so the fake-quant model and the
        integer graph agree bit for bit (up to half-even vs half-up ties)."""
        w = self.wq(self.weight)
        b = self.bias
        if self.adaq:
            w = w * self.xi.view((-1,) + (1,) * (w.dim() - 1))
            b = b + self.eta
        if in_scale is not None and self.wq.enabled:
            acc = self.wq.scale * in_scale
            if self.adaq:
                acc = acc * self.xi.abs()
            # The integer bias is decided in float64 exactly as the fold computes it: learned scales drift onto rounding
            # boundaries (b / acc = -15.4999998 in float64 is -15.5 in float32 and rounds the other way), which made
            # whole channels differ from the integer network by one accumulator step.
            with torch.no_grad():
                b64 = self.bias.double() + (self.eta.double() if self.adaq else 0.0)
                acc64 = self.wq.scale.double() * in_scale.double()
                if self.adaq:
                    acc64 = acc64 * self.xi.double().abs()
                b_int = torch.round(b64 / acc64).to(b.dtype)
            ratio = b / acc
            b = ((b_int - ratio).detach() + ratio) * acc             # straight-through gradient, like round_ste
        if self.op == "linear":
            return F.linear(x, w, b)
        a = self.attrs
        return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])

    def _integer_inputs(self) -> list[torch.Tensor | None]:
        """Every tensor :meth:`integer_constants` reads from the layer (weights, bias, weight scales, hard AdaRound
        rounding variables, AdaQTransform's xi and eta)."""
        return [self.weight, self.bias, self.wq.scale, self.wq.alpha,
                self.xi if self.adaq else None, self.eta if self.adaq else None]

    def integer_constants(self, in_scale: float, in_vmax: int, out_scale: float, res_scale: float | None,
                          res_vmax: int, name: str, device: torch.device) -> IntegerConstants:
        """The layer's integers for the fake-quant model's exact path (:meth:`QuantModel._integer_weighted`), computed
        by the fold's own functions (``ptq2tvm.fold.fold.weighted_bias``, ``weighted_multipliers``) from the input
        step ``in_scale`` (codes |q - z| <= ``in_vmax``), the output step and the fused residual's (codes <=
        ``res_vmax``). Raises what the fold raises (QuantConfigError).

        Cached: the last result is reused while the arguments, the weight bits and every tensor the layer's integers
        depend on (:meth:`_integer_inputs`) are bitwise equal to a private copy taken when it was computed. The copy
        is compared, not a version counter, because writes through ``.data`` (``p.data.copy_(...)``, as
        reconstruction's hardening and ``fit_integer_bounds`` do) do not bump one; the comparison reads the weights
        once, a fraction of what recomputing costs (batch 1)."""
        key = (float(in_scale), int(in_vmax), float(out_scale), None if res_scale is None else float(res_scale),
               int(res_vmax), name, str(device), self.wq.bits, self.adaq)
        inputs = [None if t is None else t.detach() for t in self._integer_inputs()]
        cached = getattr(self, "_constants_cache", None)
        if cached is not None and cached[0] == key and len(cached[1]) == len(inputs) and all(
                (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                              and a.device == b.device and torch.equal(a, b))
                for a, b in zip(cached[1], inputs)):
            return cached[2]
        self._constants_cache = None                     # nothing stale survives a failed computation
        result = self._compute_integer_constants(in_scale, in_vmax, out_scale, res_scale, res_vmax, name, device)
        self._constants_cache = (key, [None if t is None else t.clone() for t in inputs], result)
        return result

    def _compute_integer_constants(self, in_scale: float, in_vmax: int, out_scale: float, res_scale: float | None,
                                   res_vmax: int, name: str, device: torch.device) -> IntegerConstants:
        from ..fold.fold import weighted_bias, weighted_multipliers

        q_w, bias, acc_scale = weighted_bias(self, in_scale, name)
        if not np.all(np.isfinite(bias)) or np.abs(bias).max(initial=0) > 1 << 62:
            raise QuantConfigError(f"layer '{name}': the int32 bias is not representable")   # the fold refuses it
        mant, shift = weighted_multipliers(acc_scale, out_scale, res_scale, name)
        m, n = mant[0].astype(np.int64), shift.astype(np.int64)
        mr = mant[1].astype(np.int64) if res_scale is not None else None
        chunks = None
        if self.op == "conv" and device.type == "cpu":
            chunks = _f32_chunks(q_w, int(self.attrs["groups"]), in_vmax)
        f32 = None if chunks is None else _f32_requant_constants(q_w, bias, m, mr, n, in_vmax, res_vmax, len(chunks))

        def t(v: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(v)).to(device=device, dtype=dtype)

        return IntegerConstants(
            t(q_w, torch.float32 if chunks is not None else torch.float64), chunks, t(bias), t(m), t(n),
            t(np.left_shift(np.int64(1), n - 1)), None if mr is None else t(mr),
            None if f32 is None else (*(t(v, torch.float32) if v is not None else None for v in f32[:3]), f32[3]))


#: integers up to 2^24 in magnitude are exact in float32: a float32 conv of integer codes by integer weights is exact
#: when every partial sum any summation order forms, bounded by sum |q_x| |q_w|, stays within it
F32_EXACT = 1 << 24
#: the CPU conv algorithms that sum the products themselves (oneDNN's direct convolution, im2col + GEMM); NNPACK
#: and Winograd transform the operands and are not exact
_DIRECT_CONV = frozenset({"Mkldnn", "Slow2d", "SlowDilated2d", "Empty"})
#: the float32 requantization is used while its error bound is below this (it then re-computes ~2 E of the elements)
_F32_MAX_ERROR = 1.0 / 64


@dataclass
class IntegerConstants:
    """A conv/linear layer's integer form on a device (:meth:`QLayer.integer_constants`). ``weight``: the integer
    weights q_w, float32 when ``chunks`` is set (input-channel ranges whose float32 partial sums stay within
    :data:`F32_EXACT`), else float64; ``bias``: rint((b + eta) / acc_scale), the fold's bias before its zero-point term
    (the accumulation runs on ``q - z``, zero padded); the dyadic ``multiplier``, ``shift``, RHU's ``half`` =
    2^(shift-1) and the fused residual's multiplier, int64 per output channel; ``f32``: the float32 requantization's
    (multiplier, offset, residual multiplier, threshold) per channel (:func:`_requant_f32`), or None."""

    weight: torch.Tensor
    chunks: list[tuple[int, int]] | None
    bias: torch.Tensor
    multiplier: torch.Tensor
    shift: torch.Tensor
    half: torch.Tensor
    residual_multiplier: torch.Tensor | None
    f32: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, np.float32] | None


def _f32_chunks(q_w: np.ndarray, groups: int, vmax: int) -> list[tuple[int, int]] | None:
    """Input-channel ranges [lo, hi) over which a float32 conv of codes |v| <= ``vmax`` by ``q_w`` (O, I/g, kh, kw) is
    exact: per output channel vmax * sum |q_w| over the range <= 2^24. One range for almost every layer (W8A8 with
    4,608 terms: two or three); None when a grouped conv or a single channel exceeds it (float64 then)."""
    a = np.abs(q_w).reshape(q_w.shape[0], q_w.shape[1], -1).sum(axis=2)        # (O, I/g)
    limit = F32_EXACT // max(vmax, 1)
    if groups != 1:
        return [(0, q_w.shape[1])] if a.sum(axis=1).max(initial=0) <= limit else None
    cum = np.concatenate([np.zeros((a.shape[0], 1), a.dtype), np.cumsum(a, axis=1)], axis=1)
    chunks: list[tuple[int, int]] = []
    start, n_in = 0, q_w.shape[1]
    while start < n_in:
        reach = (cum[:, start + 1:] - cum[:, start:start + 1]).max(axis=0)      # nondecreasing in the range's end
        k = int(np.searchsorted(reach, limit, side="right"))
        if k == 0 or len(chunks) == 8:
            return None
        chunks.append((start, start + k))
        start += k
    return chunks


def _f32_requant_constants(q_w: np.ndarray, bias: np.ndarray, m: np.ndarray, mr: np.ndarray | None, shift: np.ndarray,
                           in_vmax: int, res_vmax: int, parts: int) -> tuple | None:
    """Per output channel, float64 (cast to float32 by the caller): M = m 2^-n, C = bias M, MR = mr 2^-n; and the
    threshold 0.5 - max E of :func:`_requant_f32`; None when E reaches :data:`_F32_MAX_ERROR` (the int64 path then).

    t = acc M + C [+ r MR] evaluated in float32 (``parts`` addcmuls of the accumulator chunks, one of the residual)
    differs from the exact value by at most (parts + 6) u B, u = 2^-24, B = max |acc| M + |C| + 1/2 + max |r| MR
    bounding every term and partial sum (float32 rounding of M, C and MR: 3 u B; of the products: u B; of the
    parts + 1 sums: (parts + 1) u B); E = (4 parts + 8) u B is at least 1.7 times that."""
    scale = np.ldexp(1.0, -shift)
    M = m * scale
    C = bias * M
    MR = mr * scale if mr is not None else np.zeros_like(M)
    B = in_vmax * np.abs(q_w).reshape(q_w.shape[0], -1).sum(axis=1) * M + np.abs(C) + 0.5 + res_vmax * MR
    E = (4 * parts + 8) * B * 2.0 ** -24         # the same threshold for every channel (a scalar compare: cheaper)
    if not np.all(np.isfinite(E)) or E.max(initial=0) >= _F32_MAX_ERROR:
        return None
    return M, C, (MR if mr is not None else None), np.float32(0.5 - E.max())


def _direct_fp32_conv(codes: torch.Tensor, w: torch.Tensor, a: dict[str, Any]) -> bool:
    """Whether ``F.conv2d`` runs these float32 CPU tensors through an algorithm that sums the products themselves
    (exact on integers within :data:`F32_EXACT`), in IEEE float32 (no bf16 / tf32 math mode)."""
    if codes.device.type != "cpu":
        return False
    mk = torch.backends.mkldnn
    for obj in (torch.backends, mk, getattr(mk, "conv", None)):
        if getattr(obj, "fp32_precision", "none") not in ("none", "ieee"):
            return False
    try:
        backend = torch._C._select_conv_backend(codes, w, None, list(a["stride"]), list(a["padding"]),
                                                list(a["dilation"]), False, [0, 0], int(a["groups"]), None)
    except Exception:           # a private API: without it, float64
        return False
    return getattr(backend, "name", "") in _DIRECT_CONV


def _conv_f32_parts(codes: torch.Tensor, c: IntegerConstants, a: dict[str, Any]) -> list[torch.Tensor] | None:
    """The accumulator sum (q_x - z_x) q_w over each window (zero padded) as float32 convolutions over ``c.chunks``,
    each exact (every partial sum an integer within 2^24): their sum is the accumulator. None: no exact float32 conv
    here (float64 then)."""
    if c.chunks is None:
        return None
    codes = codes.to(torch.float32)
    if not _direct_fp32_conv(codes, c.weight, a):
        return None
    args = (a["stride"], a["padding"], a["dilation"], a["groups"])
    if len(c.chunks) == 1:
        return [F.conv2d(codes, c.weight, None, *args).contiguous()]
    return [F.conv2d(codes[:, lo:hi], c.weight[:, lo:hi], None, *args).contiguous() for lo, hi in c.chunks]


def _requant_int64(acc: torch.Tensor, c: IntegerConstants, r_codes: torch.Tensor | None) -> torch.Tensor:
    """RHU((acc + bias) m [+ r mr], n): the integer network's requantization (int64, before the output zero point)."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    v = acc.add_(c.bias.view(shape)).mul_(c.multiplier.view(shape))
    if r_codes is not None:
        v.add_(r_codes.to(torch.int64).mul_(c.residual_multiplier.view(shape)))
    return v.add_(c.half.view(shape)).bitwise_right_shift_(c.shift.view(shape))


def _requant_f32(parts: list[torch.Tensor], c: IntegerConstants, r_codes: torch.Tensor | None) -> torch.Tensor:
    """:func:`_requant_int64`'s values as float32, at float32 cost: RHU(v, n) = round-half-up(t), t = (acc + bias) M
    [+ r MR] (M = m 2^-n, MR = mr 2^-n) computed in float32 within E of the exact t
    (:func:`_f32_requant_constants`). round(t) (half to even) is RHU's value wherever no half-integer lies within E of
    t, i.e. |t - round(t)| < 0.5 - E; the few elements closer to a tie (exact ties included) are recomputed in int64
    from their exact accumulator."""
    shape = (1, -1) + (1,) * (parts[0].dim() - 2)
    mult, off, rmult = (v.view(shape) if v is not None else None for v in c.f32[:3])
    thr = c.f32[3]
    t = torch.addcmul(off, parts[0], mult)
    for p in parts[1:]:
        t.addcmul_(p, mult)
    if r_codes is not None:
        t.addcmul_(r_codes, rmult)
    q = torch.round(t)
    d = t.sub_(q).abs_().numpy()                                # CPU only: numpy's compare + flatnonzero are
    idx = torch.from_numpy(np.flatnonzero(d >= thr))            # ~3x faster than torch.ge + nonzero here
    if idx.numel():
        inner = q[0, 0].numel()
        ch = torch.div(idx, inner, rounding_mode="floor").remainder_(q.shape[1])
        acc = sum(p.view(-1)[idx].to(torch.int64) for p in parts)
        v = (acc + c.bias[ch]) * c.multiplier[ch]
        if r_codes is not None:
            v += r_codes.reshape(-1)[idx].to(torch.int64) * c.residual_multiplier[ch]
        q.view(-1)[idx] = ((v + c.half[ch]) >> c.shift[ch]).to(q.dtype)
    return q


def _with_repeated_calls(config: QuantConfig, graph: FloatGraph) -> QuantConfig:
    """``config`` with the per-layer bits of a module called more than once (layers ``blk``, ``blk#1``, ...) given to
    every call that has no entry of its own (``layer_w_bits={"blk": 4}`` covers ``blk#1``, as ``--layer-bits blk=4``
    does); the caller's config is not changed."""
    names = [n.name for n in graph.nodes if n.op in OPS_WITH_WEIGHTS]
    extra = {}
    for field_name in ("layer_w_bits", "layer_a_bits"):
        d = getattr(config, field_name)
        more = {n: d[repeated_call_of(n)] for n in names if n not in d and repeated_call_of(n) in d}
        if more:
            extra[field_name] = {**d, **more}
    return replace(config, **extra) if extra else config


class QuantModel(nn.Module):
    """Fake-quant network. ``set_quant(weights=..., acts=...)`` toggles quantization (both off = folded FP model)."""

    #: conv / linear layers compute the integer network's codes when no gradient flows through them
    #: (:meth:`_integer_weighted`); False: their float path everywhere (as before; for comparisons and benchmarks)
    exact_weighted: bool = True

    def __init__(self, graph: FloatGraph, config: QuantConfig):
        super().__init__()
        self.graph = graph
        self.config = config = _with_repeated_calls(config.validate(), graph)
        self.layers = nn.ModuleDict()
        self.act_quant = nn.ModuleDict()
        first, last = self._first_and_last()
        self._check_layer_names()
        for n in graph.nodes:
            if n.op in OPS_WITH_WEIGHTS:
                bits = 8 if config.first_last_8bit and (n.name in first or n.name in last) else config.w_bits
                self.layers[_key(n.name)] = QLayer(n, config.layer_w_bits.get(n.name, bits))
        nonneg = self._nonneg()
        eight = self._eight_bit_points(first, last) if config.first_last_8bit else set()
        explicit = self._explicit_point_bits()
        wanted = self._wanted_input_bits()
        first_out = (self._first_layer_outputs(first) if config.first_last_8bit
                     and config.first_layer_output_bits is not None else set())
        for v in self.quant_points():
            default = 8 if v in eight else config.a_bits
            if v in first_out:
                default = max(default, config.first_layer_output_bits)
            bits = explicit.get(v, default)
            bits = max(bits, wanted.get(v, 0))
            self.act_quant[_key(v)] = ActQuantizer(bits, nonneg[v])

    # ---- structure -------------------------------------------------------------------------------------------
    @staticmethod
    def key(name: str) -> str:
        """The ModuleDict key of a tensor / layer name."""
        return _key(name)

    def quant_points(self) -> list[str]:
        """Names of the tensors carrying an activation quantizer (the integer points)."""
        return [self.graph.input_name] + [n.name for n in self.graph.nodes if n.op in QUANT_POINT_OPS]

    def grid_source(self, name: str) -> str:
        """The quant point whose integer grid the tensor ``name`` lies on."""
        g = self.graph
        while name != g.input_name and float_op(g.node(name).op).kind == "grid":
            name = g.node(name).inputs[0]
        return name

    def _wanted_input_bits(self) -> dict[str, int]:
        """Quant points read by an op that asks for more bits on its input (lookup tables: ``lut_input_bits``)."""
        out: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "input":
                continue
            bits = float_op(n.op).input_bits(self.config)
            if bits:
                for i in n.inputs:
                    src = self.grid_source(i)
                    out[src] = max(out.get(src, 0), bits)
        return out

    def act_quantizer(self, name: str) -> ActQuantizer:
        return self.act_quant[_key(self.grid_source(name))]

    def layer(self, name: str) -> QLayer:
        return self.layers[_key(name)]

    def layer_names(self) -> list[str]:
        """Names of the conv/linear layers, in graph order (the keys of per-layer bits)."""
        return [n.name for n in self.graph.nodes if n.op in OPS_WITH_WEIGHTS]

    def _check_layer_names(self) -> None:
        valid = self.layer_names()
        for what, d in (("layer_w_bits", self.config.layer_w_bits), ("layer_a_bits", self.config.layer_a_bits)):
            bad = sorted(set(d) - set(valid))
            if bad:
                raise QuantConfigError(f"{what}: no conv/linear layer named {', '.join(map(repr, bad))} in this model; "
                                       f"valid layer names: {', '.join(valid)}")

    def _explicit_point_bits(self) -> dict[str, int]:
        """Quant point -> bits requested through ``layer_a_bits`` by the layers reading it (they must agree)."""
        out: dict[str, tuple[int, str]] = {}
        for name, bits in self.config.layer_a_bits.items():
            point = self.grid_source(self.graph.node(name).inputs[0])
            if point in out and out[point][0] != bits:
                raise QuantConfigError(
                    f"layers '{out[point][1]}' and '{name}' read the same tensor '{point}' but ask for "
                    f"{out[point][0]} and {bits} input activation bits; give them the same bits")
            out[point] = (bits, name)
        return {p: b for p, (b, _) in out.items()}

    def _first_and_last(self) -> tuple[set[str], set[str]]:
        first = {n.name for n in self.graph.nodes if n.op in OPS_WITH_WEIGHTS
                 and any(self.grid_source(i) == self.graph.input_name for i in n.inputs)}
        last = set()
        for out in self.graph.output_names:
            src = self.grid_source(out)
            if src != self.graph.input_name and self.graph.node(src).op in OPS_WITH_WEIGHTS:
                last.add(src)
        return first, last

    def _first_layer_outputs(self, first: set[str]) -> set[str]:
        """Quant points of the first layer's output: the first conv(s) and the single-input non-weighted ops (ReLU /
        table nonlinearity, pooling) that follow them, up to the next weighted layer or a multi-input op."""
        front = set(first)
        for n in self.graph.nodes:
            if n.op not in OPS_WITH_WEIGHTS and len(n.inputs) == 1 and n.inputs[0] in front:
                front.add(n.name)
        return front & set(self.quant_points())

    def _eight_bit_points(self, first: set[str], last: set[str]) -> set[str]:
        pts = {self.graph.input_name}
        for n in self.graph.nodes:
            if n.name in first or n.name in last:
                pts.update(self.grid_source(i) for i in n.inputs)
        pts.update(last)
        return pts

    def _nonneg(self) -> dict[str, bool]:
        nn_: dict[str, bool] = {self.graph.input_name: False}
        for n in self.graph.nodes:
            if n.op == "input":
                continue
            opdef = float_op(n.op)
            if opdef.kind == "weighted" or n.op == "add":
                nn_[n.name] = n.act is not None and n.act[0] >= 0
            else:
                nn_[n.name] = opdef.nonneg(n, [nn_[i] for i in n.inputs])
        return nn_

    # ---- switches --------------------------------------------------------------------------------------------
    def set_quant(self, weights: bool, acts: bool) -> "QuantModel":
        for layer in self.layers.values():
            layer.wq.enabled = weights
        for q in self.act_quant.values():
            q.enabled = acts
        return self

    def enable_adaq(self) -> "QuantModel":
        """Turn AdaQTransform (xi, eta) on for every conv/linear layer."""
        for layer in self.layers.values():
            layer.enable_adaq()
        return self

    def set_observing(self, on: bool) -> None:
        for q in self.act_quant.values():
            q.observing = on

    # ---- execution -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_all: bool = False) -> Any:
        """The network output(s) in the model's own structure (a tensor, or a tuple / list / dict of tensors);
        ``return_all``: every tensor by name. Raises InputShapeError when ``x`` is not (N, *the traced input shape):
        the graph's shapes are those of the calibration images (a global mean became a fixed-window pool), so
        another size would run and be wrong."""
        g = self.graph
        self.check_input(x)
        env: dict[str, torch.Tensor] = {g.input_name: self.act_quant[_key(g.input_name)](x)}
        for n in g.nodes:
            if n.op == "input":
                continue
            env[n.name] = self._run_node(n, env)
        if return_all:
            return env
        return structure_outputs(g, [env[o] for o in g.output_names])

    def check_input(self, x: Any) -> None:
        """Raise InputShapeError (with a hint: batch axis, channels-last, another image size) unless ``x`` has shape
        (N, *the traced input shape); what :meth:`forward` checks first."""
        want = self.graph.input_shape
        shape = tuple(getattr(x, "shape", ()))
        if want is None or (len(shape) == len(want) + 1 and shape[1:] == tuple(want)):
            return
        hint = ""
        if shape == tuple(want):
            hint = "; add the batch dimension: x[None]"
        elif len(shape) == len(want) + 1 and len(want) == 3 and shape[1] == want[0]:
            hint = ("; its shapes (pool windows, the flatten) are the calibration images': quantize with images of "
                    "this size to run at it")
        elif len(want) == 3 and shape[1:] == (want[1], want[2], want[0]):
            hint = "; it looks channels-last (N, H, W, C): use x.permute(0, 3, 1, 2)"
        raise InputShapeError(f"the quantized model was traced for input (N, {', '.join(map(str, want))}), got "
                              f"{shape}{hint}")

    def _run_node(self, n: FloatNode, env: dict[str, torch.Tensor]) -> torch.Tensor:
        opdef = float_op(n.op)
        if opdef.kind == "weighted" and self.exact_weighted:
            y = self._integer_weighted(n, env)
            if y is not None:
                return y
        y = opdef.forward(self, n, env)
        if opdef.kind in ("weighted", "requant") and not opdef.quantizes_itself:
            if n.act is not None:
                y = act_clamp(y, n.act[0], n.act[1])
            y = self.act_quant[_key(n.name)](y)
            if opdef.kind == "requant":
                y = self._integer_requant(opdef, n, env, y)
        return y

    def _integer_requant(self, opdef: Any, n: FloatNode, env: dict[str, torch.Tensor], y: torch.Tensor
                         ) -> torch.Tensor:
        """``y`` (the float path of a requantizing op, through its output quantizer) with the values of the integer
        op (:meth:`ptq2tvm.ops.OpDef.integer_values`: the fold's dyadic multipliers, RHU, the clamp) and ``y``'s
        gradient. The float path alone rounds ``float32(s_i (q_i - z_i)) / s_out`` half to even, and calibration
        makes ``s_i / s_out`` a ratio of small integers whenever an op's output range has the max of one of its
        inputs (a concat always; an add where the other input is 0, an average pool of a saturated window): e.g. 17/14
        puts every code 7, 21, 35, ... on a half in real arithmetic, float32 lands on the half, the integer network
        (float32 scales, ratio 17/14 - 2e-8) just below it, 1 LSB apart on 0.6% of a concat's outputs."""
        q_out = self.act_quant[_key(n.name)]
        q_ins = [self.act_quantizer(i) for i in n.inputs]
        if not (q_out.enabled and all(q.enabled for q in q_ins)):
            return y                # a float input: only the float path is defined
        if any(q.drop_prob is not None and q.drop_prob < 1.0 for q in (q_out, *q_ins)):
            return y                # QDrop: elements passed through in float
        codes = [torch.round(env[i].detach() / q.scale.detach()).to(torch.int64) for i, q in zip(n.inputs, q_ins)]
        try:
            v = opdef.integer_values(n, codes, [float(q.scale.detach()) for q in q_ins], float(q_out.scale.detach()))
        except QuantConfigError:
            return y                # multipliers the fold refuses, naming the node
        if v is None:
            return y
        z = int(q_out.zero_point)
        lo, hi = q_out.grid_bounds(*n.act) if n.act else (0, q_out.qmax)
        exact = (torch.clamp(v + z, lo, hi) - z).to(y.dtype) * q_out.scale.detach()
        return y + (exact - y).detach()

    def _integer_weighted(self, n: FloatNode, env: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The integer network's output of conv/linear ``n`` (its fused residual add and clamp included), on the output
        grid, or None: the float path runs (:meth:`_run_node`).

        The float path (``F.conv2d`` of ``w_q s_w xi`` by ``x_q s_x`` in float32, then ``round(y / s_out)`` half to
        even) rounds values within float32 error of a .5 boundary the other way from the integer network (int32
        accumulator, 31-bit dyadic multiplier, half-up): with AdaQTransform's per-channel xi a W4A4 conv was 1 LSB off
        on ~1e-4 of its outputs and a squeeze-excitation gate spread it to 26 LSB at the network output. This is the
        integer op: the input codes ``q - z`` (zero padding of ``q - z`` is the integer network's ``z`` padding), an
        exact accumulation, the fold's own int32 bias and dyadic multipliers
        (``ptq2tvm.fold.fold.weighted_bias`` / ``weighted_multipliers``), RHU, the clamp. On the CPU the accumulation
        is float32 convolutions of the codes (exact: :func:`_f32_chunks`) and the requantization float32 with the few
        elements near a tie redone in int64 (:func:`_requant_f32`), so it costs about what the float path does; else
        float64 (exact below 2^53) and int64.

        Only when no gradient flows through the layer (``torch.no_grad()``, or nothing it reads requires one:
        evaluation, parity, fidelity, reconstruction's caches), and returned instead of the float path, so evaluation
        costs about what it did; with a gradient (reconstruction's iterations) the float path runs unchanged. None too
        when the integer form is undefined: weights or an activation unquantized, QDrop passing elements through in
        float, soft AdaRound weights, the output quantizer observing (calibration), multipliers the fold refuses."""
        layer = self.layer(n.name)
        wq = layer.wq
        q_in, q_out = self.act_quantizer(n.inputs[0]), self.act_quant[_key(n.name)]
        qs = [q_in, q_out] + ([self.act_quantizer(n.residual)] if n.residual else [])
        if not wq.enabled or (wq.alpha is not None and wq.soft) or q_out.observing:
            return None
        if not all(q.enabled and (q.drop_prob is None or q.drop_prob >= 1.0) for q in qs):
            return None
        x = env[n.inputs[0]]
        r = env[n.residual] if n.residual else None
        if torch.is_grad_enabled() and (x.requires_grad or (r is not None and r.requires_grad)
                                        or any(p.requires_grad for p in layer.parameters())
                                        or any(q.scale.requires_grad for q in qs)):
            return None
        s_in, s_out = float(q_in.scale.detach()), float(q_out.scale.detach())
        z_in = int(q_in.zero_point)
        s_res = res_vmax = None
        if r is not None:
            s_res, z_res = float(qs[2].scale.detach()), int(qs[2].zero_point)
            res_vmax = max(z_res, qs[2].qmax - z_res)
        try:
            c = layer.integer_constants(s_in, max(z_in, q_in.qmax - z_in), s_out, s_res, res_vmax or 0, n.name,
                                        x.device)
        except QuantConfigError:
            return None                 # the fold refuses this layer, naming it; evaluation keeps the float path
        codes = torch.div(x, s_in).round_()                                 # q - z_in
        r_codes = torch.div(r, s_res).round_() if r is not None else None  # q_r - z_r
        parts = _conv_f32_parts(codes, c, n.attrs) if n.op == "conv" else None
        if parts is not None and c.f32 is not None:
            q = _requant_f32(parts, c, r_codes)
        else:
            if parts is not None:           # the float32 error bound too wide (wide reductions: small outputs)
                acc = sum(p.to(torch.int64) for p in parts)
            elif n.op == "linear":
                acc = torch.round(F.linear(codes.double(), c.weight.double())).to(torch.int64)
            else:                           # exact below 2^53 (rounded in case an algorithm leaves a residue)
                a = n.attrs
                acc = torch.round(F.conv2d(codes.double(), c.weight.double(), None, a["stride"], a["padding"],
                                           a["dilation"], a["groups"])).to(torch.int64)
            q = _requant_int64(acc, c, r_codes)
        z = int(q_out.zero_point)
        lo, hi = q_out.grid_bounds(*n.act) if n.act else (0, q_out.qmax)
        return q.clamp_(lo - z, hi - z).to(x.dtype).mul_(q_out.scale.detach())

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save graph structure, config and all parameters to one file (atomic write)."""
        path = Path(path)
        blob = {
            "format": FAKEQUANT_FORMAT,
            "version": FAKEQUANT_VERSION,
            "ptq2tvm_version": __version__,
            "graph": graph_to_json(self.graph),
            "config": asdict(self.config),
            "state_dict": self.state_dict(),
            "act_enabled": {k: q.enabled for k, q in self.act_quant.items()},
            "adaq_layers": [k for k, layer in self.layers.items() if layer.adaq],
        }
        atomic_torch_save(blob, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantModel":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"fake-quant model file not found: {path}")
        try:  # tensors + JSON only: a crafted file cannot run code (pickled objects are refused)
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            code = pickled_code(e)
            if code:
                raise ArtifactError(f"{path}: refusing to load the fake-quant model: the file contains pickled Python "
                                    f"objects, which run code when loaded ({code})") from None
            raise ArtifactError(f"cannot read fake-quant model {path}: {type(e).__name__}: {e}") from e
        if not isinstance(blob, dict) or blob.get("format") != FAKEQUANT_FORMAT:
            raise ArtifactError(f"{path} is not a ptq2tvm fake-quant model")
        if blob.get("version") != FAKEQUANT_VERSION:
            raise ArtifactError(f"{path}: fake-quant format version {blob.get('version')} is not supported "
                                f"(expected {FAKEQUANT_VERSION})")
        sd = blob["state_dict"]
        graph = graph_from_json(blob["graph"], sd)
        config = dict(blob["config"])
        config.setdefault("first_layer_output_bits", None)  # saved before the field existed: the first output had a_bits
        model = cls(graph, QuantConfig(**config))
        for k in blob.get("adaq_layers", []):
            model.layers[k].enable_adaq()
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ArtifactError(f"{path}: parameters do not match the stored graph: {e}") from e
        for k, on in blob["act_enabled"].items():
            model.act_quant[k].enabled = on
        return model


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _unjson(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_unjson(x) for x in v)
    if v in ("inf", "-inf"):
        return float(v)
    return v


def graph_to_json(graph: FloatGraph) -> dict[str, Any]:
    nodes = [
        dict(name=n.name, op=n.op, inputs=n.inputs, attrs={k: _jsonable(v) for k, v in n.attrs.items()},
             act=_jsonable(n.act) if n.act else None, residual=n.residual)
        for n in graph.nodes
    ]
    return dict(nodes=nodes, input_name=graph.input_name, output_names=list(graph.output_names),
                output_structure=graph.output_structure, input_shape=list(graph.input_shape))


def graph_from_json(d: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> FloatGraph:
    nodes = []
    for nd in d["nodes"]:
        w = state_dict.get(f"layers.{_key(nd['name'])}.weight")
        b = state_dict.get(f"layers.{_key(nd['name'])}.bias")
        nodes.append(FloatNode(nd["name"], nd["op"], list(nd["inputs"]),
                               {k: _unjson(v) for k, v in nd["attrs"].items()}, w, b,
                               _unjson(nd["act"]) if nd["act"] else None, nd["residual"]))
    outputs = d["output_names"] if "output_names" in d else [d["output_name"]]
    return FloatGraph(nodes, d["input_name"], outputs, tuple(d["input_shape"]), d.get("output_structure"))


def structure_outputs(graph: FloatGraph, values: list[Any]) -> Any:
    """Arrange per-output ``values`` like the traced model returned them (one value, tuple, list or dict)."""
    return arrange_outputs(graph.output_structure, values)


def pickled_code(e: BaseException) -> str | None:
    """If ``torch.load(weights_only=True)`` failed because the file is a valid pickle that references code (a class
    or function, i.e. something that would run on unpickling), the global it names; else None (not a pickle)."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "can still be loaded" not in text:
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    return f"global {m.group(1)}" if m else "a global the safe loader does not allow"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a temporary file, then a rename). Saved through a file object, so
    the zip's records are named ``archive/...`` rather than after the temporary file: the same object gives the same
    bytes (and checksum in run.json) from run to run."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
