"""Property-based fuzzing of the whole pipeline on random graphs (issue 11): used by ``tests/test_fuzz.py`` (a seeded
slice) and ``benchmarks/fuzz_graphs.py`` (>= 500 graphs). Needs Hypothesis (the ``test`` extra).

A graph is a JSON-able spec: input shape, calibration-data mode, bit widths, and a chain of ops drawn from
:data:`OPS`. **Adding an op is one entry** in :data:`OPS`: an :class:`OpEntry` saying after which tensor shapes it
can come (``applies``), how its parameters are drawn (``draw``) and how it becomes a torch module (``build``).

Checks of :func:`check_spec` on each graph:

1. quantize (calibration) + fold succeed, or fail with a ptq2tvm error whose message names something in quotes;
2. the integer graph's accumulators are provably inside int32 (:mod:`ptq2tvm.fold.bounds`);
3. the compiled ``.so`` equals the reference executor bit for bit, for every schedule in ``schedules`` ('auto' =
   the blocked x86 kernels, AVX2 on this host, and 'plain'), on quantized calibration images and random codes;
4. integer vs fake-quant within the documented tolerance (docs/integer_arithmetic.md): per node, fed the same
   integer inputs, the fake-quant node's output is within 1 LSB of the integer node's.
"""

from __future__ import annotations

import json
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

Shape = tuple[int, ...]          # (C, H, W) or (F,)
Draw = Callable[[Any], Any]      # hypothesis' draw


@dataclass(frozen=True)
class OpEntry:
    """One op family of the fuzzer: ``applies(shape)``, ``draw(draw, st, shape) -> params`` (JSON-able) and
    ``build(params, shape) -> (module, out_shape)``."""

    applies: Callable[[Shape], bool]
    draw: Callable[[Draw, Any, Shape], dict[str, Any]]
    build: Callable[[dict[str, Any], Shape], tuple[nn.Module, Shape]]


def _spatial(shape: Shape) -> bool:
    return len(shape) == 3


def _out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# ---- activations ------------------------------------------------------------------------------------------------
ACTS = ("none", "relu", "relu6", "hardtanh")


def _act_module(name: str, lo: float = -1.0, hi: float = 1.0) -> nn.Module:
    return {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6()}.get(name) or nn.Hardtanh(lo, hi)


def _draw_act(draw: Draw, st: Any) -> dict[str, Any]:
    a = draw(st.sampled_from(ACTS))
    lo = draw(st.sampled_from([-1.0, -0.5, 0.0, 0.25]))
    return dict(act=a, lo=lo, hi=lo + draw(st.sampled_from([0.5, 1.0, 2.0])))


# ---- degenerate channels ----------------------------------------------------------------------------------------
def _draw_degenerate(draw: Draw, st: Any, channels: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["none"] * 5 + ["zero", "tiny", "dead"]))
    if kind == "none":
        return dict(degenerate="none", channels=[])
    chans = sorted(set(draw(st.lists(st.integers(0, channels - 1), min_size=1, max_size=min(3, channels)))))
    return dict(degenerate=kind, channels=chans, const=draw(st.sampled_from([0.5, -0.5, 3.0, 1e-3])))


def _apply_degenerate(weight: torch.Tensor, bias: torch.Tensor | None, p: dict[str, Any]) -> None:
    with torch.no_grad():
        for c in p.get("channels", []):
            if p["degenerate"] == "zero":          # pruned channel: a constant
                weight[c] = 0.0
                if bias is not None:
                    bias[c] = p["const"]
            elif p["degenerate"] == "tiny":
                weight[c] *= 1e-9
                if bias is not None:
                    bias[c] = p["const"]
            elif p["degenerate"] == "dead" and bias is not None:   # ReLU after it is 0 on every image
                bias[c] = -1e3


