"""Command line of ptq2tvm: post-training quantization of a PyTorch CNN to a true-integer TVM .so. Every command has
--help (defaults shown) and --json PATH."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .backend.storage import INT8_STORAGE_MAX_PIXELS, SUBBYTE_STORAGES
from .cli_checks import check_int_options, check_outputs, int_option_minimums
from .errors import Ptq2TvmError
from .units import size_text

DEFAULT_MODEL = "resnet_small"
DEFAULT_DATA = "fashion-mnist"


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (unless the text already says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:   # identity: a default of 0 is shown (0 == False)
            return text
        return super()._get_help_string(action)


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
    """The FP32 model, its spec (paths resolved, so the run directory works from anywhere) and where its weights
    come from: zoo name / file.py:factory, checkpoint, or the cached built-in training."""
    from .api import ModelSpec, build_model
    from .demo import training_notice

    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except ValueError as e:
        raise Ptq2TvmError(f"--model-kwargs is not JSON: {e}") from None
    name = args.model
    if ":" in name and name.split(":")[0].endswith(".py"):
        file, attr = name.rsplit(":", 1)
        name = f"{Path(file).resolve()}:{attr}"
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    spec = ModelSpec(name, kwargs, checkpoint)
    if args.model.lower().endswith(".onnx"):
        spec.name = str(Path(args.model).resolve())
        return build_model(spec), spec, f"ONNX file {spec.name}"
    if args.checkpoint is None and _is_builtin_data(args.data) and ":" not in args.model:
        from .models import list_models
        from .train import train_builtin

        if args.model not in list_models():
            build_model(spec)  # the unknown-name error (with a suggestion)
        notice = training_notice(args.model, args.data)
        if notice:
            print(notice, file=sys.stderr)
        model, info = train_builtin(args.model, dataset=args.data, progress=not args.no_progress)
        return model.eval(), ModelSpec(args.model, _builtin_kwargs(args.model, args.data, kwargs),
                                       info.get("checkpoint")), f"trained on {args.data} (cached {info.get('checkpoint')})"
    model = build_model(spec)
    if checkpoint:
        weights = f"checkpoint {checkpoint}"
    elif ":" in args.model:
        weights = f"as returned by {args.model} (no --checkpoint: random unless the factory loads weights)"
        print(f"note: no --checkpoint: the weights are whatever {args.model} returns (random unless it loads them)",
              file=sys.stderr)
    else:
        weights = "random (no --checkpoint)"
        print(f"warning: no --checkpoint: quantizing {args.model} with RANDOM weights (pass --checkpoint "
              "state_dict.pt)", file=sys.stderr)
    return model, spec, weights


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


def _resolve_data(data: str) -> str:
    """Built-in names as given; an existing path resolved (run.json then works from any directory)."""
    return data if _is_builtin_data(data) or not Path(data).exists() else str(Path(data).resolve())


def _preprocess(args: argparse.Namespace, model: Any, data: str) -> dict[str, Any]:
    """Image-folder preprocessing from --channels/--input-size/--resize/--mean/--std/--preprocess (the channels
    inferred from the model's first conv); {} for other data (where those options are an error)."""
    from .data.checks import expected_channels

    given = [f"--{k.replace('_', '-')}" for k in ("channels", "input_size", "resize", "mean", "std", "preprocess")
             if getattr(args, k, None) is not None]
    if not Path(data).is_dir():
        if given and not _is_builtin_data(data) and not Path(data).exists():
            raise Ptq2TvmError(f"--data {data}: no such folder or file")
        if given:
            raise Ptq2TvmError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to image folders only; "
                               f"{data} is not one (arrays are used as they are: preprocess them before saving)")
        return {}
    if args.preprocess:
        file, fn = args.preprocess.rsplit(":", 1) if ":" in args.preprocess else (args.preprocess, "")
        hook = f"{Path(file).resolve()}:{fn}"
        print(f"image folder {data}: preprocessing by {args.preprocess}", file=sys.stderr)
        return dict(transform=hook)
    inferred = expected_channels(model)
    channels = args.channels or (inferred if inferred in (1, 3) else 3)
    size = _parse_size(args.input_size) if args.input_size else (224, 224)
    if not args.input_size:
        _warn_small_images(data, model, channels, size)
    resize = args.resize if args.resize is not None else round(min(size) * 256 / 224)
    prep: dict[str, Any] = dict(channels=channels, crop=list(size), resize=resize)
    if args.mean is not None:
        prep["mean"] = list(args.mean)
    if args.std is not None:
        prep["std"] = list(args.std)
    from .data import IMAGENET_MEAN, IMAGENET_STD

    import numpy as np

    m = prep.get("mean") or (list(IMAGENET_MEAN) if channels == 3 else [round(float(np.mean(IMAGENET_MEAN)), 4)])
    sd = prep.get("std") or (list(IMAGENET_STD) if channels == 3 else [round(float(np.mean(IMAGENET_STD)), 4)])
    how = f"resize shorter side to {resize}, center crop" if resize else "resize to"
    print(f"image folder {data}: {channels} channel(s) "
          f"({'--channels' if args.channels else 'from the model' if inferred in (1, 3) else 'default'}), "
          f"{how} {size[0]}x{size[1]}, /255, mean {tuple(m)}, std {tuple(sd)} "
          "(change with --channels/--input-size/--resize/--mean/--std, or --preprocess file.py:fn)", file=sys.stderr)
    return prep


