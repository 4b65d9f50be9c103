"""Data movement on integer codes (no arithmetic, the output keeps the input's grid): flatten, nearest upsampling by
integer factors, PixelShuffle / PixelUnshuffle, channel shuffle, channel slices (``chunk`` / ``split`` / ``x[:, a:b]``).

Integer contracts: the float op applied to the uint8 codes (``numpy`` in :meth:`reference`): exact by construction,
since moving a value does not change its scale or zero point.

Channel shuffle is recognised from its usual spelling ``x.view(N, g, C // g, H, W).transpose(1, 2).contiguous()
.view(N, C, H, W)`` (ShuffleNet): the tracer records the 5-D steps as trace-only nodes and
:func:`collapse_channel_shuffles` turns each complete pattern into one ``channel_shuffle``; any other reshape to or
from 5-D is refused.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpDef, Unsupported, register
from .common import FLAT, NCHWC, arg, known_value


def _float_node(*a: Any, **k: Any):
    from ..frontend.graph import FloatNode

    return FloatNode(*a, **k)


class _Grid(OpDef):
    """A grid-preserving op: fold copies the input's quantization parameters."""

    kind = "grid"

    def fold(self, f: Any, n: Any):
        return f.grid_node(n, self.ir_op, {k: list(v) if isinstance(v, tuple) else v for k, v in n.attrs.items()})


@register
class Flatten(_Grid):
    op = ir_op = "flatten"
    modules = (nn.Flatten,)
    functions = (torch.flatten,)
    methods = ("flatten",)
    summary = "Flatten / torch.flatten(x, 1), view/reshape to (N, -1)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        if module is not None:
            start, end = module.start_dim, module.end_dim
        else:
            start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
        rank = len(b.shape(node.args[0]))
        start, end = start % rank, end % rank
        if rank == 5 and (start, end) == (1, 2):
            b.add(_float_node(name, "merge_groups", [b.inp(node)]))
            return
        if start != 1 or end != rank - 1:
            raise Unsupported(f"flatten(start_dim={start}, end_dim={end}) of a {rank}-D tensor "
                              "(only start_dim=1, end_dim=-1)")
        b.add(_float_node(name, "flatten", [b.inp(node)]))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.flatten(env[n.inputs[0]], 1)

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        x = env[node.inputs[0]]
        return x.reshape(x.shape[0], -1)

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.flatten, e.x(0))

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        from ..backend import te_ops

        xin, layout = b.env[node.inputs[0]]
        if layout == FLAT:
            return xin, FLAT
        c, h, w = b.graph.tensor(node.inputs[0]).shape
        if layout == NCHWC and h == w == 1:
            return b.emit(K.nchwc_flatten, xin, channels=c, name=b.hint(node)), FLAT
        return b.emit(te_ops.flatten, b.nchw(node.inputs[0]), name=b.hint(node)), FLAT


@register
class Reshape(OpDef):
    """view / reshape: to (N, -1) is a flatten, to the same shape an identity, (N, C, H, W) <-> (N, g, C/g, H, W)
    a step of a channel shuffle; anything else is refused."""

    op, kind = "reshape", "trace"
    methods = ("view", "reshape")
    functions = (torch.reshape,)

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        src, dst = tuple(b.shape(node.args[0])), tuple(b.shape(node))
        inp = b.inp(node)
        if src == dst:
            b.add(_float_node(name, "identity", [inp]))
        elif len(src) >= 2 and len(dst) == 2 and dst[1] == int(np.prod(src[1:])):
            b.add(_float_node(name, "flatten", [inp]))
        elif len(src) == 4 and len(dst) == 5 and dst[3:] == src[2:] and dst[1] * dst[2] == src[1]:
            b.add(_float_node(name, "split_groups", [inp], dict(groups=int(dst[1]))))
        elif len(src) == 5 and len(dst) == 4 and src[3:] == dst[2:] and src[1] * src[2] == dst[1]:
            b.add(_float_node(name, "merge_groups", [inp]))
        else:
            raise Unsupported(f"reshape {src} -> {dst} (only to (N, -1), or a channel shuffle)")


@register
class Transpose(OpDef):
    op, kind = "transpose", "trace"
    methods = ("transpose", "permute")
    functions = (torch.transpose, torch.permute)

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        src = tuple(b.shape(node.args[0]))
        dims = [a for a in node.args[1:]] if node.target in ("transpose", torch.transpose) else None
        if dims is None:
            perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            perm = [int(p) % len(src) for p in perm]
            swap12 = perm == [0, 2, 1, 3, 4]
        else:
            swap12 = sorted(int(d) % len(src) for d in dims) == [1, 2]
        if len(src) != 5 or not swap12:
            raise Unsupported(f"transpose/permute of a {len(src)}-D tensor (only the channel-shuffle swap of the "
                              "group axes of a 5-D view)")
        b.add(_float_node(name, "swap_groups", [b.inp(node)]))


