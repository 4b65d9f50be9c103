"""Per layer type: the .so's kernels vs OpenVINO INT8's layers, timed in one process, interleaved round by round.

    .venv/bin/python benchmarks/layer_gap.py [--models resnet18 mobilenet_v2] [--bits 7/8 8/8] [--rounds 10]
        [--threads 1] [--name layer_gap_avx2_host]

Where does the .so lose to OpenVINO INT8 (oneDNN)? For each model (seeded random weights, batch 1 or `--batch`, 224x224) and
W/A setting the .so is built as `ptq2tvm compile` builds it; its kernels are recorded with the Relax VM's
instrument hook (arguments of one inference) and then called one by one, in network order, with those arguments.
OpenVINO INT8 runs ORT's QDQ model (the `ort_int8` / `openvino_int8` baseline of benchmarks/latency_cpu.py) with
PERF_COUNT on, and each executed node's `real_time` is read from the request's profiling info. Each round runs one
inference of each side; medians over the rounds per layer, summed per layer type.

Layer types come from the shapes on both sides (kernel size, stride = input height / output height, depthwise or
dense weights): `stem` (first conv, <= 4 input channels), `conv KxK[/2]`, `dw KxK[/2]`, `fc`, and `other` (pools,
adds, layout changes, input quantization; OpenVINO's reorders and fused-op subgraphs). Where the .so computes a 1x1
expand inside the depthwise conv's kernel (kernels/expand_depthwise.py), that kernel and OpenVINO's two layers of
the pair (matched by the module path in their ONNX names) are `1x1 + dw KxK[/2]`. A .so kernel time includes
~1-2 us of Python call overhead (a few % of a 224x224 layer). The OpenVINO model has 7-bit weights on hosts without
VNNI (ORT's reduce_range): W7A8 is the like-for-like .so setting there.

Writes benchmarks/results/<name>.json (per layer and per type) and <name>.md; records the CPU, ISA and load.
Needs a quiet host: on the shared Zen 3 at load 22-26 the medians of 6 rounds per layer were dominated by
preemption (layer types off by 10x either way, while the sums stayed within 10% of each other), so no result of it
is committed yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.api import compile_so, quantize, to_integer, write_json  # noqa: E402
from ptq2tvm.backend.isa import host_isa  # noqa: E402
from ptq2tvm.backend.runtime import set_num_threads  # noqa: E402
from ptq2tvm.bench.baselines import export_onnx, quantize_onnx_int8  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.bench.runner import describe_load  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.mixed.latency import layer_macs  # noqa: E402
from ptq2tvm.models import create_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import vnni_peak  # noqa: E402


def layer_type(x: tuple, w: tuple | None, out: tuple, depthwise: bool) -> str:
    """Type label from NCHW input / output shapes and the (O, I, KH, KW) kernel size of a conv (None: not a conv)."""
    if w is None:
        return "other"
    if len(x) == 2:
        return "fc"
    kh, kw = w
    stride = "/2" if out[-2] and x[-2] // out[-2] >= 2 else ""
    if depthwise:
        return f"dw {kh}x{kw}{stride}"
    return f"conv {kh}x{kw}{stride}"


def fused_expand_pairs(graph) -> dict[str, str]:
    """{depthwise node name: its 1x1 expand node's name} for the pairs this host's build runs as one kernel
    (kernels/expand_depthwise.py; the builder's own rule, ``_BlockedBuilder.expand_depthwise_pairs``)."""
    import kernels as K
    import tvm

    from ptq2tvm.backend.blocked_builder import _BlockedBuilder, x86_isa
    from ptq2tvm.backend.compile import host_target

    target = host_target()
    isa, _ = x86_isa(target)
    if isa is None:
        return {}
    tgt = tvm.target.Target(target)
    builder = _BlockedBuilder(graph, isa, amx=K.target_has_amx(tgt), vbmi=K.target_has_vbmi(tgt))
    return {d: e.name for d, e in builder.expand_depthwise_pairs().items()}


def node_types(graph, fused: dict[str, str] | None = None) -> dict[str, str]:
    """Kernel symbol (``k_<node name>``, as the blocked builder names it) -> layer type of that graph node. Relax
    merges structurally equal kernels under the first one's name: those nodes have the same shapes, hence type.
    The first conv and the max pool after it, where AVX-512 VNNI builds run them as one kernel
    (``k_<conv>_<pool>``, kernels/stem_pool.py), count as ``stem``. A depthwise conv in ``fused`` (its 1x1 expand
    computed in its kernel, :func:`fused_expand_pairs`) is ``1x1 + dw KxK[/2]``; so is its expand node (named in
    the result too, for matching OpenVINO's layers by name: :func:`module_path`)."""
    from ptq2tvm.backend.blocked_builder import _hint

    fused = fused or {}
    kinds: dict[str, str] = {}
    first = True
    stem = None
    for node in graph.nodes:
        kind = "other"
        if node.op == "maxpool2d" and stem is not None and list(node.inputs) == [stem.name]:
            kinds.setdefault(f"{_hint(stem)}_{_hint(node)[2:]}", "stem")
        if node.op == "dense":
            kind = "fc"
        elif node.op == "conv2d":
            o, ig, kh, kw = node.arrays["weight"].shape
            groups = int(node.attrs["groups"])
            cin = ig * groups
            if first and cin <= 4:
                kind, stem = "stem", node
            else:
                stride = "/2" if max(node.attrs["stride"]) >= 2 else ""
                kind = (f"dw {kh}x{kw}" if groups > 1 and groups == cin and ig == 1 else f"conv {kh}x{kw}") + stride
            first = False
        kinds.setdefault(_hint(node), kind)
    by_name = {n.name: n for n in graph.nodes}
    for d, e in fused.items():
        merged = "1x1 + " + kinds[_hint(by_name[d])]
        kinds[_hint(by_name[d])] = merged
        kinds[f"node:{d}"] = kinds[f"node:{e}"] = merged
    return kinds


def module_path(onnx_node_name: str) -> str:
    """The PyTorch module path in an ONNX node name as torch.onnx.export scopes it:
    ``/features/features.2/conv/conv.0/conv.0.0/Conv/WithoutBiases`` -> ``features.2.conv.0.0`` (each scope names
    the module relative to an ancestor: a scope's leading components that repeat the path's last ones are dropped;
    the op's own segments, which start with an upper-case letter, end the path)."""
    path: list[str] = []
    for seg in onnx_node_name.split("/"):
        if not seg or seg[0].isupper():
            if path:
                break
            continue
        parts = seg.split(".")
        k = max((k for k in range(min(len(path), len(parts)) + 1) if path[len(path) - k:] == parts[:k]), default=0)
        path += parts[k:]
    return ".".join(path)


def kernel_macs(graph, fused: dict[str, str] | None = None) -> dict[str, int | None]:
    """Kernel symbol (as :func:`node_types` names them) -> multiply-adds per image on real input
    (:func:`ptq2tvm.mixed.latency.layer_macs` with ``skip_padding``), the products the VNNI floor column is quoted
    from: a fused 1x1 expand + depthwise kernel counts both layers; the stem + pool kernel ``k_<conv>_<pool>`` counts
    the conv (:func:`macs_of`). None for a kernel with a grouped or depthwise conv in it: its products do not fill
    the 4-byte groups of ``vpdpbusd``, so it has no floor (as ``latency_cpu.floor_gmac_per_image`` gives none for a
    network with one)."""
    from ptq2tvm.backend.blocked_builder import _hint

    macs = layer_macs(graph, skip_padding=True)
    by_name = {n.name: n for n in graph.nodes}
    grouped = {n.name for n in graph.nodes if n.op == "conv2d" and int(n.attrs["groups"]) > 1}
    out: dict[str, int | None] = {_hint(by_name[name]): None if name in grouped else v for name, v in macs.items()}
    for d, e in (fused or {}).items():
        sym = _hint(by_name[d])
        out[sym] = None if out[sym] is None or e in grouped else out[sym] + macs[e]
    return out


def macs_of(symbol: str, macs: dict[str, int | None]) -> int | None:
    """``symbol``'s entry of :func:`kernel_macs`, or the entry it extends (``k_conv1`` for ``k_conv1_maxpool``);
    0 for a kernel without products (pools, adds, layout changes); None for one without a floor."""
    if symbol in macs:
        return macs[symbol]
    return next((v for k, v in sorted(macs.items(), key=lambda kv: -len(kv[0])) if symbol.startswith(k + "_")), 0)


def so_kernels(so: Path, x: np.ndarray, graph) -> list[tuple[str, object, list, str]]:
    """(symbol, packed function, arguments, type) of every kernel call of one inference of ``so``'s float entry."""
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(so))
    calls: list[tuple[str, list]] = []

    def instrument(func, sym, before, ret, *args):  # noqa: ANN001, ARG001 - TVM's instrument signature
        if before and not sym.startswith("vm.builtin") and sym not in ("main", "main_float"):
            calls.append((sym, [a.numpy() if hasattr(a, "numpy") else a for a in args]))
        return 0

    vm = relax.VirtualMachine(lib, tvm.cpu())
    vm.set_instrument(instrument)
    vm["main_float"](tvm.runtime.tensor(x))
    kinds = node_types(graph, fused_expand_pairs(graph))
    return [(sym, lib.get_function(sym, query_imports=True),
             [tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in args], kinds.get(sym, "other"))
            for sym, args in calls]


def openvino_request(onnx_path: Path, threads: int, input_shape: tuple[int, ...]):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    model.reshape(list(input_shape))          # the batch-1 export, run at the .so's batch (static shapes)
    compiled = core.compile_model(model, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": int(threads),
        "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    ops = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ordered_ops()}
    return compiled.create_infer_request(), ops


def ov_type(op, node_type: str, first: bool) -> str:
    """Layer type of an executed OpenVINO node (from its runtime-model op's shapes)."""
    if op is None or node_type not in ("Convolution", "GroupConvolution", "FullyConnected", "MatMul"):
        return "other"
    if node_type in ("FullyConnected", "MatMul"):
        return "fc"
    x = tuple(op.input(0).get_partial_shape().to_shape())
    w = tuple(op.input(1).get_partial_shape().to_shape())
    out = tuple(op.output(0).get_partial_shape().to_shape())
    if first and x[1] <= 4:
        return "stem"
    depthwise = len(w) == 5 and w[1] == 1 and w[2] == 1
    return layer_type(x, tuple(w[-2:]), out, depthwise)


def measure(model_name: str, bits: str, rounds: int, threads: int, work: Path, batch: int = 1) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
    x = calib[:batch]
    w, a = (int(v) for v in bits.split("/"))
    graph = to_integer(quantize(model, calib[:8], QuantConfig(w, a), progress=False))
    so = work / f"{model_name}_w{w}a{a}_b{batch}.so"
    t0 = time.perf_counter()
    compile_so(graph, so, batch=batch)
    build_s = time.perf_counter() - t0
    kernels = so_kernels(so, x, graph)
    # the .so's fused 1x1 expand + depthwise kernels against OpenVINO's two layers of the pair (matched by name)
    fused_kinds = {k: v for k, v in node_types(graph, fused_expand_pairs(graph)).items() if k.startswith("node:")}
    onnx = export_onnx(model, x[:1], work / f"{model_name}.onnx")
    q = work / f"{model_name}.int8.onnx"
    if not q.is_file():
        q = quantize_onnx_int8(onnx, calib, out_path=q)
    request, ops = openvino_request(q, threads, x.shape)
    peak_loop = None
    if host_isa() == "avx512_vnni" and vnni_peak.has_vnni():
        try:
            peak_loop = vnni_peak.build(work)
            iterations = vnni_peak.iterations_for(peak_loop, 0.2)
        except RuntimeError as e:
            print(f"layer_gap: no VNNI floor ({e})", file=sys.stderr)
    rates: list[float] = []
    ours: dict[int, list[float]] = defaultdict(list)
    theirs: dict[str, list[float]] = defaultdict(list)
    kinds_ov: dict[str, str] = {}
    clock = time.perf_counter_ns
    for r in range(rounds + 1):                     # round 0: warm-up
        for side in ((0, 1) if r % 2 else (1, 0)):
            if side == 0:
                for i, (_, fn, args, _) in enumerate(kernels):
                    t = clock()
                    fn(*args)
                    if r:
                        ours[i].append((clock() - t) / 1e6)
            else:
                request.infer({0: x})
                if not r:
                    continue
                first = True
                for p in request.get_profiling_info():
                    if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED"):
                        if p.node_name not in kinds_ov:
                            kinds_ov[p.node_name] = fused_kinds.get(
                                f"node:{module_path(p.node_name)}",
                                ov_type(ops.get(p.node_name), p.node_type, first))
                        if p.node_type == "Convolution":
                            first = False
                        theirs[p.node_name].append(p.real_time.total_seconds() * 1e3)
        if r and peak_loop is not None:             # the VNNI ceiling between rounds: the VM's clock drifts
            rates += vnni_peak.rate_per_core(peak_loop, threads, iterations)
    per_core = float(np.median(rates)) if rates else None
    by_type: dict[str, dict] = defaultdict(lambda: {"so_ms": 0.0, "so_layers": 0, "openvino_ms": 0.0,
                                                    "openvino_layers": 0, "floor_ms": 0.0 if per_core else None})
    macs = kernel_macs(graph, fused_expand_pairs(graph))
    layers = []
    for i, (sym, _, _, kind) in enumerate(kernels):
        ms = float(np.median(ours[i]))
        products = macs_of(sym, macs)
        floor = (vnni_peak.floor_ms(products / 1e9, batch, per_core, threads)
                 if per_core and products is not None else None)
        t = by_type[kind]
        t["so_ms"] += ms
        t["so_layers"] += 1
        t["floor_ms"] = None if t["floor_ms"] is None or floor is None else t["floor_ms"] + floor   # one None: none
        layers.append(dict(side="ptq2tvm", name=sym, type=kind, median_ms=ms, vnni_floor_ms=floor))
    for name, ts in theirs.items():
        ms = float(np.median(ts))
        by_type[kinds_ov[name]]["openvino_ms"] += ms
        by_type[kinds_ov[name]]["openvino_layers"] += 1
        layers.append(dict(side="openvino_int8", name=name, type=kinds_ov[name], median_ms=ms))
    for v in by_type.values():
        v["ratio"] = v["so_ms"] / v["openvino_ms"] if v["openvino_ms"] > 0 else None
    return dict(model=model_name, bits=f"W{w}A{a}", batch=batch, build_seconds=round(build_s, 1), rounds=rounds,
                by_type=dict(sorted(by_type.items())), layers=layers, loadavg_1min=round(os.getloadavg()[0], 2),
                vpdpbusd_per_s_per_core=per_core, vpdpbusd_rate_spread=[min(rates), max(rates)] if rates else None)


#: what the floor column is and is not (printed under the table)
CAVEAT = (vnni_peak.FLOOR_CAVEAT + ", and kernels of a few ms ran at 0.84-1.0x their floor in some runs, 1.06-1.19x "
          "in others.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--bits", nargs="+", default=["7/8", "8/8"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="images per call (<= 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "runs" / "layer_gap"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="layer_gap_avx2_host")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    host = cpu_features()
    host["isa"] = host_isa() or "none"
    loads = [round(os.getloadavg()[0], 2)]
    results = []
    for m in args.models:
        for bits in args.bits:
            res = measure(m, bits, args.rounds, args.threads, work, args.batch)
            loads.append(res["loadavg_1min"])
            results.append(res)
            print(f"{m} {res['bits']}: " + ", ".join(
                f"{k} {v['so_ms']:.2f}/{v['openvino_ms']:.2f} ms" for k, v in res["by_type"].items()), flush=True)
    lines = [f"# Per layer type: ptq2tvm .so kernels vs OpenVINO INT8 layers, batch {args.batch}, {args.threads} thread(s)", "",
             "| model | .so W/A | layer type | .so layers | .so ms | OpenVINO layers | OpenVINO INT8 ms | .so / OpenVINO "
             "| VNNI floor ms (.so / floor, OpenVINO / floor) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        items = list(res["by_type"].items())
        tot_so = sum(v["so_ms"] for _, v in items)
        tot_ov = sum(v["openvino_ms"] for _, v in items)
        floors = [v["floor_ms"] for _, v in items if v["floor_ms"] is not None]
        if len(floors) < len(items):        # a type without a floor (grouped convs): no floor for the network
            floors = []
        for k, v in items + [("total", {"so_layers": sum(v["so_layers"] for _, v in items), "so_ms": tot_so,
                                         "openvino_layers": sum(v["openvino_layers"] for _, v in items),
                                         "openvino_ms": tot_ov, "ratio": tot_so / tot_ov if tot_ov else None,
                                         "floor_ms": sum(floors) if floors else None})]:
            ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
            floor = vnni_peak.floor_cell(v["floor_ms"], v["so_ms"], v["openvino_ms"])
            lines.append(f"| {res['model']} | {res['bits']} | {k} | {v['so_layers']} | {v['so_ms']:.2f} | "
                         f"{v['openvino_layers']} | {v['openvino_ms']:.2f} | {ratio} | {floor} |")
    lines += ["", f"Host: {host['model_name']} (LLVM cpu {host['llvm_cpu']}, int8 ISA {host['isa']}). "
              f"{describe_load(loads)} Medians of {args.rounds} rounds per layer, "
              "summed per type. `other` differs in kind on the two sides (the .so: pools, adds, layout changes, "
              "input quantization; OpenVINO: reorders, fused-op subgraphs, pools).", ""]
    if any(r["vpdpbusd_per_s_per_core"] for r in results):
        lines += ["VNNI floor: the layers' multiply-adds on real input (padding taps skipped, as the .so's convs do) at "
              "the `vpdpbusd` rate benchmarks/vnni_peak.py's loop ran at between the rounds (median; "
              + ", ".join(f"{r['model']} {r['bits']}: {r['vpdpbusd_per_s_per_core'] / 1e9:.2f} G per second per "
                          f"core, {r['vpdpbusd_rate_spread'][0] / 1e9:.2f}-{r['vpdpbusd_rate_spread'][1] / 1e9:.2f}"
                          for r in results if r["vpdpbusd_per_s_per_core"])
              + "; one 512-bit `vpdpbusd` = 64 multiply-adds): what a layer type would take doing nothing but its "
              "products; none for a kernel with a depthwise or grouped conv (its products do not fill 4-byte "
              "groups) or a type or network with such a kernel. AVX-512 VNNI hosts only. " + CAVEAT, ""]
        lines += ["| model | .so W/A | .so kernel | layer type | .so ms | VNNI floor ms | .so / floor |",
                  "|---|---|---|---|---:|---:|---:|"]
        for res in results:
            lines += [f"| {res['model']} | {res['bits']} | {k['name']} | {k['type']} | {k['median_ms']:.3f} | "
                      f"{k['vnni_floor_ms']:.3f} | {k['median_ms'] / k['vnni_floor_ms']:.2f}x |"
                      for k in res["layers"] if k["side"] == "ptq2tvm" and k.get("vnni_floor_ms")]
        lines += [""]
    lines += [f"Command: `.venv/bin/python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})."]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", dict(results=results, host=host, loadavg_samples=loads,
                                               command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d")))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
