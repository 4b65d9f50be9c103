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


def _pad(x: np.ndarray, padding: list[int], value: int) -> np.ndarray:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x: np.ndarray, kernel: list[int], stride: list[int], dilation: list[int]) -> np.ndarray:
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
    win = _windows(_pad(x, padding, pad_value), [kh, kw], stride, dilation)
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n_, groups, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    win = win.reshape(groups, n_ * oh * ow, cg * kh * kw).astype(np.float64)
    wm = w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1).astype(np.float64)
    acc = np.matmul(win, wm).reshape(groups, n_, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(n_, o, oh, ow)
    return np.rint(acc).astype(np.int64) + bias.astype(np.int64).reshape(1, -1, 1, 1)


def _check_int32(acc: np.ndarray, node: IntNode) -> np.ndarray:
    if acc.size and (acc.max() >= (1 << 31) or acc.min() < -(1 << 31)):
        raise ArtifactError(f"layer '{node.name}': int32 accumulator overflow")
    return acc


def run_node(node: IntNode, env: dict[str, np.ndarray]) -> np.ndarray:
    """Execute one integer node on uint8 inputs from ``env``."""
    a, arr = node.attrs, node.arrays
    x = env[node.inputs[0]]
    if node.op in ("conv2d", "dense"):
        if node.op == "conv2d":
            acc = conv_accumulate(x, arr["weight"], arr["bias"], a["stride"], a["padding"], a["dilation"],
                                  a["groups"], a["input_zero_point"])
        else:
            acc = np.rint(x.astype(np.float64) @ arr["weight"].astype(np.float64).T).astype(np.int64)
            acc += arr["bias"].astype(np.int64)[None, :]
        terms = [(_check_int32(acc, node), arr["multiplier"])]
        if len(node.inputs) > 1:
            r = env[node.inputs[1]].astype(np.int64) - a["residual_zero_point"]
            terms.append((r, arr["residual_multiplier"]))
        return requantize(terms, arr["shift"], a["output_zero_point"], a["lo"], a["hi"])
    if node.op == "add":
        za, zb = a["zero_points"]
        b = env[node.inputs[1]]
        terms = [(x.astype(np.int64) - za, arr["multiplier_a"]), (b.astype(np.int64) - zb, arr["multiplier_b"])]
        return requantize(terms, arr["shift"], a["output_zero_point"], a["lo"], a["hi"])
    if node.op == "avgpool2d":
        z = a["input_zero_point"]
        win = _windows(_pad(x, a["padding"], z), a["kernel"], a["stride"], [1, 1])
        acc = win.astype(np.int64).sum(axis=(4, 5)) - z * a["kernel"][0] * a["kernel"][1]
        return requantize([(acc, arr["multiplier"])], arr["shift"], a["output_zero_point"], a["lo"], a["hi"])
    if node.op == "maxpool2d":
        win = _windows(_pad(x, a["padding"], 0), a["kernel"], a["stride"], a["dilation"])
        return win.max(axis=(4, 5))
    if node.op == "flatten":
        return x.reshape(x.shape[0], -1)
    if node.op == "clamp":
        return np.clip(x, a["lo"], a["hi"]).astype(np.uint8)
    raise ArtifactError(f"unknown op {node.op!r} at '{node.name}'")


def run_reference(graph: IntegerGraph, q_input: np.ndarray, return_all: bool = False
                  ) -> np.ndarray | dict[str, np.ndarray]:
    """Run the integer graph on a uint8 input batch (N, *input.shape)."""
    q_input = np.asarray(q_input)
    if q_input.dtype != np.uint8:
        raise InputShapeError(f"reference executor expects uint8 input, got {q_input.dtype}")
    if tuple(q_input.shape[1:]) != tuple(graph.input.shape):
        raise InputShapeError(f"input shape {tuple(q_input.shape[1:])} does not match the graph input "
                              f"{tuple(graph.input.shape)}")
    env = {graph.input.name: q_input}
    for node in graph.nodes:
        env[node.name] = run_node(node, env)
    return env if return_all else env[graph.output_name]
