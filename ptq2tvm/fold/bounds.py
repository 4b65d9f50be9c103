"""Static int32 bounds of the conv/dense accumulators, and the per-channel weight-scale floor that makes them hold.

A conv/dense output channel c accumulates, in int32 (docs/integer_arithmetic.md),

    acc_c = bias_c + sum_k q_x,k * q_w,c,k        q_x in [0, qmax_in] (uint8 codes; padding is z_x <= qmax_in)

with ``bias_c = round(b_c / (|xi_c| s_w,c s_x)) - z_x sum_k q_w,c,k``. Every partial sum a kernel can form (the bias
added first or last, any subset of the products) lies in

    [min(bias_c, 0) + qmax_in * sum_k min(q_w,c,k, 0),  max(bias_c, 0) + qmax_in * sum_k max(q_w,c,k, 0)]

(:func:`accumulator_range`). The fold proves this interval inside [-2^31, 2^31 - 1] for every channel, or refuses
the layer naming the channel and the bound (:func:`check_accumulator`), so no input can overflow an accumulator.

How a model is made to satisfy it (:func:`fit_integer_bounds`, run at the end of calibration and of reconstruction):
the weight scale s_w,c of a channel that would overflow is raised just enough that it fits (every term of the
interval scales like 1 / s_w,c). This is done in the weight quantizer itself, so the fake-quant model computes the
same coarser weights and the same bias grid as the integer network. Two cases, one rule:

- a channel whose weights are all (or nearly) zero but whose bias is not (pruned channels, BN with gamma = 0, a
  learned AdaQTransform eta on such a channel): the calibrated s_w,c is ~1e-13 and b / (s_w,c s_x) is ~1e15; the
  floor puts the bias on a grid of |b| / 2^31 (relative precision 5e-10), the weights stay zero: a constant, exact;
- a channel with many large weights on a wide input grid (Conv2d(1400, 4, 7), every code +127, 8-bit input:
  68,600 * 255 * 127 > 2^31): its weights move to a slightly coarser grid (codes ~122 instead of 127).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import QuantConfigError
from ..ops import float_op

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
#: fit_integer_bounds aims this far inside int32, so that float64 rounding of the bias can never tip it over.
FIT_LIMIT = INT32_MAX - (1 << 12)


def accumulator_range(q_w: np.ndarray, bias: np.ndarray, qmax_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (lo, hi) of every partial sum of ``bias_c + sum_k q_x,k q_w,c,k`` over q_x in
    [0, qmax_in]. ``q_w``: (C, ...) integer weights, ``bias``: (C,) integer bias. int64 (exact) arrays."""
    w = np.asarray(q_w, dtype=np.int64).reshape(len(bias), -1)
    b = np.asarray(bias, dtype=np.int64)
    pos = np.where(w > 0, w, 0).sum(axis=1)
    neg = np.where(w < 0, w, 0).sum(axis=1)
    return np.minimum(b, 0) + qmax_in * neg, np.maximum(b, 0) + qmax_in * pos


def check_accumulator(layer: str, q_w: np.ndarray, bias: np.ndarray, qmax_in: int) -> tuple[int, int]:
    """Prove the int32 accumulator bound of ``layer`` (see the module docstring); returns the network-wide (lo, hi).

    Raises :class:`QuantConfigError` naming the layer, the first offending output channel and its bound."""
    lo, hi = accumulator_range(q_w, bias, qmax_in)
    bad = np.nonzero((lo < INT32_MIN) | (hi > INT32_MAX))[0]
    if bad.size:
        c = int(bad[0])
        k = int(np.asarray(q_w).reshape(len(bias), -1).shape[1])
        raise QuantConfigError(
            f"layer '{layer}': the int32 accumulator of output channel {c} can reach "
            f"[{int(lo[c]):.4g}, {int(hi[c]):.4g}] (bias {int(bias[c])} + up to {qmax_in} x {k} weights), outside "
            f"int32 [-2^31, 2^31-1] ({bad.size} channel(s)); ptq2tvm.fold.bounds.fit_integer_bounds(model) raises "
            f"those channels' weight scales so it fits (calibration and reconstruction run it)")
    return int(lo.min(initial=0)), int(hi.max(initial=0))


