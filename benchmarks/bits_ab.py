"""Two W/A settings of one model, kernel by kernel and end to end, interleaved in one process.

    .venv/bin/python benchmarks/bits_ab.py [--models resnet_small mobilenet_v2_small] [--bits 8/8 4/4]
        [--threads 2] [--batch 1] [--rounds 40] [--calls 20] [--name bits_ab]

Issue 12 asks for W4A4 no slower than W8A8 on the same host; `latency_cpu.py` times whole networks, where a 5% gap
is within a run's noise and says nothing of where it comes from. Here each model (seeded random weights and images,
as `latency_cpu.seeded_graphs`; batch 1 or ``--batch``) is built at both settings (`ptq2tvm compile`'s default schedule), the
kernels of one inference of each .so are recorded with the Relax VM's instrument hook (`layer_gap.so_kernels`), and
every round times, in an order that alternates between rounds, (1) each kernel of A and its counterpart of B
(``--calls`` back-to-back calls after one untimed call: warm caches, the kernel's own speed) and (2) the whole
network of A and of B (the VM's `main_float`, ``--calls`` back to back). Medians over the rounds; ratio = B / A
(> 1: B slower). Both settings must give the same sequence of kernel calls (same graph, same fusion; Relax names a
kernel after the first of the structurally equal layers it serves, which can differ between the settings): calls
are paired by position.

Writes benchmarks/results/<name>.json (per kernel and end to end, with the CPU and ISA) and <name>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency_cpu import seeded_graphs  # noqa: E402
from layer_gap import so_kernels  # noqa: E402

from ptq2tvm.api import compile_so, write_json  # noqa: E402
from ptq2tvm.backend.isa import host_isa  # noqa: E402
from ptq2tvm.backend.runtime import set_num_threads  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.bench.runner import describe_load  # noqa: E402


def whole_network(so: Path, x: np.ndarray):
    """-> a function running one inference of ``so``'s float entry on ``x`` (the VM, input bound once)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    vm.set_input("main_float", tvm.runtime.tensor(x))
    return lambda: vm.invoke_stateful("main_float")


def timed(fn, calls: int) -> float:
    """Microseconds per call of ``calls`` back-to-back calls of ``fn()`` after one untimed call."""
    fn()
    t = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t) / calls / 1e3


def measure(model: str, bits: list[str], rounds: int, calls: int, work: Path, batch: int = 1) -> dict:
    _, images, graphs = seeded_graphs(model, bits)
    x = images[:batch]
    sides = []
    for setting in bits:
        w, a = (int(v) for v in setting.split("/"))
        so = work / f"{model}_w{w}a{a}_b{batch}.so"
        compile_so(graphs[(w, a)], so, batch=batch)
        kernels = so_kernels(so, x, graphs[(w, a)])
        sides.append(dict(label=f"W{w}A{a}", kernels=kernels, network=whole_network(so, x)))
    names = [[k[0] for k in s["kernels"]] for s in sides]
    types = [[k[3] for k in s["kernels"]] for s in sides]
    if types[0] != types[1]:
        raise SystemExit(f"{model}: the two settings run different kernel sequences ({len(names[0])} vs "
                         f"{len(names[1])} calls); per-kernel pairs need the same graph")
    per_kernel = [[[] for _ in names[0]] for _ in sides]
    network = [[] for _ in sides]
    for r in range(rounds + 1):                     # round 0: warm-up
        order = (0, 1) if r % 2 else (1, 0)
        for i in range(len(names[0])):
            for s in order:
                _, fn, args, _ = sides[s]["kernels"][i]
                us = timed(lambda: fn(*args), calls)
                if r:
                    per_kernel[s][i].append(us)
        for s in order:
            us = timed(sides[s]["network"], calls)
            if r:
                network[s].append(us)
    layers = []
    for i, name in enumerate(names[0]):
        a, b = (float(np.median(per_kernel[s][i])) for s in (0, 1))
        layers.append(dict(kernel=name, kernel_b=names[1][i], type=types[0][i], a_us=a, b_us=b, ratio=b / a))
    net = [float(np.median(v)) for v in network]
    sums = [sum(lay[k] for lay in layers) for k in ("a_us", "b_us")]
    return dict(model=model, a=sides[0]["label"], b=sides[1]["label"], batch=batch, rounds=rounds, calls=calls,
                network_a_us=net[0], network_b_us=net[1], network_ratio=net[1] / net[0],
                kernel_sum_a_us=sums[0], kernel_sum_b_us=sums[1], kernel_sum_ratio=sums[1] / sums[0],
                layers=layers, loadavg_1min=round(os.getloadavg()[0], 2))


def markdown(results: list[dict], host: dict, loads: list[float], command: str) -> str:
    batches = ", ".join(sorted({str(r.get("batch", 1)) for r in results}))
    lines = [f"# W/A settings A/B: kernel by kernel and end to end, interleaved, batch {batches}", "",
             "| model | A | B | network A us | network B us | B / A | kernel sum B / A | slowest kernel B / A |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        worst = max(r["layers"], key=lambda lay: lay["ratio"])
        lines.append(f"| {r['model']} | {r['a']} | {r['b']} | {r['network_a_us']:.1f} | {r['network_b_us']:.1f} | "
                     f"{r['network_ratio']:.3f} | {r['kernel_sum_ratio']:.3f} | {worst['kernel']} "
                     f"{worst['ratio']:.2f}x |")
    for r in results:
        lines += ["", f"## {r['model']}: per kernel ({r['a']} -> {r['b']}, us, medians)", "",
                  "| kernel | type | A | B | B / A |", "|---|---|---:|---:|---:|"]
        lines += [f"| {lay['kernel']} | {lay['type']} | {lay['a_us']:.2f} | {lay['b_us']:.2f} | {lay['ratio']:.3f} |"
                  for lay in r["layers"]]
    lines += ["", f"Host: {host['model_name']} (LLVM cpu {host['llvm_cpu']}, int8 ISA {host['isa']}). "
              f"{describe_load(loads, os.cpu_count() or 1)}", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet_small", "mobilenet_v2_small"])
    p.add_argument("--bits", nargs=2, default=["8/8", "4/4"], metavar=("A", "B"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="images per call (<= 16)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing")
    p.add_argument("--work", default=str(ROOT / "runs" / "bits_ab"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="bits_ab")
    args = p.parse_args()
    set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    host = dict(cpu_features(), isa=host_isa())
    results, loads = [], []
    for model in args.models:
        res = measure(model, args.bits, args.rounds, args.calls, work, args.batch)
        loads.append(res["loadavg_1min"])
        results.append(res)
        print(f"{model}: {res['a']} {res['network_a_us']:.1f} us, {res['b']} {res['network_b_us']:.1f} us "
              f"(B / A {res['network_ratio']:.3f}; kernel sum {res['kernel_sum_ratio']:.3f})", flush=True)
    command = ".venv/bin/python " + " ".join(["benchmarks/bits_ab.py", *sys.argv[1:]])
    out = Path(args.out)
    write_json(out / f"{args.name}.json", dict(host=host, threads=args.threads, command=command,
                                               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               results=results))
    (out / f"{args.name}.md").write_text(markdown(results, host, loads, command))
    print(f"wrote {out / args.name}.json / .md")


if __name__ == "__main__":
    main()