def _warn_small_images(data: str, model: Any, channels: int, size: tuple[int, int]) -> None:
    """One line when the folder's images are much smaller (median shorter side < half) than the default input size
    they would be upscaled to; says whether the model runs at their own size and not at the default."""
    from .data.image_folder import median_shorter_side

    side = median_shorter_side(data)
    if side is None or side >= min(size) / 2:
        return
    runs = {s: _runs_at(model, channels, s) for s in (side, size)}
    fits = ""
    if runs[side] and not runs[size]:
        fits = f"; the model runs at {side}x{side} and not at {size[0]}x{size[1]}"
    elif not runs[side] and runs[size]:
        fits = f"; the model does not run at {side}x{side}"
    print(f"warning: the images of {data} are small (median shorter side {side} px): without --input-size they are "
          f"upscaled {min(size) / side:.0f}x to {size[0]}x{size[1]}; pass --input-size {side} (and --resize 0 for "
          f"images framed like the training images) if the model was trained at that size{fits}", file=sys.stderr)


def _runs_at(model: Any, channels: int, size: int | tuple[int, int]) -> bool:
    """Whether ``model`` accepts a (1, channels, H, W) input (one forward on zeros; False on any error)."""
    import torch

    h, w = (size, size) if isinstance(size, int) else size
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, h, w))
        return True
    except Exception:  # noqa: BLE001 - any failure means "does not run at this size"
        return False


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        raise Ptq2TvmError(f"--input-size must be N or HxW (e.g. 224 or 28x28), got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise Ptq2TvmError(f"--input-size must be N or HxW (e.g. 224 or 28x28), got {text!r}")
    return (parts[0], parts[-1])


def _data_kwargs(info: dict[str, Any]) -> dict[str, Any]:
    """load_dataset keyword arguments of a run's recorded preprocessing."""
    from .data import run_data_kwargs

    return run_data_kwargs(info)


def _quantize_out(args: argparse.Namespace) -> Path:
    """The run directory of ``quantize``: ``--out``, default ``runs/<model>_w<W>a<A>``."""
    return Path(args.out or f"runs/{Path(args.model.split(':')[0]).stem}_w{args.w_bits}a{args.a_bits}")


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """``ptq2tvm quantize``. On an error nothing this run created remains (a breaker helper found an infeasible
    ``--size-budget`` leaving layer_costs.json and sensitivity.* in a new folder): a new ``--out`` folder is removed,
    an existing one loses only the entries this run added (:func:`ptq2tvm.outpaths.removed_on_failure`)."""
    from .outpaths import removed_on_failure

    with removed_on_failure(_quantize_out(args)):
        return _quantize(args)


def _quantize(args: argparse.Namespace) -> dict[str, Any]:
    from .api import (FEW_IMAGES_NOTE, RunDir, check_calibration, fidelity, quantize_with_report, save_run,
                      to_integer)
    from .data import calibration_dataset, check_fidelity_images, holdout_set
    from .frontend.qmodel import QuantConfig
    from .reconstruct import ReconSettings
    from .reconstruct.checkpoint import Checkpoint
    from .reconstruct import cliargs as recon_cliargs

    check_fidelity_images(args.fidelity_images)

    t0 = time.perf_counter()
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, first_last_8bit=not args.no_first_last_8bit)
    config.validate()
    settings = None
    ignored = _recon_only_given(args)
    if ignored and args.method == "rtn":
        verb = "affects" if len(ignored) == 1 else "affect"
        print(f"warning: {', '.join(ignored)} only {verb} reconstruction: ignored with --method rtn (calibration "
              "only; pick --method adaround/brecq/qdrop/network/nwq)", file=sys.stderr)
    mrecg_only = [opt for dest, opt in (("mrecg_k", "--mrecg-k"), ("expand_batch", "--expand-batch"))
                  if opt in ignored or (dest == "mrecg_k" and args.mrecg_k is not None)]
    if args.method != "rtn" and mrecg_only and not str(args.granularity or "").startswith("mrecg"):
        verb = "affects" if len(mrecg_only) == 1 else "affect"
        print(f"warning: {', '.join(mrecg_only)} only {verb} MRECG's mixed granularity: ignored without "
              "--granularity mrecg-modcap / mrecg-loss / mrecg-authors", file=sys.stderr)
    if args.method != "rtn":
        settings = ReconSettings(method=args.method, granularity=args.granularity, adaqtransform=args.adaqtransform,
                                 iters=args.iters, batch_size=args.batch_size, mrecg_k=args.mrecg_k,
                                 expand_batch=args.expand_batch, seed=args.seed, threads=args.recon_threads,
                                 **recon_cliargs.settings_kwargs(args))
        settings.validate()
    out = _quantize_out(args)
    from .outpaths import check_output_path

    check_output_path(out, "dir", "--out")
    run_dir = RunDir(out)
    ckpt_dir = run_dir.recon_checkpoint
    if args.force and Checkpoint.remove(ckpt_dir):
        print(f"--force: removed the reconstruction checkpoint {ckpt_dir}", file=sys.stderr)
    model, spec, weights = _resolve_model(args)
    data = _resolve_data(args.data)
    prep = _preprocess(args, model, data)
    ds = calibration_dataset(data, args.calib_size, seed=args.seed, **_data_kwargs(dict(preprocess=prep)))
    calib = _sr_calibration(model, args, ds.images)
    source = ("builtin" if _is_builtin_data(data) else "preprocess" if prep.get("transform") else
              "folder" if Path(data).is_dir() else "array")
    notes = list(ds.extra.get("notes", [])) + check_calibration(model, calib, source)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    # from here on a Ctrl-C leaves a folder that every command refuses (RunDir.check_not_interrupted) until the rerun
    earlier = run_dir.pending_quantize()          # an interrupted quantize before this one
    run_dir.mark_pending(f"W{args.w_bits}A{args.a_bits} {args.method}")
    from .mixed.cli import mixed_config

    config, mixed = mixed_config(args, model, calib, config, out)
    if settings is not None:
        if getattr(args, "time_budget", None):
            cost = (f"at most {args.iters} iterations per unit, as many as --time-budget {args.time_budget} "
                    "buys at the measured rates")
        elif args.model == "resnet_small" and _is_builtin_data(args.data):   # the one model whose rate we know
            cost = (f"{args.iters} iterations per unit; this 28x28 resnet_small runs ~30 it/s on 2 idle CPU cores "
                    f"(measured), ~{args.iters / 30 / 60:.1f} min per unit")
        else:
            cost = (f"{args.iters} iterations per unit; the time per iteration depends on the model and input "
                    "size: " + ("the progress bar shows this model's it/s" if not args.no_progress else
                                "not estimated (without --no-progress a bar shows this model's it/s)")
                    + "; --time-budget 10m caps the total")
        print(f"reconstruction ({args.method}, batch {args.batch_size}, {cost}); checkpointed after every unit "
              "(Ctrl-C, then re-run the same command to resume; --force starts over)", file=sys.stderr)
    qm, report = quantize_with_report(model, calib, config, method=args.method, progress=not args.no_progress,
                                      settings=settings, checkpoint_dir=ckpt_dir if settings else None)
    graph = to_integer(qm)
    fid = None
    if args.fidelity_images > 0:
        hold = holdout_set(data, args.calib_size, args.fidelity_images, seed=args.seed,
                           **_data_kwargs(dict(preprocess=prep)))
        hold = _sr_calibration(model, args, hold) if hold is not None else None
        fid = fidelity(model, qm, hold if hold is not None else calib[:args.fidelity_images],
                       held_out=hold is not None, per_layer=args.per_layer, model_name=f"the FP32 model {args.model}",
                       image_notes=False)           # the data's own warnings are printed above
    bits = f"W{args.w_bits}A{args.a_bits}"
    if qm.config.layer_w_bits or qm.config.layer_a_bits:   # layers per W/A pair (A: bits of the layer's input)
        from .mixed.layerbits import layer_bits_label

        bits = layer_bits_label(graph.meta["layer_bits"], "mixed_precision" in mixed, bits)
    recon: dict[str, Any] = {}
    stale = _remove_stale(out)   # what RunDir.invalidate does not cover (old loss curves)
    if report is not None:
        report.save(out)
        recon = dict(granularity=report.granularity, adaqtransform=args.adaqtransform, iters=args.iters,
                     recon_seconds=round(report.seconds, 1), loss_curve=str(out / "recon_loss.png"))
    run = save_run(run_dir, model, spec, qm, graph, data=data, preprocess=prep, calib_size=int(len(calib)),
                   method=args.method, seed=args.seed, weights=weights, data_warnings=notes,
                   fidelity=fid.to_dict() if fid else None, bits=bits, **recon, **mixed)
    if Checkpoint.remove(ckpt_dir) and earlier and report is None:   # this run supersedes an interrupted one
        print(f"removed the checkpoint of an interrupted earlier quantize into {out} ({earlier}): this run replaces it",
              file=sys.stderr)
    superseded = run.superseded + [n for n in stale if n not in run.superseded]
    if superseded:
        built = any(n.endswith((".so", "/")) for n in superseded)       # a library or a bundle was removed
        print(f"removed what the new integer graph supersedes in {run.path}: {', '.join(superseded)}"
              + (" (compile again)" if built else ""), file=sys.stderr)
    stored, padded = _stored_bytes(graph)
    result = dict(run_dir=str(run.path), fakequant=str(run.fakequant), qgraph=str(run.qgraph),
                  bits=bits, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, calib_size=int(len(calib)),
                  weights=weights, n_layers=sum(1 for n in graph.nodes if n.op in ("conv2d", "dense")),
                  weight_bytes=stored, weight_count=graph.weight_bytes(),
                  fidelity=fid.to_dict() if fid else None, data_warnings=notes,
                  seconds=round(time.perf_counter() - t0, 2), **recon,
                  layer_bits=graph.meta.get("layer_bits"))
    predicted = ((mixed.get("mixed_precision") or {}).get("predicted") or {}).get("size")
    print(f"quantized {args.model} {bits} ({args.method}"
          f"{', AdaQTransform' if args.adaqtransform and args.method != 'rtn' else ''}, {len(calib)} calibration "
          f"images) -> {run.path}  [{result['seconds']} s]\n  weights: {weights}; stored weights "
          f"{size_text(result['weight_bytes'])} in this CPU's default build at batch 1, "
          + ("channel padding included, as compile reports it" if padded else "before channel padding")
          + f" ({_stored_bytes_target(graph)}; {result['weight_count']} values)"
          + (f"; the plan predicted {size_text(predicted)}" if predicted else ""))
    if fid is not None:
        from .fidelity_report import low_fidelity_advice

        advice = low_fidelity_advice(args.method, args.adaqtransform, args.iters, (args.w_bits, args.a_bits),
                                     mixed=bool(qm.config.layer_w_bits or qm.config.layer_a_bits))
        print("  " + fid.summary(advice).replace("\n", "\n  "))
        few = FEW_IMAGES_NOTE.format(n=len(calib))
        looks = [n for n in notes if not n.startswith(few)]          # notes on how the images look, not their count
        if looks:
            print(f"  warning: {len(looks)} data warning(s) above: this fidelity is measured on images like the "
                  "calibration images, so it cannot show that they are preprocessed differently from what the model "
                  "expects (raw pixels calibrate a model that then fails on normalized inputs)")
    if report is not None:
        print(f"reconstruction ({report.granularity}): {len(report.units)} units in {report.seconds:.0f} s; loss "
              f"curves {out / 'recon_loss.png'}")
    return result


