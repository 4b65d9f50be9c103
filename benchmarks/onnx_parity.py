"""ONNX interop acceptance numbers: ONNX Runtime on ptq2tvm's QDQ export vs the reference executor and the .so, and
zoo models coming back in through ONNX.

    .venv/bin/python benchmarks/onnx_parity.py                      # demo runs (W8A8, W4A4 resnet_small, F-MNIST)
    .venv/bin/python benchmarks/onnx_parity.py --runs runs/x runs/y # any run directories as well
    .venv/bin/python benchmarks/onnx_parity.py --zoo-size 224       # + ResNet-18 / MobileNetV2 via ONNX at 224
    .venv/bin/python benchmarks/onnx_parity.py --recon-results benchmarks/results/accuracy_fmnist_fidelity.json \
        [--recon-ckpt DIR] [--append]   # every finished reconstruction row of an accuracy table (onnx_parity_recon)

Per run (full 10k Fashion-MNIST test set): the .so top-1 (compiled if missing; it equals the reference executor bit
for bit, `ptq2tvm parity`), ORT top-1, ORT-vs-reference exact fraction / max LSB / histogram at the output and per
layer (first 512 images), for the int8-weight export and the uint8-weight export, and which kernels ORT ran after its
graph optimisation. Zoo: torch.onnx.export -> `--model x.onnx` path (onnx2torch) -> FP32 max |diff| vs torch ->
W8A8 quantize (seeded random calibration images) -> .so bit-exact vs the reference executor.
Writes benchmarks/results/onnx_parity.json and .md. ``--recon-results``: per finished row of the accuracy table
(its reconstruction checkpoint folded and exported with the default policy), ORT top-1 on the full test set vs the
row's .so top-1, output codes vs the reference executor on the first 512 images, the kernels ORT ran; writes
benchmarks/results/onnx_parity_recon.json and .md (rows without a .so top-1 or a finished checkpoint are listed as
skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.atomic import write_json, write_text  # noqa: E402


# (weight container, integer_requant): uint8 = ORT's exact u8 x u8 kernels on any x86; int8 shows the non-VNNI
# saturation; none = pure QDQ (default), residual, inexact = ORT bit-exact by construction
POLICIES = (("uint8", "none"), ("uint8", "residual"), ("uint8", "inexact"), ("int8", "none"))


def ensure_demo_run(out: Path, w: int, a: int, data: str = "fashion-mnist") -> Path:
    """The demo's quantization (resnet_small, Fashion-MNIST, 512 calibration images, rtn) as a run directory."""
    if (out / "model.qgraph.npz").is_file():
        return out
    from ptq2tvm.cli import main

    rc = main(["quantize", "--model", "resnet_small", "--data", data, "--w-bits", str(w), "--a-bits",
               str(a), "--out", str(out), "--no-progress"])
    if rc:
        raise SystemExit(f"quantize failed for {out}")
    return out


def run_row(run_dir: Path, per_layer_inputs: int, limit: int | None, reference_images: int | None = None,
            policies: tuple[tuple[str, str], ...] = POLICIES) -> dict[str, Any]:
    from ptq2tvm.api import RunDir, compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.data import load_dataset
    from ptq2tvm.ir.graph import IntegerGraph
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.onnx_parity import run_onnx_parity

    run = RunDir(run_dir)
    info = run.info()
    graph = IntegerGraph.load(run.qgraph)
    ds = load_dataset(info["data"], split="test", limit=limit)
    if not run.so.is_file():
        compile_so(graph, run.so, batch=32)
    cm = CompiledModel(run.so)
    q = graph.input.quantize(ds.images)
    so_out = cm.run_int(q)
    n_ref = len(q) if reference_images is None else min(len(q), reference_images)
    t0 = time.perf_counter()
    ref = np.concatenate([run_reference(graph, q[i:min(i + 500, n_ref)]) for i in range(0, n_ref, 500)])
    t_ref = time.perf_counter() - t0
    if n_ref < len(q):  # the .so is the compiled integer graph: checked bit-exact on the first n_ref images, it is
        if not np.array_equal(so_out[:n_ref], ref):  # the reference on the rest (saves the numpy reference's time)
            raise SystemExit(f"{run_dir}: the .so differs from the reference executor")
        ref = so_out
    row: dict[str, Any] = dict(run=str(run_dir), model=(info.get("model") or {}).get("name"), w_bits=info["w_bits"],
                               a_bits=info["a_bits"], method=info.get("method"), n=int(len(q)),
                               so_top1=float((so_out.argmax(1) == ds.labels).mean()),
                               so_bit_exact_vs_reference=bool(np.array_equal(so_out[:n_ref], ref[:n_ref])),
                               reference_images=int(n_ref),
                               reference_seconds=round(t_ref, 1), ort={})
    for weights, policy in policies:
        t0 = time.perf_counter()
        rep = run_onnx_parity(graph, ds.images, ds.labels, weights=weights, per_layer_inputs=per_layer_inputs,
                              progress=False, reference=ref, integer_requant=policy)
        d = rep.to_dict()
        d["seconds"] = round(time.perf_counter() - t0, 1)
        d["top1_gap_points"] = round(100 * (rep.ort_top1 - row["so_top1"]), 3)
        row["ort"][f"{weights}, {policy}"] = d
        print(f"{run_dir} {weights} {policy}: ORT top-1 {100 * rep.ort_top1:.2f} (.so {100 * row['so_top1']:.2f}), "
              f"codes exact {100 * rep.exact_fraction:.4f}%, float32 output exact "
              f"{100 * rep.output_float_exact_fraction:.4f}%, max {rep.max_abs_lsb} LSB, {rep.integer_kernels} "
              f"integer kernels {rep.ort_kernels}", flush=True)
    return row


