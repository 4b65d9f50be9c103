"""Command line: ptq2tvm {quantize, sensitivity, compile, parity, eval, bench, train, demo}. Each has --help and --json PATH."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import Ptq2TvmError

DEFAULT_MODEL = "resnet_small"
DEFAULT_DATA = "fashion-mnist"


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        from .api import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")


# ---- quantize -----------------------------------------------------------------------------------------------
def _resolve_model(args: argparse.Namespace):
    """The FP32 model and its spec: zoo name / file.py:factory, checkpoint, or the cached built-in training."""
    from .api import ModelSpec, build_model

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    spec = ModelSpec(args.model, kwargs, args.checkpoint)
    if args.model.lower().endswith(".onnx"):
        spec.name = str(Path(args.model).resolve())
    elif args.checkpoint is None and _is_builtin_data(args.data) and ":" not in args.model:
        from .train import train_builtin

        model, info = train_builtin(args.model, dataset=args.data, progress=not args.no_progress)
        return model.eval(), ModelSpec(args.model, _builtin_kwargs(args.model, args.data, kwargs),
                                       info.get("checkpoint"))
    return build_model(spec), spec


def _is_builtin_data(data: str) -> bool:
    return data in ("fashion-mnist", "digits")


def _builtin_kwargs(model: str, data: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from .models import model_task

    classes = {"num_classes": 10} if model_task(model) == "classification" else {}
    return {**classes, "in_channels": 1, **kwargs}


def _sr_calibration(model: Any, args: argparse.Namespace, calib: Any) -> Any:
    """A built-in super-resolution model calibrates on the low-resolution inputs it was trained on."""
    from .models import model_task

    if _is_builtin_data(args.data) and ":" not in args.model and model_task(args.model) == "super_resolution":
        from .superres import downsample

        return downsample(calib, int(getattr(model, "scale", 2)))
    return calib


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir, quantize_with_report, save_run, to_integer
    from .data import calibration_set
    from .frontend.qmodel import QuantConfig
    from .reconstruct import ReconSettings

    t0 = time.perf_counter()
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, first_last_8bit=not args.no_first_last_8bit)
    config.validate()
    settings = None
    if args.method != "rtn":
        settings = ReconSettings(method=args.method, granularity=args.granularity, adaqtransform=args.adaqtransform,
                                 iters=args.iters, batch_size=args.batch_size, mrecg_k=args.mrecg_k,
                                 expand_batch=args.expand_batch, seed=args.seed, threads=args.recon_threads)
        settings.validate()
    out = Path(args.out or f"runs/{Path(args.model).stem}_w{args.w_bits}a{args.a_bits}")
    model, spec = _resolve_model(args)
    calib = _sr_calibration(model, args, calibration_set(args.data, args.calib_size, seed=args.seed))
    from .mixed.cli import mixed_config

    config, mixed = mixed_config(args, model, calib, config, out)
    qm, report = quantize_with_report(model, calib, config, method=args.method, progress=not args.no_progress,
                                      settings=settings, checkpoint_dir=out / "recon_checkpoint" if settings else None)
    graph = to_integer(qm)
    recon: dict[str, Any] = {}
    if report is not None:
        report.save(out)
        recon = dict(granularity=report.granularity, adaqtransform=args.adaqtransform, iters=args.iters,
                     recon_seconds=round(report.seconds, 1), loss_curve=str(out / "recon_loss.png"))
    run = save_run(RunDir(out), model, spec, qm, graph, data=args.data, calib_size=int(len(calib)),
                   method=args.method, seed=args.seed, **recon, **mixed)
    result = dict(run_dir=str(run.path), fakequant=str(run.fakequant), qgraph=str(run.qgraph),
                  w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, calib_size=int(len(calib)),
                  n_layers=sum(1 for n in graph.nodes if n.op in ("conv2d", "dense")),
                  weight_bytes=graph.weight_bytes(), seconds=round(time.perf_counter() - t0, 2), **recon,
                  layer_bits=graph.meta.get("layer_bits"))
    print(f"quantized {args.model} W{args.w_bits}A{args.a_bits} ({args.method}"
          f"{', AdaQTransform' if args.adaqtransform else ''}, {len(calib)} calibration images) -> {run.path}  "
          f"[{result['seconds']} s]")
    if qm.config.layer_w_bits or qm.config.layer_a_bits:
        from .mixed.layerbits import bits_summary

        print(f"bits per layer (W/A of the input): {bits_summary(graph.meta['layer_bits'])}")
    if report is not None:
        print(f"reconstruction ({report.granularity}): {len(report.units)} units in {report.seconds:.0f} s; loss "
              f"curves {out / 'recon_loss.png'} (interrupted? re-run the same command to resume)")
    return result


def cmd_compile(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir, compile_so
    from .ir.graph import IntegerGraph

    run = RunDir(args.run)
    graph = IntegerGraph.load(args.qgraph or run.qgraph)
    target = args.target      # resolved (host / x86-64-v3 / CPU name / TVM string / JSON) by backend.compile
    so = Path(args.out) if args.out else run.so
    res = compile_so(graph, so, batch=args.batch, target=target, schedule=args.schedule, tune_trials=args.tune_trials,
                     tune_db=args.tune_db, progress=not args.no_progress)
    print(f"compiled {so} (batch {args.batch}, {res.meta['backend']}, target {res.meta['target']}) "
          f"in {res.seconds:.1f} s")
    out = dict(so=str(res.so_path), meta=str(res.meta_path), seconds=round(res.seconds, 2), target=res.meta["target"],
               backend=res.meta["backend"], batch=args.batch, weight_bytes=res.meta["weight_bytes"])
    if "tuning" in res.meta:
        from .backend.tune import TuneReport

        t = res.meta["tuning"]
        rep = TuneReport(t["db_dir"], t["trials"], t["tasks"], t["measured"], t["seconds"])
        print(f"tuning records {t['db_dir']}: {rep.summary()}")
        out["tuning"] = dict(db_dir=t["db_dir"], measured=t["measured"], seconds=t["seconds"])
    return out


def _eval_data(args: argparse.Namespace, info: dict[str, Any]):
    from .data import load_dataset

    spec = args.data or info.get("data") or DEFAULT_DATA
    return load_dataset(spec, split="test", limit=args.n, seed=getattr(args, "seed", 0))


def cmd_parity(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir
    from .backend.runtime import CompiledModel
    from .frontend.qmodel import QuantModel
    from .ir.graph import IntegerGraph
    from .parity import run_parity

    run = RunDir(args.run)
    info = run.info()
    if args.onnx:  # ONNX Runtime on the QDQ export instead of the .so (ptq2tvm/onnx_cli.py)
        from .onnx_cli import cmd_parity_onnx

        ds = _eval_data(args, info)
        return cmd_parity_onnx(args, ds.images, ds.labels)
    graph = IntegerGraph.load(run.qgraph)
    compiled = CompiledModel(args.so or run.so)
    qm = QuantModel.load(run.fakequant)
    ds = _eval_data(args, info)
    rep = run_parity(graph, compiled, qm, ds.images, ds.labels, per_layer_inputs=args.per_layer_inputs,
                     progress=not args.no_progress)
    print(rep.summary())
    return rep.to_dict()


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir, load_fp32, top1_so, top1_torch
    from .backend.runtime import CompiledModel
    from .frontend.qmodel import QuantModel

    run = RunDir(args.run)
    info = run.info()
    ds = _eval_data(args, info)
    if ds.labels is None:
        raise Ptq2TvmError(f"dataset {ds.name} has no labels: cannot compute accuracy")
    res: dict[str, Any] = dict(data=ds.name, n=int(len(ds.images)))
    res["fp32_top1"] = top1_torch(load_fp32(run.fp32, trust_code=args.trust_code), ds.images, ds.labels)
    res["fakequant_top1"] = top1_torch(QuantModel.load(run.fakequant), ds.images, ds.labels)
    so = Path(args.so) if args.so else run.so
    res["so_top1"] = top1_so(CompiledModel(so), ds.images, ds.labels) if so.exists() else None
    print(f"top-1 on {ds.name} ({res['n']} images): FP32 {100 * res['fp32_top1']:.2f}%  fake-quant "
          f"{100 * res['fakequant_top1']:.2f}%" + (f"  .so {100 * res['so_top1']:.2f}%" if res["so_top1"] is not None
                                                 else "  (.so not compiled)"))
    run.update_info(**{k: v for k, v in res.items() if k.endswith("_top1")})
    return res


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.runner import bench_run

    return bench_run(args.run, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                     ort_int8=not args.no_ort_int8, progress=not args.no_progress, out_dir=args.out_dir,
                     calls_per_turn=args.calls_per_turn)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import train_builtin

    _, info = train_builtin(args.model, dataset=args.data, epochs=args.epochs, seed=args.seed,
                            progress=not args.no_progress)
    print(json.dumps(info, indent=2))
    return info


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import run_demo

    return run_demo(out=args.out, model=args.model, data=args.data, bits=args.bits, calib_size=args.calib_size,
                    threads=args.threads, repeats=args.repeats, progress=not args.no_progress)


def cmd_bundle(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir
    from .bundle import make_bundle
    from .ir.graph import IntegerGraph

    run = RunDir(args.run)
    so = Path(args.so) if args.so else run.so
    out = Path(args.out) if args.out else so.parent / "bundle"
    graph = IntegerGraph.load(run.qgraph) if run.qgraph.is_file() else None
    b = make_bundle(so, out, overwrite=args.force, graph=graph)
    print(f"bundle {b.path}: {len(b.files)} files, {b.bytes / 1e6:.1f} MB (no torch, no ptq2tvm, no TVM compiler)\n"
          f"  on the target: pip install -r {b.path / 'requirements.txt'} && "
          + (f"python {b.path / 'run_model.py'} --check && " if graph is not None else "")
          + f"python {b.path / 'run_model.py'} --random 1 --bench 20")
    return dict(bundle=str(b.path), files=b.files, bytes=b.bytes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptq2tvm", description=__doc__)
    p.add_argument("--version", action="version", version=f"ptq2tvm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model post-training into a run directory")
    q.add_argument("--model", default=DEFAULT_MODEL, help="zoo name (see ptq2tvm.models.list_models()), "
                   "path/to/file.py:factory or an FP32 model.onnx")
    q.add_argument("--model-kwargs", help="JSON kwargs for the model constructor, e.g. '{\"width_mult\": 0.5}'")
    q.add_argument("--checkpoint", help="state_dict to load (strict); default for built-in data: train and cache")
    q.add_argument("--data", default=DEFAULT_DATA, help="calibration data: fashion-mnist, digits, an image folder "
                   "or a .npy/.npz file (labels not needed)")
    q.add_argument("--calib-size", type=int, default=512, help="number of calibration images")
    q.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8")
    q.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8")
    q.add_argument("--no-first-last-8bit", action="store_true", help="quantize first conv / last layer at the "
                   "requested bits too (default keeps them at 8 bit)")
    q.add_argument("--method", default="rtn", choices=["rtn", "adaround", "brecq", "qdrop", "network", "nwq"],
                   help="rtn: calibration only; adaround (layer-wise), brecq (block, two-stage), qdrop (block, joint, "
                   "drop), network (one unit, logits loss), nwq (NWQ: one unit, activation regularisation, annealing "
                   "softmax and mixup): reconstruction (see docs/reconstruction.md)")
    q.add_argument("--granularity", choices=["layer", "block", "mrecg-modcap", "mrecg-loss", "mrecg-authors",
                                              "network"],
                   help="reconstruction units (default: the method's own); mrecg-*: MRECG mixed granularity "
                   "(mrecg-authors: the MRECG authors' released merge lists, or their structural rule)")
    q.add_argument("--adaqtransform", action="store_true", help="learn per-channel output scale xi and shift eta "
                   "(folded into the requant multiplier and int32 bias: free at inference)")
    q.add_argument("--iters", type=int, default=20000, help="reconstruction iterations per unit (papers: 20000; "
                   "about 1.2 h for resnet_small on 2 cores, scale down for a quick run)")
    q.add_argument("--batch-size", type=int, default=32, help="reconstruction batch size")
    q.add_argument("--expand-batch", type=int, default=1, help="MRECG expanded calibration batch factor")
    q.add_argument("--mrecg-k", type=int, help="MRECG: number of adjacent merges (default: the paper's "
                   "2/4/7 for ResNet-18/50/MobileNetV2, see docs/reconstruction.md)")
    q.add_argument("--recon-threads", type=int, default=1, help="torch threads during reconstruction (1 is often "
                   "fastest on 2 cores)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="run directory (default runs/<model>_w<W>a<A>)")
    from .mixed.cli import add_quantize_args, register as register_sensitivity

    add_quantize_args(q)
    _add_json(q)
    q.set_defaults(func=cmd_quantize)
    register_sensitivity(sub)

    c = sub.add_parser("compile", help="compile the integer graph of a run to a .so")
    c.add_argument("run", help="run directory")
    c.add_argument("--qgraph", help="integer graph file (default RUN/model.qgraph.npz)")
    c.add_argument("--out", help="output .so (default RUN/model.so); the sidecar is written next to it (.json)")
    c.add_argument("--batch", type=int, default=1, help="compiled batch size (inputs are chunked to it)")
    c.add_argument("--schedule", default="auto", choices=["auto", "x86", "plain"],
                   help="auto: hand-scheduled x86 kernels (AVX-512 VNNI / exact AVX2) when the target has them, "
                   "else plain (TVM's default lowering of the NCHW definitions; portable)")
    c.add_argument("--target", help="'host' (default: this CPU's best kernels), 'x86-64-v3' (portable: AVX2 "
                   "kernels for any AVX2 CPU), an LLVM CPU name (znver4, sapphirerapids, alderlake), 'cuda' / "
                   "'cuda:sm_90', a TVM target string ('llvm -mcpu=znver4') or a JSON target dict")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="measure up to N schedules per kernel (MetaSchedule runner; ~2 s each) and keep the fastest; "
                   "records are kept in --tune-db and reused, so a rebuild measures only what is new (default 0: "
                   "the hand schedules, no measuring)")
    c.add_argument("--tune-db", metavar="DIR", help="tuning records (MetaSchedule JSON database; default "
                   "<out>.tuning/ next to the .so); given without --tune-trials, rebuilds from the records")
    _add_json(c)
    c.set_defaults(func=cmd_compile)

    for name, fn, helptext in (("parity", cmd_parity, "prove the .so equals the reference executor and compare "
                                "with fake-quant"), ("eval", cmd_eval, "top-1 of FP32, fake-quant and .so")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("run", help="run directory")
        e.add_argument("--data", help="evaluation data (default: the run's dataset, test split)")
        e.add_argument("--n", type=int, help="use only the first N images")
        e.add_argument("--so", help="library to check (default RUN/model.so)")
        if name == "eval":
            e.add_argument("--trust-code", action="store_true", help="allow an fp32.pt that runs code when loaded (a "
                           "pickled module or a file.py:factory model): only for run directories you made yourself")
        if name == "parity":
            e.add_argument("--per-layer-inputs", type=int, default=256, help="inputs for the per-layer comparison "
                           "(0 = skip)")
            from .onnx_cli import add_parity_args

            add_parity_args(e)
        _add_json(e)
        e.set_defaults(func=fn)

    b = sub.add_parser("bench", help="latency of the .so vs PyTorch FP32 and ONNX Runtime FP32/INT8")
    b.add_argument("run", help="run directory (compiled)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeats", type=int, default=20, help="timed turns per runtime")
    b.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    b.add_argument("--calls-per-turn", type=int, default=5,
                   help="timed calls back to back per turn (1: latency right after an idle gap)")
    b.add_argument("--no-ort-int8", action="store_true", help="skip the ONNX Runtime INT8 baseline")
    b.add_argument("--out-dir", help="where to write the markdown table and PNG chart (default RUN)")
    _add_json(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("bundle", help="runtime-only deployment bundle of a compiled .so (TVM runtime libraries, "
                       "a numpy + apache-tvm-ffi runner; no compiler)")
    d.add_argument("run", help="run directory (compiled)")
    d.add_argument("--so", help="the .so to bundle (default RUN/model.so)")
    d.add_argument("--out", help="bundle directory (default next to the .so: bundle/)")
    d.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    _add_json(d)
    d.set_defaults(func=cmd_bundle)

    from .onnx_cli import register_export

    register_export(sub, _add_json)

    t = sub.add_parser("train", help="train (or load from cache) a small zoo model on a built-in dataset")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--data", default=DEFAULT_DATA, choices=["fashion-mnist", "digits"])
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int, default=0)
    _add_json(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job on the built-in default: train/load, quantize W8A8 and W4A4, "
                       "compile, eval, parity, bench -> runs/demo/summary.json")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--data", default=DEFAULT_DATA, choices=["fashion-mnist", "digits"])
    d.add_argument("--bits", nargs="+", default=["8/8", "4/4"], help="W/A settings, e.g. 8/8 4/4 2/4")
    d.add_argument("--calib-size", type=int, default=512)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--repeats", type=int, default=30)
    _add_json(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Ptq2TvmError as e:
        print(f"ptq2tvm {args.command}: error: {e}", file=sys.stderr)
        return 2
    _emit(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
