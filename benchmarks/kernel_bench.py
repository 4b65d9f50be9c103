"""Time the hand-scheduled int8 kernels on ResNet-18's layer shapes (224x224, batch 1) and estimate the network time.

    .venv/bin/python benchmarks/kernel_bench.py [--threads 2] [--rounds 9] [--number 10] [--no-int4] [--no-int2]
                                              [--layers 'SUBSTR,...'] [--no-network] [--quick]
                                              [--cold-weights COPIES]
                                              [--out benchmarks/results/kernel_bench.json]

Every distinct conv shape is built once as a standalone .so with the hand schedule (no tuning); variants (int8,
int8 + fused residual, int4 weights two per byte, and on AVX2 int2 weights four per byte: what the x86 backend
stores for 2-bit layers there) are timed interleaved, round-robin, so that machine noise hits them alike; the
table reports the median over rounds and the best round. The 2 cores are shared with other jobs: when they are busy
the median can be 2-3x the best round; the best round is then the better estimate of the kernel's own speed (short
rounds, few runs each, to catch quiet moments). A whole ResNet-18-shaped network is also built from the kernels
(Relax VM, random weights) and timed run by run. GMAC/s counts real MACs (the stem's 3 input channels, not
the 4 it is padded to) and is compared with the VNNI peak: 64 MAC/cycle/core x 3.63 GHz x threads (467 GMAC/s on 2).
The network estimate sums conv times x multiplicity (the second conv of each basic block with its residual fused)
plus the ops between convs (input layout, max-pool, global average pool, fc). On an AVX2 target the int4 / int2
variants use the VNNI weight layout and vpmaddubsw (<= 4-bit weights are always proved exact for it, as in the
network build), the int8 variant the int16 vpmaddwd kernel (W8A8). ``--layers`` keeps the conv shapes whose name
contains one of the given substrings (the estimate then covers only those).

``--cold-weights COPIES`` adds two rows per conv variant, timed by a Python loop over the kernel
(``StandaloneKernel.rotating_timer``): ``<variant> cold`` cycles through COPIES copies of the weights (8 copies of
ResNet-18's 3x3 512 -> 512 are 19 MB: each call meets its weights out of the cores' L1 / L2, from L3 or memory, as
a layer does in a network where 11 MB of other weights pass between two of its calls) and ``<variant> warm`` runs
the same loop on one copy. The ``vs`` column of a cold row is cold / warm, of a warm row warm / the variant's own
timing (the loop's overhead). What kernels/prefetch.py was measured with (session 19: 3x3 512 -> 512 at 7x7,
0.285 ms cold vs 0.218 ms warm before the prefetch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels as K  # noqa: E402

PEAK_MAC_PER_CYCLE_CORE = 64
CLOCK_GHZ = 3.63

# name, C, H(=W), O, k, stride, pad, ic_block, count without residual, count with fused residual
RESNET18_CONVS = [
    ("stem 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3, 4, 1, 0),
    ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1, 16, 2, 2),
    ("3x3/2 64->128 @56", 64, 56, 128, 3, 2, 1, 16, 1, 0),
    ("1x1/2 64->128 @56 (ds)", 64, 56, 128, 1, 2, 0, 16, 1, 0),
    ("3x3 128->128 @28", 128, 28, 128, 3, 1, 1, 16, 1, 2),
    ("3x3/2 128->256 @28", 128, 28, 256, 3, 2, 1, 16, 1, 0),
    ("1x1/2 128->256 @28 (ds)", 128, 28, 256, 1, 2, 0, 16, 1, 0),
    ("3x3 256->256 @14", 256, 14, 256, 3, 1, 1, 16, 1, 2),
    ("3x3/2 256->512 @14", 256, 14, 512, 3, 2, 1, 16, 1, 0),
    ("1x1/2 256->512 @14 (ds)", 256, 14, 512, 1, 2, 0, 16, 1, 0),
    ("3x3 512->512 @7", 512, 7, 512, 3, 1, 1, 16, 1, 2),
]


def _weights(rng, shape, bits):
    lo, hi = K.layout.WEIGHT_RANGES[bits]
    return rng.integers(lo, hi + 1, shape, dtype=np.int8)


def _packing(bits, isa, ubsw=False):
    """(pack isa, ubsw_exact, packing kwargs) of ``bits``-bit weights on ``isa``, as the network build does it
    (``ubsw``: int8 weights on vpmaddubsw too, as for W8 with <= 7-bit activations; timing only)."""
    low = bits <= 4 or ubsw
    layout = "vnni" if isa == "avx2" and low else K.pack_isa(isa)
    return layout, isa == "avx2" and low, dict(int4=bits == 4, int2=bits == 2)


def _conv_arrays(rng, c, h, o, k, s, p, icb, bits=8, residual=False, isa="vnni", ubsw=False):
    x = rng.integers(0, 256, (1, c, h, h), dtype=np.uint8)
    w = _weights(rng, (o, c, k, k), bits)
    oh = (h + 2 * p - k) // s + 1
    bias = rng.integers(-(1 << 16), 1 << 16, o).astype(np.int32)
    m = rng.integers(1 << 29, 1 << 31, o, dtype=np.int64).astype(np.int32)
    sh = np.full(o, 40, np.int32)
    params = K.pack_channel_params(bias, m, sh, m)
    layout, _, kw = _packing(bits, isa, ubsw)
    arrays = [K.nchw_to_nchwc(x, icb, 3), K.pack_conv_weight(w, 1, icb, isa=layout, **kw), *params[:3]]
    if residual:
        arrays += [rng.integers(0, 256, (1, -(-o // 16), oh, oh, 16), dtype=np.uint8), params[3]]
    return arrays, oh


def build_conv(rng, spec, target, isa, bits=8, residual=False, tile=None, rows=False, ubsw=False):
    """One conv kernel with ``bits``-bit weights (8, 4: two per byte, 2: four per byte); ``rows=True``: the first
    conv in the interleaved row layout (conv2d_rows_requant)."""
    name, c, h, o, k, s, p, icb, _, _ = spec
    opts = {"tile": tile} if tile is not None else None
    layout, ubsw, kw = _packing(bits, isa, ubsw)
    if rows:
        x = rng.integers(0, 256, (1, c, h, h), dtype=np.uint8)
        w = _weights(rng, (o, c, k, k), bits)
        params = K.pack_channel_params(rng.integers(-(1 << 16), 1 << 16, o).astype(np.int32),
                                       rng.integers(1 << 29, 1 << 31, o, dtype=np.int64).astype(np.int32),
                                       np.full(o, 40, np.int32))
        arrays = [K.nchw_to_rows(x, k, s, p, 3), K.pack_rows_weight(w, isa=layout, **kw), *params]
        kern = K.build_standalone(K.conv2d_rows_requant, arrays, target, options=opts, in_channels=c, in_width=h,
                                  kernel=k, stride=s, padding=p, output_zero_point=5, isa=layout, ubsw_exact=ubsw)
        oh = (h + 2 * p - k) // s + 1
    else:
        arrays, oh = _conv_arrays(rng, c, h, o, k, s, p, icb, bits, residual, isa, ubsw)
        kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, options=opts, stride=s, padding=p,
                                  input_zero_point=3, output_zero_point=5, isa=layout, ubsw_exact=ubsw)
    macs = oh * oh * o * c * k * k
    return kern, arrays, macs


def other_ops(rng, target, isa):
    """The non-conv ops of ResNet-18 at batch 1, as (name, kernel, arrays)."""
    ops = []
    x = rng.integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    ops.append(("input NCHW -> rows", K.build_standalone(K.te_nchw_to_rows, [x], target, kernel=7, stride=2,
                                                         padding=3, pad_value=3), [x]))
    ops.append(("input NCHW -> NCHW4c", K.build_standalone(K.te_nchw_to_nchwc, [x], target, block=4, pad_value=3),
                [x]))
    y = rng.integers(0, 256, (1, 4, 112, 112, 16), dtype=np.uint8)
    ops.append(("maxpool 3x3/2 64 @112", K.build_standalone(K.maxpool2d_nchwc, [y], target, kernel=3, stride=2,
                                                             padding=1), [y]))
    g = rng.integers(0, 256, (1, 32, 7, 7, 16), dtype=np.uint8)
    mg, sg = K.pack_channel_params(np.full(512, 1 << 30, np.int32), np.full(512, 36, np.int32), kinds="ms")
    ops.append(("global avgpool 512 @7", K.build_standalone(K.global_avgpool_nchwc_requant, [g, mg, sg], target),
                [g, mg, sg]))
    f = rng.integers(0, 256, (1, 512), dtype=np.uint8)
    wd = rng.integers(-128, 128, (1000, 512), dtype=np.int8)
    bd, md, sd = K.pack_channel_params(np.zeros(1000, np.int32), np.full(1000, 1 << 30, np.int32),
                                       np.full(1000, 40, np.int32))
    arr = [f, K.pack_dense_weight(wd, isa=isa), bd, md, sd]
    ops.append(("fc 512->1000", K.build_standalone(K.dense_requant, arr, target, out_features=1000, isa=isa), arr))
    return ops


def build_resnet18(rng, target, isa, bits=8, batch=1):
    """A whole ResNet-18-shaped integer network (random weights, valid requant parameters) built from the kernels
    with Relax BlockBuilder.emit_te, scheduled with schedule_module, compiled with tvm.compile -> Relax VM."""
    import tvm
    from tvm import relax

    def c(a):
        return relax.const(np.ascontiguousarray(a))

    layout, ubsw, kw = _packing(bits, isa)

    def conv_args(cin, cout, k, first=False):
        w = _weights(rng, (cout, cin, k, k), bits)
        bias = rng.integers(-(1 << 12), 1 << 12, cout).astype(np.int32)
        m = rng.integers(1 << 29, 1 << 30, cout, dtype=np.int64).astype(np.int32)
        # shift so that the output spreads over uint8: |acc| ~ 128 * 30 * sqrt(K)
        sh = np.full(cout, int(np.log2(128 * 30 * np.sqrt(cin * k * k) * (1 << 29) / 40)), np.int32)
        wp = K.pack_rows_weight(w, isa=layout, **kw) if first else K.pack_conv_weight(w, 1, 16, isa=layout, **kw)
        return [c(wp), *map(c, K.pack_channel_params(bias, m, sh))], sh

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 3, 224, 224), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit_te(K.te_nchw_to_rows, x, kernel=7, stride=2, padding=3, pad_value=3)
            a, _ = conv_args(3, 64, 7, first=True)
            t = bb.emit_te(K.conv2d_rows_requant, t, *a, in_channels=3, in_width=224, kernel=7, stride=2, padding=3,
                           output_zero_point=0, isa=layout, ubsw_exact=ubsw)
            t = bb.emit_te(K.maxpool2d_nchwc, t, kernel=3, stride=2, padding=1)
            cin = 64
            for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
                a1, _ = conv_args(cin, cout, 3)
                y = bb.emit_te(K.conv2d_nchwc_requant, t, *a1, stride=stride, padding=1, isa=layout, ubsw_exact=ubsw)
                if stride != 1 or cin != cout:
                    ad, _ = conv_args(cin, cout, 1)
                    r = bb.emit_te(K.conv2d_nchwc_requant, t, *ad, stride=stride, padding=0, isa=layout,
                                   ubsw_exact=ubsw)
                else:
                    r = t
                a2, sh2 = conv_args(cout, cout, 3)
                mr_raw = np.exp2(sh2 - 2.0).clip(1, 2 ** 31 - 1).astype(np.int64).astype(np.int32)   # r / 4
                mr = c(K.pack_channel_params(mr_raw, kinds="m")[0])
                t = bb.emit_te(K.conv2d_nchwc_requant, y, *a2, r, mr, stride=1, padding=1, residual_zero_point=0,
                               isa=layout, ubsw_exact=ubsw)
                cin = cout
            mg, sg = K.pack_channel_params(np.full(512, 1 << 30, np.int32), np.full(512, 36, np.int32), kinds="ms")
            t = bb.emit_te(K.global_avgpool_nchwc_requant, t, c(mg), c(sg))
            t = bb.emit_te(K.nchwc_flatten, t, channels=512)
            wd = rng.integers(-128, 128, (1000, 512), dtype=np.int8)
            bd, md, sd = K.pack_channel_params(np.zeros(1000, np.int32), np.full(1000, 1 << 30, np.int32),
                                               np.full(1000, 40, np.int32))
            t = bb.emit_te(K.dense_requant, t, c(K.pack_dense_weight(wd, isa=isa)), c(bd), c(md), c(sd),
                           out_features=1000, isa=isa)
            out = bb.emit_output(t)
        bb.emit_func_output(out)
    mod = K.schedule_module(bb.get(), target)
    ex = K.compile_module(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xin = tvm.runtime.tensor(rng.integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8), tvm.cpu())
    return vm, xin


def interleaved(timers: dict, rounds: int) -> dict:
    res = {k: [] for k in timers}
    for t in timers.values():
        t()                                    # warm-up
    for _ in range(rounds):
        for k, t in timers.items():
            res[k].append(t())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--number", type=int, default=3, help="runs per timing round (kernels; the network: 1)")
    ap.add_argument("--no-int4", action="store_true")
    ap.add_argument("--no-int2", action="store_true", help="skip the int2 (four per byte) variant (AVX2 only)")
    ap.add_argument("--layers", default=None, help="comma-separated substrings of the conv names to keep")
    ap.add_argument("--no-network", action="store_true", help="skip the whole-network build and timing")
    ap.add_argument("--isa", default=None, help="vnni | avx2 (default: from this CPU)")
    ap.add_argument("--mcpu", default=None, help="LLVM mcpu (default: this CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--cold-weights", type=int, default=0, metavar="COPIES",
                    help="also time each conv with its weights rotated over COPIES copies (cold, as in a network) "
                         "against the same loop with one copy (warm)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_bench.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.number = 3, 3
    # TVM's thread pool reads it when it starts (its default here oversubscribed the 2 cores: 3x3 512 -> 512 at 7x7
    # took 0.53 ms instead of 0.22)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    mcpu = args.mcpu or ("haswell" if args.isa == "avx2" else None)
    target = K.host_target(args.threads, mcpu)
    isa = args.isa or K.target_isa(target)
    peak = PEAK_MAC_PER_CYCLE_CORE * CLOCK_GHZ * args.threads if isa == "vnni" else None
    rng = np.random.default_rng(0)
    low = [k for k, b, skip in (("int4w", 4, args.no_int4), ("int2w", 2, args.no_int2 or isa != "avx2")) if not skip]
    low_bits = {"int4w": 4, "int2w": 2}
    convs = [sp for sp in RESNET18_CONVS
             if args.layers is None or any(part.strip() in sp[0] for part in args.layers.split(","))]

    timers, meta = {}, {}
    t0 = time.perf_counter()
    for spec in convs:
        name, *_, n_plain, n_res = spec
        first = spec[7] == 4
        variants = [("int8", 8, False, first)]
        if first:
            variants.append(("int8 4c", 8, False, False))        # NCHW4c stem, for comparison
        if n_res:
            variants.append(("int8+res", 8, True, False))
        if isa == "avx2" and low:      # int8 weights on vpmaddubsw (W8 with <= 7-bit activations): the int4 / int2
            variants.append(("int8ubsw", 8, False, first))     # kernels minus their unpack
        variants += [(kind, low_bits[kind], False, first) for kind in low]
        for vname, bits, res, rows in variants:
            kern, arrays, macs = build_conv(rng, spec, target, isa, bits=bits, residual=res, rows=rows,
                                            ubsw=vname == "int8ubsw")
            timers[(name, vname)] = kern.timer(*arrays, number=args.number)
            if args.cold_weights:
                for label, copies in (("warm", 1), ("cold", args.cold_weights)):
                    timers[(name, f"{vname} {label}")] = kern.rotating_timer(arrays, copies, number=args.number
                                                                             * max(copies, 4))
            oh = (spec[2] + 2 * spec[6] - spec[4]) // spec[5] + 1
            # int4 weights are unpacked once per task, then the int8 tile runs (unpack_at="task", the default)
            layout, ubsw, _ = _packing(bits, isa, vname == "int8ubsw")
            tile = K.choose_conv_tile(1, -(-spec[3] // 16), oh, oh, isa=K.dot_product(layout, isa, ubsw)[1],
                                      threads=args.threads)
            meta[(name, vname)] = dict(macs=macs, tile=tile.as_list())
            for label in ("warm", "cold") if args.cold_weights else ():
                meta[(name, f"{vname} {label}")] = dict(macs=macs, tile=tile.as_list())
    for oname, kern, arrays in other_ops(rng, target, isa):
        timers[(oname, "op")] = kern.timer(*arrays, number=args.number)
        meta[(oname, "op")] = dict(macs=0)
    if not args.no_network:
        import tvm

        for kind in ["int8", *low]:
            vm, xin = build_resnet18(rng, target, isa, bits=low_bits.get(kind, 8))
            ev = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1)     # one run per sample: see noise note
            timers[("ResNet-18 end-to-end (VM)", kind)] = (lambda ev=ev, xin=xin: float(ev(xin).mean))
            meta[("ResNet-18 end-to-end (VM)", kind)] = dict(macs=1813561344)
    build_s = time.perf_counter() - t0
    res = interleaved(timers, args.rounds)

    rows = []
    for key, ts in res.items():
        med, best = float(np.median(ts)), float(min(ts))
        macs = meta[key]["macs"]
        row = dict(layer=key[0], variant=key[1], median_us=med * 1e6, best_us=best * 1e6, macs=macs,
                   tile=meta[key].get("tile"))
        if macs:
            row["gmacs"] = macs / med / 1e9
            row["gmacs_best"] = macs / best / 1e9
            if peak:
                row["pct_peak"] = 100 * row["gmacs"] / peak
        rows.append(row)

    by = {(r["layer"], r["variant"]): r for r in rows}
    total = {k: 0.0 for k in ["int8", *low]}
    total_best = {k: 0.0 for k in ["int8", *low]}
    conv_macs = 0
    for spec in convs:
        name, *_, n_plain, n_res = spec
        plain = by[(name, "int8")]
        resr = by.get((name, "int8+res"), plain)
        conv_macs += plain["macs"] * (n_plain + n_res)
        for kind in total:
            src_plain = by.get((name, kind), plain) if kind != "int8" else plain
            src_res = by.get((name, kind), resr) if kind != "int8" else resr
            total[kind] += n_plain * src_plain["median_us"] + n_res * src_res["median_us"]
            total_best[kind] += n_plain * src_plain["best_us"] + n_res * src_res["best_us"]
    # the network uses the row-layout stem, so its input op is "NCHW -> rows" (the NCHW4c op is only for comparison)
    net = {r["variant"]: r for r in rows if r["layer"].startswith("ResNet-18 end-to-end")}
    others = sum(r["median_us"] for r in rows if r["variant"] == "op" and "NCHW4c" not in r["layer"])
    others_best = sum(r["best_us"] for r in rows if r["variant"] == "op" and "NCHW4c" not in r["layer"])

    hdr = f"{'layer':28s} {'variant':14s} {'tile P,Q,R':11s} {'median us':>10s} {'best us':>9s} {'GMAC/s':>7s} " \
          f"{'%peak':>6s} {'vs':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tile = ",".join(map(str, r["tile"])) if r.get("tile") else ""
        g = f"{r['gmacs']:7.1f}" if "gmacs" in r else " " * 7
        pp = f"{r['pct_peak']:6.1f}" if "pct_peak" in r else " " * 6
        v = r["variant"]        # vs int8; a warm row vs its variant, a cold row vs its warm row
        base = by.get((r["layer"], v[:-5] + " warm" if v.endswith(" cold") else v[:-5] if v.endswith(" warm")
                       else "int8"))
        rel = f"{r['median_us'] / base['median_us']:7.2f}" if base and r["variant"] != "op" else " " * 7
        print(f"{r['layer']:28s} {r['variant']:14s} {tile:11s} {r['median_us']:10.1f} {r['best_us']:9.1f} {g} {pp} "
              f"{rel}")
    print()
    print(f"ResNet-18 convs: {conv_macs / 1e9:.3f} GMAC; peak {peak or float('nan'):.0f} GMAC/s -> "
          f"{(conv_macs / peak / 1e6) if peak else float('nan'):.2f} ms at 100% of peak")
    for kind in total:
        est = (total[kind] + others) / 1e3
        est_b = (total_best[kind] + others_best) / 1e3
        print(f"estimated network ({kind} weights): convs {total[kind] / 1e3:.2f} ms + other ops {others / 1e3:.2f} ms"
              f" = {est:.2f} ms median ({est_b:.2f} ms from best rounds)")

    out = dict(
        machine=dict(cpu=platform.processor() or platform.machine(), mcpu=str(target.attrs.get("mcpu")),
                     threads=args.threads, cpu_count=os.cpu_count(), isa=isa),
        peak_gmacs=peak, rounds=args.rounds, number=args.number, build_seconds=round(build_s, 1),
        rows=rows, layers=[sp[0] for sp in convs], loadavg=[round(v, 2) for v in os.getloadavg()],
        resnet18=dict(conv_gmac=conv_macs / 1e9, other_ops_ms=others / 1e3,
                      **{f"conv_ms_{k}": v / 1e3 for k, v in total.items()},
                      **{f"est_total_ms_{k}": (v + others) / 1e3 for k, v in total.items()},
                      est_total_ms_int8_best=(total_best["int8"] + others_best) / 1e3,
                      measured_ms={k: dict(median=r["median_us"] / 1e3, best=r["best_us"] / 1e3)
                                   for k, r in net.items()}),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for kind, r in net.items():
        print(f"measured ResNet-18 end-to-end ({kind} weights, Relax VM, batch 1, {args.threads} threads): "
              f"{r['median_us'] / 1e3:.2f} ms median, {r['best_us'] / 1e3:.2f} ms best round")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
