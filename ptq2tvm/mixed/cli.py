"""Command-line parts of mixed precision: ``ptq2tvm sensitivity RUN`` and the ``quantize`` options
(``--mixed-precision`` with budgets, ``--layer-bits``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from ..errors import QuantConfigError
from ..frontend.qmodel import QuantConfig


def add_quantize_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("mixed precision (HAWQ-V3-style bit allocation; see README)")
    g.add_argument("--layer-bits", metavar="SPEC", action="append", help="per-layer bits, e.g. "
                   "'layer1.0.conv1=4/8,layer2.*=4/4' (LAYER=W/A or LAYER=W; fnmatch globs; A = bits of the layer's "
                   "input tensor; may be repeated: the items add up, each layer named once; a layer named outright "
                   "wins over any glob, later globs over earlier ones); names are checked against the model")
    g.add_argument("--mixed-precision", action="store_true", help="choose W (2/4/8) and A (4/8) per layer by an ILP "
                   "minimising the summed sensitivity under the budgets below (at least one)")
    g.add_argument("--latency-budget", metavar="B", help="predicted .so latency: fraction of W8A8 (0.8) or absolute "
                   "(3ms); per-layer kernel times measured on this host")
    g.add_argument("--size-budget", metavar="B", help="stored weight bytes: fraction of W8A8 (0.6) or absolute (2MB)")
    g.add_argument("--bops-budget", metavar="B", help="bit operations per image: fraction of W8A8 (0.3) or absolute "
                   "(1.5G)")
    g.add_argument("--sensitivity", dest="sensitivity_measure", default="hessian", choices=["hessian", "output"],
                   help="ILP objective: HAWQ Hessian-trace-weighted perturbation, or FP32-output MSE of each layer "
                   "quantized alone")
    g.add_argument("--hutchinson-samples", type=int, default=32, help="random draws of the Hessian-trace estimate")
    _add_trace_estimator(g)
    g.add_argument("--latency-batch", type=int, default=1, help="batch size the latencies are measured at")


def _add_trace_estimator(p: Any) -> None:
    """``--trace-estimator`` (quantize --mixed-precision and sensitivity: one name); ``--estimator``, sensitivity's
    old name, stays as a hidden alias."""
    p.add_argument("--trace-estimator", default="gauss-newton", choices=["gauss-newton", "hutchinson"],
                   help="Hessian-trace estimator: Gauss-Newton (Rademacher-projected softmax Hessian, a sum of "
                   "squares: never negative; default) or Hutchinson's (Rademacher vectors, double backward)")
    p.add_argument("--estimator", dest="trace_estimator", choices=["gauss-newton", "hutchinson"],
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _layer_names(model: nn.Module, images: np.ndarray) -> list[str]:
    from ..frontend.graph import OPS_WITH_WEIGHTS
    from ..frontend.trace import trace_model

    g = trace_model(model, tuple(images.shape[1:]))
    return [n.name for n in g.nodes if n.op in OPS_WITH_WEIGHTS]


def mixed_config(args: argparse.Namespace, model: nn.Module, calib: np.ndarray, config: QuantConfig,
                 out: Path) -> tuple[QuantConfig, dict[str, Any]]:
    """Apply ``--layer-bits`` / ``--mixed-precision`` to ``config``; -> (config, what to record in run.json)."""
    budgets = {k: v for k, v in (("latency", args.latency_budget), ("size", args.size_budget),
                                 ("bops", args.bops_budget)) if v is not None}
    if budgets and not args.mixed_precision:
        raise QuantConfigError("--latency/--size/--bops-budget need --mixed-precision")
    if args.mixed_precision and args.layer_bits:
        raise QuantConfigError("use either --mixed-precision or --layer-bits, not both")
    if args.layer_bits:
        from .layerbits import parse_layer_bits, resolve_layer_bits

        # --layer-bits given several times: one spec (a layer named in two of them is refused, not the last kept)
        spec = ",".join(args.layer_bits) if isinstance(args.layer_bits, list) else args.layer_bits
        w, a = resolve_layer_bits(parse_layer_bits(spec), _layer_names(model, calib))
        config.layer_w_bits, config.layer_a_bits = w, a
        return config.validate(), dict(layer_bits_spec=spec)
    if not args.mixed_precision:
        return config, {}
    if not budgets:
        raise QuantConfigError("--mixed-precision needs a budget: --latency-budget, --size-budget or --bops-budget")
    from .pipeline import plan_mixed_precision

    plan = plan_mixed_precision(model, calib, config, budgets, out, measure=args.sensitivity_measure,
                                samples=args.hutchinson_samples, batch=args.latency_batch, seed=args.seed,
                                progress=not args.no_progress, estimator=args.trace_estimator)
    print(plan.summary())
    return plan.config(config), dict(mixed_precision=plan.to_dict())


def cmd_sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    from ..api import RunDir, load_fp32
    from ..data import calibration_set, run_data_kwargs
    from ..ir.graph import IntegerGraph
    from .pipeline import run_layer_costs, run_sensitivity

    run = RunDir(args.run)
    info = run.info()
    model = load_fp32(run.fp32, trust_code=args.trust_code)
    images = calibration_set(info["data"], int(info["calib_size"]), seed=int(info.get("seed", 0)),
                             **run_data_kwargs(info))
    rep = run_sensitivity(model, images, run.path, samples=args.samples, max_images=args.images,
                          seed=args.seed, progress=not args.no_progress, estimator=args.trace_estimator)
    print(rep.summary())
    print(f"wrote {run.path / 'sensitivity.json'} and {run.path / 'sensitivity.png'}  [{rep.seconds} s]")
    out: dict[str, Any] = dict(sensitivity=str(run.path / "sensitivity.json"), png=str(run.path / "sensitivity.png"),
                               report=rep.to_dict())
    if args.latency:
        costs = run_layer_costs(IntegerGraph.load(run.qgraph), run.path, batch=args.batch,
                                progress=not args.no_progress)
        w = max(len(n) for n in costs.seconds)
        print(f"per-layer kernel latency (ms, batch {costs.batch}, {costs.isa}; {costs.measured} kernels measured, "
              f"{costs.cached} from {run.path / 'latency_cache.json'}; load average {costs.load_average}):")
        classes = ("int8", "int4", "int2") if costs.packs_int2 else ("int8", "int4")
        ubsw = all("int8ubsw" in t for t in costs.seconds.values())
        for n, t in costs.seconds.items():
            times = "  ".join(f"{c}{'-packed' if c != 'int8' else ''} {1e3 * t[c]:8.4f}" for c in classes)
            if ubsw:      # AVX2: int8 weights on the exact vpmaddubsw kernel (W8 reading <= 7-bit inputs, W5..7)
                times += f"  int8-ubsw {1e3 * t['int8ubsw']:8.4f}"
            print(f"  {n:<{w}}  {times}  bytes {'/'.join(str(costs.stored_bytes[n][c]) for c in classes)}")
        print(f"  other kernels {1e3 * costs.other_seconds:.4f} ms; whole W8A8 network {1e3 * costs.reference_seconds:.4f}"
              f" ms (overhead over its kernels {1e3 * costs.overhead_seconds:.4f} ms; kernel cache {costs.cache_status})")
        out["layer_costs"] = costs.to_dict()
    return out


def register(sub: Any) -> None:
    s = sub.add_parser("sensitivity", help="per-layer sensitivity to 2/4/8-bit weights and 4/8-bit inputs "
                       "(HAWQ Hessian trace, FP32-output error), optionally per-layer kernel latency")
    s.add_argument("run", help="run directory (its FP32 model and calibration data are used)")
    s.add_argument("--samples", type=int, default=32, help="random draws of the Hessian-trace estimate")
    _add_trace_estimator(s)
    s.add_argument("--images", type=int, default=256, help="calibration images used for the traces / errors")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--latency", action="store_true", help="also time every layer's kernel (int8, packed int4, packed "
                   "int2; on AVX2 also int8 on vpmaddubsw) on this host (cached in RUN/latency_cache.json)")
    s.add_argument("--batch", type=int, default=1, help="batch size of the latency measurement")
    s.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--trust-code", action="store_true", help="allow an fp32.pt that runs code when loaded (a "
                   "pickled module or a file.py:factory model): only for run directories you made yourself")
    s.set_defaults(func=cmd_sensitivity)


__all__ = ["add_quantize_args", "cmd_sensitivity", "mixed_config", "register"]
