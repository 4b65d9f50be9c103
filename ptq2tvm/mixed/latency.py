"""Per-layer latency and stored weight bytes of each weight-bit candidate, measured on this host with the project's
own kernels, cached next to the run.

The integer graph is built twice with the hand-scheduled blocked kernels (``ptq2tvm.backend.blocked_builder``, the
``--schedule auto`` x86 build): every conv/linear layer with int8 weights, then with <= 4-bit weights (the builder
stores those two per byte and unpacks them in the kernel; depthwise convs stay int8). Every kernel PrimFunc of the
Relax ``main`` is timed with TVM's ``time_evaluator`` on its real packed weights and
parameters (random activations) - the per-kernel protocol of ``backend.tune`` (median of ``repeat`` runs of at least
``min_repeat_ms`` each) but in this process, every kernel taken by name from one compiled library per build (one
``tvm.compile`` per build instead of one per kernel). A network's predicted latency = the sum of its layer kernels
at their chosen weight bits + every other kernel (layout changes, pools, adds, measured once).

Activation bits do not change a kernel's code here (activations are uint8 containers at any bits; only the clamp
constants differ), so WxA4 costs what WxA8 costs; 2-bit weights use the int4 kernel (same storage, same speed).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tqdm.auto import tqdm

from ..atomic import write_json
from ..backend.compile import resolve_target
from ..ir.graph import IntegerGraph

LAYER_OPS = ("conv2d", "dense")


def storage_class(w_bits: int) -> str:
    """'int4' (packed two per byte where the kernels can) for <= 4-bit weights, else 'int8'."""
    return "int4" if w_bits <= 4 else "int8"


def variant_graph(graph: IntegerGraph, w_bits: int) -> IntegerGraph:
    """``graph`` with every conv/linear layer's integer weights clipped to the ``w_bits`` range and marked so: the
    same kernels (shapes, zero points, layouts) as a real ``w_bits`` fold, for timing and sizing only."""
    g = copy.copy(graph)
    g.nodes = []
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    for n in graph.nodes:
        if n.op in LAYER_OPS:
            n = copy.copy(n)
            n.arrays = {**n.arrays, "weight": np.clip(n.arrays["weight"], lo, hi).astype(np.int8)}
            n.attrs = {**n.attrs, "w_bits": int(w_bits)}
        g.nodes.append(n)
    return g


def kernel_name(layer: str) -> str:
    """The Relax PrimFunc name of a layer's kernel (``blocked_builder._hint``)."""
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in layer)


def layer_macs(graph: IntegerGraph) -> dict[str, int]:
    """Multiply-accumulates per image of every conv/linear layer: output elements x (C_in / groups) x KH x KW."""
    out = {}
    for n in graph.nodes:
        if n.op in LAYER_OPS:
            w = n.arrays["weight"]
            out[n.name] = int(np.prod(n.out.shape)) * int(np.prod(w.shape[1:]))
    return out


@dataclass
class LayerCosts:
    """Measured costs: ``seconds[layer][cls]`` and ``stored_bytes[layer][cls]`` for cls in ('int8', 'int4');
    ``other_seconds`` = every non-layer kernel; ``macs[layer]`` per image."""

    seconds: dict[str, dict[str, float]]
    stored_bytes: dict[str, dict[str, int]]
    macs: dict[str, int]
    other_seconds: float
    other_kernels: dict[str, float]
    batch: int
    target: dict[str, Any]
    isa: str
    measured: int = 0
    cached: int = 0
    load_average: list[float] = field(default_factory=list)

    def predict_seconds(self, w_bits: dict[str, int]) -> float:
        return self.other_seconds + sum(self.seconds[n][storage_class(b)] for n, b in w_bits.items())

    def predict_bytes(self, w_bits: dict[str, int]) -> int:
        return sum(self.stored_bytes[n][storage_class(b)] for n, b in w_bits.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCosts":
        return cls(**d)


def _time_kernel(lib: Any, name: str, func: tvm.tirx.PrimFunc, args: list, rng: np.random.Generator, repeat: int,
                 min_repeat_ms: int) -> float:
    """Median seconds of kernel ``name`` of the compiled library ``lib`` on ``args`` (numpy constants as given,
    random uint8 activations), outputs zeroed."""
    dev = tvm.cpu()
    arrays = [a if isinstance(a, np.ndarray) else rng.integers(0, 256, a[0]).astype(a[1]) for a in args]
    outs = [np.zeros([int(v) for v in b.shape], b.dtype) for b in list(func.params)[len(arrays):]]
    tv = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (*arrays, *outs)]
    ev = lib.time_evaluator(name, dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return float(np.median(ev(*tv).results))


def _kernel_library(mod: tvm.IRModule, target: tvm.target.Target) -> Any:
    """Compile the whole scheduled module once; -> the runtime module holding every kernel by name."""
    ex = tvm.compile(mod, target=target)
    for m in (ex.mod, *ex.mod.imports):
        try:
            m.get_function(next(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)))
            return m
        except (AttributeError, RuntimeError, StopIteration):
            continue
    raise RuntimeError("compiled module exposes no kernel by name")


