"""ONNX in: an FP32 ONNX classifier or backbone -> a plain-torch ``fx.GraphModule`` the tracer
(:func:`ptq2tvm.frontend.trace.trace_model`) accepts, through onnx2torch (https://github.com/ENOT-AutoDL/onnx2torch).

Steps: load + ``onnx.checker`` (clear error for a missing, truncated or corrupted file) -> fold ``Constant`` and
``Identity``-of-initializer nodes into initializers (torch's exporter writes those for shared parameters, and
onnx2torch cannot read a Conv bias through an Identity) -> the dynamo exporter's ``ReduceMean`` (spatial) /
``Reshape`` (each sample's features flattened: (N, C, H, W) -> (N, C*H*W), constant or computed target) rewritten as
``GlobalAveragePool`` / ``Flatten`` -> check every node against the ONNX ops ptq2tvm handles
(one error naming every unsupported ONNX node and its op type, with the reason for a ReduceMean / Reshape of another
kind and for every Resize that is not an exact nearest
upsampling by integer factors) -> onnx2torch -> rewrite onnx2torch's own modules into the plain torch ops the tracer
knows (``Add`` / ``Sub`` / ``Mul`` / ``Div`` / ``Pow`` -> ``operator`` functions, a one-number constant operand as
a Python number, ``Erf`` -> ``torch.erf``: the tracer recognizes GELU / Mish / Hardswish written with them and
refuses other arithmetic with a constant; ``Concat`` -> ``torch.cat``,
``GlobalAveragePool`` -> ``AdaptiveAvgPool2d(1)``, ``Clip(min, max)`` -> ``Hardtanh``, ``HardSigmoid(1/6, 1/2)`` ->
``Hardsigmoid``, ``Tanh`` -> ``nn.Tanh``, ``Resize`` with constant integer scales -> ``Upsample`` nearest). Several
outputs come back as a dict keyed by the ONNX output names. Layers are named by the torch module path the exporter
recorded, as the torch model's are (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``; for the dynamo exporter
the weights' names and each node's ``pkg.torch.onnx.name_scopes`` metadata: :func:`_layer_names`).

onnx2torch 1.5.15 declares torchvision as a dependency and imports it at import time, only for its NonMaxSuppression
and RoiAlign converters (neither op is accepted here). It is installed with ``--no-deps``; if torchvision cannot be
imported, a stand-in ``torchvision.ops`` (whose functions raise) is put in ``sys.modules`` for the duration of the
import only and removed afterwards.
"""

from __future__ import annotations

import math
import operator
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .errors import ArtifactError, UnsupportedModelError

#: ONNX op types the importer accepts (what the tracer can quantize after onnx2torch); anything else is rejected by
#: name before conversion.
SUPPORTED_ONNX_OPS = ("Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                      "Flatten", "Gemm", "Add", "Identity", "Dropout", "Mul", "Concat", "Sigmoid", "HardSigmoid",
                      "HardSwish", "LeakyRelu", "Tanh", "Resize", "Softplus", "Sub", "Div", "Pow", "Erf", "Gelu",
                      "Mish")

# Resize attributes under which ONNX nearest resizing by an integer factor picks floor(x / s), torch's nearest:
# asymmetric + floor, or a half-pixel transform (x_in = (x + 0.5) / s - 0.5 lies within +-(0.5 - 0.5 / s) of
# floor(x / s), so every rounding mode gives it)
_NEAREST_AS_TORCH = {"asymmetric": ("floor",), "half_pixel": None, "pytorch_half_pixel": None}


def _import_onnx2torch() -> Any:
    try:
        import onnx2torch

        return onnx2torch
    except ModuleNotFoundError as e:
        if e.name == "onnx2torch":
            raise UnsupportedModelError("ONNX models need onnx2torch: pip install --no-deps 'onnx2torch==1.5.15'") from e
        if e.name not in ("torchvision", "torchvision.ops"):
            raise
    stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    def _unavailable(*_: Any, **__: Any) -> Any:
        raise UnsupportedModelError("torchvision ops (NonMaxSuppression, RoiAlign) are not available")

    ops.roi_align = ops.nms = ops.box_convert = _unavailable  # type: ignore[attr-defined]
    stub.ops = ops  # type: ignore[attr-defined]
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "onnx2torch" or k.startswith("onnx2torch.")}
    del saved  # a half-imported onnx2torch from the failed attempt is dropped
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    try:
        import onnx2torch
    finally:
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.ops", None)
    return onnx2torch


