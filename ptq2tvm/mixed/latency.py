"""Per-layer latency and stored weight bytes of each weight-bit candidate, measured on this host with the project's
own kernels, cached next to the run.

The integer graph is built twice with the hand-scheduled blocked kernels (``ptq2tvm.backend.blocked_builder``, the
``--schedule auto`` x86 build): every conv/linear layer with int8 weights, then with <= 4-bit weights (the builder
stores those two per byte and unpacks them in the kernel; depthwise convs stay int8), and on targets whose kernels
store 2-bit weights four per byte (x86 and CUDA, :func:`ptq2tvm.backend.blocked_builder.packs_int2`) a third time with
<= 2-bit weights. Every kernel PrimFunc of the
Relax ``main`` is timed with TVM's ``time_evaluator`` on its real packed weights and
parameters (random activations), every kernel taken by name from one compiled library per build (one
``tvm.compile`` per build instead of one per kernel).

Calibration against the whole network (a shared, loaded host changes every time by the same factor, and a network
call costs more than its kernels: the VM's per-call dispatch, allocations, cold caches): the W8A8 build's whole
Relax ``main`` (what the W8A8 .so runs) is timed in the same process, interleaved with the kernels - ``rounds``
rounds, each timing the whole network once and then every kernel once (``time_evaluator``, ``number=1``,
``min_repeat_ms``), medians over the rounds. The difference whole network - sum of its kernels is the fitted
per-network overhead (``overhead_seconds``). A plan's predicted latency is

    T(plan) = T(W8A8 network) + sum over layers of (t_layer(chosen weight storage) - t_layer(int8))

(= other kernels + overhead + the chosen layer kernels). Cached kernel times are reused only while the whole W8A8
network, re-timed at every use, stays within ``drift`` (10 %) of the time it had when they were measured; otherwise
the cache is dropped and every kernel measured again (the host's load changed). :meth:`LayerCosts.predict_seconds`
also takes a W8A8 .so time measured later (next to the plan's .so) and scales the prediction to it.

Activation bits change a kernel only through the dot product the builder can prove exact: on AVX2 (no VNNI) a
layer with int8 weights runs the int16 ``vpmaddwd`` kernel unless every ``vpmaddubsw`` pair sum provably fits int16
for its input's range (:func:`kernels.layout.u8s8_pairs_exact`), which always holds for <= 7-bit weights or <= 7-bit
input activations. So on AVX2 the W8A8 build's kernels are timed a fourth time with 7-bit weights (the timing class
'int8ubsw': int8 storage on ``vpmaddubsw``), and :func:`kernel_class` picks it for W5..7 layers and for W8 layers
reading <= 7-bit activations (measured: a plan of ten W8A4 layers ran 0.78x the latency the vpmaddwd times
predicted). On AVX2 the input range also decides whether a ``vpmaddubsw`` layer may accumulate in int16
(:func:`kernels.layout.u8s8_int16_group`, typically <= 5-bit inputs: 1.2-1.45x faster 3x3 convs) and whether a
depthwise conv sums in int16 (:func:`kernels.layout.depthwise_int16_exact`); every build here keeps the graph's
activation ranges and real weights, so the measured times include whichever kernel the builder proves.
Elsewhere (VNNI's ``vpdpbusd`` is exact for any uint8 x int8) WxA4 costs what WxA8 costs. 2-bit weights
are the storage class 'int2' (four per byte, their own kernels) where the target packs them so, else they use the
int4 kernels (same storage, same speed).
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

from kernels.task_stack import compile_module

from ..atomic import write_json
from ..backend.compile import resolve_target
from ..ir.graph import IntegerGraph

LAYER_OPS = ("conv2d", "dense")
#: time_evaluator repeats per round (each at least ``min_repeat_ms`` of back-to-back calls)
REPEATS_PER_ROUND = 20


def robust_time(samples: list[float], statistic: str = "min") -> float:
    """One figure from repeated timings: ``min`` (default: the least-disturbed window, what the code costs when
    the shared host lets it run; other processes only ever add time) or ``median``."""
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    return float(np.min(samples) if statistic == "min" else np.median(samples))


def storage_class(w_bits: int, int2: bool = False) -> str:
    """'int2' (four per byte) for <= 2-bit weights when ``int2`` (the target packs them so), 'int4' (packed two per
    byte where the kernels can) for <= 4-bit weights, else 'int8'."""
    return "int2" if int2 and w_bits <= 2 else "int4" if w_bits <= 4 else "int8"


def kernel_class(w_bits: int, a_bits: int, isa: str, int2: bool = False) -> str:
    """The timing class of a layer with ``w_bits`` weights reading ``a_bits`` activations on ``isa``: its storage
    class (:func:`storage_class`), except on AVX2 int8-stored layers that the builder runs on ``vpmaddubsw`` because
    the pair sums provably fit int16 (<= 7-bit weights: |w| <= 64, 255 * 128 < 2^15; or <= 7-bit inputs: 127 * 256 <
    2^15): 'int8ubsw'."""
    cls = storage_class(w_bits, int2)
    if cls == "int8" and isa == "avx2" and (w_bits <= 7 or a_bits <= 7):
        return "int8ubsw"
    return cls


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


def _taps_on_input(out_size: int, taps: int, stride: int, padding: int, dilation: int, in_size: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis whose input index lies inside [0, in_size)."""
    index = np.arange(out_size)[:, None] * stride - padding + np.arange(taps)[None, :] * dilation
    return int(((index >= 0) & (index < in_size)).sum())