def _remove_stale(run_dir: Path) -> list[str]:
    """Artifacts of a run directory that a new quantize run supersedes beyond :meth:`ptq2tvm.api.RunDir.invalidate`
    (.so, bundles, parity / latency results, ONNX exports of another graph): the old reconstruction loss curves,
    removed before this run's report writes its own. Names removed."""
    removed: list[str] = []
    for name in ("recon_loss.png", "recon_loss.json"):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    return removed


# reconstruction-only options of quantize: (dest, option) pairs; given with --method rtn they do nothing
RECON_ONLY = (("granularity", "--granularity"), ("adaqtransform", "--adaqtransform"), ("iters", "--iters"),
              ("batch_size", "--batch-size"), ("expand_batch", "--expand-batch"), ("mrecg_k", "--mrecg-k"),
              ("recon_threads", "--recon-threads"), ("time_budget", "--time-budget"), ("early_stop", "--early-stop"))


def _recon_only_given(args: argparse.Namespace) -> list[str]:
    """The reconstruction-only options whose value differs from the parser's default (``args._defaults``)."""
    defaults = getattr(args, "_defaults", {})
    return [opt for dest, opt in RECON_ONLY if dest in defaults and getattr(args, dest, None) != defaults[dest]]


def _stored_bytes(graph: Any) -> tuple[int, bool]:
    """(the bytes this CPU's default batch-1 build stores for ``graph``, :func:`ptq2tvm.api.built_weight_bytes`;
    True). The run is saved by then: a graph that build refuses (compile will say why) gets (the count before channel
    padding, False) and a warning instead of a traceback."""
    from .api import built_weight_bytes, stored_weight_bytes

    try:
        return built_weight_bytes(graph), True
    except Exception as e:  # noqa: BLE001 - a size line is not worth losing the finished run's summary
        print(f"warning: the default build could not be set up to count its stored weight bytes ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); the size below is before channel padding",
              file=sys.stderr)
        return stored_weight_bytes(graph), False