@dataclass
class LayerFit:
    """What :func:`fit_integer_bounds` changed in one layer."""

    layer: str
    channels: list[int]
    factor: float          # the largest s_w,c increase (new / old)
    zero_weight_channels: int


def _input_quantizer(qm, name: str):
    n = qm.graph.node(name)
    return qm.act_quantizer(n.inputs[0])


@torch.no_grad()
def layer_integers(qm, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(q_w (C, K) int64, bias (C,) int64, qmax_in) of layer ``name`` as the fold computes them (AdaQTransform eta in
    the bias, |xi| in the accumulator scale, weights negated where xi < 0)."""
    layer = qm.layer(name)
    q_in = _input_quantizer(qm, name)
    s_in, z_in = float(q_in.scale.detach()), int(q_in.zero_point)
    w = layer.weight.detach()
    q_w = layer.wq.integer(w).detach().double().cpu().numpy().reshape(w.shape[0], -1).astype(np.int64)
    b = layer.bias.detach().double().cpu().numpy()
    acc = layer.wq.scale.detach().double().cpu().numpy() * s_in
    if getattr(layer, "adaq", False):
        xi = layer.xi.detach().double().cpu().numpy()
        b = b + layer.eta.detach().double().cpu().numpy()
        acc = acc * np.abs(xi)
        q_w = np.where((xi < 0)[:, None], -q_w, q_w)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(acc > 0, b / acc, np.inf)
    ratio = np.where(np.isfinite(ratio), ratio, np.sign(b) * 1e300)
    bias = np.clip(np.rint(ratio), -1e18, 1e18).astype(np.int64) - z_in * q_w.sum(axis=1)
    return q_w, bias, q_in.qmax


#: the largest requantization multiplier the fit leaves (dyadic_multipliers accepts up to 2^30)
MAX_MULTIPLIER = float(1 << 29)


@torch.no_grad()
def fit_requant_scales(qm, warn: bool = True) -> list[str]:
    """Raise the scale of every quantized tensor whose requantization multipliers would exceed 2^29 (the dyadic
    form allows < 2^30): the tensor's range collapsed (a ReLU output that is 0 on every calibration image, a
    residual sum that cancels) while its inputs' did not, so ``s_in / s_out`` is ~1e9. The multiplier is the op's
    own (:meth:`ptq2tvm.ops.OpDef.multiplier_numerator` / s_out): by default the largest data-input scale over
    ``s_out`` (conv / linear: that input's scale times ``max_c |xi_c| s_w,c``), for ``mul`` the product
    ``s_a s_b / s_out`` (the larger input scale alone under-estimated it: two ReLU branches of opposite sign, each
    with a range of ~1e3, have a product that is 0 on every image, and the fit left 2.5e9 > 2^30).
    Raising ``s_out`` (zero point kept, so the observed range stays covered) changes nothing on the calibration
    data: the tensor is (nearly) constant there. Returns the tensors changed (and warns naming them)."""
    changed = []
    for n in qm.graph.nodes:
        key = n.name.replace(".", "__")
        if n.op == "input" or key not in qm.act_quant:
            continue
        q_out = qm.act_quant[key]
        s_out = float(q_out.scale.detach())
        scales = []
        for i in n.data_inputs:
            s_i = float(qm.act_quantizer(i).scale.detach())
            if n.op in ("conv", "linear") and i == n.inputs[0] and qm.layer(n.name).wq.enabled:
                layer = qm.layer(n.name)
                w = layer.wq.scale.detach().double()
                if getattr(layer, "adaq", False):
                    w = w * layer.xi.detach().double().abs()
                s_i *= float(w.max())
            scales.append(s_i)
        m = float_op(n.op).multiplier_numerator(n, scales) / s_out
        if m > MAX_MULTIPLIER:
            q_out.scale.data.mul_(m / MAX_MULTIPLIER * (1 + 1e-6))
            changed.append(f"'{n.name}' (multiplier {m:.3g}, scale {s_out:.3g} -> {float(q_out.scale):.3g})")
    if changed and warn:
        warnings.warn("requantization: raised the scale of the (nearly constant) tensor(s) " + ", ".join(changed),
                      RuntimeWarning, stacklevel=2)
    return changed


@torch.no_grad()
def fit_integer_bounds(qm, max_rounds: int = 12, warn: bool = True) -> list[LayerFit]:
    """Make ``qm`` foldable without overflow: :func:`fit_requant_scales`, then raise the per-channel weight scale of
    every conv/linear channel whose int32 accumulator could overflow (see the module docstring) until
    :func:`check_accumulator` holds, then the requant scales once more (a raised weight scale raises a multiplier).
    Changes ``qm`` in place (activation and weight quantizers' ``scale``); the fake-quant model then computes what
    the integer graph will. Returns the weight fits (and warns naming the layers / tensors, unless ``warn=False``)."""
    fit_requant_scales(qm, warn)
    fits = _fit_weights(qm, max_rounds, warn)
    fit_requant_scales(qm, warn)
    return fits


def _bias_limit(qm, name: str) -> float:
    """The largest |round(b / acc_scale)| worth keeping for layer ``name``. With a fused residual the two requant
    terms share one shift, set by the larger multiplier: the conv term's mantissa then has only
    ~31 - log2(M_res / M_conv) bits, and its rounding error is about |acc| * M_res * 2^-32 output LSBs. A constant
    channel whose bias sits near 2^31 (M_conv tiny) was 2-4 LSB off (found by the fuzzer); keeping
    |bias| <= 2^27 / M_res bounds that error by 1/32 LSB. Without a residual the mantissa has all 31 bits."""
    n = qm.graph.node(name)
    if not n.residual:
        return float(FIT_LIMIT)
    key = name.replace(".", "__")
    m_res = float(qm.act_quantizer(n.residual).scale.detach()) / float(qm.act_quant[key].scale.detach())
    return float(min(FIT_LIMIT, (1 << 27) / max(m_res, 1e-30)))


_ZERO_WEIGHTS = (", {n} channel(s) with all-zero integer weights: they output their bias alone (zero weights, or "
                 "weights that round to 0 at the raised scale: typical of an input that is (nearly) constant on the "
                 "calibration images)")


def _fit_weights(qm, max_rounds: int, warn: bool) -> list[LayerFit]:
    fits: list[LayerFit] = []
    for key, layer in qm.layers.items():
        name = next(n.name for n in qm.graph.nodes if n.name.replace(".", "__") == key)
        if not layer.wq.enabled:
            continue
        scale = layer.wq.scale
        old = scale.detach().double().clone()
        changed = np.zeros(scale.numel(), dtype=bool)
        bias_limit = _bias_limit(qm, name)
        for _ in range(max_rounds):
            q_w, bias, qmax_in = layer_integers(qm, name)
            lo, hi = accumulator_range(q_w, bias, qmax_in)
            const = np.abs(bias + qm.act_quantizer(qm.graph.node(name).inputs[0]).zero_point.item()
                           * q_w.sum(axis=1))
            need = np.maximum(np.maximum(hi / FIT_LIMIT, lo / -FIT_LIMIT), const / bias_limit)
            bad = need > 1.0
            if not bad.any():
                break
            changed |= bad
            grow = torch.from_numpy(np.where(bad, need * (1.0 + 1e-6), 1.0)).to(scale.device, scale.dtype)
            scale.data.mul_(grow)
        if changed.any():
            q_w, _, _ = layer_integers(qm, name)
            idx = np.nonzero(changed)[0]
            factor = float((scale.detach().double() / old).max())
            fits.append(LayerFit(name, idx.tolist(), factor, int((np.abs(q_w[idx]).sum(axis=1) == 0).sum())))
    if fits and warn:
        warnings.warn("int32 accumulator bound: raised the weight scale of " + "; ".join(
            f"layer '{f.layer}' channel(s) {f.channels[:8]}{'...' if len(f.channels) > 8 else ''} (x{f.factor:.3g}"
            f"{_ZERO_WEIGHTS.format(n=f.zero_weight_channels) if f.zero_weight_channels else ''})"
            for f in fits), RuntimeWarning, stacklevel=2)
    return fits


# ---- every integer op of a graph --------------------------------------------------------------------------------
#: an int64 requantization value (sum of terms, plus the rounding 2^(n-1)) must stay below this
INT64_LIMIT = 1 << 63


def _span(t) -> int:
    """max |q - z| over the codes q in [0, qmax] of QTensor ``t``."""
    return max(int(t.zero_point), t.qmax - int(t.zero_point))


def _int64(node, what: str, terms: list[tuple[int, np.ndarray]], shift: np.ndarray) -> int:
    """Prove sum_k |t_k| * m_k + 2^(n-1) < 2^63 per channel for the requantization of ``node``."""
    total = np.zeros(np.asarray(shift).shape, dtype=object)
    for t, m in terms:
        total = total + int(t) * np.abs(np.asarray(m, dtype=np.int64)).astype(object)
    total = total + (np.ones_like(total) << (np.asarray(shift, dtype=np.int64).astype(object) - 1))
    worst = int(np.max(total)) if np.size(total) else 0
    if worst >= INT64_LIMIT:
        raise QuantConfigError(f"{node.op} '{node.name}': the int64 requantization of {what} can reach {worst:.4g} "
                               f">= 2^63")
    return worst


def _check_input_zero_point(node, tin) -> None:
    """A conv's / pool's padding value (its input zero point) is a code of its input: in [0, qmax_in], like every
    code the bounds below assume (the kernels pad with it; a lifted epilogue's proof bounds the accumulator over
    codes in that range)."""
    z = node.attrs.get("input_zero_point")
    if z is not None and not 0 <= int(z) <= tin.qmax:
        raise QuantConfigError(f"{node.op} '{node.name}': input zero point {int(z)} (its padding value) is outside "
                               f"its input's {tin.bits}-bit grid [0, {tin.qmax}]")


def _bound_weighted(node, tensors) -> dict:
    tin = tensors[node.inputs[0]]
    _check_input_zero_point(node, tin)
    lo, hi = check_accumulator(node.name, node.arrays["weight"], node.arrays["bias"], tin.qmax)
    terms = [(max(-lo, hi), node.arrays["multiplier"])]
    if len(node.inputs) > 1:
        tr = tensors[node.inputs[1]]
        terms.append((_span(tr), node.arrays["residual_multiplier"]))
    return dict(int32=(lo, hi), int64=_int64(node, "the accumulator", terms, node.arrays["shift"]))


def _bound_add(node, tensors) -> dict:
    ta, tb = (tensors[i] for i in node.inputs)
    terms = [(_span(ta), node.arrays["multiplier_a"]), (_span(tb), node.arrays["multiplier_b"])]
    return dict(int64=_int64(node, "the two inputs", terms, node.arrays["shift"]))


def _bound_mul(node, tensors) -> dict:
    """(q_a - z_a)(q_b - z_b) is formed in int32 by every kernel, then times the mantissa in int64."""
    ta, tb = (tensors[i] for i in node.inputs)
    prod = _span(ta) * _span(tb)
    if prod > INT32_MAX:
        raise QuantConfigError(f"mul '{node.name}': the int32 product of the two inputs' codes can reach {prod} "
                               f"(|q_a - z_a| <= {_span(ta)}, |q_b - z_b| <= {_span(tb)}), outside int32")
    return dict(int32=(-prod, prod), int64=_int64(node, "the product", [(prod, node.arrays["multiplier"])],
                                                  node.arrays["shift"]))


def _bound_avgpool(node, tensors) -> dict:
    """The window sum sum(q_pad) (q_pad in [0, qmax_in], padding z_in) is formed in int32, then z_in * KH * KW is
    subtracted and the result multiplied in int64."""
    tin = tensors[node.inputs[0]]
    _check_input_zero_point(node, tin)
    kh, kw = node.attrs["kernel"]
    window = int(kh) * int(kw)
    total = window * tin.qmax
    if total > INT32_MAX:
        raise QuantConfigError(
            f"avgpool '{node.name}': the int32 window sum of a {kh}x{kw} window ({window} codes of up to {tin.qmax}) "
            f"can reach {total}, outside int32; the largest window at {tin.bits}-bit input is "
            f"{INT32_MAX // tin.qmax} elements: pool in two steps (e.g. AvgPool2d(k) then AdaptiveAvgPool2d) or "
            f"give the input fewer bits")
    return dict(int32=(0, total), int64=_int64(node, "the window sum", [(window * _span(tin), node.arrays["multiplier"])],
                                               node.arrays["shift"]))


def _bound_concat(node, tensors) -> dict:
    worst = 0
    for i, name in enumerate(node.inputs):
        t = tensors[name]
        worst = max(worst, _int64(node, f"input '{name}'", [(_span(t), np.array([node.arrays["multiplier"][i]]))],
                                  np.array([node.arrays["shift"][i]])))
    return dict(int64=worst)


def _bound_lut(node, tensors) -> dict:
    """Every input code indexes the table: codes lie in [0, qmax_in] (each producer clamps to its tensor's qmax), so
    the table needs qmax_in + 1 entries; and every entry it can return is an output code: inside the node's clamp
    [lo, hi] (else [0, qmax_out]), which the consumers' bounds assume (a table writing 255 into a 4-bit tensor
    broke a lifted epilogue downstream)."""
    tin = tensors[node.inputs[0]]
    table = np.asarray(node.arrays["table"])
    size = int(table.size)
    if tin.qmax >= size:
        raise QuantConfigError(
            f"lut '{node.name}': its input '{node.inputs[0]}' has {tin.bits}-bit codes (up to {tin.qmax}) but the "
            f"table has {size} entries; the table must be built on the input's grid (ptq2tvm.ops.lut_table with "
            f"bits_in = {tin.bits})")
    lo, hi = int(node.attrs.get("lo", 0)), int(node.attrs.get("hi", node.out.qmax))
    used = table.reshape(-1)[: tin.qmax + 1].astype(np.int64)
    if used.size and not (lo <= int(used.min()) and int(used.max()) <= hi):
        raise QuantConfigError(
            f"lut '{node.name}': its table holds codes {int(used.min())}..{int(used.max())}, outside its output "
            f"range [{lo}, {hi}] ({node.out.bits}-bit tensor '{node.out.name}')")
    return dict(index=(0, tin.qmax))


#: integer op -> its bound rule; every op that computes (kind weighted / requant) needs one (tests/test_fuzz.py
#: checks this against the registry), ops that only move codes (kind grid) need none
BOUND_RULES = {"conv2d": _bound_weighted, "dense": _bound_weighted, "add": _bound_add, "mul": _bound_mul,
               "avgpool2d": _bound_avgpool, "concat": _bound_concat, "lut": _bound_lut}


def check_graph_bounds(graph) -> dict[str, dict]:
    """Prove, for every node of an :class:`~ptq2tvm.ir.graph.IntegerGraph`, that no input can leave the integer
    ranges its kernels compute in (docs/integer_arithmetic.md, "No overflow, proven at fold time"):

    - every tensor's codes lie in [0, qmax] of its QTensor: each node's clamp ``[lo, hi]`` is inside it, and an op
      that moves codes (kind ``grid``) has an output grid at least as wide as its input's;
    - conv2d / dense: the int32 accumulator (:func:`check_accumulator`), and the int64 requantization
      ``|acc| * m + |q_r - z_r| * m_r + 2^(n-1) < 2^63``;
    - mul: the int32 product ``|q_a - z_a| * |q_b - z_b|`` and its int64 requantization;
    - avgpool2d: the int32 window sum ``KH * KW * qmax_in`` (a refusal names the largest window) and int64;
    - add, concat: the int64 requantization of each input;
    - lut: every input code is an index inside the table (``qmax_in < len(table)``), every entry read an output code;
    - conv2d / dense / avgpool2d: the input zero point (the padding value) is an input code.

    Returns {node name: the bounds proven}. Raises :class:`QuantConfigError` naming the node, the quantity and its
    bound."""
    from ..ops import IR_OPS

    tensors = {graph.input.name: graph.input, **{n.name: n.out for n in graph.nodes}}
    proven: dict[str, dict] = {}
    for node in graph.nodes:
        hi = node.attrs.get("hi")
        if hi is not None and not 0 <= int(node.attrs.get("lo", 0)) <= int(hi) <= node.out.qmax:
            raise QuantConfigError(f"{node.op} '{node.name}': output clamp [{node.attrs.get('lo', 0)}, {hi}] is not "
                                   f"inside the {node.out.bits}-bit grid [0, {node.out.qmax}]")
        rule = BOUND_RULES.get(node.op)
        if rule is not None:
            proven[node.name] = rule(node, tensors)
        elif getattr(IR_OPS.get(node.op), "kind", "grid") == "grid":
            wide = max((tensors[i].qmax for i in node.inputs), default=0)
            if wide > node.out.qmax:
                raise QuantConfigError(f"{node.op} '{node.name}': moves codes up to {wide} onto a {node.out.bits}-bit "
                                       f"grid")
            proven[node.name] = dict(codes=(0, wide))
    return proven