def layer_macs(graph: IntegerGraph, skip_padding: bool = False) -> dict[str, int]:
    """Multiply-accumulates per image of every conv/linear layer: output elements x (C_in / groups) x KH x KW.

    ``skip_padding``: only the products whose input element is real, not zero padding (a 3x3 conv with padding 1 on
    7x7: (19 / 21)^2 = 0.82 of them), which is what a kernel that skips the padding taps computes (the VNNI convs
    do where the input zero point is 0): the lower bound of :mod:`benchmarks.vnni_peak`'s "VNNI floor"."""
    out = {}
    for n in graph.nodes:
        if n.op not in LAYER_OPS:
            continue
        w = n.arrays["weight"]
        if skip_padding and n.op == "conv2d":
            _, in_h, in_w = graph.tensor(n.inputs[0]).shape
            out_c, out_h, out_w = n.out.shape
            (kh, kw), (sh, sw) = w.shape[2:], n.attrs["stride"]
            (ph, pw), (dh, dw) = n.attrs["padding"], n.attrs.get("dilation", (1, 1))
            out[n.name] = out_c * int(w.shape[1]) * _taps_on_input(out_h, kh, sh, ph, dh, in_h) \
                * _taps_on_input(out_w, kw, sw, pw, dw, in_w)
        else:
            out[n.name] = int(np.prod(n.out.shape)) * int(np.prod(w.shape[1:]))
    return out