def zoo_row(name: str, size: int, work: Path) -> dict[str, Any]:
    """torch -> ONNX -> ``--model x.onnx`` -> W8A8 -> .so, bit-exact against the reference executor."""
    from ptq2tvm.api import ModelSpec, build_model, compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.bench.baselines import export_onnx as torch_to_onnx
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, size, size)).astype(np.float32)
    path = torch_to_onnx(model, x[:1], work / f"{name}_{size}.onnx")
    t0 = time.perf_counter()
    gm = build_model(ModelSpec(str(path)))
    t_import = time.perf_counter() - t0
    with torch.no_grad():
        diff = float((gm(torch.from_numpy(x)) - model(torch.from_numpy(x))).abs().max())
        scale = float(model(torch.from_numpy(x)).abs().max())
    qm = quantize(gm, x, QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)
    res = compile_so(graph, work / f"{name}_{size}.so", batch=1)
    cm = CompiledModel(res.so_path)
    q = graph.input.quantize(x[:4])
    exact = bool(np.array_equal(cm.run_int(q), run_reference(graph, q)))
    names = [n.name for n in graph.nodes][:3]
    print(f"{name} {size}x{size} via ONNX: FP32 max |diff| {diff:.2e} (max |out| {scale:.2f}), "
          f"{len(graph.nodes)} integer nodes ({names} ...), .so bit-exact: {exact}", flush=True)
    return dict(model=name, size=size, fp32_max_abs_diff=diff, fp32_max_abs_out=scale, import_seconds=round(t_import, 2),
                integer_nodes=len(graph.nodes), first_layers=names, compile_seconds=round(res.seconds, 1),
                so_bit_exact_vs_reference=exact)


# ---- the reconstruction rows of an accuracy table (benchmarks/accuracy_fmnist.py) --------------------------------
def _accuracy_module() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy_fmnist

    return accuracy_fmnist


def recon_checkpoint(row: dict[str, Any], ckpt_root: Path) -> tuple[Path | None, str]:
    """The finished reconstruction checkpoint (fake-quant model file) of an accuracy-table row, or (None, why not).
    ``ckpt_root``: the table's ``<out>_ckpt`` folder (one sub-folder per row key, ``state.json`` with ``finished``
    and ``model``, as :func:`accuracy_fmnist.row_ckpt` writes it)."""
    from ptq2tvm.sweep import key_dir

    acc = _accuracy_module()
    if row.get("so_top1") is None:
        return None, "no .so top-1 in the table (made with --no-so, not filled yet)"
    return acc.finished_model_file(ckpt_root / key_dir(acc.row_key(row)))


def _weight_containers(graph: Any, export: Any) -> dict[str, Any]:
    """How the export stores the graph's sub-8-bit weights and activations (for the W2 statement)."""
    import onnx

    wb: dict[str, list[int]] = {}
    for n in graph.nodes:
        if "weight" in n.arrays and "w_bits" in n.attrs:
            r = wb.setdefault(str(int(n.attrs["w_bits"])), [0, 127, -128])
            q = n.arrays["weight"]
            r[0] += 1
            r[1], r[2] = min(r[1], int(q.min())), max(r[2], int(q.max()))
    a_bits = sorted({int(n.out.bits) for n in graph.nodes})
    return dict(weight_bits={b: dict(layers=v[0], min=v[1], max=v[2]) for b, v in sorted(wb.items())},
                weight_container=("uint8 (zero point 128)" if export.weights == "uint8" else "int8 (zero point 0)"),
                activation_bits=a_bits, activation_container="uint8", opset=export.opset,
                int4_initializers=len(export.int4_weights), clips=len(export.clips),
                onnx_version=onnx.__version__)