def _register_resize_converters() -> None:
    """onnx2torch 1.5.15 converts Resize only up to opset 13; opsets 18 / 19 (what torch exports today) added
    ``antialias``, ``axes`` and ``keep_aspect_ratio_policy``, which :func:`_check_resize` requires at their defaults,
    so the opset-13 converter reads them right. Registered once."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, get_converter

    v13 = get_converter("Resize", 13)
    for version in (18, 19):
        key = OperationDescription(domain="", operation_type="Resize", version=version)
        _CONVERTER_REGISTRY.setdefault(key, v13)


def _register_activation_converters() -> None:
    """onnx2torch 1.5.15 has no converter for ``Gelu`` (opset 20, what torch's dynamo exporter writes for nn.GELU)
    and ``Mish`` (opset 18): they become ``nn.GELU(approximate=...)`` (the node's ``approximate``, "none" or
    "tanh") and ``nn.Mish()``. Registered once."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def gelu(node: Any, graph: Any) -> Any:  # noqa: ARG001 - onnx2torch's converter signature
        approximate = node.attributes.get("approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
        return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                        onnx_mapping=onnx_mapping_from_node(node=node))

    def mish(node: Any, graph: Any) -> Any:  # noqa: ARG001
        return OperationConverterResult(torch_module=nn.Mish(), onnx_mapping=onnx_mapping_from_node(node=node))

    for op, version, converter in (("Gelu", 20, gelu), ("Mish", 18, mish)):
        _CONVERTER_REGISTRY.setdefault(OperationDescription(domain="", operation_type=op, version=version), converter)


def _check_resize(n: Any) -> str | None:
    """Why the ONNX Resize node ``n`` cannot be read as torch's nearest upsampling (None when it can): only mode
    'nearest' with a coordinate transform / rounding that picks floor(x / s) at integer factors
    (:data:`_NEAREST_AS_TORCH`; the factors themselves are checked once the scales are read), no antialias, axes
    or aspect-ratio policy."""
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in a.items()}
    mode = text.get("mode", "nearest")
    ctm = text.get("coordinate_transformation_mode", "half_pixel")
    rounding = text.get("nearest_mode", "round_prefer_floor")
    if mode != "nearest":
        return f"Resize mode {mode!r} (only 'nearest', by integer factors)"
    if ctm not in _NEAREST_AS_TORCH or (_NEAREST_AS_TORCH[ctm] and rounding not in _NEAREST_AS_TORCH[ctm]):
        return (f"nearest Resize with coordinate_transformation_mode {ctm!r} and nearest_mode {rounding!r} (picks "
                "other pixels than torch's nearest: use asymmetric + floor or half_pixel)")
    if text.get("antialias", 0) or "axes" in text or text.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize with antialias, axes or keep_aspect_ratio_policy"
    return None


def external_data_locations(model: Any) -> list[tuple[str, str]]:
    """(initializer name, file location relative to the model) of every initializer ``model`` keeps in an external
    data file (torch.onnx's ``.onnx.data``)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return [(t.name, ExternalDataInfo(t).location) for t in model.graph.initializer if uses_external_data(t)]


def onnx_files(path: Path) -> list[Path]:
    """An ONNX model file and the external data files next to it that its initializers name: what a run directory
    keeps a copy of. Files that are missing or outside its folder are left out (the import names missing ones)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: the import reports it
        return [path]
    side = sorted({location for _, location in external_data_locations(model)})
    return [path] + [path.parent / s for s in side if (path.parent / s).is_file() and Path(s).name == s]


def load_onnx(path: str | Path) -> Any:
    """Read and check an ONNX file; :class:`ArtifactError` naming the file if it is missing or unreadable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX model (corrupted or truncated?): {type(e).__name__}: "
                            f"{e}") from e
    from onnx.external_data_helper import load_external_data_for_model

    external = external_data_locations(model)
    for tensor, location in external:  # weights kept in side files (torch.onnx's .onnx.data): say which is missing
        side = path.parent / location
        if not side.is_file():
            raise ArtifactError(f"{path}: its weights (tensor {tensor!r}) are stored in the external data file "
                                f"{side.name}, which is not next to it ({side}): keep the two files together")
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise ArtifactError(f"{path}: cannot read its external weight data: {type(e).__name__}: {e}") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ArtifactError(f"{path} fails onnx.checker: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from e
    if not model.graph.node:
        raise ArtifactError(f"{path}: the ONNX graph has no nodes")
    return model


def _module_path(name: str, op_type: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1' (torch's exporter writes cumulative scope names)."""
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 1 and (parts[-1] == op_type or parts[-1].startswith(op_type + "_")):
        parts = parts[:-1]
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return re.sub(r"[^\w.]", "_", ".".join(path)).strip(".")