def collapse_channel_shuffles(prims: list) -> list[str]:
    """Replace each ``split_groups -> swap_groups -> merge_groups`` chain by one ``channel_shuffle`` node (in place).
    Returns error lines for 5-D steps that are not part of such a chain."""
    by_name = {n.name: n for n in prims}
    users: dict[str, list] = {}
    for n in prims:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    errors, drop = [], set()
    for n in prims:
        if n.op != "merge_groups" or n.name in drop:
            continue
        sw = by_name.get(n.inputs[0])
        while sw is not None and sw.op == "identity":
            sw = by_name.get(sw.inputs[0])
        sp = by_name.get(sw.inputs[0]) if sw is not None and sw.op == "swap_groups" else None
        while sp is not None and sp.op == "identity":
            sp = by_name.get(sp.inputs[0])
        if sp is None or sp.op != "split_groups":
            continue
        chain = [sp, sw]
        if any(len(users.get(c.name, [])) != 1 for c in chain):
            continue
        n.op, n.inputs, n.attrs = "channel_shuffle", [sp.inputs[0]], dict(groups=sp.attrs["groups"])
        drop.update(c.name for c in chain)
    prims[:] = [p for p in prims if p.name not in drop]
    for p in prims:
        if p.op in ("split_groups", "swap_groups", "merge_groups"):
            errors.append(f"{p.name} ({p.op.replace('_', ' ')}): a 5-D view that is not part of a channel shuffle "
                          "(view(N, g, C/g, H, W) -> transpose(1, 2) -> view(N, C, H, W))")
    return errors


for _name in ("split_groups", "swap_groups", "merge_groups"):
    register(type(f"_Trace_{_name}", (OpDef,), dict(op=_name, kind="trace")))


