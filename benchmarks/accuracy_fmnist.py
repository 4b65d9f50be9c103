"""Accuracy of the reconstruction methods on the small Fashion-MNIST models: FP32, fake-quant and compiled .so top-1.

    .venv/bin/python benchmarks/accuracy_fmnist.py                       # the full table (~hours on 2 cores)
    .venv/bin/python benchmarks/accuracy_fmnist.py --models resnet_small --methods qdrop --bits W4A4 \
        --seeds 0 --iters 200 --eval-limit 2000                          # one quick row

Rows {model, method, granularity, adaqtransform, w_bits, a_bits, seed, iters, fp32_top1, fakequant_top1, so_top1,
seconds, ...} go to ``<out>.json`` (rewritten atomically after every row) and a markdown table ``<out>.md`` (mean
+- std over seeds). All seeds run at the ``--multi-seed-bits`` settings, the first seed elsewhere. The run is
resumable at two levels: finished rows are skipped, and an interrupted row resumes after its last finished
reconstruction unit (``<out>_ckpt/<row key>``).

The rows run as Ray tasks through ``ptq2tvm.sweep.run_sweep`` (``--threads`` CPUs each; a local Ray instance with
``--num-cpus``, or ``--address ray://...``); the driver alone writes the results file, after every finished row.
``--no-ray`` runs the rows one after the other in this process.

Methods are ``method[:granularity][+xb][+adaq]``, e.g. ``rtn``, ``adaround``, ``brecq``, ``qdrop``,
``qdrop:mrecg-modcap``, ``qdrop:mrecg-loss``, ``qdrop:mrecg-authors+xb+adaq``, ``network+adaq``, ``nwq``, ``nwq+adaq``.
``+xb``: MRECG's expanded calibration batch, ``--batch-size`` x ``--expand-batch`` rows per iteration (the paper: 256).
For ``nwq`` / ``network`` (one unit) ``--iters`` counts network iterations: the same compute as ``--iters`` per unit of
a block-wise method (the papers: NWQ 20k network iterations, QDrop/MRECG 20k per block). First and last layers stay
at 8 bit (QuantConfig default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel  # noqa: E402
from ptq2tvm.reconstruct import ReconSettings, reconstruct  # noqa: E402
from ptq2tvm.sweep import ResultsStore, key_dir, run_sweep  # noqa: E402

DEFAULT_METHODS = ["rtn", "adaround", "brecq", "qdrop", "qdrop:mrecg-modcap", "qdrop:mrecg-loss", "qdrop+adaq",
                   "qdrop:mrecg-modcap+adaq", "network+adaq"]
DEFAULT_BITS = ["W4A4", "W3A3", "W2A4", "W2A2"]
DEFAULT_MULTI_SEED_BITS = ["W2A4", "W2A2"]


def parse_method(spec: str) -> tuple[str, str | None, bool]:
    method, gran, adaq, _ = parse_method_flags(spec)
    return method, gran, adaq


def parse_method_flags(spec: str) -> tuple[str, str | None, bool, bool]:
    """``method[:granularity][+xb][+adaq]`` -> (method, granularity, adaq, expanded batch)."""
    base, *flags = spec.split("+")
    unknown = set(flags) - {"adaq", "xb"}
    if unknown:
        raise ValueError(f"method {spec!r}: unknown flag(s) {sorted(unknown)} (known: +xb, +adaq)")
    method, _, gran = base.partition(":")
    return method, (gran or None), "adaq" in flags, "xb" in flags


def parse_bits(spec: str) -> tuple[int, int]:
    s = spec.upper()
    if not (s.startswith("W") and "A" in s):
        raise ValueError(f"bits must look like W4A4, got {spec!r}")
    w, a = s[1:].split("A")
    return int(w), int(a)


def row_key(r: dict[str, Any]) -> str:
    xb = f"|x{r['expand_batch']}" if r.get("expand_batch", 1) > 1 else ""
    lr = f"|lr{r['lr_adaq']:g}" if r.get("lr_adaq") is not None else ""
    return (f"{r['model']}|{r['method']}|{r['granularity']}|{'adaq' if r['adaqtransform'] else '-'}|"
            f"W{r['w_bits']}A{r['a_bits']}|s{r['seed']}|i{r['iters']}|c{r['n_calib']}|e{r['eval_images']}{xb}{lr}")


def row_ckpt(out: Path, row: dict[str, Any]) -> Path:
    """The per-row checkpoint directory (reconstruction state after every unit, loss curves)."""
    return out.parent / f"{out.name}_ckpt" / key_dir(row_key(row))


def finished_model_file(ckpt: Path) -> tuple[Path | None, str]:
    """The fake-quant model file of the finished reconstruction checkpoint in folder ``ckpt`` (``state.json`` with
    ``finished`` and ``model``, as :func:`reconstruct` writes it), or (None, why not)."""
    state_path = ckpt / "state.json"
    if not state_path.is_file():
        return None, f"no checkpoint ({ckpt.name} is not in {ckpt.parent})"
    state = json.loads(state_path.read_text())
    if not state.get("finished") or not state.get("model"):
        return None, f"checkpoint {ckpt.name} is not finished"
    return ckpt / state["model"], ""


def load_row_model(out: Path, row: dict[str, Any]) -> QuantModel:
    """The reconstructed fake-quant model of a finished row, from its checkpoint under ``<out>_ckpt``. Raises
    RuntimeError naming the row when it has no finished checkpoint."""
    path, _ = finished_model_file(row_ckpt(out, row))
    if path is None:
        raise RuntimeError(f"{row_key(row)}: no finished checkpoint in {row_ckpt(out, row)}; re-run the row")
    return QuantModel.load(path)


def recon_settings(row: dict[str, Any], args: argparse.Namespace) -> ReconSettings:
    extra = {} if row.get("lr_adaq") is None else dict(lr_adaq=row["lr_adaq"])
    return ReconSettings(method=row["method"], granularity=row["granularity"], adaqtransform=row["adaqtransform"],
                         iters=max(1, row["iters"]), seed=row["seed"], batch_size=args.batch_size,
                         expand_batch=row.get("expand_batch", 1), threads=args.threads,
                         device=getattr(args, "device", "cpu"), **extra)


def refresh_fakequant(jpath: Path, mpath: Path, out: Path, args: argparse.Namespace, test: Any,
                      calib: np.ndarray) -> None:
    """Re-evaluate the fake-quant top-1 of every finished row from its checkpoint (no reconstruction is re-run).

    Used once after the fix that decides the fake-quant bias rounding in float64 like the fold: rows made before it
    keep their reconstructed parameters; only the fake-quant evaluation changes (the old value is kept as
    ``fakequant_top1_float32_bias``)."""
    from ptq2tvm.train import train_builtin

    models: dict[str, torch.nn.Module] = {}
    for r in read_rows(jpath):
        if r.get("bias_rounding") == "float64":
            continue
        if r["model"] not in models:
            models[r["model"]] = train_builtin(r["model"], dataset=args.dataset, progress=False)[0].eval()
        if r["method"] == "rtn":
            qm, _ = reconstruct(models[r["model"]], calib, QuantConfig(r["w_bits"], r["a_bits"]),
                                recon_settings(r, args), progress=False)
        else:
            qm = load_row_model(out, r)
        fq = top1_torch(qm.eval(), test.images, test.labels)
        upd = dict(r, fakequant_top1=fq, bias_rounding="float64")
        if fq != r["fakequant_top1"]:
            upd["fakequant_top1_float32_bias"] = r["fakequant_top1"]
        merge_row(jpath, mpath, upd)
        print(f"refreshed {row_key(r)}: fake-quant {100 * r['fakequant_top1']:.2f} -> {100 * fq:.2f} "
              f"(.so {100 * r['so_top1']:.2f})", file=sys.stderr, flush=True)


def read_rows(jpath: Path) -> list[dict[str, Any]]:
    return json.loads(jpath.read_text())["rows"] if jpath.is_file() else []


def store_for(jpath: Path) -> ResultsStore:
    """The results file: rows keyed by :func:`row_key`, the markdown table rewritten with it. Hand-written commentary
    lives in ``<out>.notes.md`` (put at the top of every rewrite of ``<out>.md``, which is generated)."""
    notes = jpath.with_suffix(".notes.md")

    def with_notes(rows: list[dict[str, Any]]) -> str:
        head = notes.read_text().rstrip() + "\n\n" if notes.is_file() else ""
        return head + markdown(rows)

    return ResultsStore(jpath, key=row_key, markdown=with_notes, extra=dict(torch=torch.__version__))


def merge_row(jpath: Path, mpath: Path, res: dict[str, Any]) -> None:
    """Add ``res`` to the results file (and its markdown ``mpath``, which is ``jpath`` with .md)."""
    assert mpath == jpath.with_suffix(".md")
    store_for(jpath).add(res)


MD_HEADER = """# Fashion-MNIST: reconstruction methods, fake-quant and compiled .so top-1