def _stored_bytes_target(graph: Any = None) -> str:
    """The kernel family the default build of this host uses, for the stored-size line of ``quantize``, and the
    <= 4-bit layers that build keeps one weight per byte (:func:`ptq2tvm.backend.storage.keeps_int8_storage`, at
    batch 1) when ``graph`` has any, with the bytes packing them would save (before channel padding)."""
    from .backend.blocked_builder import packs_int2, x86_isa
    from .backend.compile import resolve_target
    from .backend.storage import graph_subbyte_storage, keeps_int8_storage

    isa = x86_isa(resolve_target(None))[0]
    if isa is None:
        return "plain kernels: one byte per weight"
    text = f"{isa} kernels: W<=4 two per byte" + (", W<=2 four per byte" if packs_int2(isa, False) else "")
    kept = [] if graph is None else [n for n in graph.nodes
                                     if keeps_int8_storage(n, 1, subbyte_storage=graph_subbyte_storage(graph))]
    if kept:
        from .api import stored_weight_bytes

        saved = stored_weight_bytes(graph, batch=1) - stored_weight_bytes(graph, batch=1, subbyte_storage="packed")
        text += (f", except {len(kept)} small layer(s) whose weights meet < {INT8_STORAGE_MAX_PIXELS} output pixels "
                 f"per call: one per byte, faster; compile --subbyte-storage packed packs them, {size_text(saved)} "
                 "less")
    return text


TARGET_FORMS = ("'host' (this CPU), 'x86-64-v3' / 'x86-64-v4', an LLVM CPU name (znver4, sapphirerapids, "
                "alderlake), 'cuda' / 'cuda:sm_90', a TVM target string ('llvm -mcpu=znver4') or a JSON target dict")


def _check_target(target: Any) -> dict[str, Any]:
    """The resolved target, or one clear error (:class:`Ptq2TvmError`): an empty or blank ``--target`` or CPU name
    (``''``, ``'  '``, ``'llvm -mcpu='``: TVM built for mcpu '' with a warning per kernel, plain kernels), an unknown
    name, or a CPU of another architecture (the .so is linked by this host's compiler: no cross toolchain)."""
    import platform

    from .backend.compile import resolve_target

    if isinstance(target, str) and not target.strip():
        raise Ptq2TvmError(f"--target {target!r} is empty: give {TARGET_FORMS}, or leave --target out for this CPU")
    try:
        resolved = resolve_target(target)
    except ValueError as e:
        raise Ptq2TvmError(str(e)) from None
    for t in (resolved, resolved.get("host") if isinstance(resolved.get("host"), dict) else {}):
        if "mcpu" in t and not str(t["mcpu"]).strip():
            raise Ptq2TvmError(f"--target {target!r} sets an empty CPU name (mcpu ''): give {TARGET_FORMS}")
    triple = str(resolved.get("mtriple") or (resolved.get("host") or {}).get("mtriple") or "")
    arch = triple.split("-", 1)[0].lower()
    host = platform.machine().lower()
    same = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}}.get(host, {host})
    if arch and arch not in same:
        raise Ptq2TvmError(f"cannot build for {triple} on this {host} host: ptq2tvm links the .so with the host's "
                           f"C compiler and has no cross toolchain; run `ptq2tvm compile` on a {arch} machine (the "
                           "run directory, or just its model.qgraph.npz, is portable)")
    return resolved


