"""The fake-quant model: an nn.Module interpreting a :class:`FloatGraph` with quantizers at the integer points."""

from __future__ import annotations

import json
import pickle
import re
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..atomic import atomic_path
from ..errors import ArtifactError, InputShapeError, QuantConfigError
from ..ops import float_op, ops_of_kind
from .fused_quant import act_clamp
from .graph import OPS_WITH_WEIGHTS, FloatGraph, FloatNode
from .quantizers import ActQuantizer, WeightQuantizer, check_bits

FAKEQUANT_FORMAT = "ptq2tvm-fakequant"
FAKEQUANT_VERSION = 1
#: ops whose output carries an activation quantizer (from the op registry: weighted and requantizing ops)
QUANT_POINT_OPS = ops_of_kind("weighted", "requant")


@dataclass
class QuantConfig:
    """Bit widths and calibration settings.

    ``first_last_8bit``: the first conv (weights and its input) and the last layer (weights, its input and the network
    output) stay at 8 bit, as BRECQ/QDrop deploy them. With it, ``first_layer_output_bits`` (default 8) is the bits of
    the first layer's output: the first conv's quant point and the outputs of the single-input ops that follow it
    (its ReLU/table nonlinearity, a max-pool), i.e. what the second layer reads. 8 is BRECQ's convention
    (``set_first_last_layer_to_8bit`` sets ``module_list[0].act_quantizer``, the quantizer after the first module's
    activation, to 8 bits); None gives it ``a_bits`` (QDrop's code keeps only the last layer's input at 8 bits). The
    stem's output is where a per-tensor 4-bit grid hurts most: its few channels have very different ranges (no later
    layer has mixed them yet) and a depthwise conv reads each channel alone (measured: benchmarks/results/
    coverage_fmnist_first8.md).

    Per-layer bits (mixed precision), keyed by conv/linear layer name (the model's module path, e.g.
    ``layer1.0.conv1``; :func:`ptq2tvm.mixed.layerbits.resolve_layer_bits` expands globs): ``layer_w_bits`` the
    layer's weight bits, ``layer_a_bits`` the bits of the layer's INPUT quantization point (the activation tensor it
    reads). An explicit per-layer entry wins over ``first_last_8bit``. Layers reading the same tensor (a residual
    block's conv1 and its downsample) share that tensor's bits: conflicting entries are an error. Names are checked
    against the model when the :class:`QuantModel` is built (an unknown name raises QuantConfigError listing the valid
    ones).
    """

    w_bits: int = 8
    a_bits: int = 8
    first_last_8bit: bool = True
    weight_lp: float = 2.0
    act_lp: float = 2.0
    layer_w_bits: dict[str, int] = field(default_factory=dict)
    layer_a_bits: dict[str, int] = field(default_factory=dict)
    #: bits of a tensor read by a lookup-table nonlinearity (SiLU, Sigmoid, ...); None: a_bits (ptq2tvm.ops.lut)
    lut_input_bits: int | None = 8
    #: bits of the first layer's output when ``first_last_8bit`` (BRECQ's convention); None: a_bits
    first_layer_output_bits: int | None = 8

    def validate(self) -> "QuantConfig":
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.lut_input_bits is not None:
            check_bits(self.lut_input_bits, "lut_input_bits")
        if self.first_layer_output_bits is not None:
            check_bits(self.first_layer_output_bits, "first_layer_output_bits")
        for k, v in self.layer_w_bits.items():
            check_bits(v, f"weight bits of layer '{k}'")
        for k, v in self.layer_a_bits.items():
            check_bits(v, f"input activation bits of layer '{k}'")
        for name in ("weight_lp", "act_lp"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 1.0 <= v <= 8.0):
                raise QuantConfigError(f"{name} must be in [1, 8], got {v!r}")
        return self


def _key(name: str) -> str:
    return name.replace(".", "__")