@dataclass
class LayerCosts:
    """Measured costs: ``seconds[layer][cls]`` and ``stored_bytes[layer][cls]`` for cls in ('int8', 'int4'), 'int2'
    on targets that store 2-bit weights four per byte and 'int8ubsw' on AVX2 (:func:`kernel_class`); ``other_seconds`` = every non-layer kernel;
    ``macs[layer]`` per image."""

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
    #: the whole W8A8 network (Relax ``main``), timed interleaved with the kernels; 0 when not measured
    reference_seconds: float = 0.0
    #: reference_seconds - (other_seconds + every layer's int8 kernel): per-call dispatch and the like
    overhead_seconds: float = 0.0
    #: "measured", "cached" (reference within drift) or "remeasured (reference drifted x.xx)"
    cache_status: str = ""
    #: how the repeated timings became one figure (:func:`robust_time`)
    statistic: str = "median"

    @property
    def packs_int2(self) -> bool:
        """Whether these costs have the 'int2' storage class (the target stores 2-bit weights four per byte)."""
        return any("int2" in v for v in self.stored_bytes.values())

    def storage(self, w_bits: int) -> str:
        """The storage class (:func:`storage_class`) of ``w_bits``-bit weights on the measured target."""
        return storage_class(w_bits, self.packs_int2)

    @property
    def constant_seconds(self) -> float:
        """The part of a network's latency no bit choice changes: non-layer kernels + fitted overhead."""
        return self.other_seconds + self.overhead_seconds

    def timing(self, w_bits: int, a_bits: int = 8) -> str:
        """The timing class (:func:`kernel_class`) of a ``w_bits`` x ``a_bits`` layer on the measured target; costs
        measured before the 'int8ubsw' class existed (a cache of an older version) fall back to 'int8'."""
        cls = kernel_class(w_bits, a_bits, self.isa, self.packs_int2)
        if cls == "int8ubsw" and not all("int8ubsw" in v for v in self.seconds.values()):
            return "int8"
        return cls

    def predict_seconds(self, w_bits: dict[str, int], reference_seconds: float | None = None,
                        a_bits: dict[str, int] | None = None) -> float:
        """Predicted latency (s) of one network call with ``w_bits[layer]`` weight bits (every layer given) and
        ``a_bits[layer]`` input-activation bits (default 8): T(W8A8) + sum of per-layer deltas.
        ``reference_seconds``: the W8A8 network timed again now (e.g. its .so, interleaved with the plan's .so);
        the prediction is scaled by its ratio to ``reference_seconds`` of the cost measurement (a changed load slows
        every kernel alike)."""
        a_bits = a_bits or {}
        t = self.constant_seconds + sum(self.seconds[n][self.timing(b, a_bits.get(n, 8))] for n, b in w_bits.items())
        if reference_seconds is not None and self.reference_seconds > 0:
            t *= reference_seconds / self.reference_seconds
        return t

    def predict_bytes(self, w_bits: dict[str, int]) -> int:
        return sum(self.stored_bytes[n][self.storage(b)] for n, b in w_bits.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCosts":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _kernel_timer(lib: Any, name: str, func: tvm.tirx.PrimFunc, args: list, rng: np.random.Generator,
                  min_repeat_ms: int) -> Any:
    """A zero-argument callable -> seconds of ``REPEATS_PER_ROUND`` timings of kernel ``name`` of the compiled library ``lib`` on
    ``args`` (numpy constants as given, random uint8 activations), outputs zeroed."""
    dev = tvm.cpu()
    arrays = [a if isinstance(a, np.ndarray) else rng.integers(0, 256, a[0]).astype(a[1]) for a in args]
    outs = [np.zeros([int(v) for v in b.shape], b.dtype) for b in list(func.params)[len(arrays):]]
    tv = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (*arrays, *outs)]
    ev = lib.time_evaluator(name, dev, number=1, repeat=REPEATS_PER_ROUND, min_repeat_ms=min_repeat_ms)
    return lambda: [float(v) for v in ev(*tv).results]


def _network_timer(ex: Any, mod: tvm.IRModule, rng: np.random.Generator, min_repeat_ms: int) -> Any:
    """A zero-argument callable -> seconds per call of ``REPEATS_PER_ROUND`` timings of the compiled module's Relax ``main`` (random integer
    input), the protocol of :func:`time_so` (the same VM entry point a .so runs)."""
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    p = mod["main"].params[0].ty
    x = tvm.runtime.tensor(rng.integers(0, 16, [int(v) for v in p.shape.values]).astype(str(p.dtype)), dev)
    ev = vm.time_evaluator("main", dev, number=1, repeat=REPEATS_PER_ROUND, min_repeat_ms=min_repeat_ms)
    return lambda: [float(v) for v in ev(x).results]


_LIBRARIES: dict[tuple[int, str], tuple[Any, Any]] = {}     # this process's compiled builds (a few, newest last)


def _kernel_library(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[Any, Any]:
    """Compile the whole scheduled module once (kept for this process: re-timing a build compiles nothing);
    -> (the executable, the runtime module holding every kernel by name)."""
    key = (int(tvm_ffi.structural_hash(mod)), str(target))
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    ex = compile_module(mod, target)
    for m in (ex.mod, *ex.mod.imports):
        try:
            m.get_function(next(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)))
        except (AttributeError, RuntimeError, StopIteration):
            continue
        while len(_LIBRARIES) >= 4:
            _LIBRARIES.pop(next(iter(_LIBRARIES)))
        _LIBRARIES[key] = (ex, m)
        return ex, m
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