def cmd_compile(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir, compile_so
    from .ir.graph import IntegerGraph

    run = RunDir(args.run)
    graph = IntegerGraph.load(args.qgraph or run.qgraph)
    target = _check_target(args.target)   # host / x86-64-v3 / CPU name / TVM string / JSON, or one clear error
    so = Path(args.out) if args.out else run.so
    print(f"compiling {args.qgraph or run.qgraph} for {target.get('kind')} {target.get('mcpu', target.get('arch', ''))}"
          f" (batch {args.batch}; a few seconds per MB of weights"
          + (f", plus ~2 s per measured schedule, up to {args.tune_trials} per kernel" if args.tune_trials else "")
          + ")", file=sys.stderr)
    try:
        res = compile_so(graph, so, batch=args.batch, target=target, schedule=args.schedule,
                         tune_trials=args.tune_trials, tune_db=args.tune_db, progress=not args.no_progress,
                         subbyte_storage=args.subbyte_storage)
    except ValueError as e:
        raise Ptq2TvmError(str(e)) from None
    print(f"compiled {so} (batch {args.batch}, {res.meta['backend']}, target {res.meta['target']}) "
          f"in {res.seconds:.1f} s")
    shortcuts = res.meta.get("arithmetic_shortcuts") or {}
    if any(shortcuts.values()):
        print("proved arithmetic shortcuts (kernels): " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                                    for k, v in shortcuts.items()))
    int8_kept = res.meta.get("int8_storage_layers") or []
    if int8_kept:
        names = ", ".join(int8_kept[:4]) + (", ..." if len(int8_kept) > 4 else "")
        print(f"{len(int8_kept)} <= 4-bit layer(s) stored one weight per byte, faster than unpacking weights that meet "
              f"< {INT8_STORAGE_MAX_PIXELS} output pixels per call ({names}); --subbyte-storage packed packs them "
              "(smallest file)")
        if graph.meta.get("subbyte_storage") == "packed":      # a mixed-precision / --layer-bits graph, made auto
            print(f"warning: {args.qgraph or run.qgraph} has per-layer bits chosen for packed sub-byte weights (a "
                  "mixed-precision plan's size budget counts them packed); this build stores "
                  f"{size_text(res.meta['stored_weight_bytes'])}: leave out --subbyte-storage auto to keep the plan's "
                  "size", file=sys.stderr)
    out = dict(so=str(res.so_path), meta=str(res.meta_path), seconds=round(res.seconds, 2), target=res.meta["target"],
               backend=res.meta["backend"], batch=args.batch,
               weight_bytes=res.meta.get("stored_weight_bytes", res.meta["weight_bytes"]),
               weight_count=res.meta.get("weight_count", res.meta["weight_bytes"]), arithmetic_shortcuts=shortcuts,
               int8_storage_layers=int8_kept)
    if "tuning" in res.meta:
        from .backend.tune import TuneReport

        t = res.meta["tuning"]
        rep = TuneReport(t["db_dir"], t["trials"], t["tasks"], t["measured"], t["seconds"])
        print(f"tuning records {t['db_dir']}: {rep.summary()}")
        out["tuning"] = dict(db_dir=t["db_dir"], measured=t["measured"], seconds=t["seconds"])
    return out


def _eval_data(args: argparse.Namespace, info: dict[str, Any]):
    """The evaluation set of ``eval`` / ``parity``: ``--data`` or the run's data (test split), with the run's
    preprocessing. Data without a test split of its own (an array file, a folder without train/val) is the set the
    run was calibrated on: its calibration images are left out (all of them calibrated it: kept, and said).
    ``--n``: a seeded random subset (``--seed``), said."""
    import numpy as np

    from .data import calibration_rows_in_test, load_dataset
    from .data.image_folder import check_seed

    spec = args.data or info.get("data") or DEFAULT_DATA
    same = not args.data or _resolve_data(args.data) == info.get("data")
    kwargs = _data_kwargs(info) if same else {}
    if args.data and Path(args.data).is_dir() and not kwargs:
        kwargs = _data_kwargs(info)   # another folder: the run's preprocessing
    seed = check_seed(getattr(args, "seed", 0))
    shared = calibration_rows_in_test(spec, int(info["calib_size"]), int(info.get("seed", 0))) \
        if same and info.get("calib_size") else None
    if shared is None:
        ds = load_dataset(spec, split="test", limit=args.n, seed=seed, **kwargs)
        total = None
    else:
        used, total = shared
        rest = np.setdiff1d(np.arange(total), used)
        if len(rest) == 0:
            print(f"note: {spec} has no test split of its own and all {total} of its images calibrated this run: the "
                  "accuracy below is on the calibration images (pass --data held-out images)", file=sys.stderr)
            ds = load_dataset(spec, split="test", limit=args.n, seed=seed, **kwargs)
        else:
            pick = rest if args.n is None or args.n >= len(rest) else \
                np.sort(np.random.default_rng(seed).choice(rest, size=int(args.n), replace=False))
            print(f"note: {spec} has no test split of its own: evaluating on its {len(rest)} images not used for "
                  f"calibration (the run's {len(used)} calibration images left out)", file=sys.stderr)
            ds = load_dataset(spec, split="test", indices=pick, **kwargs)
            ds.extra["calibration_images_excluded"] = int(len(used))
            total = len(rest)
    if args.n is not None and len(ds.images) == args.n:
        print(f"note: --n {args.n}: a seeded random subset (--seed {seed}) of the "
              f"{f'{total} ' if total is not None else ''}evaluation images, not the first {args.n}", file=sys.stderr)
    elif args.n is not None and len(ds.images) < args.n:
        print(f"note: --n {args.n}, but there are only {len(ds.images)} evaluation images: using all of them",
              file=sys.stderr)
    return ds


