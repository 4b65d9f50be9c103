"""Command-line pieces of the ONNX interop (kept out of cli.py): ``ptq2tvm export RUN --format onnx`` and
``ptq2tvm parity RUN --onnx``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import ArtifactError


def register_export(sub: Any, add_json: Any) -> None:
    """Add the ``export`` subcommand to the ``ptq2tvm`` subparsers."""
    x = sub.add_parser("export", help="export the integer graph of a run (ONNX QDQ: a model ONNX Runtime, OpenVINO "
                       "or TensorRT runs)")
    x.add_argument("run", help="run directory")
    x.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    x.add_argument("--out", help="output file (default RUN/model.onnx)")
    x.add_argument("--qgraph", help="integer graph file (default RUN/model.qgraph.npz)")
    x.add_argument("--weights", default="auto", choices=["auto", "int8", "uint8"],
                   help="weight container: int8 (symmetric, zero point 0: what TensorRT / OpenVINO expect; ONNX "
                   "Runtime's int8-weight kernels saturate on x86 CPUs without VNNI), uint8 (the same integers + 128, "
                   "zero point 128: exact in ONNX Runtime on every CPU), or auto: int8 on CPUs with VNNI, else uint8 "
                   "(what parity --onnx and bench use)")
    x.add_argument("--int4", action="store_true", help="opset 21: weights of <= 4 bits as INT4 initializers")
    x.add_argument("--int4-activations", action="store_true",
                   help="opset 21: activations of <= 4 bits as UINT4 (ONNX Runtime 1.32 rejects these at full "
                   "optimisation)")
    x.add_argument("--integer-requant", default="none", choices=["none", "residual", "inexact"],
                   help="conv/dense written as ConvInteger/MatMulInteger + the exact int64 requantization instead "
                   "of QDQ, for executors with exact int64 arithmetic (ONNX Runtime; not OpenVINO, which narrows "
                   "int64): none (pure QDQ, any QDQ consumer; default), residual (the convs with a fused residual "
                   "add, which QDQ runs in float), inexact (those and every layer whose float32 requantization "
                   "multiplier is not provably exact: ONNX Runtime then equals the reference bit for bit); "
                   "docs/onnx.md")
    x.add_argument("--per-layer-outputs", action="store_true",
                   help="also output every IR tensor's integer codes (uint8 'codes:<tensor>')")
    add_json(x)
    x.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from .api import RunDir
    from .ir.graph import IntegerGraph
    from .bench.baselines import host_has_vnni
    from .onnx_export import choose_weights, export_onnx

    run = RunDir(args.run)
    qgraph = Path(args.qgraph) if args.qgraph else run.qgraph
    if not args.qgraph and not run.info_path.is_file():
        run.info()  # raises the clear "not a run directory" error
    graph = IntegerGraph.load(qgraph)
    out = Path(args.out) if args.out else run.path / "model.onnx"
    if out.exists() and out.is_dir():
        raise ArtifactError(f"--out {out} is a directory")
    weights, why = choose_weights(args.weights)
    if args.weights == "int8" and not host_has_vnni():
        print("warning: --weights int8 on a CPU without VNNI: ONNX Runtime on this CPU may saturate (its u8 x s8 "
              "kernels use vpmaddubsw) and compute far from the .so; --weights uint8 is exact here",
              file=sys.stderr)
    rep = export_onnx(graph, out, weights=weights, int4=args.int4, int4_activations=args.int4_activations,
                      per_layer_outputs=args.per_layer_outputs, integer_requant=args.integer_requant)
    n = sum(rep.node_counts.values())
    fit = rep.requant_fit
    print(f"exported {out} (ONNX QDQ, opset {rep.opset}, {n} nodes, {weights} weights"
          + (f", INT4 weights in {len(rep.int4_weights)} layers" if rep.int4 else "")
          + (f", {len(rep.clips)} explicit Clip(s)" if rep.clips else "") + "); onnx.checker passed")
    if args.weights == "auto":
        print(f"  {weights} weights: {why}")
    print(f"  {len(rep.integer_layers)} conv/dense as integer ops (--integer-requant {args.integer_requant}); "
          f"QLinearConv/QGemm float32 multipliers exact on every accumulator value in "
          f"{sum(f['exact_channels'] for f in fit.values())} of {sum(f['channels'] for f in fit.values())} channels")
    if rep.int8_fallback:
        print(f"  kept int8 (a weight outside [-8, 7] after AdaQTransform's sign flip): {', '.join(rep.int8_fallback)}")
    return {**rep.to_dict(), "weights_requested": args.weights, "weights_reason": why}


def add_parity_args(p: argparse.ArgumentParser) -> None:
    """``--onnx`` options of ``ptq2tvm parity``."""
    p.add_argument("--onnx", action="store_true", help="check ONNX Runtime (CPU) on the run's QDQ export against the "
                   "reference executor instead of the .so")
    p.add_argument("--onnx-weights", default="auto", choices=["auto", "int8", "uint8"],
                   help="weight container of the export ORT runs (auto: int8 on hosts with VNNI, else uint8)")
    p.add_argument("--onnx-int4", action="store_true", help="INT4 weights (opset 21) in the export ORT runs")
    p.add_argument("--onnx-integer-requant", default="none", choices=["none", "residual", "inexact"],
                   help="which conv/dense the export ORT runs writes as integer ops (see `export --integer-requant`)")


def cmd_parity_onnx(args: argparse.Namespace, images: Any, labels: Any) -> dict[str, Any]:
    from .api import RunDir
    from .ir.graph import IntegerGraph
    from .onnx_parity import run_onnx_parity

    run = RunDir(args.run)
    graph = IntegerGraph.load(run.qgraph)
    rep = run_onnx_parity(graph, images, labels, weights=args.onnx_weights, int4=args.onnx_int4,
                          per_layer_inputs=args.per_layer_inputs, progress=not args.no_progress,
                          integer_requant=args.onnx_integer_requant, threads=getattr(args, "threads", None) or 2)
    print(rep.summary())
    return rep.to_dict()
