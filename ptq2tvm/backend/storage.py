"""How the x86 kernels store <= 4-bit conv / dense weights: packed (two per byte, four at 2 bits), or one per byte
where unpacking would cost more than it saves (issue 12: W4A4 no slower than W8A8). No TVM import: the CLI reads the
choices when it builds its parser."""

from __future__ import annotations

import numpy as np

from ..ir.graph import IntegerGraph, IntNode

#: a <= 4-bit conv / dense whose weights meet fewer output pixels per call than this (batch x OH x OW, more than
#: one) keeps them one per byte in an x86 build: unpacking costs ~2 vpdpbusd steps per 64-weight vector (one
#: vgf2p8affineqb and a 64-byte store, kernels/schedule.py UNPACK_STEPS), against one step per pixel. Zen 4, 2
#: threads, standalone kernels interleaved with their int8 build (session 31, scratch i4.py): 1x1 convs at 4x4 (16
#: pixels) 1.05-1.16x the int8 time, 96 -> 16 at 7x7 1.07x, 3x3 64 -> 64 at 28x28 1.005x, 128 -> 128 at 14x14 1.01x;
#: in the network (benchmarks/bits_ab.py, 28x28 MobileNetV2 W4A4 / W8A8) 1.041x with every layer packed, 1.008x
#: with the rule at 64 pixels. Raised to 256 (14x14 outputs at batch 1) in session 32, W4A4 against W8A8 kernel by
#: kernel, interleaved (scratch i4ab3.py, 64 / 256 / 1024): resnet_small's 3x3 convs at 14x14 1.04x -> 1.005-1.013x
#: (network 1.030 -> 1.009x), MobileNetV2's 14x14 1x1 expands 64 -> 384 1.41-1.57x -> 1.02-1.03x (kernel sum 1.062
#: -> 1.026x); 1024 (28x28 outputs too) gained 0.006x more on resnet_small and nothing on MobileNetV2, for a larger
#: file.
INT8_STORAGE_MAX_PIXELS = 256
#: ... and whose int8 weights are at most this many bytes: larger weights are not cache-resident from one call to
#: the next in a network, where reading half the bytes pays for the unpack (MobileNetV3-Large / EfficientNet-B0
#: W4A4 0.99x their W8A8 at batch 1 with the kernels 1.01-1.05x slower one by one with warm weights,
#: benchmarks/results/bits_ab_zoo_b1_zen4_after.md); the file grows by at most half this per layer.
INT8_STORAGE_MAX_BYTES = 64 * 1024
#: ``subbyte_storage`` of the x86 builds: "auto" (:func:`keeps_int8_storage` decides per layer) or "packed" (every
#: <= 4-bit conv / dense two per byte, or four where the build packs 2-bit weights: the smallest file)
SUBBYTE_STORAGES = ("auto", "packed")


def check_subbyte_storage(subbyte_storage: str) -> str:
    """``subbyte_storage`` if it is one of :data:`SUBBYTE_STORAGES`, else ValueError naming the choices."""
    if subbyte_storage not in SUBBYTE_STORAGES:
        raise ValueError(f"subbyte_storage must be one of {', '.join(SUBBYTE_STORAGES)}, got {subbyte_storage!r}")
    return subbyte_storage


def graph_subbyte_storage(graph: IntegerGraph) -> str:
    """The storage a graph asks for when the caller names none: ``graph.meta["subbyte_storage"]`` ("packed" for a
    mixed-precision plan, whose size and latency model assumes packed sub-byte weights), else "auto"."""
    return str(graph.meta.get("subbyte_storage") or "auto")


def int4_weights(node: IntNode) -> bool:
    """Whether a layer's weights are <= 4-bit values in [-8, 7]: what the x86 and CUDA kernels can store two (or
    four) per byte. No weight -> False."""
    w = node.arrays.get("weight")
    return w is not None and int(node.attrs.get("w_bits", 8)) <= 4 and int(w.min(initial=0)) >= -8 \
        and int(w.max(initial=0)) <= 7


def is_depthwise(node: IntNode) -> bool:
    """A conv with one input channel per group and several groups: its weights stay one per byte in every build."""
    w = node.arrays.get("weight")
    return node.op == "conv2d" and w is not None and int(node.attrs.get("groups", 1)) > 1 and int(w.shape[1]) == 1


def keeps_int8_storage(node: IntNode, batch: int, cuda: bool = False, subbyte_storage: str = "auto") -> bool:
    """Whether an x86 build stores this <= 4-bit conv / dense layer's weights one per byte (int8 values in [-8, 7])
    instead of two (or four) per byte: its weights meet 2..:data:`INT8_STORAGE_MAX_PIXELS` - 1 output pixels per
    call (``batch`` x the output's spatial size) and take at most :data:`INT8_STORAGE_MAX_BYTES` as int8, so that
    unpacking them would cost more than it saves. A layer with one output pixel per call (squeeze-excitation convs
    and classifiers at batch 1) keeps packed weights: unpacked right before each ``vpdpbusd`` it reads half the
    bytes and runs 0.74-0.85x its int8 kernel (:func:`kernels.schedule.default_unpack_at`). The same integers
    either way; CUDA builds and ``subbyte_storage="packed"`` always pack."""
    if check_subbyte_storage(subbyte_storage) == "packed" or cuda or node.op not in ("conv2d", "dense") \
            or not int4_weights(node) or is_depthwise(node):   # depthwise: one byte per weight anyway
        return False
    w = node.arrays["weight"]
    pixels = int(batch) * int(np.prod(node.out.shape[1:], dtype=np.int64))
    return 1 < pixels < INT8_STORAGE_MAX_PIXELS and int(w.size) <= INT8_STORAGE_MAX_BYTES


__all__ = ["INT8_STORAGE_MAX_BYTES", "INT8_STORAGE_MAX_PIXELS", "SUBBYTE_STORAGES", "check_subbyte_storage",
           "graph_subbyte_storage", "int4_weights", "is_depthwise", "keeps_int8_storage"]