def _calls(mod: tvm.IRModule) -> list[tuple[str, list]]:
    """Every call_tir of the Relax ``main``, in order: (PrimFunc name, its arguments: numpy for constants,
    (shape, dtype) for activations)."""
    from tvm import relax

    out = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir":
                out.append((call.args[0].name_hint,
                            [a.value.numpy() if isinstance(a, tvm.ir.expr.Constant)
                             else ([int(v) for v in a.ty.shape.values], str(a.ty.dtype)) for a in call.args[1].fields]))
    return out


def _read_cache(path: Path | None) -> dict[str, float]:
    if path is None or not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).get("kernels", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def measure_layer_costs(graph: IntegerGraph, batch: int = 1, target: str | dict[str, Any] | None = None,
                        cache: str | Path | None = None, repeat: int = 5, min_repeat_ms: int = 40,
                        progress: bool = True, timed: bool = True) -> LayerCosts:
    """Time every kernel of ``graph``'s x86 build with int8 and with packed int4 weights (module docstring).

    ``cache``: a JSON file (e.g. ``RUN/latency_cache.json``) of kernel times keyed by target, batch and the
    structural hash of the scheduled PrimFunc; kernels found there are not measured again. Raises ValueError when
    the target has no hand-scheduled x86 kernels (AVX2 or AVX-512 VNNI). ``timed=False``: stored bytes only
    (nothing compiled; ``seconds`` stay empty).
    """
    from ..backend.blocked_builder import build_x86_module, x86_isa

    tdict = resolve_target(target)
    isa, why = x86_isa(tdict)
    if isa is None:
        raise ValueError(f"per-layer latency needs the hand-scheduled x86 kernels: {why}")
    tgt = tvm.target.Target(tdict)
    cache_path = Path(cache) if cache is not None else None
    known = _read_cache(cache_path)
    prefix = f"{json.dumps(tdict, sort_keys=True)}|b{batch}|r{repeat}|m{min_repeat_ms}|"
    layers = [n.name for n in graph.nodes if n.op in LAYER_OPS]
    rng = np.random.default_rng(0)
    seconds: dict[str, dict[str, float]] = {n: {} for n in layers}
    sizes: dict[str, dict[str, int]] = {n: {} for n in layers}
    other: dict[str, float] = {}
    measured = cached = 0
    mods = {cls: build_x86_module(variant_graph(graph, bits), batch, tdict)[0] for cls, bits in
            (("int8", 8), ("int4", 4))}
    names = {kernel_name(n) for n in layers}
    jobs = []
    for cls, mod in mods.items():
        funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        order = iter(layers)
        for name, args in _calls(mod):
            # Relax reuses one PrimFunc for layers of identical shape and attributes (layer1.1.conv1 calls
            # k_layer1_0_conv1): the layer kernels are the calls of a layer kernel name, in graph order
            layer = next(order) if name in names else None
            if cls == "int4" and layer is None:
                continue                           # non-layer kernels are the same in both builds
            jobs.append((cls, layer, name, funcs[name], args))
    if not timed:
        for cls, layer, _, _, args in jobs:
            if layer is not None:
                sizes[layer][cls] = int(args[1].nbytes)
        return LayerCosts(seconds, sizes, layer_macs(graph), 0.0, {}, batch, tdict, isa)
    keys = [prefix + str(tvm_ffi.structural_hash(func)) for _, _, _, func, _ in jobs]
    libs = {cls: _kernel_library(mods[cls], tgt) for cls in mods
            if any(k not in known for k, (c, *_) in zip(keys, jobs) if c == cls)}
    bar = tqdm(list(zip(keys, jobs)), desc="kernel latency", unit="kernel", disable=not progress)
    try:
        for key, (cls, layer, name, func, args) in bar:
            if key in known:
                t = known[key]
                cached += 1
            else:
                t = _time_kernel(libs[cls], name, func, args, rng, repeat, min_repeat_ms)
                known[key] = t
                measured += 1
            if layer is not None:
                seconds[layer][cls] = t
                sizes[layer][cls] = int(args[1].nbytes)
            else:
                other[f"{len(other)}:{name}"] = t
    finally:
        bar.close()
        if cache_path is not None and measured:
            write_json(cache_path, dict(format="ptq2tvm-kernel-latency", kernels=known))
    return LayerCosts(seconds, sizes, layer_macs(graph), float(sum(other.values())), other, batch, tdict, isa,
                      measured, cached, [round(v, 2) for v in os.getloadavg()])


def time_so(so_path: str | Path, repeat: int = 10, min_repeat_ms: int = 100) -> float:
    """Median seconds of one call of a compiled .so's ``main`` (uint8 input, back to back, warm), the protocol of
    :func:`measure_layer_costs` applied to the whole network."""
    from ..backend.runtime import CompiledModel

    cm = CompiledModel(so_path)
    rng = np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.integers(0, cm.input.qmax + 1, (cm.batch, *cm.input.shape)).astype(np.uint8))
    ev = cm._vm.time_evaluator("main", cm.device, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return float(np.median(ev(x).results))


__all__ = ["LayerCosts", "kernel_name", "layer_macs", "measure_layer_costs", "storage_class", "time_so",
           "variant_graph"]