def _read_cache(path: Path | None) -> tuple[dict[str, float], dict[str, float]]:
    """(kernel times, whole-network reference times) of a cache file; empty when missing or unreadable."""
    if path is None or not path.is_file():
        return {}, {}
    try:
        d = json.loads(path.read_text())
        return ({str(k): float(v) for k, v in d.get("kernels", {}).items()},
                {str(k): float(v) for k, v in d.get("references", {}).items()})
    except (OSError, ValueError, AttributeError):
        return {}, {}


def measure_layer_costs(graph: IntegerGraph, batch: int = 1, target: str | dict[str, Any] | None = None,
                        cache: str | Path | None = None, rounds: int = 7, min_repeat_ms: int = 1,
                        progress: bool = True, timed: bool = True, drift: float = 0.10,
                        statistic: str = "min") -> LayerCosts:
    """Time every kernel of ``graph``'s x86 build with int8, packed int4 and (where the target packs them, AVX2)
    packed int2 weights, and on AVX2 with 7-bit weights (the 'int8ubsw' class, :func:`kernel_class`), interleaved
    with the whole W8A8 network (module docstring).

    ``cache``: a JSON file (e.g. ``RUN/latency_cache.json``) of kernel times keyed by target, batch and the
    structural hash of the scheduled PrimFunc, with the whole-network reference time they were measured against;
    they are reused only while the reference, timed again now, is within ``drift`` (relative) of that time.
    ``rounds``: interleaved timing rounds, each ``REPEATS_PER_ROUND`` windows of >= ``min_repeat_ms`` per kernel;
    ``statistic`` (:func:`robust_time`) over all windows. Raises ValueError when the target has no hand-scheduled x86
    kernels (AVX2 or AVX-512 VNNI). ``timed=False``: stored bytes only (nothing compiled; ``seconds`` stay empty).
    """
    from ..backend.blocked_builder import build_x86_module, packs_int2, x86_isa

    tdict = resolve_target(target)
    isa, why = x86_isa(tdict)
    if isa is None:
        raise ValueError(f"per-layer latency needs the hand-scheduled x86 kernels: {why}")
    tgt = tvm.target.Target(tdict)
    cache_path = Path(cache) if cache is not None else None
    known, refs = _read_cache(cache_path)
    robust_time([1.0], statistic)                 # checks the name
    prefix = f"{json.dumps(tdict, sort_keys=True)}|b{batch}|m{min_repeat_ms}|{statistic}|"
    layers = [n.name for n in graph.nodes if n.op in LAYER_OPS]
    rng = np.random.default_rng(0)
    seconds: dict[str, dict[str, float]] = {n: {} for n in layers}
    sizes: dict[str, dict[str, int]] = {n: {} for n in layers}
    other: dict[str, float] = {}
    classes = ((("int8", 8), ("int4", 4)) + ((("int2", 2),) if packs_int2(isa) else ())
               + ((("int8ubsw", 7),) if isa == "avx2" else ()))
    # unfused: each layer its own kernel (the .so may run a 1x1 expand inside its depthwise conv, a little faster
    # than the sum of the two measured here; the stored bytes are the same)
    # packed sub-byte storage (subbyte_storage="packed"): the int4 / int2 classes are what those bits store and cost
    # when packed; a plan made from these costs is built that way (graph.meta["subbyte_storage"], set by quantize)
    mods = {cls: build_x86_module(variant_graph(graph, bits), batch, tdict, fuse=False, subbyte_storage="packed")[0]
            for cls, bits in classes}
    names = {kernel_name(n) for n in layers}
    jobs = []
    for cls, mod in mods.items():
        funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        order = iter(layers)
        for name, args in _calls(mod):
            # Relax reuses one PrimFunc for layers of identical shape and attributes (layer1.1.conv1 calls
            # k_layer1_0_conv1): the layer kernels are the calls of a layer kernel name, in graph order
            layer = next(order) if name in names else None
            if cls != "int8" and layer is None:
                continue                           # non-layer kernels are the same in every build
            jobs.append((cls, layer, name, funcs[name], args))
    if not timed:
        for cls, layer, _, _, args in jobs:
            if layer is not None:
                sizes[layer][cls] = int(args[1].nbytes)
        return LayerCosts(seconds, sizes, layer_macs(graph), 0.0, {}, batch, tdict, isa)
    import kernels as K

    if any(K.amx_kernel_count(m) for m in mods.values()):
        from ..bundle_runner import request_amx_state

        request_amx_state()       # the AMX kernels run in this process (torch's oneDNN may have asked already)
    keys = [prefix + str(tvm_ffi.structural_hash(func)) for _, _, _, func, _ in jobs]
    ref_key = prefix + "network:" + str(tvm_ffi.structural_hash(mods["int8"]))
    libs = {"int8": _kernel_library(mods["int8"], tgt)}
    net = _network_timer(libs["int8"][0], mods["int8"], rng, min_repeat_ms)
    status = "measured"
    if ref_key in refs:
        now = robust_time([t for _ in range(3) for t in net()], statistic)
        ratio = now / refs[ref_key]
        if abs(ratio - 1) <= drift:
            status = "cached"
        else:
            status = f"remeasured (reference drifted x{ratio:.2f})"
            known, refs = {}, {}
    else:
        known = {}                                 # kernel times without their reference cannot be trusted
    todo = [i for i, k in enumerate(keys) if k not in known]
    for cls in mods:
        if cls != "int8" and any(jobs[i][0] == cls for i in todo):
            libs[cls] = _kernel_library(mods[cls], tgt)
    timers = {i: _kernel_timer(libs[jobs[i][0]][1], jobs[i][2], jobs[i][3], jobs[i][4], rng, min_repeat_ms)
              for i in todo}
    if todo:
        samples: dict[int, list[float]] = {i: [] for i in todo}
        ref_samples = []
        bar = tqdm(total=rounds * (len(todo) + 1), desc="kernel latency", unit="timing", disable=not progress)
        try:
            for r in range(max(1, rounds)):
                ref_samples += net()
                bar.update()
                for i in (todo if r % 2 == 0 else todo[::-1]):      # alternate the order: no position bias
                    samples[i] += timers[i]()
                    bar.update()
        finally:
            bar.close()
        for i in todo:
            known[keys[i]] = robust_time(samples[i], statistic)
        refs[ref_key] = robust_time(ref_samples, statistic)
        if cache_path is not None:
            write_json(cache_path, dict(format="ptq2tvm-kernel-latency", kernels=known, references=refs))
    for key, (cls, layer, name, func, args) in zip(keys, jobs):
        t = known[key]
        if layer is not None:
            seconds[layer][cls] = t
            sizes[layer][cls] = int(args[1].nbytes)
        else:
            other[f"{len(other)}:{name}"] = t
    other_s = float(sum(other.values()))
    reference = refs[ref_key]
    overhead = reference - other_s - sum(seconds[n]["int8"] for n in layers)
    return LayerCosts(seconds, sizes, layer_macs(graph), other_s, other, batch, tdict, isa, len(todo),
                      len(keys) - len(todo), [round(v, 2) for v in os.getloadavg()], reference, overhead, status,
                      statistic)


def time_so(so_path: str | Path, repeat: int = 10, min_repeat_ms: int = 100, statistic: str = "median",
            samples: list[float] | None = None) -> float:
    """Seconds of one call of a compiled .so's ``main`` (uint8 input, back to back, warm): ``statistic``
    (:func:`robust_time`) over ``repeat`` windows of >= ``min_repeat_ms``; every window's time is also appended to
    ``samples`` when given. The protocol of :func:`measure_layer_costs` applied to the whole network."""
    from ..backend.runtime import CompiledModel

    cm = CompiledModel(so_path)
    rng = np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.integers(0, cm.input.qmax + 1, (cm.batch, *cm.input.shape)).astype(np.uint8))
    ev = cm._vm.time_evaluator("main", cm.device, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    res = [float(v) for v in ev(x).results]
    if samples is not None:
        samples += res
    return robust_time(res, statistic)


__all__ = ["LayerCosts", "REPEATS_PER_ROUND", "kernel_name", "robust_time", "layer_macs", "measure_layer_costs", "kernel_class", "storage_class", "time_so",
           "variant_graph"]
