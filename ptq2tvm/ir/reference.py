"""The reference executor: numpy, exact integers. Its results define what every backend must compute.

Accumulations use float64 matrix products on integer values: every partial sum is an integer below 2^53 in magnitude
(|q_x| <= 255, |q_w| <= 128, K <= 2^20 terms), so they are exact; requantization is done in int64.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ArtifactError, InputShapeError
from .graph import IntegerGraph, IntNode

_EXACT_LIMIT = 1 << 53


def pad(x: np.ndarray, padding: list[int], value: int, padding_end: list[int] | None = None) -> np.ndarray:
    """Pad H and W of (N, C, H, W) by ``padding`` on both sides (plus ``padding_end`` at the bottom/right)."""
    ph, pw = padding
    eh, ew = padding_end or (0, 0)
    if ph == pw == eh == ew == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=value)


def windows(x: np.ndarray, kernel: list[int], stride: list[int], dilation: list[int]) -> np.ndarray:
    """(N, C, H, W) -> (N, C, OH, OW, kh, kw) view of the sliding windows."""
    kh, kw = kernel
    dh, dw = dilation
    win = sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dh, ::dw]


def requantize(terms: list[tuple[np.ndarray, np.ndarray]], shift: np.ndarray, zero_point: int, lo: int, hi: int
               ) -> np.ndarray:
    """q = clamp(zero_point + ((sum_k t_k * m_k) + 2^(n-1)) >> n, lo, hi), per channel (axis 1), as uint8."""
    ndim = terms[0][0].ndim
    bshape = (1, -1) + (1,) * (ndim - 2)
    v = np.zeros(terms[0][0].shape, dtype=np.int64)
    for t, m in terms:
        v += t.astype(np.int64) * m.astype(np.int64).reshape(bshape)
    n = shift.astype(np.int64).reshape(bshape)
    r = (v + (np.int64(1) << (n - 1))) >> n
    return np.clip(r + zero_point, lo, hi).astype(np.uint8)


def conv_accumulate(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, pad_value: int) -> np.ndarray:
    """int32-exact accumulator of a grouped conv over a zero-point-padded uint8 input."""
    n_, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    if cg * kh * kw * 255 * 128 >= _EXACT_LIMIT:
        raise ArtifactError("convolution too large for the exact float64 reference accumulation")
    win = windows(pad(x, padding, pad_value), [kh, kw], stride, dilation)
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n_, groups, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    win = win.reshape(groups, n_ * oh * ow, cg * kh * kw).astype(np.float64)
    wm = w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1).astype(np.float64)
    acc = np.matmul(win, wm).reshape(groups, n_, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(n_, o, oh, ow)
    return np.rint(acc).astype(np.int64) + bias.astype(np.int64).reshape(1, -1, 1, 1)


def check_int32(acc: np.ndarray, node: IntNode) -> np.ndarray:
    if acc.size and (acc.max() >= (1 << 31) or acc.min() < -(1 << 31)):
        raise ArtifactError(f"layer '{node.name}': int32 accumulator overflow")
    return acc


def run_node(node: IntNode, env: dict[str, np.ndarray]) -> np.ndarray:
    """Execute one integer node on uint8 inputs from ``env`` (the op's definition: ``ptq2tvm.ops``)."""
    from ..ops import IR_OPS

    opdef = IR_OPS.get(node.op)
    if opdef is None:
        raise ArtifactError(f"unknown op {node.op!r} at '{node.name}'")
    return opdef.reference(node, env)


def run_reference(graph: IntegerGraph, q_input: np.ndarray, return_all: bool = False
                  ) -> np.ndarray | list[np.ndarray] | dict[str, np.ndarray]:
    """Run the integer graph on a uint8 input batch (N, *input.shape): the output array (a list of arrays, in
    ``graph.output_names`` order, for a graph with several outputs; every tensor by name with ``return_all``)."""
    q_input = np.asarray(q_input)
    if q_input.dtype != np.uint8:
        raise InputShapeError(f"reference executor expects uint8 input, got {q_input.dtype}")
    if tuple(q_input.shape[1:]) != tuple(graph.input.shape):
        raise InputShapeError(f"input shape {tuple(q_input.shape[1:])} does not match the graph input "
                              f"{tuple(graph.input.shape)}")
    env = {graph.input.name: q_input}
    for node in graph.nodes:
        env[node.name] = run_node(node, env)
    if return_all:
        return env
    outs = [env[o] for o in graph.output_names]
    return outs[0] if len(outs) == 1 else outs