def full_check(graph: Any, images: np.ndarray, labels: np.ndarray, codes: np.ndarray, *, weights: str,
               threads: int = 1, explain: int = 64) -> dict[str, Any]:
    """ORT's output codes of the export on every image against the same graph exported with
    ``integer_requant='inexact'`` (every layer whose float32 multiplier is not provably exact as ConvInteger /
    MatMulInteger + the reference's int64 requantization: ORT runs it bit-exactly, checked here against the
    reference executor on the first ``explain`` images and on every image that differs), so the full test set is
    compared without the slow numpy reference. The first ``explain`` differing images get the per-layer view of
    :func:`run_onnx_parity` (which layers differ alone, and their requantization fit)."""
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.onnx_parity import ort_output_codes, run_onnx_parity

    exact, _, _ = ort_output_codes(graph, images, weights=weights, integer_requant="inexact", threads=threads)
    idx = np.nonzero((codes != exact).reshape(len(codes), -1).any(1))[0]
    check = np.unique(np.concatenate([np.arange(min(explain, len(images))), idx[:explain]])).astype(np.int64)
    ref = run_reference(graph, graph.input.quantize(images[check]))
    res: dict[str, Any] = dict(
        policy="inexact", inexact_equals_reference_on=int(len(check)),
        inexact_equals_reference=bool(np.array_equal(exact[check], ref)),
        inexact_top1=float((exact.argmax(1) == labels).mean()), images_differing=int(len(idx)),
        differing_images=idx[:explain].tolist(),
        top1_changed=int((codes[idx].argmax(1) != exact[idx].argmax(1)).sum()),
        max_abs_lsb=int(np.abs(codes[idx] - exact[idx]).max(initial=0)), local_layers=[])
    if len(idx):
        sub = idx[:explain]
        rep = run_onnx_parity(graph, images[sub], labels[sub], weights=weights, per_layer_inputs=len(sub),
                              threads=threads, progress=False)
        res["local_layers"] = [dict(name=p.name, kernel=p.ort_kernel, off=int(len(sub) and sum(
            v for k, v in p.local_lsb_histogram.items() if k != "0")), of=int(sum(p.local_lsb_histogram.values())),
            max_abs_lsb=p.local_max_abs_lsb, fit=rep.requant_fit.get(p.name))
            for p in rep.per_layer if p.local_exact_fraction < 1.0]
    return res


def recon_row(row: dict[str, Any], model_path: Path, images: np.ndarray, labels: np.ndarray, *,
              compare_images: int = 512, per_layer_inputs: int = 512, weights: str = "auto",
              integer_requant: str = "none", threads: int = 1, full: bool = True) -> dict[str, Any]:
    """One reconstruction row: load its fake-quant checkpoint, fold (``to_integer``), export QDQ (``weights`` /
    ``integer_requant``: the export policy), ORT top-1 on all ``images`` against the row's ``so_top1``, ORT's
    output codes against the reference executor on the first ``compare_images`` (exact fraction, max LSB, per layer
    on the first ``per_layer_inputs``), and the kernels ORT ran after its graph optimisation. ``full``: also
    :func:`full_check` (every image, against the bit-exact ``inexact`` export)."""
    from ptq2tvm.api import to_integer
    from ptq2tvm.frontend.qmodel import QuantModel
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.onnx_export import choose_weights
    from ptq2tvm.onnx_parity import INTEGER_KERNELS, ort_output_codes, run_onnx_parity

    acc = _accuracy_module()
    t0 = time.perf_counter()
    graph = to_integer(QuantModel.load(model_path).eval())
    weights = choose_weights(weights)[0]
    codes, kernels, export = ort_output_codes(graph, images, weights=weights, integer_requant=integer_requant,
                                              threads=threads)
    correct = int((codes.argmax(1) == labels).sum())
    ort_top1 = correct / len(images)
    correct_so = int(round(float(row["so_top1"]) * len(images)))
    n = min(int(compare_images), len(images))
    q = graph.input.quantize(images[:n])
    ref = np.concatenate([run_reference(graph, q[i:i + 256]) for i in range(0, n, 256)])
    rep = run_onnx_parity(graph, images[:n], labels[:n], weights=weights, per_layer_inputs=min(per_layer_inputs, n),
                          threads=threads, progress=False, reference=ref, integer_requant=integer_requant)
    d = rep.to_dict()
    so = float(row["so_top1"])
    res = dict(key=acc.row_key(row), checkpoint=str(model_path), model=row["model"], w_bits=row["w_bits"],
               a_bits=row["a_bits"], method=acc.method_spec(row), seed=row["seed"], iters=row.get("iters"),
               n=int(len(images)), so_top1=so, fakequant_top1=row.get("fakequant_top1"), ort_top1=ort_top1,
               diff_points=round(100 * (ort_top1 - so), 4), correct_ort=correct, correct_so=correct_so,
               within_0_1=(bool(1000 * abs(correct - correct_so) <= len(images))
                           if row.get("eval_images", len(images)) == len(images) else None),
               compared_images=n, exact_fraction=rep.exact_fraction, max_abs_lsb=rep.max_abs_lsb,
               lsb_histogram=rep.lsb_histogram, top1_agreement_vs_reference=rep.top1_agreement_vs_reference,
               exact_fraction_full_run=float((codes[:n] == ref).mean()),
               images_differing=int((codes[:n] != ref).reshape(n, -1).any(1).sum()),
               reference_top1_compared=rep.reference_top1, ort_top1_compared=rep.ort_top1,
               weights=weights, integer_requant=integer_requant, ort_kernels=kernels,
               integer_kernels={k: v for k, v in kernels.items() if k in INTEGER_KERNELS},
               float_convs=rep.float_kernels, containers=_weight_containers(graph, export),
               requant_fit=d["requant_fit"], per_layer_layers=len(d["per_layer"]),
               per_layer=[_compact(p) for p in d["per_layer"]
                          if p["local_exact_fraction"] < 1.0 or p["exact_fraction"] < 1.0],
               per_layer_inputs=d["per_layer_inputs"],
               seconds=round(time.perf_counter() - t0, 1))
    if full and integer_requant != "inexact":
        res["full_check"] = full_check(graph, images, labels, codes, weights=weights, threads=threads)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{res['key']}: ORT top-1 {100 * ort_top1:.2f} (.so {100 * so:.2f}, {res['diff_points']:+.2f}), codes "
          f"exact {100 * rep.exact_fraction:.4f}% on {n}, max {rep.max_abs_lsb} LSB, integer kernels "
          f"{res['integer_kernels']}, {res['seconds']} s", flush=True)
    return res