@register
class ChannelShuffle(_Grid):
    op = ir_op = "channel_shuffle"
    modules = (nn.ChannelShuffle,)
    functions = (F.channel_shuffle, torch.channel_shuffle)
    methods = ("channel_shuffle",)
    summary = "channel shuffle (nn.ChannelShuffle, or view/transpose/view)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        g = module.groups if module is not None else arg(node, 1, "groups", None)
        b.add(_float_node(name, "channel_shuffle", [b.inp(node)], dict(groups=int(g))))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[n.inputs[0]]
        g = n.attrs["groups"]
        nb, c, h, w = x.shape
        return x.view(nb, g, c // g, h, w).transpose(1, 2).reshape(nb, c, h, w)

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        x = env[node.inputs[0]]
        g = node.attrs["groups"]
        nb, c, h, w = x.shape
        return np.ascontiguousarray(x.reshape(nb, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(nb, c, h, w))

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.channel_shuffle, e.x(0), groups=node.attrs["groups"])


def _check_picks_repeat(node: Any, module: Any | None, src: tuple[int, ...], scale: tuple[int, int]) -> None:
    """Raise Unsupported unless the traced resize picks the pixels of a repeat by ``scale``: the output size alone
    does not say so (torch's nearest maps output pixel i to floor(i / scale_factor) with the scale factor as given:
    ``scale_factor=3.01`` makes a 2x2 map 6x6 but picks pixels 0, 0, 0, 0, 1, 1; 'nearest-exact' by 2.2 makes 4
    pixels 8 as 0, 0, 1, 1, 2, 2, 2, 3). Runs the op itself on a map of pixel indices (one image, one channel)."""
    h, w = int(src[2]), int(src[3])
    probe = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    with torch.no_grad():
        if module is not None:
            got = module(probe)
        else:
            got = node.target(probe, *(known_value(a, "upsampling") for a in node.args[1:]),
                              **{k: known_value(v, "upsampling") for k, v in node.kwargs.items()})
    want = probe.repeat_interleave(scale[0], dim=2).repeat_interleave(scale[1], dim=3)
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
        raise Unsupported(f"nearest upsampling {src} -> {tuple(src[:2]) + tuple(got.shape[2:])} that does not repeat "
                          f"each pixel {scale[0]}x{scale[1]} times (a non-integer scale_factor picks other pixels; "
                          f"give scale_factor={scale} or size=)")


@register
class Upsample(_Grid):
    op = ir_op = "upsample"
    modules = (nn.Upsample, nn.UpsamplingNearest2d)
    functions = (F.interpolate, F.upsample, F.upsample_nearest)
    summary = "nearest upsampling by integer factors (nn.Upsample, F.interpolate)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        if module is not None:
            mode = getattr(module, "mode", "nearest")
        elif node.target is F.upsample_nearest:
            mode = "nearest"
        else:
            mode = arg(node, 3, "mode", "nearest")
        if mode not in ("nearest", "nearest-exact"):
            raise Unsupported(f"upsampling mode {mode!r} (only 'nearest')")
        src, dst = tuple(b.shape(node.args[0])), tuple(b.shape(node))
        if len(src) != 4 or dst[2] % src[2] or dst[3] % src[3]:
            raise Unsupported(f"upsampling {src} -> {dst} (only 4-D by integer factors)")
        scale = (dst[2] // src[2], dst[3] // src[3])
        _check_picks_repeat(node, module, src, scale)
        b.add(_float_node(name, "upsample", [b.inp(node)], dict(scale=scale)))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        sh, sw = n.attrs["scale"]
        return env[n.inputs[0]].repeat_interleave(sh, dim=2).repeat_interleave(sw, dim=3)

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        sh, sw = node.attrs["scale"]
        return env[node.inputs[0]].repeat(sh, axis=2).repeat(sw, axis=3)

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.upsample_nearest, e.x(0), scale=node.attrs["scale"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        return b.emit(K.upsample_nearest_nchwc, b.blocked(node.inputs[0]), scale=tuple(node.attrs["scale"]),
                      name=b.hint(node)), NCHWC


@register
class PixelShuffle(_Grid):
    op = ir_op = "pixel_shuffle"
    modules = (nn.PixelShuffle,)
    functions = (F.pixel_shuffle, torch.pixel_shuffle)
    summary = "PixelShuffle"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        r = module.upscale_factor if module is not None else arg(node, 1, "upscale_factor", None)
        b.add(_float_node(name, "pixel_shuffle", [b.inp(node)], dict(factor=int(r))))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pixel_shuffle(env[n.inputs[0]], n.attrs["factor"])

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        x, r = env[node.inputs[0]], node.attrs["factor"]
        nb, c, h, w = x.shape
        return np.ascontiguousarray(x.reshape(nb, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
                                    .reshape(nb, c // (r * r), h * r, w * r))

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.pixel_shuffle, e.x(0), factor=node.attrs["factor"])


@register
class PixelUnshuffle(_Grid):
    op = ir_op = "pixel_unshuffle"
    modules = (nn.PixelUnshuffle,)
    functions = (F.pixel_unshuffle, torch.pixel_unshuffle)
    summary = "PixelUnshuffle"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        r = module.downscale_factor if module is not None else arg(node, 1, "downscale_factor", None)
        b.add(_float_node(name, "pixel_unshuffle", [b.inp(node)], dict(factor=int(r))))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pixel_unshuffle(env[n.inputs[0]], n.attrs["factor"])

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        x, r = env[node.inputs[0]], node.attrs["factor"]
        nb, c, h, w = x.shape
        return np.ascontiguousarray(x.reshape(nb, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
                                    .reshape(nb, c * r * r, h // r, w // r))

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.pixel_unshuffle, e.x(0), factor=node.attrs["factor"])


@register
class Chunks(OpDef):
    """``chunk`` / ``split`` along channels: recorded by the tracer; each ``getitem`` of it becomes a ``slice``."""

    op, kind = "chunks", "trace"
    functions = (torch.chunk, torch.split)
    methods = ("chunk", "split")

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        shape = tuple(b.shape(node.args[0]))
        is_chunk = node.target in ("chunk", torch.chunk)
        dim = arg(node, 2, "dim", 0)
        if len(shape) < 2 or dim % len(shape) != 1:
            raise Unsupported(f"{'chunk' if is_chunk else 'split'} along dim {dim} (only the channel dim 1)")
        c = int(shape[1])
        sec = arg(node, 1, "chunks" if is_chunk else "split_size_or_sections", None)
        if sec is None and not is_chunk:
            sec = node.kwargs.get("split_size")           # Tensor.split's name for it
        if sec is None:
            raise Unsupported(f"{'chunk' if is_chunk else 'split'} without its sizes")
        sec = known_value(sec, "chunk" if is_chunk else "split")
        if is_chunk:
            step = -(-c // int(sec))
            sizes = [min(step, c - s) for s in range(0, c, step)]
        elif isinstance(sec, int):
            sizes = [min(sec, c - s) for s in range(0, c, sec)]
        else:
            sizes = [int(s) for s in sec]
        bounds = np.cumsum([0] + sizes).tolist()
        b.chunks[name] = (b.inp(node), [(bounds[i], bounds[i + 1]) for i in range(len(sizes))])


@register
class Slice(_Grid):
    op = ir_op = "slice"
    functions = (operator.getitem,)
    summary = "channel slices (chunk / split / x[:, a:b])"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        src, idx = node.args[0], node.args[1]
        src_name = b.name(src)
        if src_name in b.chunks:
            inp, ranges = b.chunks[src_name]
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise Unsupported(f"indexing the parts of a chunk / split with {idx!r} (only one part, parts[i]: "
                                  "a, b = x.chunk(2, 1))")
            start, stop = ranges[idx]
            b.add(_float_node(name, "slice", [inp], dict(start=int(start), stop=int(stop))))
            return
        shape = tuple(b.shape(src))
        if not isinstance(idx, tuple) or len(idx) < 2 or not all(
                isinstance(s, slice) and s == slice(None) for s in idx[:1] + idx[2:]) or not isinstance(idx[1], slice):
            raise Unsupported(f"indexing {idx!r} (only channel slices x[:, a:b])")
        start, stop, step = idx[1].indices(int(shape[1]))
        if step != 1:
            raise Unsupported("channel slice with a step")
        b.add(_float_node(name, "slice", [b.inp(node)], dict(start=int(start), stop=int(stop))))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[n.inputs[0]][:, n.attrs["start"]:n.attrs["stop"]]

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(env[node.inputs[0]][:, node.attrs["start"]:node.attrs["stop"]])

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.slice_channels, e.x(0), start=node.attrs["start"], stop=node.attrs["stop"])
