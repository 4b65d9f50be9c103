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
    q_w = layer.wq.integer(w).detach().double().numpy().reshape(w.shape[0], -1).astype(np.int64)
    b = layer.bias.detach().double().numpy()
    acc = layer.wq.scale.detach().double().numpy() * s_in
    if getattr(layer, "adaq", False):
        xi = layer.xi.detach().double().numpy()
        b = b + layer.eta.detach().double().numpy()
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
    residual sum that cancels) while its inputs' did not, so ``s_in / s_out`` is ~1e9. The multiplier bound used is
    generic: max over the node's data inputs of ``s_in / s_out`` (times ``max_c |xi_c| s_w,c`` for conv / linear).
    Raising ``s_out`` (zero point kept, so the observed range stays covered) changes nothing on the calibration
    data: the tensor is (nearly) constant there. Returns the tensors changed (and warns naming them)."""
    changed = []
    for n in qm.graph.nodes:
        key = n.name.replace(".", "__")
        if n.op == "input" or key not in qm.act_quant:
            continue
        q_out = qm.act_quant[key]
        s_out = float(q_out.scale.detach())
        m = 0.0
        for i in n.data_inputs:
            s_i = float(qm.act_quantizer(i).scale.detach())
            if n.op in ("conv", "linear") and i == n.inputs[0] and qm.layer(n.name).wq.enabled:
                layer = qm.layer(n.name)
                w = layer.wq.scale.detach().double()
                if getattr(layer, "adaq", False):
                    w = w * layer.xi.detach().double().abs()
                s_i *= float(w.max())
            m = max(m, s_i / s_out)
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
            grow = torch.from_numpy(np.where(bad, need * (1.0 + 1e-6), 1.0)).to(scale.dtype)
            scale.data.mul_(grow)
        if changed.any():
            q_w, _, _ = layer_integers(qm, name)
            idx = np.nonzero(changed)[0]
            factor = float((scale.detach().double() / old).max())
            fits.append(LayerFit(name, idx.tolist(), factor, int((np.abs(q_w[idx]).sum(axis=1) == 0).sum())))
    if fits and warn:
        warnings.warn("int32 accumulator bound: raised the weight scale of " + "; ".join(
            f"layer '{f.layer}' channel(s) {f.channels[:8]}{'...' if len(f.channels) > 8 else ''} (x{f.factor:.3g}"
            f"{f', {f.zero_weight_channels} all-zero weight channel(s) with a bias' if f.zero_weight_channels else ''})"
            for f in fits), RuntimeWarning, stacklevel=2)
    return fits