#: the metadata key under which torch's dynamo exporter records each node's module scopes, e.g.
#: ``"['', 'stem', 'stem.1', '_native_batch_norm_legit_no_training']"``: the root, each enclosing module's path, then
#: the FX node's own name
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
#: ops whose second input is a weight: torch's dynamo exporter names that initializer ``<module path>.weight``
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _is_path(p: str) -> bool:
    """Whether ``p`` reads as a torch module path ('layer1.0.conv1'): dot-separated identifiers / indices."""
    return bool(p) and all(part.isidentifier() or part.isdigit() for part in p.split("."))


def _dynamo_scope(n: Any) -> tuple[str, str] | None:
    """(module path, FX node name) that torch's dynamo exporter recorded in the metadata of ONNX node ``n`` (the
    module path is '' for a node of the root module's own forward), or None when the metadata is missing or
    unreadable (other exporters; a file the onnx version converter rewrote, which drops metadata)."""
    import ast

    raw = next((p.value for p in n.metadata_props if p.key == _NAME_SCOPES), None)
    if raw is None:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(scopes, list) or not scopes or not all(isinstance(x, str) for x in scopes):
        return None
    # a module called again may be recorded as 'blocks.a@1': the same module, so the same path
    module = ".".join(re.sub(r"@\d+$", "", part) for part in scopes[-2].split(".")) if len(scopes) > 1 else ""
    return module, scopes[-1]