# ---- op entries -------------------------------------------------------------------------------------------------
class _ConvBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: bool, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, (nn.BatchNorm2d(conv.out_channels) if bn else nn.Identity()), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _draw_conv(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    c, h, w = shape
    k = draw(st.sampled_from([1, 1, 3, 3, 5]))
    k = min(k, 2 * min(h, w) + 1 - (1 - min(h, w) % 2) if min(h, w) < k else k)
    d = draw(st.sampled_from([1, 1, 1, 2])) if k > 1 and min(h, w) >= 2 * k else 1
    p = draw(st.integers(0, k // 2)) if k > 1 else 0
    s = draw(st.sampled_from([1, 1, 2]))
    mode = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    if mode == "depthwise":
        cout, groups = c * draw(st.sampled_from([1, 1, 2])), c
    else:
        cout = draw(st.integers(1, 13))
        divs = [g for g in range(2, 5) if c % g == 0 and cout % g == 0] if mode == "grouped" else []
        groups = draw(st.sampled_from(divs)) if divs else 1
        if mode == "grouped" and not divs:
            groups, cout = c, c                 # fall back to depthwise
    if _out(h, k, s, p, d) < 1 or _out(w, k, s, p, d) < 1:
        k, p, s, d = 1, 0, 1, 1
    return dict(cout=cout, k=k, stride=s, padding=p, dilation=d, groups=groups,
                bias=draw(st.booleans()), bn=draw(st.booleans()), **_draw_act(draw, st),
                **_draw_degenerate(draw, st, cout))


def _build_conv(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    conv = nn.Conv2d(c, p["cout"], p["k"], p["stride"], p["padding"], p["dilation"], p["groups"], bias=p["bias"])
    _apply_degenerate(conv.weight, conv.bias, p)
    m = _ConvBlock(conv, p["bn"], _act_module(p["act"], p["lo"], p["hi"]))
    if p["bn"] and p["degenerate"] == "zero":
        with torch.no_grad():                   # BN gamma 0, beta = const: the same constant channel
            for ch in p["channels"]:
                m.bn.weight[ch] = 0.0
                m.bn.bias[ch] = p["const"]
    oh = _out(h, p["k"], p["stride"], p["padding"], p["dilation"])
    ow = _out(w, p["k"], p["stride"], p["padding"], p["dilation"])
    return m, (p["cout"], oh, ow)


class _Residual(nn.Module):
    """x + f(x) (f: one or two shape-preserving convs), or g(x) + f(x) with a 1x1 conv shortcut; optional act."""

    def __init__(self, c: int, two: bool, shortcut: bool, act: nn.Module, depthwise: bool):
        super().__init__()
        g = c if depthwise else 1
        self.f1 = nn.Conv2d(c, c, 3, 1, 1, groups=g)
        self.relu = nn.ReLU()
        self.f2 = nn.Conv2d(c, c, 1) if two else None
        self.short = nn.Conv2d(c, c, 1) if shortcut else None
        self.act = act

    def forward(self, x):
        y = self.f1(x)
        if self.f2 is not None:
            y = self.f2(self.relu(y))
        s = self.short(x) if self.short is not None else x
        return self.act(y + s)


def _draw_residual(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    return dict(two=draw(st.booleans()), shortcut=draw(st.booleans()), depthwise=draw(st.booleans()),
                **_draw_act(draw, st), **_draw_degenerate(draw, st, shape[0]))


def _build_residual(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    m = _Residual(shape[0], p["two"], p["shortcut"], _act_module(p["act"], p["lo"], p["hi"]), p["depthwise"])
    _apply_degenerate(m.f1.weight, m.f1.bias, p)
    return m, shape


def _draw_pool(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    _, h, w = shape
    k = min(draw(st.sampled_from([2, 3])), h, w)
    s = draw(st.sampled_from([1, 2]))
    return dict(k=k, stride=s, padding=draw(st.integers(0, k // 2)))


def _build_maxpool(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    return nn.MaxPool2d(p["k"], p["stride"], p["padding"]), (c, _out(h, p["k"], p["stride"], p["padding"]),
                                                            _out(w, p["k"], p["stride"], p["padding"]))


def _build_avgpool(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = shape
    return nn.AvgPool2d(p["k"], p["stride"], p["padding"]), (c, _out(h, p["k"], p["stride"], p["padding"]),
                                                            _out(w, p["k"], p["stride"], p["padding"]))


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _build_gap(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    if p["how"] == "mean":
        return _Mean(), (shape[0],)
    return nn.AdaptiveAvgPool2d(1), (shape[0], 1, 1)


def _build_linear(p: dict[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    lin = nn.Linear(shape[0], p["out"], bias=p["bias"])
    _apply_degenerate(lin.weight, lin.bias, p)
    return nn.Sequential(lin, _act_module(p["act"], p["lo"], p["hi"])), (p["out"],)


def _draw_linear(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    out = draw(st.integers(1, 12))
    return dict(out=out, bias=draw(st.booleans()), **_draw_act(draw, st), **_draw_degenerate(draw, st, out))


def _draw_clamp(draw: Draw, st: Any, shape: Shape) -> dict[str, Any]:
    d = _draw_act(draw, st)
    if d["act"] == "none":
        d["act"] = "relu"
    return d


OPS: dict[str, OpEntry] = {
    "conv": OpEntry(_spatial, _draw_conv, _build_conv),
    "residual": OpEntry(_spatial, _draw_residual, _build_residual),
    "maxpool": OpEntry(_spatial, _draw_pool, _build_maxpool),
    "avgpool": OpEntry(_spatial, _draw_pool, _build_avgpool),
    "gap": OpEntry(_spatial, lambda draw, st, s: dict(how=draw(st.sampled_from(["adaptive", "mean"]))), _build_gap),
    "flatten": OpEntry(lambda s: _spatial(s) and s[0] * s[1] * s[2] <= 512, lambda draw, st, s: {},
                       lambda p, s: (nn.Flatten(), (s[0] * s[1] * s[2],))),
    # an activation that cannot be fused into a producer (after a pool / flatten): a standalone integer clamp
    "clamp": OpEntry(lambda s: True, _draw_clamp, lambda p, s: (_act_module(p["act"], p["lo"], p["hi"]), s)),
    "linear": OpEntry(lambda s: len(s) == 1, _draw_linear, _build_linear),
}
#: ops a graph must contain at least one of (the pipeline needs a conv or linear)
WEIGHTED = ("conv", "residual", "linear")


class FuzzNet(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def graph_specs(max_ops: int = 6, ops: tuple[str, ...] | None = None):
    """Hypothesis strategy of graph specs (JSON-able dicts)."""
    from hypothesis import strategies as st

    names = tuple(ops or OPS)

    @st.composite
    def spec(draw: Draw) -> dict[str, Any]:
        c = draw(st.sampled_from([1, 2, 3, 4, 5]))
        h = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 12]))
        w = draw(st.sampled_from([h, h, 1, 4, 9]))
        shape: Shape = (c, h, w)
        chain: list[dict[str, Any]] = []
        for i in range(draw(st.sampled_from([k for k in range(1, max_ops + 1) for _ in range(min(k, 3))]))):
            ok = [n for n in names if OPS[n].applies(shape)]
            if i == 0:
                ok = [n for n in ok if n in WEIGHTED] or ok
            name = draw(st.sampled_from(ok))
            params = OPS[name].draw(draw, st, shape)
            _, shape = OPS[name].build(params, shape)
            chain.append(dict(op=name, **params))
        if not any(b["op"] in WEIGHTED for b in chain):
            name = "conv" if len(shape) == 3 else "linear"
            chain.append(dict(op=name, **OPS[name].draw(draw, st, shape)))
        n_weighted = sum(b["op"] in ("conv", "linear") for b in chain) + 3 * sum(b["op"] == "residual" for b in chain)
        return dict(
            input_shape=[c, h, w], chain=chain, seed=draw(st.integers(0, 2 ** 16)),
            a_bits=draw(st.integers(2, 8)), w_bits=[draw(st.integers(2, 8)) for _ in range(n_weighted)],
            first_last_8bit=draw(st.booleans()),
            data=draw(st.sampled_from(["normal"] * 6 + ["uniform01", "zeros", "const_channel", "large"])))

    return spec()


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The torch model of ``spec`` (seeded weights; BN statistics randomized)."""
    torch.manual_seed(spec["seed"])
    shape: Shape = tuple(spec["input_shape"])
    blocks = []
    for b in spec["chain"]:
        params = {k: v for k, v in b.items() if k != "op"}
        m, shape = OPS[b["op"]].build(params, shape)
        blocks.append(m)
    model = FuzzNet(blocks).eval()
    g = torch.Generator().manual_seed(spec["seed"])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            keep = m.weight.data == 0          # a degenerate channel set by the builder
            m.weight.data.copy_(torch.where(keep, m.weight.data, torch.rand(c, generator=g) + 0.5))
            m.bias.data.copy_(torch.where(keep, m.bias.data, torch.rand(c, generator=g) - 0.5))
    return model


def calibration_data(spec: dict[str, Any], n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    shape = (n, *spec["input_shape"])
    kind = spec["data"]
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "uniform01":
        return rng.uniform(0, 1, shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "const_channel":
        x[:, 0] = 0.0
    if kind == "large":
        x *= 1e3
    return x


def _named(msg: str) -> bool:
    return "'" in msg or '"' in msg


@dataclass
class FuzzResult:
    """The outcome of one graph: ``status`` ok | named_error | failure, with details."""

    spec: dict[str, Any]
    status: str
    stage: str = ""
    message: str = ""
    ops: list[str] = field(default_factory=list)
    int_ops: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_local_lsb: int = 0
    exact_fraction_vs_fakequant: float | None = None
    schedules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def local_lsb(qm, graph, q_in: np.ndarray) -> int:
    """Max |integer - fake-quant| in output LSBs over every node, each node fed the same (integer) inputs."""
    from .ir.reference import run_reference
    from .parity import to_grid

    ref = run_reference(graph, q_in, return_all=True)
    tensors = {graph.input.name: graph.input, **{n.name: n.out for n in graph.nodes}}
    env = {k: torch.from_numpy(tensors[k].dequantize(v)) for k, v in ref.items()}
    worst = 0
    fnodes = {n.name: n for n in qm.graph.nodes}
    for node in graph.nodes:
        y = qm._run_node(fnodes[node.name], env).numpy()
        d = np.abs(to_grid(y, node.out) - ref[node.name].astype(np.int64))
        worst = max(worst, int(d.max(initial=0)))
    return worst


def check_spec(spec: dict[str, Any], work: Path, schedules: tuple[str, ...] = ("auto", "plain"),
               lsb_tolerance: int = 1) -> FuzzResult:
    """Run the checks of the module docstring on one spec; never raises (the result says what happened)."""
    from .api import quantize, to_integer
    from .backend.compile import compile_graph
    from .backend.runtime import CompiledModel
    from .errors import Ptq2TvmError
    from .fold.bounds import INT32_MAX, INT32_MIN, accumulator_range
    from .frontend.qmodel import QuantConfig
    from .ir.reference import run_reference
    from .parity import to_grid

    t0 = time.perf_counter()
    res = FuzzResult(spec, "ok", ops=sorted({b["op"] for b in spec["chain"]}))
    stage = "build"
    try:
        model = build_model(spec)
        calib = calibration_data(spec)
        stage = "quantize"
        from .frontend.trace import trace_model

        names = [n.name for n in trace_model(model, tuple(spec["input_shape"])).nodes if n.op in ("conv", "linear")]
        wb = dict(zip(names, spec["w_bits"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = quantize(model, calib, QuantConfig(spec["w_bits"][0], spec["a_bits"], spec["first_last_8bit"],
                                                    layer_w_bits=wb), progress=False)
            stage = "fold"
            graph = to_integer(qm)
        res.int_ops = sorted({n.op for n in graph.nodes})
        stage = "bound"
        tq = {graph.input.name: graph.input, **{n.name: n.out for n in graph.nodes}}
        for n in graph.nodes:
            if n.op in ("conv2d", "dense"):
                lo, hi = accumulator_range(n.arrays["weight"], n.arrays["bias"], tq[n.inputs[0]].qmax)
                if lo.min() < INT32_MIN or hi.max() > INT32_MAX:
                    raise AssertionError(f"'{n.name}': accumulator bound not proven")
        rng = np.random.default_rng(spec["seed"])
        q = np.concatenate([graph.input.quantize(calib[:4]),
                            rng.integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)])
        stage = "reference"
        ref = run_reference(graph, q)
        for sched in schedules:
            stage = f"compile:{sched}"
            so = work / f"fuzz_{sched}.so"
            compile_graph(graph, so, batch=3, schedule=sched)
            stage = f"run:{sched}"
            out = CompiledModel(so).run_int(q)
            if not np.array_equal(out, ref):
                raise AssertionError(f"schedule '{sched}': {int((out != ref).sum())} of {ref.size} elements differ "
                                     f"from the reference")
            res.schedules.append(sched)
        stage = "fakequant"
        res.max_local_lsb = local_lsb(qm, graph, q[:4])
        fq = qm(torch.from_numpy(calib[:4])).detach().numpy()
        res.exact_fraction_vs_fakequant = float((to_grid(fq, graph.output) == ref[:4]).mean())
        if res.max_local_lsb > lsb_tolerance:
            raise AssertionError(f"integer vs fake-quant: {res.max_local_lsb} LSB on one node (tolerance "
                                 f"{lsb_tolerance})")
    except Ptq2TvmError as e:
        named = _named(str(e)) and stage in ("quantize", "fold")
        res.status, res.stage, res.message = ("named_error" if named else "failure"), stage, str(e)[:600]
    except Exception as e:  # noqa: BLE001 - a fuzzer records every other exception as a failure
        res.status, res.stage = "failure", stage
        res.message = f"{type(e).__name__}: {e}"[:600] + "\n" + traceback.format_exc(limit=4)[-800:]
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def dump(results: list[FuzzResult], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in results], indent=1))