def recon_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = sorted(result["rows"], key=lambda r: (r["model"], -r["w_bits"], -r["a_bits"], r["method"], r["seed"]))
    ok = sum(bool(r["within_0_1"]) for r in rows)
    partial = [r for r in rows if r["within_0_1"] is None]
    fulls = [r for r in rows if r.get("full_check")]
    cont = dict(rows[0]["containers"]) if rows else {}
    if rows:
        cont["activation_bits"] = sorted({b for r in rows for b in r["containers"]["activation_bits"]})
        per_model: dict[str, dict[str, dict[str, int]]] = {}
        for r in rows:
            wbits = per_model.setdefault(r["model"], {})
            for b, v in r["containers"]["weight_bits"].items():
                o = wbits.setdefault(b, dict(v))
                o["min"], o["max"] = min(o["min"], v["min"]), max(o["max"], v["max"])
        cont["weight_bits"] = per_model
    lines = [
        "# ONNX Runtime on the QDQ export of the accuracy table's reconstruction rows (Fashion-MNIST)",
        "",
        "Command: `" + "`, then `".join(result["commands"]) + "`",
        "",
        f"Table: `{result['results']}`; checkpoints: `{result['ckpt_root']}`. Machine: {m['cpu']}, {m['cores']} "
        f"cores, VNNI: {m['vnni']}, ONNX Runtime {m['ort']}, load average {m['loadavg']} at the start, {m.get('loadavg_end', '-')} at the end (shared with a running "
        "reconstruction sweep; no timings here). Per row: the row's finished reconstruction checkpoint, folded "
        "(`ptq2tvm.api.to_integer`), exported with the default policy "
        f"(weights `{result['policy']['weights']}`"
        + (f" = `{rows[0]['weights']}` on this host" if rows and rows[0]["weights"] != result["policy"]["weights"]
           else "")
        + f", integer_requant `{result['policy']['integer_requant']}`), "
        f"ORT (CPU EP, full graph optimisation) top-1 on the full {rows[0]['n'] if rows else '-'}-image test set "
        "against the table's `.so` top-1 (the compiled .so equals the reference executor bit for bit), and ORT's "
        f"output codes against the reference executor on the first {rows[0]['compared_images'] if rows else '-'} "
        "test images.",
        "",
        f"**{ok} of {len(rows)} rows within 0.1 point** of the .so top-1"
        f" ({sum(r['correct_ort'] == r['correct_so'] for r in rows)} identical)."
        + (f" Whole test set: ORT's output codes equal the bit-exact `inexact` export's on every image in "
           f"{sum(r['full_check']['images_differing'] == 0 for r in fulls)} of {len(fulls)} rows; "
           f"{sum(r['full_check']['images_differing'] for r in fulls)} images differ in all "
           f"(at most {max(r['full_check']['images_differing'] for r in fulls)} in a row), the argmax on "
           f"{sum(r['full_check']['top1_changed'] for r in fulls)}; the `inexact` export's top-1 equals the .so's "
           f"in {sum(abs(r['full_check']['inexact_top1'] - r['so_top1']) < 1e-9 for r in fulls)} of {len(fulls)}."
           if fulls else "")
        + (f" ({len(partial)} rows ran on fewer test images than the table's .so top-1 (--limit): not comparable.)"
           if partial else ""),
        "",
        "| model | W/A | method | seed | .so top-1 | ORT top-1 | ORT - .so (points) | output codes exact | max LSB "
        "| images differing, all (top-1 changed) | integer kernels ORT ran | float convs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kern = ", ".join(f"{k} {v}" for k, v in r["integer_kernels"].items()) or "none"
        fc = r.get("full_check")
        full = "-" if fc is None else (f"{fc['images_differing']} ({fc['top1_changed']})"
                                       + ("" if fc["inexact_equals_reference"] else " inexact != reference!"))
        lines.append(f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {r['method']} | {r['seed']} | "
                     f"{100 * r['so_top1']:.2f} | {100 * r['ort_top1']:.2f} | {r['diff_points']:+.2f} | "
                     f"{100 * r['exact_fraction']:.3f}% | {r['max_abs_lsb']} | {full} | {kern} | {r['float_convs']} |")
    lines += ["", f"`output codes exact` / `max LSB`: ORT vs the numpy reference executor on the first "
              f"{rows[0]['compared_images'] if rows else '-'} test images. `images differing, all`: over the whole "
              "test set, the images whose ORT output codes differ from the same graph exported with "
              "`integer_requant='inexact'` (ConvInteger/MatMulInteger + the reference's int64 requantization "
              "wherever a float32 multiplier is not provably exact; ORT runs it bit-exactly: checked against the "
              "reference executor on the first 64 images and on every differing image), and on how many of them "
              "the argmax changes."]
    if result.get("skipped"):
        lines += ["", "Rows not measured:", ""]
        lines += [f"- `{s['key']}`: {s['reason']}" for s in result["skipped"]]
    if cont:
        wb = "; ".join(f"{m}: " + ", ".join(f"{b}-bit {v['layers']} layers, integers in [{v['min']}, {v['max']}]"
                                            for b, v in sorted(wbits.items(), key=lambda kv: int(kv[0])))
                       for m, wbits in cont["weight_bits"].items())
        lines += ["", f"Containers: weights ({wb}) are {cont['weight_container']} initializers (opset "
                  f"{cont['opset']}, {cont['int4_initializers']} INT4 initializers): the 2-bit integers are stored "
                  "exactly in the 8-bit container, no clamp needed (constants). Activations of "
                  f"{', '.join(map(str, cont['activation_bits']))} bits are {cont['activation_container']} codes; "
                  "a range narrower than [0, 255] (2/4-bit activations) is the exact Q -> DQ -> Clip -> Q of "
                  "`onnx_export._split_clamp` (the conv still fuses into QLinearConv)."]
    off = [r for r in rows if r["within_0_1"] is False or r["exact_fraction"] < 1.0]
    if off:
        lines += ["", "Rows whose output codes are not all exact: the first layers that differ (local = the layer "
                  "alone on the reference's input codes; chained = ORT end to end). A layer that differs alone is "
                  "one whose float32 requantization multiplier cannot round every accumulator value like the dyadic "
                  "one (docs/onnx.md); `--recon-requant inexact` writes such layers as ConvInteger/MatMulInteger + "
                  "the reference's int64 requantization, which ORT runs bit-exactly:", ""]
        for r in off:
            diffs = [p for p in r["per_layer"] if p["local_exact_fraction"] < 1.0]
            desc = "; ".join(f"{p['name']} ({p['ort_kernel']}) {p['local_lsb_histogram'].get('1', 0)} element(s) off "
                             f"by 1 of {sum(p['local_lsb_histogram'].values())}, max {p['local_max_abs_lsb']}; its "
                             f"float32 multipliers: {_fit_note(r, p['name'])}" for p in diffs[:4]) \
                or "no layer differs alone"
            grow = ", ".join(f"{p['name']} {p['max_abs_lsb']}" for p in r["per_layer"] if p["max_abs_lsb"] > 1)
            lines.append(f"- {r['model']} {r['method']} W{r['w_bits']}A{r['a_bits']} seed {r['seed']}: output codes of "
                         f"{r.get('images_differing', '-')} of {r['compared_images']} images differ (top-1 agreement "
                         f"{100 * r['top1_agreement_vs_reference']:.2f}%); {len(diffs)} layer(s) differ alone: {desc}. "
                         f"Chained, the flip spreads (max LSB: {grow or 'none above 1'}).")
    full_off = [r for r in rows if (r.get("full_check") or {}).get("images_differing")]
    if full_off:
        lines += ["", "Whole test set: rows where some images' output codes differ (per layer on those images: the "
                  "layers that differ alone, on the reference's input codes):", ""]
        for r in full_off:
            fc = r["full_check"]
            desc = "; ".join(f"{p['name']} ({p['kernel']}) {p['off']} of {p['of']} elements, max {p['max_abs_lsb']}"
                             + (f" LSB (float32 multiplier exact on every accumulator value in "
                                f"{p['fit']['exact_channels']} of {p['fit']['channels']} channels, "
                                f"{p['fit']['mismatching_accumulators']} accumulator values differ)" if p["fit"]
                                else " LSB (a float conv + Q in ORT: rounds once in float32)")
                             for p in fc["local_layers"][:4]) or "none alone"
            lines.append(f"- {r['model']} {r['method']} W{r['w_bits']}A{r['a_bits']} seed {r['seed']}: "
                         f"{fc['images_differing']} of {r['n']} images differ (max {fc['max_abs_lsb']} LSB at the "
                         f"output), argmax changed on {fc['top1_changed']}: ORT top-1 {100 * r['ort_top1']:.2f} vs "
                         f".so {100 * r['so_top1']:.2f} (`inexact` export: {100 * fc['inexact_top1']:.2f}). "
                         f"Layers that differ alone: {desc}.")
    return "\n".join(lines) + "\n"


def _compact(p: dict[str, Any]) -> dict[str, Any]:
    """A per-layer entry without its all-zero histograms (the results file keeps only the layers that differ)."""
    return {k: v for k, v in p.items() if not (k.endswith("lsb_histogram") and set(v) <= {"0"})}


def _fit_note(r: dict[str, Any], layer: str) -> str:
    f = r["requant_fit"].get(layer)
    if not f:
        return "not a fitted QLinearConv/QGemm"
    return (f"exact on every accumulator value in {f['exact_channels']} of {f['channels']} channels, "
            f"{f['mismatching_accumulators']} of {f['checked_accumulators']} reachable accumulator values round "
            "differently from the dyadic multiplier")


def recon_main(args: argparse.Namespace, machine: dict[str, Any]) -> None:
    """``--recon-results``: every finished row of an accuracy table through ORT (see :func:`recon_row`)."""
    from ptq2tvm.data import load_dataset

    acc = _accuracy_module()
    table = Path(args.recon_results)
    if not table.is_file():
        raise SystemExit(f"--recon-results: {table} not found")
    ckpt_root = Path(args.recon_ckpt) if args.recon_ckpt else table.parent / f"{table.stem}_ckpt"
    out = Path(args.recon_out)
    result: dict[str, Any] = dict(results=str(table), ckpt_root=str(ckpt_root), machine=machine, rows=[],
                                  skipped=[], commands=[],
                                  policy=dict(weights=args.recon_weights, integer_requant=args.recon_requant))
    if args.append and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        result["rows"], result["commands"] = old["rows"], old.get("commands", [])
        machine["loadavg"] = f"{old['machine']['loadavg']} / {machine['loadavg']}"
    if args.recon_full_check:   # rows measured before full_check existed: add it (export + 2 ORT runs each)
        from ptq2tvm.api import to_integer
        from ptq2tvm.data import load_dataset as _load
        from ptq2tvm.frontend.qmodel import QuantModel
        from ptq2tvm.onnx_parity import ort_output_codes

        todo = [r for r in result["rows"] if "full_check" not in r and r["integer_requant"] != "inexact"]
        ds = _load("fashion-mnist", split="test", limit=args.limit) if todo else None
        for r in todo:
            graph = to_integer(QuantModel.load(r["checkpoint"]).eval())
            codes, _, _ = ort_output_codes(graph, ds.images, weights=r["weights"], integer_requant=r["integer_requant"],
                                           threads=args.threads)
            if int((codes.argmax(1) == ds.labels).sum()) != r["correct_ort"]:
                raise SystemExit(f"{r['key']}: ORT's top-1 changed since the row was measured")
            r["full_check"] = full_check(graph, ds.images, ds.labels, codes, weights=r["weights"],
                                         threads=args.threads)
            print(f"{r['key']}: full check {r['full_check']['images_differing']} images differ", flush=True)
            write_json(out.with_suffix(".json"), result)
    done = {r["key"] for r in result["rows"]}
    cmd = ("python benchmarks/onnx_parity.py " + " ".join(sys.argv[1:])).strip()
    result["commands"].append(cmd)
    data: dict[str, Any] = {}
    for row in json.loads(table.read_text())["rows"]:
        key = acc.row_key(row)
        if key in done:
            continue
        path, why = recon_checkpoint(row, ckpt_root)
        if path is None:
            result["skipped"].append(dict(key=key, reason=why))
            print(f"skipped {key}: {why}", flush=True)
            continue
        name = row.get("dataset", "fashion-mnist")
        if name not in data:
            data[name] = load_dataset(name, split="test", limit=args.limit)
        ds = data[name]
        result["rows"].append(recon_row(row, path, ds.images, ds.labels, compare_images=args.recon_compare,
                                        per_layer_inputs=args.per_layer_inputs, weights=args.recon_weights,
                                        integer_requant=args.recon_requant, threads=args.threads))
        write_json(out.with_suffix(".json"), result)     # after every row: an interrupted run keeps its rows
    machine["loadavg_end"] = round(os.getloadavg()[0], 1)
    write_json(out.with_suffix(".json"), result)
    md = recon_markdown(result)
    write_text(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")


def _first(d: dict[str, Any]) -> str:
    """The first layer (graph order) whose ORT result, alone on the reference's inputs, differs."""
    for p in d["per_layer"]:
        if p["local_exact_fraction"] < 1.0:
            return f"{p['name']} ({p['ort_kernel']}): {100 * p['local_exact_fraction']:.4f}%, max {p['local_max_abs_lsb']}"
    return "none" if d["per_layer"] else "-"


def markdown(result: dict[str, Any], cmd: str) -> str:
    m = result["machine"]
    lines = [
        "# ONNX interop: ONNX Runtime on ptq2tvm's QDQ export, and ONNX models in",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']}, ONNX Runtime {m['ort']}; load average "
        f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end (shared, loaded machine: timings are "
        "not latencies, see `ptq2tvm bench`).",
        "",
    ]
    if result["runs"]:
        lines += _runs_markdown(result)
    lines += _zoo_markdown(result)
    return "\n".join(lines) + "\n"


def _runs_markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        "## ORT vs the reference executor and the .so (full test set)",
        "",
        "| run | weights in ONNX, integer_requant | ORT top-1 | .so top-1 | gap (points) | output codes exact "
        "| float32 output bitwise exact | max LSB | histogram | first layer that differs, local | QLinearConv/QGemm "
        "channels with a provably exact multiplier | integer kernels (ORT optimised graph) | float convs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in result["runs"]:
        if r.get("reference_images", r["n"]) < r["n"]:
            notes.append(f"{Path(r['run']).name}: the numpy reference executor ran on the first "
                         f"{r['reference_images']} of {r['n']} test images, where the .so equals it bit for bit "
                         f"({r['so_bit_exact_vs_reference']}); ORT is compared with the .so's output codes on all "
                         f"{r['n']}.")
        for w, d in r["ort"].items():
            kern = ", ".join(f"{k} {v}" for k, v in d["ort_kernels"].items()
                             if k in ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger"))
            fit = d.get("requant_fit", {})
            fits = (f"{sum(f['exact_channels'] for f in fit.values())} / {sum(f['channels'] for f in fit.values())} "
                    f"({sum(f['mismatching_accumulators'] for f in fit.values())} acc. values differ)")
            lines.append(f"| {Path(r['run']).name} (W{r['w_bits']}A{r['a_bits']}) | {w} | {100 * d['ort_top1']:.2f} | "
                         f"{100 * r['so_top1']:.2f} | {d['top1_gap_points']:+.2f} | {100 * d['exact_fraction']:.4f}% | "
                         f"{100 * d['output_float_exact_fraction']:.4f}% | {d['max_abs_lsb']} | {d['lsb_histogram']} | "
                         f"{_first(d)} | {fits} | {kern or 'none'} | {d['float_kernels']} |")
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "Per layer (ORT vs reference on the first images; kernel = what ORT ran after optimisation, "
              "`X->Q` = a float X then a QuantizeLinear; local = the layer alone on the reference executor's input "
              "codes, chained = ORT end to end; docs/onnx.md explains both):", ""]
    for r in result["runs"]:
        for w, d in r["ort"].items():
            lines += [f"### {Path(r['run']).name}, {w} weights ({d['per_layer_inputs']} images)", "",
                      "| layer | op | ORT kernel | local exact | local max LSB | chained exact | chained max LSB "
                      "| chained histogram |", "|---|---|---|---|---|---|---|---|"]
            for p in d["per_layer"]:
                lines.append(f"| {p['name']} | {p['op']} | {p['ort_kernel']} | {100 * p['local_exact_fraction']:.4f}% | "
                             f"{p['local_max_abs_lsb']} | {100 * p['exact_fraction']:.4f}% | {p['max_abs_lsb']} | "
                             f"{p['lsb_histogram']} |")
            lines.append("")
    return lines


def _zoo_markdown(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if result.get("zoo"):
        lines += ["## Zoo models through ONNX (`--model x.onnx`, W8A8, seeded random calibration images)", "",
                  "| model | input | FP32 max abs diff vs torch | integer nodes | first layers | .so bit-exact |",
                  "|---|---|---|---|---|---|"]
        for z in result["zoo"]:
            lines.append(f"| {z['model']} | {z['size']}x{z['size']} | {z['fp32_max_abs_diff']:.2e} (max abs out "
                         f"{z['fp32_max_abs_out']:.2f}) | {z['integer_nodes']} | {', '.join(z['first_layers'])} | "
                         f"{z['so_bit_exact_vs_reference']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=[], help="extra run directories")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo W8A8 / W4A4 runs")
    ap.add_argument("--demo-dir", default="runs/onnx_parity", help="where the demo runs are (created if absent)")
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"],
                    help="dataset of the demo runs")
    ap.add_argument("--limit", type=int, help="first N test images only")
    ap.add_argument("--per-layer-inputs", type=int, default=512)
    ap.add_argument("--reference-images", type=int, help="run the numpy reference executor on the first N test images "
                    "only, check the .so bit-exact there, and compare ORT with the .so's outputs on the rest")
    ap.add_argument("--policies", nargs="*", default=[f"{w}:{p}" for w, p in POLICIES],
                    help="weights:integer_requant pairs to run (default: %(default)s)")
    ap.add_argument("--zoo-size", type=int, nargs="*", default=[], help="ResNet-18 / MobileNetV2 through ONNX at "
                    "these input sizes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_parity"))
    ap.add_argument("--append", action="store_true", help="keep the runs already in OUT.json (same machine fields "
                    "are not re-measured) and add these; a run measured again replaces its old row (with "
                    "--recon-results: keep the rows already in RECON_OUT.json and measure only the others)")
    ap.add_argument("--recon-results", help="an accuracy table JSON (benchmarks/accuracy_fmnist.py, e.g. "
                    "benchmarks/results/accuracy_fmnist_fidelity.json): export every finished row's reconstruction "
                    "checkpoint and run ORT on the full test set (only this; no demo runs)")
    ap.add_argument("--recon-ckpt", help="the table's checkpoint folder (default: <table>_ckpt beside it)")
    ap.add_argument("--recon-out", default=str(ROOT / "benchmarks" / "results" / "onnx_parity_recon"))
    ap.add_argument("--recon-compare", type=int, default=512, help="test images on which ORT's output codes are "
                    "compared with the reference executor (default: %(default)s)")
    ap.add_argument("--recon-weights", default="auto", choices=["auto", "int8", "uint8"])
    ap.add_argument("--recon-requant", default="none", choices=["none", "residual", "inexact"])
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (--recon-results)")
    ap.add_argument("--recon-full-check", action="store_true", help="with --append: add the full-test-set check "
                    "against the bit-exact 'inexact' export to rows measured without it")
    args = ap.parse_args()
    import onnxruntime as ort

    from ptq2tvm.bench.baselines import host_has_vnni
    from ptq2tvm.bench.disasm import cpu_features

    machine = dict(cpu=cpu_features(llvm=False).get("model_name"), cores=os.cpu_count(), vnni=host_has_vnni(),
                   ort=ort.__version__, loadavg_start=round(os.getloadavg()[0], 1))
    if args.recon_results:
        machine["loadavg"] = machine.pop("loadavg_start")
        recon_main(args, machine)
        return
    runs = [Path(r) for r in args.runs]
    if not args.no_demo:
        runs = [ensure_demo_run(Path(args.demo_dir) / f"{args.data}_w{w}a{a}", w, a, args.data)
                for w, a in ((8, 8), (4, 4))] + runs
    result: dict[str, Any] = dict(machine=machine, runs=[], zoo=[])
    if args.append and Path(args.out + ".json").is_file():
        old = json.loads(Path(args.out + ".json").read_text())
        keep = {str(r) for r in runs}
        result["runs"] = [r for r in old.get("runs", []) if r["run"] not in keep]
        result["zoo"] = old.get("zoo", [])
        machine["loadavg_start"] = f"{old['machine']['loadavg_start']} / {machine['loadavg_start']}"
        result.setdefault("commands", old.get("commands", []))
    for r in runs:
        result["runs"].append(run_row(r, args.per_layer_inputs, args.limit, args.reference_images,
                                      tuple(tuple(p.split(":")) for p in args.policies)))
    work = Path(args.demo_dir) / "zoo"
    work.mkdir(parents=True, exist_ok=True)
    for size in args.zoo_size:
        for name in ("resnet18", "mobilenet_v2"):
            result["zoo"].append(zoo_row(name, size, work))
    machine["loadavg_end"] = round(os.getloadavg()[0], 1)
    cmd = ("python benchmarks/onnx_parity.py " + " ".join(sys.argv[1:])).strip()
    result["commands"] = result.get("commands", []) + [cmd]
    cmd = "`, then `".join(result["commands"])
    write_json(args.out + ".json", result)
    write_text(args.out + ".md", markdown(result, cmd))
    print(f"wrote {args.out}.json, {args.out}.md")
    print(json.dumps({Path(r["run"]).name: {w: (d["ort_top1"], r["so_top1"], d["exact_fraction"], d["max_abs_lsb"])
                                             for w, d in r["ort"].items()} for r in result["runs"]}, indent=1))


if __name__ == "__main__":
    main()