Full 10,000-image test set, 1024 calibration images (train split, seed 0), batch 32, first/last layer 8 bit, one torch
thread per worker. Made by `benchmarks/accuracy_fmnist.py --threads 1 --iters 250` (two workers sharing the output)
plus the 2000- and 20000-iteration rows of docs/reconstruction.md. mean ± std over seeds (0, 1, 2 at W2A4 / W2A2);
`s/run` is the reconstruction wall time on the shared 2 cores (inflated for rows that ran while other jobs shared
them or the workers were paused), `it/s` its iterations per second. Rows made before the float64 bias-rounding fix
were re-evaluated from their checkpoints with `--refresh-fakequant` (the old value is kept in the JSON as
`fakequant_top1_float32_bias`).
"""

DIGITS_HEADER = """# sklearn digits (8x8): reconstruction methods, fake-quant and compiled .so top-1

The small models trained on sklearn's digits (1437 train / 360 test images, 8x8, `--dataset digits`), 1024 calibration
images from the train split, batch 32, first/last layer 8 bit, one torch thread. A cheap stand-in where the
Fashion-MNIST rows did not fit the CPU budget: 360 test images, so one image is 0.28 points. Rows made with
`benchmarks/accuracy_fmnist.py --dataset digits --out benchmarks/results/accuracy_digits ...` (the command is in
docs/reconstruction.md) on the shared 2 cores at load average ~30 (`s/run` is inflated ~10x).
"""

METHOD_ORDER = ["rtn", "adaround", "brecq", "qdrop", "qdrop:mrecg-modcap", "qdrop:mrecg-loss", "qdrop:mrecg-authors",
                "qdrop:mrecg-authors+xb", "qdrop+adaq", "qdrop:mrecg-modcap+adaq", "qdrop:mrecg-loss+adaq",
                "qdrop:mrecg-authors+adaq", "qdrop:mrecg-authors+xb+adaq", "network", "network+adaq", "nwq",
                "nwq+adaq"]


LEGACY_LR_ADAQ = 1e-3


def method_spec(r: dict[str, Any]) -> str:
    """The ``--methods`` spelling of a row (``qdrop`` for QDrop at its default block granularity)."""
    default = ReconSettings(method=r["method"]).resolved_granularity
    gran = "" if r["granularity"] == default else f":{r['granularity']}"
    xb = "+xb" if r.get("expand_batch", 1) > 1 else ""
    # rows made before the default became 1e-2 carry no lr_adaq: they ran with 1e-3
    lr_adaq = r.get("lr_adaq", LEGACY_LR_ADAQ)
    lr = f"(lr_adaq {lr_adaq:g})" if r["adaqtransform"] and lr_adaq != ReconSettings().lr_adaq else ""
    return f"{r['method']}{gran}{xb}{'+adaq' if r['adaqtransform'] else ''}{lr}"


def _order(spec: str) -> int:
    return METHOD_ORDER.index(spec) if spec in METHOD_ORDER else len(METHOD_ORDER)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["w_bits"], r["a_bits"], r["iters"] or None, method_spec(r)), []).append(r)
    return groups


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table (mean ± std over seeds, in points) and the ordering checks of :func:`ordering`."""
    groups = _groups(rows)

    def ms(vals: list[float]) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        m = 100 * statistics.mean(vals)
        return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {100 * statistics.stdev(vals):.2f}"

    header = MD_HEADER if {r.get("dataset", "fashion-mnist") for r in rows} != {"digits"} else DIGITS_HEADER
    lines = [header,
             "| model | W/A | method | iters/unit | seeds | FP32 | fake-quant | .so | max abs(.so - fq) | s/run | it/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(groups, key=lambda k: (k[0], -k[1], -k[2], k[3] or 0, _order(k[4]))):
        g = groups[k]
        gaps = [abs(r["so_top1"] - r["fakequant_top1"]) for r in g if r.get("so_top1") is not None]
        gap = f"{100 * max(gaps):.2f}" if gaps else "-"
        lines.append(f"| {k[0]} | W{k[1]}A{k[2]} | {k[4]} | {k[3] or '-'} | {len(g)} | "
                     f"{ms([r['fp32_top1'] for r in g])} | {ms([r['fakequant_top1'] for r in g])} | "
                     f"{ms([r.get('so_top1') for r in g])} | {gap} | "
                     f"{statistics.mean(r['seconds'] for r in g):.0f} | "
                     f"{statistics.mean(r.get('iters_per_s', 0.0) for r in g):.1f} |")
    checks = ordering(rows)
    if checks:
        lines += ["", "Ordering checks (fake-quant top-1, mean over seeds; 'within spread' = the difference is "
                  "smaller than the larger std of the two, or than 0.3 points with one seed):", "",
                  "| model | W/A | iters/unit | claim | a | b | a - b | verdict |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | W{c['w_bits']}A{c['a_bits']} | {c['iters']} | {c['claim']} | {c['a']:.2f} | "
                  f"{c['b']:.2f} | {c['diff']:+.2f} | {c['verdict']} |" for c in checks]
    return "\n".join(lines) + "\n"


CLAIMS = [("reconstruction >> RTN (best reconstruction - RTN >= 10; 2-bit weights)", "best", "rtn", 10.0),
          ("QDrop >= BRECQ", "qdrop", "brecq", 0.0), ("BRECQ >= AdaRound", "brecq", "adaround", 0.0),
          ("QDrop+MRECG(ModCap) >= QDrop", "qdrop:mrecg-modcap", "qdrop", 0.0),
          ("QDrop+MRECG(loss) >= QDrop", "qdrop:mrecg-loss", "qdrop", 0.0),
          ("QDrop+AdaQ >= QDrop", "qdrop+adaq", "qdrop", 0.0),
          ("QDrop+MRECG+AdaQ >= QDrop+AdaQ", "qdrop:mrecg-modcap+adaq", "qdrop+adaq", 0.0),
          ("QDrop+MRECG+AdaQ >= QDrop+MRECG", "qdrop:mrecg-modcap+adaq", "qdrop:mrecg-modcap", 0.0),
          ("QDrop+MRECG(authors) >= QDrop", "qdrop:mrecg-authors", "qdrop", 0.0),
          ("QDrop+MRECG(authors)+AdaQ >= QDrop+AdaQ", "qdrop:mrecg-authors+adaq", "qdrop+adaq", 0.0),
          ("QDrop+MRECG(authors)+AdaQ >= QDrop+MRECG(authors)", "qdrop:mrecg-authors+adaq", "qdrop:mrecg-authors",
           0.0),
          ("NWQ+AdaQ >= QDrop+AdaQ (AdaQ Tab. 3)", "nwq+adaq", "qdrop+adaq", 0.0),
          ("QDrop+MRECG(authors, xb) >= QDrop (MRECG Tab. 1)", "qdrop:mrecg-authors+xb", "qdrop", 0.0),
          ("QDrop+MRECG(authors, xb)+AdaQ >= QDrop+MRECG(authors, xb) (AdaQ Tab. 3)", "qdrop:mrecg-authors+xb+adaq",
           "qdrop:mrecg-authors+xb", 0.0),
          ("NWQ >= QDrop (NWQ Tab.)", "nwq", "qdrop", 0.0),
          ("NWQ >= QDrop+MRECG(authors, xb) (AdaQ Tab. 3)", "nwq", "qdrop:mrecg-authors+xb", 0.0),
          ("NWQ+AdaQ >= NWQ (AdaQ Tab. 3)", "nwq+adaq", "nwq", 0.0),
          ("NWQ+AdaQ >= QDrop+MRECG(authors, xb)+AdaQ (AdaQ Tab. 3)", "nwq+adaq", "qdrop:mrecg-authors+xb+adaq", 0.0),
          ("NWQ >= network (logits only)", "nwq", "network", 0.0)]


def ordering(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The papers' claims checked on every (model, bits, iterations) block of the table that has both sides."""
    stats: dict[tuple, dict[tuple, tuple[float, float]]] = {}
    for (model, w, a, iters, spec), g in _groups(rows).items():
        v = [100 * r["fakequant_top1"] for r in g]
        stats.setdefault((model, w, a), {})[(spec, iters)] = (statistics.mean(v),
                                                              statistics.stdev(v) if len(v) > 1 else 0.0)
    out = []
    for (model, w, a), st in sorted(stats.items(), key=lambda kv: (kv[0][0], -kv[0][1], -kv[0][2])):
        rtn = st.get(("rtn", None))                  # RTN rows have no iterations: they join every block
        for iters in sorted({it for _, it in st if it}):
            block = {spec: v for (spec, it), v in st.items() if it == iters}
            for spec in list(block):          # legacy lr_adaq rows stand in where no row at the default exists
                plain = spec.replace(f"(lr_adaq {LEGACY_LR_ADAQ:g})", "")
                if plain != spec and plain not in block:
                    block[plain] = block[spec]
            block.setdefault("rtn", rtn)
            recon = [v for k, v in block.items() if k != "rtn" and v is not None]
            if recon:
                block["best"] = max(recon)
            for claim, a_key, b_key, margin in CLAIMS:
                if block.get(a_key) is None or block.get(b_key) is None or (a_key == "best" and w > 2):
                    continue
                (ma, sa), (mb, sb) = block[a_key], block[b_key]
                diff = ma - mb
                noise = max(sa, sb, 0.3)
                verdict = ("holds" if diff >= margin else "within spread" if margin == 0 and diff > -noise
                           else "does not hold")
                out.append(dict(model=model, w_bits=w, a_bits=a, iters=iters, claim=claim, a=ma, b=mb, diff=diff,
                                verdict=verdict))
    return out


@torch.no_grad()
def top1_torch(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, bs: int = 500) -> float:
    correct = 0
    for i in range(0, len(images), bs):
        out = model(torch.from_numpy(np.ascontiguousarray(images[i:i + bs])))
        correct += int((out.argmax(1).numpy() == labels[i:i + bs]).sum())
    return correct / len(images)


def so_top1_of(qm: torch.nn.Module, test_x: np.ndarray, test_y: np.ndarray, work: Path, batch: int) -> float:
    """Top-1 of the compiled .so of a reconstructed model (fold, compile for this CPU, run the test set)."""
    from ptq2tvm.api import compile_so, to_integer, top1_so
    from ptq2tvm.backend.runtime import CompiledModel

    so = work / "model.so"
    compile_so(to_integer(qm), so, batch=batch)
    return top1_so(CompiledModel(so), test_x, test_y)


def fill_so(jpath: Path, out: Path, args: argparse.Namespace, test: Any) -> None:
    """Compile and evaluate the .so of every row that has none (rows made with ``--no-so``, e.g. on a GPU host
    without TVM), from the row's finished reconstruction checkpoint."""
    for r in read_rows(jpath):
        if r.get("so_top1") is not None:
            continue
        qm = load_row_model(out, r).eval()
        with tempfile.TemporaryDirectory() as td:
            so = so_top1_of(qm, test.images, test.labels, Path(td), args.so_batch)
        store_for(jpath).add(dict(r, so_top1=so))
        print(f"filled {row_key(r)}: fake-quant {100 * r['fakequant_top1']:.2f}  .so {100 * so:.2f}",
              file=sys.stderr, flush=True)


def run_row(model: torch.nn.Module, calib: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, row: dict[str, Any],
            args: argparse.Namespace, ckpt: Path, work: Path) -> dict[str, Any]:
    settings = recon_settings(row, args)
    t0 = time.perf_counter()
    qm, rep = reconstruct(model, calib, QuantConfig(row["w_bits"], row["a_bits"]), settings,
                          progress=not args.quiet, checkpoint_dir=ckpt)
    seconds = time.perf_counter() - t0
    qm.eval()
    fq = top1_torch(qm, test_x, test_y)
    so_top1 = None if getattr(args, "no_so", False) else so_top1_of(qm, test_x, test_y, work, args.so_batch)
    rep.save(ckpt, stem="recon_loss")
    device = torch.device(rep.device)
    where = dict(device=device.type)
    if device.type == "cuda":
        where["gpu"] = torch.cuda.get_device_name(device)
    return dict(row, **where, fakequant_top1=fq, so_top1=so_top1, seconds=round(seconds, 2), bias_rounding="float64",
                rtn_seconds=round(rep.rtn_seconds, 2), iterations=rep.iterations,
                iters_per_s=round(rep.iters_per_s, 2), units=len(rep.units), lam=rep.lam,
                mrecg_groups=(rep.mrecg or {}).get("groups"), resumed_units=rep.resumed_units, adaq=rep.adaq,
                loss_json=str(ckpt / "recon_loss.json"))


def sweep_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row in a Ray worker (or in-process with --no-ray): load the cached model, calibrate, reconstruct with the
    row's checkpoint, evaluate fake-quant and .so."""
    from ptq2tvm.data import calibration_set, load_dataset
    from ptq2tvm.train import train_builtin

    args = argparse.Namespace(**row.pop("_args"))
    torch.set_num_threads(args.threads)
    test = load_dataset(args.dataset, split="test", limit=args.eval_limit)
    calib = calibration_set(args.dataset, args.calib, seed=0)
    model = train_builtin(row["model"], dataset=args.dataset, epochs=args.epochs, progress=False)[0].eval()
    out = Path(args.out)
    ckpt = row_ckpt(out, row)
    with tempfile.TemporaryDirectory() as td:
        return run_row(model, calib, test.images, test.labels, row, args, ckpt, Path(td))


def _print_row(res: dict[str, Any]) -> None:
    so = "-" if res.get("so_top1") is None else f"{100 * res['so_top1']:.2f}"
    print(f"[row] {row_key(res)}: fp32 {100 * res['fp32_top1']:.2f}  fake-quant {100 * res['fakequant_top1']:.2f}  "
          f".so {so}  {res['seconds']:.0f}s  {res['iters_per_s']:.1f} it/s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet_small,mobilenet_v2_small")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits (smoke tests)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the FP32 models (default: recipe)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--bits", default=",".join(DEFAULT_BITS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--multi-seed-bits", default=",".join(DEFAULT_MULTI_SEED_BITS),
                   help="settings that run every seed; the others run the first seed only ('all' for every setting)")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--calib", type=int, default=1024, help="calibration images (train split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--expand-batch", type=int, default=8, help="rows per iteration of '+xb' methods: batch-size x "
                   "this (MRECG's expanded calibration batch; 32 x 8 = the paper's 256)")
    p.add_argument("--lr-adaq", type=float, default=None, help="AdaQTransform xi/eta learning rate (default: "
                   "ReconSettings'); recorded in the row")
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole test split)")
    p.add_argument("--so-batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--train-threads", type=int, default=None, help="threads for training a missing FP32 model "
                   "(default: ptq2tvm.train's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy_fmnist"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-ray", action="store_true", help="run the rows one after the other in this process")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all); rows run "
                   "--threads CPUs each, so --num-cpus 2 --threads 1 runs two rows at a time")
    p.add_argument("--address", help="Ray cluster address (ray://host:10001); default: a local instance")
    p.add_argument("--device", default="cpu", help="reconstruction device: cpu, cuda, auto")
    p.add_argument("--no-so", action="store_true", help="skip compiling and evaluating the .so (a host without "
                   "TVM, e.g. a GPU machine): the row keeps its checkpoint, --fill-so adds the .so top-1 later")
    p.add_argument("--fill-so", action="store_true", help="only compile and evaluate the .so of the rows that have "
                   "none (made with --no-so), from their checkpoints")
    p.add_argument("--refresh-fakequant", action="store_true", help="only re-evaluate the fake-quant top-1 of the "
                   "finished rows made before the float64 bias-rounding fix (from their checkpoints)")
    args = p.parse_args(argv)

    from ptq2tvm.data import calibration_set, load_dataset
    from ptq2tvm.train import train_builtin

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    jpath, mpath = out.with_suffix(".json"), out.with_suffix(".md")
    seeds = [int(s) for s in args.seeds.split(",")]
    multi = {b.upper() for b in args.multi_seed_bits.split(",") if b}
    test = load_dataset(args.dataset, split="test", limit=args.eval_limit)
    calib = calibration_set(args.dataset, args.calib, seed=0)
    if args.refresh_fakequant:
        refresh_fakequant(jpath, mpath, out, args, test, calib)
        return 0
    if args.fill_so:
        fill_so(jpath, out, args, test)
        return 0
    models = [m for m in args.models.split(",") if m]
    rows = []
    for name in models:      # train (or load) each model here once, so the workers find it in the cache
        kw = {} if args.train_threads is None else dict(threads=args.train_threads)
        model, info = train_builtin(name, dataset=args.dataset, epochs=args.epochs, progress=not args.quiet, **kw)
        fp32 = top1_torch(model.eval(), test.images, test.labels)
        for bits in args.bits.split(","):
            w, a = parse_bits(bits)
            for mspec in args.methods.split(","):
                method, gran, adaq, xb = parse_method_flags(mspec)
                for seed in (seeds if "ALL" in multi or bits.upper() in multi else seeds[:1]):
                    row = dict(model=name, dataset=args.dataset, method=method,
                               granularity=gran or ReconSettings(method=method).resolved_granularity,
                               adaqtransform=adaq, w_bits=w, a_bits=a, seed=seed,
                               iters=0 if method == "rtn" else args.iters, n_calib=len(calib),
                               eval_images=len(test), fp32_top1=fp32, model_epochs=info.get("epochs"))
                    if xb:
                        row["expand_batch"] = args.expand_batch
                    if adaq:
                        row["lr_adaq"] = args.lr_adaq if args.lr_adaq is not None else ReconSettings().lr_adaq
                    rows.append(row)
    store = store_for(jpath)
    todo = [r for r in rows if row_key(r) not in store.keys()]
    print(f"{len(todo)} of {len(rows)} rows to run -> {jpath}", file=sys.stderr, flush=True)
    if args.no_ray:
        for row in todo:
            res = sweep_row(dict(row, _args=vars(args)))
            store.add(res)
            _print_row(res)
    else:
        for row in todo:
            row["_args"] = vars(args)
        summary = run_sweep(todo, sweep_row, store, cpus_per_task=args.threads, address=args.address,
                            num_cpus=args.num_cpus, progress=not args.quiet, on_row=_print_row)
        if summary.failed:
            print(f"{len(summary.failed)} row(s) failed; re-run to retry: {summary.failed}", file=sys.stderr)
    print(markdown(read_rows(jpath)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
