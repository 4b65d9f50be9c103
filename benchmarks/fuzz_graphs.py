"""Fuzz the pipeline on >= 500 random graphs (Hypothesis; ptq2tvm/fuzz.py) and commit a summary.

    nice .venv/bin/python benchmarks/fuzz_graphs.py --graphs 500 --compile-every 4 --cuda-every 25 --jobs 2

Every graph: quantize + fold (success, or a ptq2tvm error naming its layer/tensor), the int32 accumulator bound,
the reference executor, integer vs fake-quant per node (<= 1 LSB from the same integer inputs). Every
``--compile-every``-th graph also: the compiled .so on both CPU backends ('auto' = blocked x86 kernels for this host's ISA;
'plain') bit for bit against the reference; every ``--cuda-every``-th: every kernel of the CUDA build in the CPU
emulation of the CUDA thread model. Each graph is an independent seeded draw (:func:`ptq2tvm.fuzz.fresh_specs`). Writes benchmarks/results/fuzz_graphs.{json,md} (failures with their
specs, so each can be replayed with ``--replay FILE``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def _host_isa() -> str:
    """The kernel ISA the 'auto' builds get on this host (ptq2tvm.backend.isa.host_isa), for the summary."""
    from ptq2tvm.backend.isa import host_isa

    return host_isa() or "generic x86"

#: faults the fuzzer (and the issue's inputs) found, and how each kind was fixed (kept by hand, newest last)
FOUND_AND_FIXED = [
    "zero-weight output channel with a non-zero bias (pruned / BN gamma 0, and a learned AdaQTransform eta on it): "
    "'the int32 bias overflows' -> fit_integer_bounds raises that channel's weight scale (the constant kept exactly)",
    "degenerate activation range (all-zero calibration images, a ReLU dead on every image): the downstream layer's "
    "bias overflowed and it was blamed -> folds (constant tensor), a warning names the collapsed tensor",
    "Conv2d(1400, 4, 7) with every weight code +127 on an 8-bit input: silent int32 accumulator overflow in the .so -> "
    "the fold proves the bound per channel, calibration coarsens those channels' weight grid until it holds",
    "(found by this fuzzer) a fused residual sum whose ReLU output is 0 on every calibration image: its scale "
    "collapsed to 1e-8 and the residual's requantization multiplier s_r / s_out reached 1e9-2.5e9 "
    "('requantization multiplier too large') -> fit_requant_scales raises a collapsed tensor's scale until every "
    "multiplier feeding it is < 2^29 (tests/test_reliability.py::test_residual_sum_dead_on_every_image_folds)",
    "(found by this fuzzer) a zero / tiny-weight channel in a conv with a fused residual: the bias floor had put its "
    "bias near 2^31 steps, so the conv term shared the residual's shift with a 2-5 bit mantissa: 2-3 LSB from "
    "fake-quant -> the floor keeps |bias| <= 2^27 / M_res there "
    "(test_constant_channel_with_fused_residual_stays_within_one_lsb)",
    "(found by this fuzzer, second run) Linear -> Hardtanh(-0.5, 0) -> Hardtanh(0.25, 1.25): the trace fused the two "
    "clamps as (max lo, min hi) = (0.25, 0.0), lo > hi, which numpy and the blocked kernels resolve differently "
    "(every output wrong on 'auto') -> clamps compose as clamp(x, clamp(lo1, lo2, hi2), clamp(hi1, lo2, hi2)) "
    "(test_disjoint_clamps_compose_like_torch)",
    "(found while writing the fuzzer's mul entry, session 3; its 'disjoint' variant reproduces it: with the old fit 3 "
    "of the 6 such graphs among fresh_specs(99, 400) were refused, 0 after) relu(f(x)) * relu(-f(x)) with a range of "
    "~1e3 per factor: the "
    "product is 0 on every image, its scale collapses, and fit_requant_scales bounded the mul multiplier by "
    "max(s_a, s_b) / s_out instead of s_a s_b / s_out: 'requantization multiplier 2.5e+09 is too large' -> each op "
    "states its multiplier (OpDef.multiplier_numerator; mul: the product) "
    "(tests/test_bounds.py::test_mul_whose_product_collapses_folds_exactly)",
    "(found by this fuzzer, session 29, once the stem / inverted-residual entries and 16-wide inputs reached the "
    "AVX-512 hand kernels) a sliced 3-channel tensor of width 32 read by two 1x1 convs: both took the row layout, "
    "whose shuffle kernel is named 'to_rows' -> 'IRModule contains duplicate global symbol: to_rows' at compile -> "
    "the builder gives a hand kernel whose name the module already has a suffix "
    "(tests/test_fuzz.py::test_graphs_the_fuzzer_found_failing_now_run_bit_exact)",
    "(found by this fuzzer, session 29; a fault of the check, not of a kernel) the CUDA emulation fed a lookup table "
    "of 8 entries (a 3-bit input) random codes 0-255: both builds read outside the table and disagreed -> the "
    "emulation draws codes below the table's length (the same test, second graph)",
]


def _job(args: tuple[int, int, int, str, int, int]) -> str:
    job, seed, n, out, compile_every, cuda_every = args
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from ptq2tvm.fuzz import check_spec, fresh_specs

    work = Path(tempfile.mkdtemp(prefix=f"fuzz{job}-"))
    path = Path(out) / f"job{job}.jsonl"
    for i, spec in enumerate(fresh_specs(seed, n)):
        sched = ("auto", "plain") if compile_every and i % compile_every == 0 else ()
        cuda = bool(cuda_every) and i % cuda_every == cuda_every // 2
        r = check_spec(spec, work, schedules=sched, cuda=cuda)
        with open(path, "a") as f:
            f.write(json.dumps(r.to_dict()) + "\n")
        print(f"[job {job}] {i + 1}/{n} {r.status:<11} {r.stage:<12} {r.seconds:6.1f}s {','.join(r.ops)}"
              + (f"  {r.message.splitlines()[0][:150]}" if r.status != "ok" else ""), flush=True)
    return str(path)


def summarize(rows: list[dict], args: argparse.Namespace, seconds: float, load: tuple) -> dict:
    from ptq2tvm.fuzz import OPS
    from ptq2tvm.ops import FLOAT_OPS, LUT_FUNCTIONS

    status = Counter(r["status"] for r in rows)
    compiled = [r for r in rows if r["schedules"] or r["status"] != "ok" and r["stage"].startswith(("compile", "run"))]
    ops = Counter(o for r in rows for o in r["ops"])
    float_ops = Counter(o for r in rows for o in r.get("float_ops", []))
    int_ops = Counter(o for r in rows for o in r["int_ops"])
    luts = Counter(o for r in rows for o in r.get("lut_functions", []))
    registered = sorted(n for n, d in FLOAT_OPS.items() if d.kind != "trace")
    named = Counter(r["message"].split(":")[0][:80] for r in rows if r["status"] == "named_error")
    return dict(
        command=" ".join(sys.argv), graphs=len(rows), status=dict(status),
        compiled_both_backends=len(compiled),
        compiled_bit_exact=sum(1 for r in compiled if len(r["schedules"]) == 2),
        cuda_emulated=sum(1 for r in rows if r.get("cuda_kernels")),
        cuda_kernels_bit_exact=sum(r.get("cuda_kernels", 0) for r in rows),
        multi_output_graphs=sum(1 for r in rows if r.get("outputs", 1) > 1),
        fuzzer_entries_drawn=dict(ops), fuzzer_entries=sorted(OPS), registered_ops=registered,
        registered_ops_traced=dict(float_ops), registered_ops_never_traced=[o for o in registered if not float_ops[o]],
        lut_functions=dict(luts), lut_functions_never_drawn=[f for f in LUT_FUNCTIONS if not luts[f]],
        integer_ops_covered=dict(int_ops),
        max_local_lsb=max((r["max_local_lsb"] for r in rows if r["status"] == "ok"), default=0),
        exact_fraction_vs_fakequant_mean=(sum(r["exact_fraction_vs_fakequant"] for r in rows
                                              if r["exact_fraction_vs_fakequant"] is not None)
                                          / max(1, sum(r["exact_fraction_vs_fakequant"] is not None for r in rows))),
        named_errors=dict(named), failures=[r for r in rows if r["status"] == "failure"],
        named_error_specs=[r for r in rows if r["status"] == "named_error"],
        degenerate_graphs=sum(1 for r in rows if any(b.get("degenerate", "none") != "none" for b in r["spec"]["chain"])
                              or r["spec"]["data"] in ("zeros", "const_channel")),
        seconds=round(seconds, 1), jobs=args.jobs, seed=args.seed, loadavg=load, host=platform.node(),
        isa=_host_isa(),
        found_and_fixed=FOUND_AND_FIXED)


def write_md(s: dict, path: Path) -> None:
    lines = [
        "# Fuzzing random graphs (issue 11)", "",
        f"Command: `{s['command']}` ({s['seconds']} s, {s['jobs']} job(s), load average at the end "
        f"{', '.join(f'{x:.1f}' for x in s['loadavg'])} on 2 cores shared with other agents).", "",
        *([s["note"], ""] if s.get("note") else []),
        f"- graphs tried: **{s['graphs']}**; outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items())),
        f"- compiled on both CPU backends ('auto' blocked {s.get('isa', 'x86')} kernels, 'plain') and bit-exact vs the "
        f"reference: "
        f"**{s['compiled_bit_exact']} of {s['compiled_both_backends']}** compiled graphs",
        f"- integer vs fake-quant, per node from the same integer inputs: max {s['max_local_lsb']} LSB "
        f"(tolerance 1); end-to-end exact fraction of output elements (mean) "
        f"{100 * s['exact_fraction_vs_fakequant_mean']:.2f}%",
        f"- CUDA build in the CPU emulation of the CUDA thread model (a sample): {s.get('cuda_emulated', 0)} graphs, "
        f"{s.get('cuda_kernels_bit_exact', 0)} kernels bit-exact vs the same PrimFunc on this CPU",
        f"- graphs with degenerate channels or calibration data (zero / tiny / dead channels, all-zero or "
        f"constant-channel images): {s['degenerate_graphs']}; graphs with several outputs: "
        f"{s.get('multi_output_graphs', 0)}",
        "- registered op families (ptq2tvm.ops, not trace-only) traced in the graphs (graphs containing each): "
        + ", ".join(f"{k} {s['registered_ops_traced'].get(k, 0)}" for k in s.get("registered_ops", []))
        + f"; never: {s.get('registered_ops_never_traced') or 'none'}",
        "- lookup-table functions: " + ", ".join(f"{k} {v}" for k, v in sorted(s.get("lut_functions", {}).items()))
        + f"; never: {s.get('lut_functions_never_drawn') or 'none'}",
        "- fuzzer entries drawn: " + ", ".join(f"{k} {v}" for k, v in
                                               sorted(s.get("fuzzer_entries_drawn", s.get("ops_covered", {})).items())),
        "- integer ops produced: " + ", ".join(f"{k} {v}" for k, v in sorted(s["integer_ops_covered"].items())),
        "", "## Named errors (the fold refused with a message naming the layer/tensor)", ""]
    lines += [f"- {k}: {v}" for k, v in s["named_errors"].items()] or ["- none"]
    lines += ["", "## Failures (a raw exception, a mismatch, or more than 1 LSB)", ""]
    lines += [f"- stage {f['stage']}: {f['message'].splitlines()[0][:200]}" for f in s["failures"]] or ["- none"]
    if "replayed_after_fixes" in s:
        rp = s["replayed_after_fixes"]
        lines += ["", "## Failures and named errors replayed after the fixes", "",
                  f"`{rp['command']}`: " + ", ".join(f"{k} {v}" for k, v in sorted(rp["status"].items()))
                  + " (every replayed graph compiled on both backends when it got through)"]
        lines += [f"- {a['status']} {a['stage']}: {a['message'].splitlines()[0][:160] if a['message'] else ''}"
                  for a in rp["results"] if a["status"] != "ok"]
    lines += ["", "## Found and fixed", ""] + [f"- {x}" for x in s["found_and_fixed"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", type=int, default=500)
    p.add_argument("--compile-every", type=int, default=1, help="compile every k-th graph on both backends")
    p.add_argument("--cuda-every", type=int, default=0,
                   help="also run every kernel of the CUDA build in the CPU emulation for every k-th graph")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(RESULTS / "fuzz_graphs"), help="output prefix (.json, .md)")
    p.add_argument("--replay", help="a JSON file with one spec (or a results JSON: its failures) to re-check")
    args = p.parse_args()
    if args.replay:
        from ptq2tvm.fuzz import check_spec

        data = json.loads(Path(args.replay).read_text())
        if isinstance(data, dict) and "failures" in data:     # a summary: re-check its failures and named errors
            specs = [f["spec"] for f in data["failures"] + data.get("named_error_specs", [])]
        else:
            specs = [data]
        after = []
        for spec in specs:
            r = check_spec(spec, Path(tempfile.mkdtemp()))
            after.append(dict(status=r.status, stage=r.stage, message=r.message[:300], schedules=r.schedules))
            print(r.status, r.stage, r.message[:200], flush=True)
        if isinstance(data, dict) and "failures" in data:
            data["replayed_after_fixes"] = dict(command=" ".join(sys.argv), results=after,
                                                status=dict(Counter(a["status"] for a in after)))
            Path(args.replay).write_text(json.dumps(data, indent=1))
            write_md(data, Path(args.replay).with_suffix(".md"))
        return
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="fuzzrun-"))
    per = [args.graphs // args.jobs + (1 if j < args.graphs % args.jobs else 0) for j in range(args.jobs)]
    jobs = [(j, args.seed * 1000 + j, per[j], str(tmp), args.compile_every, args.cuda_every)
            for j in range(args.jobs)]
    if args.jobs == 1:
        files = [_job(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            files = pool.map(_job, jobs)
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines()]
    s = summarize(rows, args, time.time() - t0, os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(s, indent=1))
    write_md(s, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