def _torch_threads(args: argparse.Namespace) -> None:
    """``--threads N`` of eval / parity: PyTorch's intra-op threads too (the .so's go to load_compiled)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(int(args.threads))


def cmd_parity(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir
    from .frontend.qmodel import QuantModel
    from .ir.graph import IntegerGraph
    from .parity import run_parity

    run = RunDir(args.run)
    info = run.info()
    _torch_threads(args)
    if args.onnx:  # ONNX Runtime on the QDQ export instead of the .so (ptq2tvm/onnx_cli.py)
        from .onnx_cli import cmd_parity_onnx

        ds = _eval_data(args, info)
        return cmd_parity_onnx(args, ds.images, ds.labels)
    graph = IntegerGraph.load(run.qgraph)
    compiled = run.load_compiled(args.so, threads=args.threads)
    qm = QuantModel.load(run.check(run.fakequant, info))
    ds = _eval_data(args, info)
    rep = run_parity(graph, compiled, qm, ds.images, ds.labels, per_layer_inputs=args.per_layer_inputs,
                     progress=not args.no_progress)
    print(rep.summary())
    return rep.to_dict()


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir, load_fp32, scored_output, top1_so, top1_torch
    from .frontend.qmodel import QuantModel

    run = RunDir(args.run)
    info = run.info()
    ds = _eval_data(args, info)
    if ds.labels is None:
        raise Ptq2TvmError(f"dataset {ds.name} has no labels: cannot compute accuracy")
    so = Path(args.so) if args.so else run.so
    _torch_threads(args)
    compiled = run.load_compiled(so, threads=args.threads) if so.exists() else None   # a stale .so fails here
    res: dict[str, Any] = dict(data=ds.name, n=int(len(ds.images)),
                               calibration_images_excluded=ds.extra.get("calibration_images_excluded", 0))
    qm = QuantModel.load(run.check(run.fakequant, info))
    qm.check_input(ds.images)    # data of another shape: one line, before the FP32 model fails on it (traceback)
    fp32 = load_fp32(run.check(run.fp32, info), trust_code=args.trust_code)
    res["fp32_top1"] = top1_torch(fp32, ds.images, ds.labels)
    res["scored_output"] = scored_output(fp32, ds.images)   # which output top-1 is computed on (several outputs)
    res["fakequant_top1"] = top1_torch(qm, ds.images, ds.labels)
    res["so_top1"] = top1_so(compiled, ds.images, ds.labels) if compiled is not None else None
    print(f"top-1 on {ds.name} ({res['n']} images): FP32 {100 * res['fp32_top1']:.2f}%  fake-quant "
          f"{100 * res['fakequant_top1']:.2f}%" + (f"  .so {100 * res['so_top1']:.2f}%" if res["so_top1"] is not None
                                                 else "  (.so not compiled)"))
    if info.get("weights", "").startswith("random"):
        print("note: this run quantized RANDOM weights (no --checkpoint)", file=sys.stderr)
    # what these figures were measured on goes with them: an `eval --data other.npz` (or --n, --so) replaced the
    # run's top-1 in run.json while its "data" still named the run's own set
    run.update_info(**{k: v for k, v in res.items() if k.endswith("_top1")},
                    top1_on=dict(data=ds.name, n=res["n"], seed=args.seed if args.n is not None else None,
                                 so=str(so) if res["so_top1"] is not None else None))
    return res


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.runner import bench_run

    return bench_run(args.run, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                     ort_int8=not args.no_ort_int8, progress=not args.no_progress, out_dir=args.out_dir,
                     calls_per_turn=args.calls_per_turn, trust_code=args.trust_code, so=args.so)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import train_builtin

    _, info = train_builtin(args.model, dataset=args.data, epochs=args.epochs, seed=args.seed,
                            progress=not args.no_progress, threads=args.threads, force=args.force)
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
    req, runner = (shlex.quote(str(b.path / name)) for name in ("requirements.txt", "run_model.py"))  # paste-able
    print(f"bundle {b.path}: {len(b.files)} files, {size_text(b.bytes)} (no torch, no ptq2tvm, no TVM compiler)\n"
          f"  on the target: pip install -r {req} && "
          + (f"python {runner} --check && " if graph is not None else "")
          + f"python {runner} --random 1 --bench 20")
    return dict(bundle=str(b.path), files=b.files, bytes=b.bytes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptq2tvm", description=__doc__, formatter_class=HELP)
    p.add_argument("--version", action="version", version=f"ptq2tvm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model post-training into a run directory")
    q.add_argument("--model", default=DEFAULT_MODEL, help="zoo name (see ptq2tvm.models.list_models()), "
                   "path/to/file.py:factory or an FP32 model.onnx")
    q.add_argument("--model-kwargs", help="JSON kwargs for the model constructor, e.g. '{\"width_mult\": 0.5}'")
    q.add_argument("--checkpoint", help="state_dict to load (strict; or a training checkpoint dict holding it under "
                   "'state_dict' / 'model_state_dict' / 'model'); without it: built-in zoo model + built-in data "
                   "-> trained once and cached (minutes; announced), otherwise the weights are RANDOM")
    q.add_argument("--data", default=DEFAULT_DATA, help="calibration data: fashion-mnist, digits, an image folder "
                   "(class sub-folders or flat) or a .npy/.npz file of float (N, C, H, W) ('images' or 'arr_0'; "
                   "labels not needed)")
    q.add_argument("--calib-size", type=int, default=512, help="number of calibration images")
    g = q.add_argument_group("image-folder preprocessing (default: RGB, resize 256, center crop 224, ImageNet "
                             "mean/std; channels follow the model's first conv)")
    g.add_argument("--channels", type=int, choices=[1, 3], help="1: grayscale, 3: RGB (default: the model's first "
                   "conv in_channels)")
    g.add_argument("--input-size", metavar="N|HxW", help="model input size (default 224)")
    g.add_argument("--resize", type=int, help="shorter side before the center crop (default: input size x 256/224); "
                   "0: resize the whole image to the input size (nothing cut off)")
    g.add_argument("--mean", type=float, nargs="+", help="per-channel mean after /255 (default ImageNet's)")
    g.add_argument("--std", type=float, nargs="+", help="per-channel std after /255 (default ImageNet's)")
    g.add_argument("--preprocess", metavar="FILE.py:FN", help="your own preprocessing: FN(PIL.Image) -> float "
                   "(C, H, W) array or tensor; replaces the options above")
    q.add_argument("--fidelity-images", type=int, default=128, metavar="N",
                   help="after quantizing, compare fake-quant with FP32 (output SQNR, top-1 agreement; no labels) on "
                   "N calibration-split images not used for calibration (0: skip)")
    q.add_argument("--per-layer", action="store_true", help="also report the SQNR of every layer that rounds onto a "
                   "new grid (conv, linear, add, multiply, lookup table, clamp, concat, average pool)")
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
    q.add_argument("--iters", type=int, default=2000, help="reconstruction iterations per unit: a CPU budget "
                   "(resnet_small W2A4 QDrop: ~7 min on 2 cores, 90.6%% top-1); the papers use --iters 20000 "
                   "(~1.2 h there, 91.7%%; hours to days at 224x224 on a CPU)")
    q.add_argument("--batch-size", type=int, default=32, help="reconstruction batch size")
    q.add_argument("--expand-batch", type=int, default=1, help="MRECG expanded calibration batch factor")
    q.add_argument("--mrecg-k", type=int, help="MRECG: number of adjacent merges (default: the paper's "
                   "2/4/7 for ResNet-18/50/MobileNetV2, see docs/reconstruction.md)")
    q.add_argument("--recon-threads", type=int, default=1, help="torch threads during reconstruction (1 is often "
                   "fastest on 2 cores)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration subsample and reconstruction")
    from .reconstruct.cliargs import add_args as add_recon_runtime_args

    add_recon_runtime_args(q)
    q.add_argument("--out", help="run directory (default runs/<model>_w<W>a<A>)")
    q.add_argument("--force", action="store_true", help="start a reconstruction over (delete its checkpoint) "
                   "instead of resuming it")
    from .mixed.cli import add_quantize_args, register as register_sensitivity

    add_quantize_args(q)
    _add_json(q)
    q.set_defaults(func=cmd_quantize)
    q.set_defaults(_defaults={dest: q.get_default(dest) for dest, _ in RECON_ONLY})
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
    c.add_argument("--subbyte-storage", choices=SUBBYTE_STORAGES, default=None,
                   help="how x86 builds store <= 4-bit weights: auto (default; packed two (four) per byte, except "
                   "small layers whose weights meet few output pixels per call: one per byte, faster) or packed "
                   "(every such layer packed: the smallest file). Default for a mixed-precision / --layer-bits run: "
                   "packed, as its size and latency model assumed")
    _add_json(c)
    c.set_defaults(func=cmd_compile)

    for name, fn, helptext in (("parity", cmd_parity, "prove the .so equals the reference executor and compare "
                                "with fake-quant"), ("eval", cmd_eval, "top-1 of FP32, fake-quant and .so")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("run", help="run directory")
        e.add_argument("--data", help="evaluation data (default: the run's dataset, test split)")
        e.add_argument("--n", type=int, help="use N images: a seeded random subset (--seed; classes in proportion, "
                       "in expectation) of the evaluation set")
        e.add_argument("--seed", type=int, default=0, help="seed of the --n subset")
        e.add_argument("--so", help="library to check (default RUN/model.so)")
        e.add_argument("--threads", type=int, help="threads of the .so and PyTorch (default: all cores, or 1 when "
                       "the machine is busy)")
        if name == "eval":
            _add_trust_code(e)
        if name == "parity":
            e.add_argument("--per-layer-inputs", type=int, default=256, help="inputs for the per-layer comparison "
                           "(0 = skip)")
            from .onnx_cli import add_parity_args

            add_parity_args(e)
        _add_json(e)
        e.set_defaults(func=fn)

    b = sub.add_parser("bench", help="latency of the .so vs PyTorch FP32, ONNX Runtime FP32/INT8 and OpenVINO "
                       "FP32/INT8 (when installed)")
    b.add_argument("run", help="run directory (compiled)")
    b.add_argument("--so", help="the .so to time (default RUN/model.so), e.g. one compiled with --batch 8 --out: "
                   "every runtime then runs its batch")
    b.add_argument("--threads", type=int, default=2, help="threads of every runtime (the .so, PyTorch, ONNX "
                   "Runtime, OpenVINO)")
    b.add_argument("--repeats", type=int, default=20, help="timed turns per runtime")
    b.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    b.add_argument("--calls-per-turn", type=int, default=5,
                   help="timed calls back to back per turn (1: latency right after an idle gap)")
    b.add_argument("--no-ort-int8", action="store_true", help="skip the ONNX Runtime INT8 baseline")
    b.add_argument("--out-dir", help="where to write the table, PNG chart and ONNX exports (default RUN)")
    _add_trust_code(b)
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
    t.add_argument("--model", default=DEFAULT_MODEL, help="zoo model (resnet_small, mobilenet_v2_small, "
                   "mobilenet_v3_small_fm, efficientnet_small_fm, edsr_small_fm)")
    t.add_argument("--data", default=DEFAULT_DATA, choices=["fashion-mnist", "digits"], help="built-in dataset")
    t.add_argument("--epochs", type=int, help="epochs (default: the recipe's, e.g. 6 on Fashion-MNIST)")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--threads", type=int, help="intra-op threads (default: 2, or 1 when the machine is busy; results "
                   "are reproducible per thread count)")
    t.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    _add_json(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job on the built-in default: train/load, quantize W8A8 and W4A4, "
                       "compile, eval, parity, bench -> runs/demo/summary.json")
    d.add_argument("--out", default="runs/demo", help="output folder (a run directory per setting + summary.json)")
    d.add_argument("--model", default=DEFAULT_MODEL, help="built-in zoo model (e.g. mobilenet_v2_small)")
    d.add_argument("--data", default=DEFAULT_DATA, choices=["fashion-mnist", "digits"], help="built-in dataset")
    d.add_argument("--bits", nargs="+", default=["8/8", "4/4"], help="W/A settings, e.g. 8/8 4/4 2/4")
    d.add_argument("--calib-size", type=int, default=512, help="calibration images (from the training split)")
    d.add_argument("--threads", type=int, default=None,
                   help="threads of every runtime (default: 2, or 1 when the machine is busy)")
    d.add_argument("--repeats", type=int, default=30, help="timed turns per runtime in the latency benchmark")
    _add_json(d)
    d.set_defaults(func=cmd_demo)
    from .sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    finish_parser(p, sub)
    return p


def _add_trust_code(p: argparse.ArgumentParser) -> None:
    """``--trust-code``: every command that loads a run's fp32.pt (eval, bench, sensitivity) has it, since
    :func:`ptq2tvm.api.load_fp32` names it when the model is a pickled module or a file.py:factory."""
    p.add_argument("--trust-code", action="store_true", help="allow an fp32.pt that runs code when loaded (a "
                   "pickled module or a file.py:factory model): only for run directories you made yourself")


def finish_parser(p: argparse.ArgumentParser, sub: Any) -> None:
    """Defaults in every --help, and the top-level help naming every command (also those added elsewhere)."""
    for sp in sub.choices.values():
        sp.formatter_class = HELP
        for a in sp._actions:   # an option without help text still shows its default (argparse hides it)
            if a.option_strings and a.help is None and a.default is not None and a.default is not False:
                a.help = "(default: %(default)s)"
    p.description = (__doc__ or "") + "\n\ncommands: " + ", ".join(sub.choices)
    #: command -> {integer option dest: least value}, checked by main before any work
    p.int_minimums = {name: int_option_minimums(sp._actions) for name, sp in sub.choices.items()}


def main(argv: list[str] | None = None) -> int:
    from . import threads

    try:            # building the parser imports torch (~1 s): a Ctrl-C then was a 30-line traceback
        parser = build_parser()
    except KeyboardInterrupt:
        print("\nptq2tvm: interrupted before the command started; nothing was written", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    # the load-average note of ptq2tvm.threads names this command's own option where it has one
    threads.set_override_hint("pass --threads N" if hasattr(args, "threads") else None)
    shown_before = warnings.showwarning
    warnings.showwarning = _one_line_warning(args.command)
    try:
        check_outputs(args)
        if args.command != "quantize" and isinstance(getattr(args, "run", None), str) and Path(args.run).is_dir():
            from .api import RunDir

            RunDir(args.run).check_not_interrupted()      # not the previous run's files as if they were the new run
        # checked before any work (bench exports ONNX models first)
        check_int_options(args, parser.int_minimums.get(args.command, {}))
        cores = os.cpu_count() or 1
        from .bundle_runner import threads_limit_error     # the bundle's run_model.py applies the same limit

        too_many = threads_limit_error(getattr(args, "threads", None))
        if too_many:
            raise Ptq2TvmError(too_many)
        if getattr(args, "threads", None) is not None and args.threads > cores:
            print(f"ptq2tvm {args.command}: warning: --threads {args.threads} is more than this machine's {cores} "
                  "logical CPUs: the threads share cores (latencies mislead, TVM and OpenMP threads spin)",
                  file=sys.stderr)
        result = args.func(args)
        _emit(args, result)
        if (args.command == "parity" and isinstance(result, dict)
                and result.get("bit_exact_vs_reference") is False):   # like the bundle's run_model.py --check
            print(f"ptq2tvm parity: the .so differs from the reference executor on {result.get('mismatched_elements')}"
                  f" of {result.get('n_elements')} output elements", file=sys.stderr)
            return 1
    except Ptq2TvmError as e:
        print(f"ptq2tvm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # access refused by the file system (a read or a write no check caught): one line
        from .atomic import not_writable_reason

        reason = not_writable_reason(e)
        if reason is None:
            raise
        print(f"ptq2tvm {args.command}: error: {e.filename or 'a file'}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nptq2tvm {args.command}: {interrupt_message(args)}", file=sys.stderr)
        return 130
    finally:
        threads.set_override_hint(None)
        warnings.showwarning = shown_before
    return 0


def _one_line_warning(command: str):
    """``warnings.showwarning`` for the CLI: the project's RuntimeWarning / UserWarning as ``ptq2tvm CMD: warning:
    message`` (no file:line prefix, no source line: they are about the user's model or data, not a place in the
    code); any other category keeps its name and origin on the same line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = (f"ptq2tvm {command}: warning: {message}" if category in (RuntimeWarning, UserWarning)
                else f"ptq2tvm {command}: {category.__name__}: {message} ({filename}:{lineno})")
        print(text, file=file if file is not None else sys.stderr)

    return show


def interrupt_message(args: argparse.Namespace) -> str:
    """One line for Ctrl-C: how far a reconstruction got (its checkpoint resumes it), else that nothing is half
    written (every artifact is written atomically)."""
    from .reconstruct.checkpoint import Checkpoint

    if args.command == "quantize" and getattr(args, "method", "rtn") != "rtn":
        ck = Checkpoint.last
        if ck is not None:
            done, total = ck.progress()
            return f"interrupted after unit {done}/{total if total else '?'}; re-run the same command to resume"
        planning = (" (the mixed-precision planning, sensitivity and latency, runs before it)"
                    if getattr(args, "mixed_precision", False) else "")
        return (f"interrupted before the first reconstruction unit finished{planning}; re-run the same command to "
                "start again")
    return "interrupted; no artifact was left half-written (re-run the command)"


if __name__ == "__main__":
    sys.exit(main())