def _layer_names(nodes: list[Any], inits: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """A unique layer name per ONNX node: its torch module path when it has one, else a generated name; a name that
    would also be a parent of another is flattened with '_'.

    The module path comes from the node's name for torch's legacy exporter ('/layer1/layer1.0/conv1/Conv' ->
    'layer1.0.conv1'). For other nodes (torch's dynamo exporter names them 'node_conv2d', 'node_Conv_86'): the weight's
    name for a Conv / Gemm whose weight is the initializer ``<path>.weight`` (the exporter names parameters by their
    module path; this is also right for a Conv with its BatchNorm folded in, whose metadata names the BatchNorm), else
    the module path in the node's ``pkg.torch.onnx.name_scopes`` metadata, else for a node of the root module's own
    forward the FX node name recorded there ('cat', 'view'). Without any of those: today's name (the node's name when
    it is an identifier, else op type + index). Module paths are given out first, so a generated name never takes one.
    """
    raw: list[str] = []
    primary: list[bool] = []
    for i, n in enumerate(nodes):
        legacy = n.name.startswith("/")
        p = _module_path(n.name, n.op_type) if n.name else ""
        fallback = p if _is_path(p) else f"{n.op_type.lower()}_{i}"
        scope = None if legacy else _dynamo_scope(n)
        weight = n.input[1] if not legacy and n.op_type in _WEIGHTED_OPS and len(n.input) > 1 else ""
        if weight in inits and weight.endswith(".weight") and _is_path(weight[: -len(".weight")]):
            raw.append(weight[: -len(".weight")])
            primary.append(True)
        elif scope is not None and _is_path(scope[0]):
            raw.append(scope[0])
            primary.append(True)
        elif scope is not None and scope[1].isidentifier():
            raw.append(scope[1])
            primary.append(False)
        else:
            raw.append(fallback)
            primary.append(True)
    parents = {".".join(r.split(".")[:k]) for r in raw for k in range(1, r.count(".") + 1)}
    out: list[str] = [""] * len(raw)
    taken: set[str] = set()
    for first in (True, False):
        for i, r in enumerate(raw):
            if primary[i] != first:
                continue
            base = r.replace(".", "_") if r in parents else r
            name, k = base, 1
            while name in taken or name in parents:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            out[i] = name
    return out


def _constant_value(n: Any) -> Any:
    """The array of a ``Constant`` node given by ``value`` or ``value_int(s)`` / ``value_float(s)`` (the dynamo
    exporter writes shape pieces as ``value_ints`` when its graph optimizer is off), else None (left as a node)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if len(n.attribute) != 1:
        return None
    a = n.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    kinds = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
    return np.array(helper.get_attribute_value(a), dtype=kinds[a.name]) if a.name in kinds else None


def prepare_onnx(model: Any, path: str | Path = "model") -> tuple[Any, dict[str, tuple[str, str, str]]]:
    """Fold Constant / Identity-of-initializer nodes, read the exporters' spellings of global average pool /
    flatten / upsampling to a computed size (:func:`_rewrite_exporter_spellings`), check the op types, give every
    node a clean unique layer name (:func:`_layer_names`).

    Returns the model (modified in place) and ``onnx2torch module name -> (ONNX node name, op type, layer name)``. Raises
    :class:`UnsupportedModelError` listing every unsupported ONNX node (with the reason for a ReduceMean / Reshape /
    Resize of a form it cannot read), and for a model with several data inputs
    (initializers aside). Several outputs are fine (returned as a dict by ONNX output name: :func:`onnx_to_torch`)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    if len(real_inputs) != 1:
        raise UnsupportedModelError(f"{path}: ptq2tvm takes single-input models; this ONNX graph has inputs "
                                    f"{[i.name for i in real_inputs]}")
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        ins = [rename.get(i, i) for i in n.input]
        del n.input[:]
        n.input.extend(ins)
        value = _constant_value(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        if value is not None:
            g.initializer.append(numpy_helper.from_array(value, n.output[0]))
            inits.add(n.output[0])
            continue
        if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in {o.name for o in g.output}:
            rename[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    reasons = _rewrite_exporter_spellings(model)
    bad = [f"'{n.name or '(unnamed)'}' ({n.op_type}{'' if n.domain in ('', 'ai.onnx') else ', domain ' + n.domain})"
           + (f": {reasons[n.output[0]]}" if n.output and n.output[0] in reasons else "")
           for n in g.node if n.op_type not in SUPPORTED_ONNX_OPS or n.domain not in ("", "ai.onnx")]
    bad += [f"'{n.name or '(unnamed)'}' (Resize): {why}" for n in g.node
            if n.op_type == "Resize" and (why := reasons.get(n.output[0]) or _check_resize(n)) is not None]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 11:
        bad += [f"'{n.name or '(unnamed)'}' (Resize): opset {opset}'s Resize (X, scales) is not read (onnx2torch "
                "converts Resize from opset 11): export with opset_version >= 11" for n in g.node
                if n.op_type == "Resize"]
    if bad:
        raise UnsupportedModelError(f"{len(bad)} unsupported ONNX node(s) in {path}:\n  " + "\n  ".join(bad)
                                    + f"\nSupported ONNX ops: {', '.join(SUPPORTED_ONNX_OPS)}.")
    names: dict[str, tuple[str, str, str]] = {}
    for n, layer in zip(g.node, _layer_names(list(g.node), inits)):
        ident = layer.replace(".", "__")  # onnx2torch's module names cannot contain dots
        names[ident] = (n.name, n.op_type, layer)
        n.name = ident
    return model, names


#: ops that compute shapes (the dynamo exporter's ``x.view(x.size(0), -1)`` without its graph optimizer:
#: Shape -> Squeeze -> Reshape -> Concat): read by :func:`_shape_value`, dropped once nothing reads them
_SHAPE_OPS = ("Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Reshape", "Flatten", "Identity")


def _fmt_shape(dims: list[Any]) -> str:
    """(1, 16, 5, 5); a symbolic dim by its symbol, an unknown one as '?'."""
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _shape_value(name: str, producers: dict[str, Any], consts: dict[str, Any],
                 shapes: dict[str, list[Any]], depth: int = 0) -> list[Any] | None:
    """The values of the small integer tensor ``name`` (a Reshape's target shape, a ReduceMean's axes), flattened: an
    initializer's ints, or what a chain of Shape / Gather / Slice / Concat / (Un)Squeeze / Reshape / Cast / Identity
    nodes computes from initializers and from the dims shape inference gives (a dim of a tensor is its size, its
    symbol when dynamic, or a token equal only to itself when unknown). None when it cannot be read so."""
    from onnx import helper

    if name in consts:
        v = consts[name]
        return [int(x) for x in v.reshape(-1)] if v.dtype.kind in "iu" and v.size <= 64 else None
    n = producers.get(name)
    if n is None or depth > 32 or n.domain not in ("", "ai.onnx") or n.op_type not in _SHAPE_OPS:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}

    def arg(i: int) -> list[Any] | None:
        if len(n.input) <= i or not n.input[i]:
            return None
        return _shape_value(n.input[i], producers, consts, shapes, depth + 1)

    if n.op_type == "Shape":
        dims = shapes.get(n.input[0])
        if dims is None:
            return None
        start, end = int(attrs.get("start", 0)), attrs.get("end")
        picked = list(enumerate(dims))[start:None if end is None else int(end)]
        return [f"?{n.input[0]}[{i}]" if d is None else d for i, d in picked]
    if n.op_type == "Concat":
        if int(attrs.get("axis", 0)) != 0:
            return None
        parts = [arg(i) for i in range(len(n.input))]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if n.op_type == "Gather":
        data, idx = arg(0), arg(1)
        if data is None or idx is None or int(attrs.get("axis", 0)) != 0 or not all(isinstance(i, int) for i in idx):
            return None
        return [data[i] for i in idx] if all(-len(data) <= i < len(data) for i in idx) else None
    if n.op_type == "Slice":
        data, starts, ends = arg(0), arg(1), arg(2)
        axes = arg(3) if len(n.input) > 3 and n.input[3] else [0]
        steps = arg(4) if len(n.input) > 4 and n.input[4] else [1]
        params = [starts, ends, axes, steps]
        if data is None or any(p is None or len(p) != 1 or not isinstance(p[0], int) for p in params):
            return None
        if axes not in ([0], [-1]) or steps == [0]:
            return None
        return data[slice(starts[0], ends[0], steps[0])]
    return arg(0)  # Squeeze / Unsqueeze / Reshape / Flatten / Cast / Identity: the same values


def _resize_scales(shape: list[Any] | None, sizes: list[Any] | None) -> list[float] | None:
    """The Resize scales equivalent to output ``sizes`` (read by :func:`_shape_value`) for an input of ``shape``:
    1 where a size is the input's own dim (the same number or the same symbol: a dynamic batch), the whole-number
    ratio on the spatial axes; None when any axis has no such scale."""
    if shape is None or sizes is None or len(sizes) != len(shape):
        return None
    scales: list[float] = []
    for d, s in zip(shape, sizes):
        if s == d and d is not None:
            scales.append(1.0)
        elif isinstance(s, int) and isinstance(d, int) and d > 0 and s > 0 and s % d == 0:
            scales.append(float(s // d))
        else:
            return None
    return scales


def _flatten_reason(dims: list[Any] | None, target: list[Any] | None, allowzero: int) -> str | None:
    """None when a Reshape of a tensor of shape ``dims`` to ``target`` (read by :func:`_shape_value`) gives
    (N, product of the other dims), i.e. is ``Flatten(axis=1)``, else why not. Accepted targets: (batch or -1,
    features), (batch, -1), with 'batch' a 0 (unless ``allowzero``), the same symbol as the input's batch dim, or its
    size when fixed (the dynamo exporter bakes the example's batch in: the Flatten then takes any batch size); a
    constant 1 is also read as the batch of an input whose batch is dynamic when the features are spelled out."""
    why = "only flattening the features of each sample into one dim, (N, C*H*W), is supported"
    if dims is None:
        return f"input shape unknown (shape inference failed); {why}"
    shown = _fmt_shape(dims)
    if target is None:
        return f"Reshape of a {shown} tensor to a shape computed in the graph that could not be read; {why}"
    tgt = _fmt_shape(target)
    bad = f"Reshape of a {shown} tensor to {tgt}; {why}"
    if len(dims) < 2 or len(target) != 2:
        return bad
    batch, rest = dims[0], dims[1:]
    features = int(math.prod(rest)) if all(isinstance(d, int) for d in rest) else None
    a, b = target
    if not allowzero:
        a = batch if a == 0 else a
        b = dims[1] if b == 0 else b
    if a == -1:
        ok = features is not None and b == features
    else:
        same_batch = a == batch and batch is not None
        ok = (same_batch and (b == -1 or (features is not None and b == features))) or (
            a == 1 and not isinstance(batch, int) and features is not None and b == features)
    return None if ok else bad


def _rewrite_exporter_spellings(model: Any) -> dict[str, str]:
    """Rewrite, in place, the spellings of global average pooling and flattening that torch's dynamo exporter (the
    default of ``torch.onnx.export`` since torch 2.9) writes into the ops the importer handles: ``ReduceMean`` over
    the two spatial axes of a 4-D tensor -> ``GlobalAveragePool`` (+ ``Flatten`` when ``keepdims=0``), and a
    ``Reshape`` that flattens the features of each sample of a tensor of any rank ((N, C, H, W) -> (N, C*H*W): the
    targets :func:`_flatten_reason` accepts, constant or computed from the graph's shapes by Shape / Gather / Concat
    nodes, which are then dropped) -> ``Flatten(axis=1)`` (any batch size). The rewritten nodes keep their names and
    metadata. A ``Resize`` whose output sizes are computed from the graph's shapes (torch's legacy exporter writes
    ``F.interpolate(x, size=skip.shape[-2:])`` as Shape / Slice / Concat) gets the equivalent constant scales
    (:func:`_resize_scales`) and those shape nodes are dropped.

    Returns ``{output name: why}`` for every other ReduceMean / Reshape / such Resize, left alone and rejected by
    name afterwards with that reason."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    why: dict[str, str] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception as e:  # noqa: BLE001 - shape inference is best effort; without it nothing is rewritten
        for n in g.node:
            if n.op_type in ("ReduceMean", "Reshape") and n.output:
                why[n.output[0]] = f"ONNX shape inference failed ({type(e).__name__}), so its shapes are unknown"
        return why
    shapes: dict[str, list[Any]] = {}
    for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param")
                              else None for d in v.type.tensor_type.shape.dim]
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def attr(n: Any, name: str, default: Any) -> Any:
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)

    def like(new: Any, n: Any) -> Any:
        new.metadata_props.extend(n.metadata_props)  # the module path :func:`_layer_names` reads
        return new

    out = []
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            out.append(n)
            continue
        shape = shapes.get(n.input[0]) if n.input else None
        if n.op_type == "ReduceMean":
            axes_input = len(n.input) > 1 and bool(n.input[1])
            axes = _shape_value(n.input[1], producers, consts, shapes) if axes_input else attr(n, "axes", None)
            if (shape is not None and len(shape) == 4 and axes is not None and all(isinstance(a, int) for a in axes)
                    and sorted(int(a) % 4 for a in axes) == [2, 3]):
                if attr(n, "keepdims", 1):
                    gap = helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name)
                    out.append(like(gap, n))
                else:
                    mid = n.output[0] + "__gap"
                    out.append(like(helper.make_node("GlobalAveragePool", [n.input[0]], [mid], name=n.name), n))
                    out.append(like(helper.make_node("Flatten", [mid], list(n.output), name=n.name + "__flatten",
                                                     axis=1), n))
                continue
            over = ("axes computed in the graph" if axes is None and axes_input else "all axes" if axes is None
                    else f"axes {list(axes)}")
            why[n.output[0]] = (f"ReduceMean of a {'?' if shape is None else _fmt_shape(shape)} tensor over {over}: "
                                "only the mean over the two spatial axes of an (N, C, H, W) tensor (global average "
                                "pooling) is supported")
        if n.op_type == "Resize" and len(n.input) > 3 and n.input[3] and n.input[3] not in consts:
            scales = _resize_scales(shape, _shape_value(n.input[3], producers, consts, shapes))
            if scales is not None:       # sizes computed from the graph's shapes (F.interpolate(x, size=y.shape[-2:]))
                const = n.output[0] + "__scales"
                g.initializer.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), const))
                consts[const] = np.asarray(scales, dtype=np.float32)
                inputs = [n.input[0], n.input[1], const]
                del n.input[:]
                n.input.extend(inputs)
            else:
                why[n.output[0]] = ("its output sizes are computed in the graph (the Shape / Gather / Slice / "
                                    "Concat nodes listed) and do not resolve to whole-number factors of its "
                                    f"{'?' if shape is None else _fmt_shape(shape)} input: export with a fixed "
                                    "input shape (no dynamic H / W), or upsample with scale_factor= instead of size=")
        if n.op_type == "Reshape" and len(n.input) > 1:
            target = _shape_value(n.input[1], producers, consts, shapes)
            reason = _flatten_reason(shape, target, int(attr(n, "allowzero", 0)))
            if reason is None:
                out.append(like(helper.make_node("Flatten", [n.input[0]], list(n.output), name=n.name, axis=1), n))
                continue
            why[n.output[0]] = reason
        out.append(n)
    # the shape computations that only fed rewritten Reshapes are read by nothing now: drop them
    graph_outputs = {o.name for o in g.output}
    while True:
        read = {i for n in out for i in n.input} | graph_outputs
        dead = [n for n in out if n.op_type in _SHAPE_OPS and n.domain in ("", "ai.onnx")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        gone = {id(d) for d in dead}
        out = [n for n in out if id(n) not in gone]
    del g.node[:]
    g.node.extend(out)
    return why


def _rewrite(gm: fx.GraphModule, names: dict[str, tuple[str, str, str]], path: str | Path) -> fx.GraphModule:
    """onnx2torch modules -> plain torch modules / functions; every remaining module must be a torch.nn layer."""
    import torch
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.clip import OnnxClip
    from onnx2torch.node_converters.activations import OnnxErf, OnnxHardSigmoid
    from onnx2torch.node_converters.pow import OnnxPow
    from onnx2torch.node_converters.concat import OnnxConcat
    from onnx2torch.node_converters.functions import OnnxFunction
    from onnx2torch.node_converters.global_average_pool import (OnnxGlobalAveragePool,
                                                                 OnnxGlobalAveragePoolWithKnownInputShape)
    from onnx2torch.node_converters.resize import OnnxResize

    def is_resize(user: fx.Node) -> bool:
        return user.op == "call_module" and isinstance(gm.get_submodule(user.target), OnnxResize)

    def is_arithmetic(user: fx.Node) -> bool:
        return user.op == "call_module" and isinstance(gm.get_submodule(user.target), (OnnxBinaryMathOperation,
                                                                                        OnnxPow))

    def scalar(n: fx.Node) -> float | None:
        v = _attr(gm, n) if n.op == "get_attr" else None
        return float(v.reshape(())) if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point() \
            else None

    # constants read here (a Resize's roi / scales / sizes), not operands of the network
    resize_inputs = {n for n in gm.graph.nodes if n.op == "get_attr" and n.users and all(map(is_resize, n.users))}
    # one-number constants of arithmetic (GELU's Div by sqrt(2), Add 1, Mul 0.5; Hardswish's Add 3, Div 6): passed
    # as Python numbers, so the tracer can recognize the activation they spell (frontend/pointwise.py) and name
    # any other arithmetic with a constant
    scalars = {n: v for n in gm.graph.nodes if n.users and all(map(is_arithmetic, n.users))
               and (v := scalar(n)) is not None}
    root: dict[str, Any] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    errors: list[str] = []
    binary = {torch.add: operator.add, torch.mul: operator.mul, torch.sub: operator.sub}
    for node in gm.graph.nodes:
        if node in resize_inputs or node in scalars:
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), OnnxResize):
            onnx_name, _, layer = names.get(str(node.target), (str(node.target), "Resize", str(node.target)))
            up, why = _resize_as_upsample(gm, node)
            if up is None:
                errors.append(f"ONNX node '{onnx_name}' (Resize): {why}")
                up = nn.Upsample(scale_factor=1.0)
            root[layer] = up
            env[node] = graph.call_module(layer, (env[node.args[0]],))
            continue
        args = fx.node.map_arg(node.args, lambda a: scalars[a] if a in scalars else env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        if node.op != "call_module":
            new = graph.node_copy(node, lambda a: env[a])
            if node.op == "get_attr":
                errors.append(f"constant tensor {node.target!r} used as an operand (only weights inside Conv / "
                              "Gemm / BatchNormalization are supported)")
            env[node] = new
            continue
        m = gm.get_submodule(node.target)
        onnx_name, op_type, layer = names.get(str(node.target), (str(node.target), type(m).__name__,
                                                                  str(node.target)))
        where = f"ONNX node '{onnx_name}' ({op_type})"
        if isinstance(m, (OnnxBinaryMathOperation, OnnxPow)):
            op = getattr(m, "math_op_function", None)
            fn = (operator.pow if isinstance(m, OnnxPow) else binary.get(op)
                  or (operator.truediv if getattr(op, "__name__", "") == "_onnx_div" else None))
            if fn is None or len(args) != 2 or getattr(m, "broadcast", None) == 1:
                errors.append(f"{where}: only Add / Sub / Mul / Div / Pow of tensors and one-number constants is "
                              "supported")
            env[node] = graph.call_function(fn or operator.add, tuple(args))
            continue
        if isinstance(m, OnnxErf):
            env[node] = graph.call_function(torch.erf, tuple(args))
            continue
        if isinstance(m, OnnxConcat):
            env[node] = graph.call_function(torch.cat, (list(args),), {"dim": int(m.axis)})
            continue
        if isinstance(m, (OnnxGlobalAveragePool, OnnxGlobalAveragePoolWithKnownInputShape)):
            m = nn.AdaptiveAvgPool2d(1)
        elif isinstance(m, OnnxHardSigmoid):      # torch's hardsigmoid is HardSigmoid(alpha=1/6, beta=0.5)
            if abs(float(m.alpha) - 1 / 6) > 1e-6 or abs(float(m.beta) - 0.5) > 1e-6:
                errors.append(f"{where}: HardSigmoid with alpha {m.alpha}, beta {m.beta} (only alpha 1/6, beta 0.5: "
                              "torch's hardsigmoid)")
            m = nn.Hardsigmoid()
        elif isinstance(m, OnnxFunction) and m.function is torch.tanh:
            m = nn.Tanh()
        elif isinstance(m, OnnxClip):
            if m.min_val is None or m.max_val is None:
                errors.append(f"{where}: Clip with only one bound (min {m.min_val}, max {m.max_val})")
            else:
                m = nn.Hardtanh(float(m.min_val), float(m.max_val))
        elif type(m).__module__.startswith("onnx2torch"):
            errors.append(f"{where}: onnx2torch module {type(m).__name__} has no plain torch equivalent here")
        root[layer] = m
        env[node] = graph.call_module(layer, tuple(args), kwargs)
    if errors:
        raise UnsupportedModelError(f"cannot import {path}:\n  " + "\n  ".join(errors))
    return fx.GraphModule(root, graph)


def _attr(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The object behind a ``get_attr`` fx node (onnx2torch keeps constants as buffers of submodules)."""
    owner, _, attr = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _resize_as_upsample(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module | None, str]:
    """onnx2torch's Resize call ``node`` (input, roi, scales[, sizes]: constants) -> ``nn.Upsample`` nearest by the
    integer factors of its scales (or of its constant sizes, left to the tracer to check), else (None, why)."""
    import torch

    def const(i: int) -> Any:
        a = node.args[i] if len(node.args) > i else node.kwargs.get(("input_tensor", "roi", "scales", "sizes")[i])
        if a is None:
            return None
        if not isinstance(a, fx.Node) or a.op != "get_attr":
            return "dynamic"
        return _attr(gm, a).detach().cpu().reshape(-1).tolist()

    scales, sizes = const(2), const(3)
    if scales == "dynamic" or sizes == "dynamic":
        return None, "scales / sizes computed in the graph (only constants)"
    if scales:
        if len(scales) != 4 or scales[:2] != [1.0, 1.0] or any(float(v) != int(v) or v < 1 for v in scales[2:]):
            return None, f"scales {scales} (only 4-D, batch and channels 1, spatial integer factors)"
        return nn.Upsample(scale_factor=(float(scales[2]), float(scales[3])), mode="nearest"), ""
    if sizes and len(sizes) == 4:
        return nn.Upsample(size=(int(sizes[2]), int(sizes[3])), mode="nearest"), ""
    return None, "no constant scales or sizes"


def onnx_to_torch(path: str | Path) -> fx.GraphModule:
    """An FP32 ONNX model file -> ``fx.GraphModule`` of plain torch layers (eval mode) for the tracer. Its
    ``fixed_input_shape`` holds the ONNX input's dimensions (an int where fixed, None where dynamic) and
    ``fixed_input_source`` names the input, for :func:`ptq2tvm.data.checks.check_fixed_input_shape`.

    Raises :class:`ArtifactError` (missing, corrupted, fails onnx.checker) or :class:`UnsupportedModelError` (naming
    every unsupported ONNX node)."""
    model, names = prepare_onnx(load_onnx(path), path)
    inp, dims = _graph_input(model)
    o2t = _import_onnx2torch()
    _register_resize_converters()
    _register_activation_converters()
    import warnings

    try:
        with warnings.catch_warnings():  # its nearest-Resize warnings: _check_resize admitted only exact forms
            warnings.filterwarnings("ignore", message="Pytorch's nearest neighbor", category=UserWarning)
            gm = o2t.convert(model)
    except Exception as e:  # onnx2torch raises NotImplementedError / KeyError / RuntimeError
        raise UnsupportedModelError(f"onnx2torch cannot convert {path}: {type(e).__name__}: {e}") from e
    gm = _rewrite(gm, names, path).eval()
    _name_outputs(gm, [o.name for o in model.graph.output])
    gm.fixed_input_shape = dims
    gm.fixed_input_source = f"the ONNX model {Path(path).name} (input {inp.name!r})"
    return gm


def _name_outputs(gm: fx.GraphModule, onnx_names: list[str]) -> None:
    """A graph with several outputs returns ``{ONNX output name: tensor}`` (onnx2torch returns a list), so the run,
    the bundle's ``--output`` .npz and the fidelity report name each output as the ONNX model does."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = out.args[0]
    if isinstance(values, (list, tuple)) and len(values) > 1 and len(values) == len(onnx_names):
        out.args = (dict(zip(onnx_names, values)),)
        gm.recompile()


def _graph_input(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, tuple[int | None, ...]]:
    """The graph's data input (the first input that is not an initializer) and its dimensions: an int where fixed,
    None where dynamic (a symbolic or 0 dim)."""
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    return inp, tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in inp.type.tensor_type.shape.dim)


def onnx_input_shape(path: str | Path) -> tuple[int, ...] | None:
    """(C, H, W) of the ONNX model's input when fixed, else None."""
    vals = _graph_input(load_onnx(path))[1]
    return tuple(vals[1:]) if len(vals) == 4 and all(v for v in vals[1:]) else None