class QLayer(nn.Module):
    """A conv or linear layer with folded BN, a weight quantizer and an optional fused residual + clamp."""

    def __init__(self, node: FloatNode, w_bits: int):
        super().__init__()
        self.op = node.op
        self.attrs = dict(node.attrs)
        self.weight = nn.Parameter(node.weight.clone())
        self.bias = nn.Parameter(node.bias.clone())
        self.wq = WeightQuantizer(w_bits, node.weight.shape[0])
        self.adaq = False

    def enable_adaq(self) -> "QLayer":
        """AdaQTransform (Case 2.2 + shift): y = xi * (W_hat * x_hat) + b + eta, xi (de-quant step s_w' / s_w) and
        eta per output channel, initialised to the identity (xi = 1, eta = 0). The fold merges both (Eq. 9)."""
        if not self.adaq:
            c, dev = self.weight.shape[0], self.weight.device       # on the layer's device (reconstruction on a GPU)
            self.xi = nn.Parameter(torch.ones(c, device=dev))
            self.eta = nn.Parameter(torch.zeros(c, device=dev))
            self.adaq = True
        return self

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale``: the input's quantization step. When given (and weights are quantized), the bias is rounded
        to the int32 accumulator grid |xi| * s_w * s_x exactly as the fold does, so the fake-quant model and the
        integer graph agree bit for bit (up to half-even vs half-up ties)."""
        w = self.wq(self.weight)
        b = self.bias
        if self.adaq:
            w = w * self.xi.view((-1,) + (1,) * (w.dim() - 1))
            b = b + self.eta
        if in_scale is not None and self.wq.enabled:
            acc = self.wq.scale * in_scale
            if self.adaq:
                acc = acc * self.xi.abs()
            # The integer bias is decided in float64 exactly as the fold computes it: learned scales drift onto rounding
            # boundaries (b / acc = -15.4999998 in float64 is -15.5 in float32 and rounds the other way), which made
            # whole channels differ from the integer network by one accumulator step.
            with torch.no_grad():
                b64 = self.bias.double() + (self.eta.double() if self.adaq else 0.0)
                acc64 = self.wq.scale.double() * in_scale.double()
                if self.adaq:
                    acc64 = acc64 * self.xi.double().abs()
                b_int = torch.round(b64 / acc64).to(b.dtype)
            ratio = b / acc
            b = ((b_int - ratio).detach() + ratio) * acc             # straight-through gradient, like round_ste
        if self.op == "linear":
            return F.linear(x, w, b)
        a = self.attrs
        return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])


class QuantModel(nn.Module):
    """Fake-quant network. ``set_quant(weights=..., acts=...)`` toggles quantization (both off = folded FP model)."""

    def __init__(self, graph: FloatGraph, config: QuantConfig):
        super().__init__()
        self.graph = graph
        self.config = config.validate()
        self.layers = nn.ModuleDict()
        self.act_quant = nn.ModuleDict()
        first, last = self._first_and_last()
        self._check_layer_names()
        for n in graph.nodes:
            if n.op in OPS_WITH_WEIGHTS:
                bits = 8 if config.first_last_8bit and (n.name in first or n.name in last) else config.w_bits
                self.layers[_key(n.name)] = QLayer(n, config.layer_w_bits.get(n.name, bits))
        nonneg = self._nonneg()
        eight = self._eight_bit_points(first, last) if config.first_last_8bit else set()
        explicit = self._explicit_point_bits()
        wanted = self._wanted_input_bits()
        first_out = (self._first_layer_outputs(first) if config.first_last_8bit
                     and config.first_layer_output_bits is not None else set())
        for v in self.quant_points():
            default = 8 if v in eight else config.a_bits
            if v in first_out:
                default = max(default, config.first_layer_output_bits)
            bits = explicit.get(v, default)
            bits = max(bits, wanted.get(v, 0))
            self.act_quant[_key(v)] = ActQuantizer(bits, nonneg[v])

    # ---- structure -------------------------------------------------------------------------------------------
    @staticmethod
    def key(name: str) -> str:
        """The ModuleDict key of a tensor / layer name."""
        return _key(name)

    def quant_points(self) -> list[str]:
        """Names of the tensors carrying an activation quantizer (the integer points)."""
        return [self.graph.input_name] + [n.name for n in self.graph.nodes if n.op in QUANT_POINT_OPS]

    def grid_source(self, name: str) -> str:
        """The quant point whose integer grid the tensor ``name`` lies on."""
        g = self.graph
        while name != g.input_name and float_op(g.node(name).op).kind == "grid":
            name = g.node(name).inputs[0]
        return name

    def _wanted_input_bits(self) -> dict[str, int]:
        """Quant points read by an op that asks for more bits on its input (lookup tables: ``lut_input_bits``)."""
        out: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "input":
                continue
            bits = float_op(n.op).input_bits(self.config)
            if bits:
                for i in n.inputs:
                    src = self.grid_source(i)
                    out[src] = max(out.get(src, 0), bits)
        return out

    def act_quantizer(self, name: str) -> ActQuantizer:
        return self.act_quant[_key(self.grid_source(name))]

    def layer(self, name: str) -> QLayer:
        return self.layers[_key(name)]

    def layer_names(self) -> list[str]:
        """Names of the conv/linear layers, in graph order (the keys of per-layer bits)."""
        return [n.name for n in self.graph.nodes if n.op in OPS_WITH_WEIGHTS]

    def _check_layer_names(self) -> None:
        valid = self.layer_names()
        for what, d in (("layer_w_bits", self.config.layer_w_bits), ("layer_a_bits", self.config.layer_a_bits)):
            bad = sorted(set(d) - set(valid))
            if bad:
                raise QuantConfigError(f"{what}: no conv/linear layer named {', '.join(map(repr, bad))} in this model; "
                                       f"valid layer names: {', '.join(valid)}")

    def _explicit_point_bits(self) -> dict[str, int]:
        """Quant point -> bits requested through ``layer_a_bits`` by the layers reading it (they must agree)."""
        out: dict[str, tuple[int, str]] = {}
        for name, bits in self.config.layer_a_bits.items():
            point = self.grid_source(self.graph.node(name).inputs[0])
            if point in out and out[point][0] != bits:
                raise QuantConfigError(
                    f"layers '{out[point][1]}' and '{name}' read the same tensor '{point}' but ask for "
                    f"{out[point][0]} and {bits} input activation bits; give them the same bits")
            out[point] = (bits, name)
        return {p: b for p, (b, _) in out.items()}

    def _first_and_last(self) -> tuple[set[str], set[str]]:
        first = {n.name for n in self.graph.nodes if n.op in OPS_WITH_WEIGHTS
                 and any(self.grid_source(i) == self.graph.input_name for i in n.inputs)}
        last = set()
        for out in self.graph.output_names:
            src = self.grid_source(out)
            if src != self.graph.input_name and self.graph.node(src).op in OPS_WITH_WEIGHTS:
                last.add(src)
        return first, last

    def _first_layer_outputs(self, first: set[str]) -> set[str]:
        """Quant points of the first layer's output: the first conv(s) and the single-input non-weighted ops (ReLU /
        table nonlinearity, pooling) that follow them, up to the next weighted layer or a multi-input op."""
        front = set(first)
        for n in self.graph.nodes:
            if n.op not in OPS_WITH_WEIGHTS and len(n.inputs) == 1 and n.inputs[0] in front:
                front.add(n.name)
        return front & set(self.quant_points())

    def _eight_bit_points(self, first: set[str], last: set[str]) -> set[str]:
        pts = {self.graph.input_name}
        for n in self.graph.nodes:
            if n.name in first or n.name in last:
                pts.update(self.grid_source(i) for i in n.inputs)
        pts.update(last)
        return pts

    def _nonneg(self) -> dict[str, bool]:
        nn_: dict[str, bool] = {self.graph.input_name: False}
        for n in self.graph.nodes:
            if n.op == "input":
                continue
            opdef = float_op(n.op)
            if opdef.kind == "weighted" or n.op == "add":
                nn_[n.name] = n.act is not None and n.act[0] >= 0
            else:
                nn_[n.name] = opdef.nonneg(n, [nn_[i] for i in n.inputs])
        return nn_

    # ---- switches --------------------------------------------------------------------------------------------
    def set_quant(self, weights: bool, acts: bool) -> "QuantModel":
        for layer in self.layers.values():
            layer.wq.enabled = weights
        for q in self.act_quant.values():
            q.enabled = acts
        return self

    def enable_adaq(self) -> "QuantModel":
        """Turn AdaQTransform (xi, eta) on for every conv/linear layer."""
        for layer in self.layers.values():
            layer.enable_adaq()
        return self

    def set_observing(self, on: bool) -> None:
        for q in self.act_quant.values():
            q.observing = on

    # ---- execution -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_all: bool = False) -> Any:
        """The network output(s) in the model's own structure (a tensor, or a tuple / list / dict of tensors);
        ``return_all``: every tensor by name. Raises InputShapeError when ``x`` is not (N, *the traced input shape):
        the graph's shapes are those of the calibration images (a global mean became a fixed-window pool), so
        another size would run and be wrong."""
        g = self.graph
        self._check_input(x)
        env: dict[str, torch.Tensor] = {g.input_name: self.act_quant[_key(g.input_name)](x)}
        for n in g.nodes:
            if n.op == "input":
                continue
            env[n.name] = self._run_node(n, env)
        if return_all:
            return env
        return structure_outputs(g, [env[o] for o in g.output_names])

    def _check_input(self, x: Any) -> None:
        want = self.graph.input_shape
        shape = tuple(getattr(x, "shape", ()))
        if want is None or (len(shape) == len(want) + 1 and shape[1:] == tuple(want)):
            return
        hint = ""
        if shape == tuple(want):
            hint = "; add the batch dimension: x[None]"
        elif len(shape) == len(want) + 1 and len(want) == 3 and shape[1] == want[0]:
            hint = ("; its shapes (pool windows, the flatten) are the calibration images': quantize with images of "
                    "this size to run at it")
        elif len(want) == 3 and shape[1:] == (want[1], want[2], want[0]):
            hint = "; it looks channels-last (N, H, W, C): use x.permute(0, 3, 1, 2)"
        raise InputShapeError(f"the quantized model was traced for input (N, {', '.join(map(str, want))}), got "
                              f"{shape}{hint}")

    def _run_node(self, n: FloatNode, env: dict[str, torch.Tensor]) -> torch.Tensor:
        opdef = float_op(n.op)
        y = opdef.forward(self, n, env)
        if opdef.kind in ("weighted", "requant") and not opdef.quantizes_itself:
            if n.act is not None:
                y = act_clamp(y, n.act[0], n.act[1])
            y = self.act_quant[_key(n.name)](y)
            if opdef.kind == "requant":
                y = self._integer_requant(opdef, n, env, y)
        return y

    def _integer_requant(self, opdef: Any, n: FloatNode, env: dict[str, torch.Tensor], y: torch.Tensor
                         ) -> torch.Tensor:
        """``y`` (the float path of a requantizing op, through its output quantizer) with the values of the integer
        op (:meth:`ptq2tvm.ops.OpDef.integer_values`: the fold's dyadic multipliers, RHU, the clamp) and ``y``'s
        gradient. The float path alone rounds ``float32(s_i (q_i - z_i)) / s_out`` half to even, and calibration
        makes ``s_i / s_out`` a ratio of small integers whenever an op's output range has the max of one of its
        inputs (a concat always; an add where the other input is 0, an average pool of a saturated window): e.g. 17/14
        puts every code 7, 21, 35, ... on a half in real arithmetic, float32 lands on the half, the integer network
        (float32 scales, ratio 17/14 - 2e-8) just below it, 1 LSB apart on 0.6% of a concat's outputs."""
        q_out = self.act_quant[_key(n.name)]
        q_ins = [self.act_quantizer(i) for i in n.inputs]
        if not (q_out.enabled and all(q.enabled for q in q_ins)):
            return y                # a float input: only the float path is defined
        if any(q.drop_prob is not None and q.drop_prob < 1.0 for q in (q_out, *q_ins)):
            return y                # QDrop: elements passed through in float
        codes = [torch.round(env[i].detach() / q.scale.detach()).to(torch.int64) for i, q in zip(n.inputs, q_ins)]
        try:
            v = opdef.integer_values(n, codes, [float(q.scale.detach()) for q in q_ins], float(q_out.scale.detach()))
        except QuantConfigError:
            return y                # multipliers the fold refuses, naming the node
        if v is None:
            return y
        z = int(q_out.zero_point)
        lo, hi = q_out.grid_bounds(*n.act) if n.act else (0, q_out.qmax)
        exact = (torch.clamp(v + z, lo, hi) - z).to(y.dtype) * q_out.scale.detach()
        return y + (exact - y).detach()

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save graph structure, config and all parameters to one file (atomic write)."""
        path = Path(path)
        blob = {
            "format": FAKEQUANT_FORMAT,
            "version": FAKEQUANT_VERSION,
            "ptq2tvm_version": __version__,
            "graph": graph_to_json(self.graph),
            "config": asdict(self.config),
            "state_dict": self.state_dict(),
            "act_enabled": {k: q.enabled for k, q in self.act_quant.items()},
            "adaq_layers": [k for k, layer in self.layers.items() if layer.adaq],
        }
        atomic_torch_save(blob, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantModel":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"fake-quant model file not found: {path}")
        try:  # tensors + JSON only: a crafted file cannot run code (pickled objects are refused)
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            code = pickled_code(e)
            if code:
                raise ArtifactError(f"{path}: refusing to load the fake-quant model: the file contains pickled Python "
                                    f"objects, which run code when loaded ({code})") from None
            raise ArtifactError(f"cannot read fake-quant model {path}: {type(e).__name__}: {e}") from e
        if not isinstance(blob, dict) or blob.get("format") != FAKEQUANT_FORMAT:
            raise ArtifactError(f"{path} is not a ptq2tvm fake-quant model")
        if blob.get("version") != FAKEQUANT_VERSION:
            raise ArtifactError(f"{path}: fake-quant format version {blob.get('version')} is not supported "
                                f"(expected {FAKEQUANT_VERSION})")
        sd = blob["state_dict"]
        graph = graph_from_json(blob["graph"], sd)
        config = dict(blob["config"])
        config.setdefault("first_layer_output_bits", None)  # saved before the field existed: the first output had a_bits
        model = cls(graph, QuantConfig(**config))
        for k in blob.get("adaq_layers", []):
            model.layers[k].enable_adaq()
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ArtifactError(f"{path}: parameters do not match the stored graph: {e}") from e
        for k, on in blob["act_enabled"].items():
            model.act_quant[k].enabled = on
        return model


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _unjson(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_unjson(x) for x in v)
    if v in ("inf", "-inf"):
        return float(v)
    return v


def graph_to_json(graph: FloatGraph) -> dict[str, Any]:
    nodes = [
        dict(name=n.name, op=n.op, inputs=n.inputs, attrs={k: _jsonable(v) for k, v in n.attrs.items()},
             act=_jsonable(n.act) if n.act else None, residual=n.residual)
        for n in graph.nodes
    ]
    return dict(nodes=nodes, input_name=graph.input_name, output_names=list(graph.output_names),
                output_structure=graph.output_structure, input_shape=list(graph.input_shape))


def graph_from_json(d: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> FloatGraph:
    nodes = []
    for nd in d["nodes"]:
        w = state_dict.get(f"layers.{_key(nd['name'])}.weight")
        b = state_dict.get(f"layers.{_key(nd['name'])}.bias")
        nodes.append(FloatNode(nd["name"], nd["op"], list(nd["inputs"]),
                               {k: _unjson(v) for k, v in nd["attrs"].items()}, w, b,
                               _unjson(nd["act"]) if nd["act"] else None, nd["residual"]))
    outputs = d["output_names"] if "output_names" in d else [d["output_name"]]
    return FloatGraph(nodes, d["input_name"], outputs, tuple(d["input_shape"]), d.get("output_structure"))


def structure_outputs(graph: FloatGraph, values: list[Any]) -> Any:
    """Arrange per-output ``values`` like the traced model returned them (one value, tuple, list or dict)."""
    st = graph.output_structure
    if st is None:
        return values[0]
    if st[0] == "dict":
        return dict(zip(st[1], values))
    return list(values) if st[0] == "list" else tuple(values)


def pickled_code(e: BaseException) -> str | None:
    """If ``torch.load(weights_only=True)`` failed because the file is a valid pickle that references code (a class
    or function, i.e. something that would run on unpickling), the global it names; else None (not a pickle)."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "can still be loaded" not in text:
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    return f"global {m.group(1)}" if m else "a global the safe loader does not allow"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a temporary file, then a rename). Saved through a file object, so
    the zip's records are named ``archive/...`` rather than after the temporary file: the same object gives the same
    bytes (and checksum in run.json) from run to run."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
