"""Reconstruction units found from the traced :class:`FloatGraph` (never from module classes or node names).

A unit is a contiguous range of graph nodes (topological order) between two *cuts*: a cut is a tensor that every
path from the input to the output goes through, so exactly one tensor flows from one unit into the next. Units
partition the graph, which lets the reconstruction stream cached tensors from unit to unit.

Block granularity (BRECQ/QDrop):

1. Split the node list at the cuts into segments. A segment of several nodes is a multi-path region: a residual block
   (BasicBlock, Bottleneck, InvertedResidual with skip, RegNet block...). It becomes one block unit.
2. Single-node segments form chains. In a chain, consecutive weighted layers are grouped into one block when the run
   ends in a layer without activation (a linear bottleneck output: MobileNetV2 InvertedResidual without skip); any
   other weighted layer (stem, head 1x1 conv, classifier) is a unit of its own. The first weighted layer (the one
   reading the graph input) and the last one (producing the output) are always units of their own.
3. Weight-free nodes (pooling, flatten) join the unit that follows them (trailing ones join the last unit), so their
   activation quantizers are learned too.

Layer granularity: one unit per conv/linear layer (same partition rule for weight-free nodes). Network granularity:
one unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..frontend.graph import OPS_WITH_WEIGHTS, FloatGraph, FloatNode
from ..ops import float_op, ops_of_kind

#: ops carrying learnable state (weights and/or an activation quantizer): from the op registry
PARAM_OPS = ops_of_kind("weighted", "requant")


@dataclass
class Unit:
    """A contiguous node range ``nodes`` reading the tensors ``inputs`` (produced before it) and producing
    ``outputs`` (its tensors still needed after it, or the graph output). Block and network units start and end at
    cuts, so they have one input and one output; layer units inside a residual block may have more."""

    name: str
    nodes: list[str]
    layers: list[str]
    inputs: list[str]
    outputs: list[str]
    kind: str = "layer"            # layer | block | merged | network
    members: list[str] = field(default_factory=list)   # names of the units merged into this one (MRECG)
    #: outputs that depend on the unit's parameters (the reconstruction loss is taken on these)
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _body(graph: FloatGraph) -> list[FloatNode]:
    return [n for n in graph.nodes if n.op != "input"]


def cut_positions(graph: FloatGraph) -> list[int]:
    """Indices i (into the non-input node list) whose output is a cut: no data edge jumps over node i."""
    body = _body(graph)
    pos = {graph.input_name: -1}
    pos.update({n.name: i for i, n in enumerate(body)})
    last_use = {i: i for i in range(-1, len(body))}
    for j, n in enumerate(body):
        for t in n.data_inputs:
            last_use[pos[t]] = max(last_use[pos[t]], j)
    cuts, reach = [], last_use[-1]
    for i in range(len(body)):
        if reach <= i:          # nothing produced before node i is used after it
            cuts.append(i)
        reach = max(reach, last_use[i])
    if not cuts or cuts[-1] != len(body) - 1:
        cuts.append(len(body) - 1)
    return cuts


def segments(graph: FloatGraph) -> list[list[FloatNode]]:
    """Split the node list at the cuts: each segment ends at a cut tensor."""
    body = _body(graph)
    segs, start = [], 0
    for c in cut_positions(graph):
        if c >= start:
            segs.append(body[start:c + 1])
            start = c + 1
    return segs


def _is_weighted(n: FloatNode) -> bool:
    return n.op in OPS_WITH_WEIGHTS


def unit_from_range(graph: FloatGraph, start: int, end: int, kind: str, name: str | None = None,
                    members: list[str] | None = None) -> Unit:
    """The unit covering body[start..end] with its live-in and live-out tensors."""
    body = _body(graph)
    rng = body[start:end + 1]
    inside = {n.name for n in rng}
    inputs: list[str] = []
    for n in rng:
        for t in n.data_inputs:
            if t not in inside and t not in inputs:
                inputs.append(t)
    later = {t for n in body[end + 1:] for t in n.data_inputs}
    outputs = [n.name for n in rng if n.name in later or n.name in graph.output_names]
    layers = [n.name for n in rng if _is_weighted(n)]
    dependent: set[str] = set()
    for n in rng:
        if n.op in PARAM_OPS or any(t in dependent for t in n.data_inputs):
            dependent.add(n.name)
    targets = [t for t in outputs if t in dependent] or list(outputs)
    return Unit(name or _unit_name(layers, kind), [n.name for n in rng], layers, inputs, outputs, kind,
                list(members or []), targets)


def _make_units(graph: FloatGraph, groups: list[tuple[int, str]]) -> list[Unit]:
    """Groups (end index, kind) in order -> a partition of the body; weight-free nodes join the next group and
    trailing ones the last."""
    n_body = len(_body(graph))
    units, start = [], 0
    for gi, (end, kind) in enumerate(groups):
        if gi == len(groups) - 1:
            end = n_body - 1
        units.append(unit_from_range(graph, start, end, kind))
        start = end + 1
    return units


def _unit_name(layers: list[str], kind: str) -> str:
    if not layers:
        return kind
    if len(layers) == 1:
        return layers[0]
    # common dotted prefix if any (display only; discovery never looks at names)
    parts = [name.split(".") for name in layers]
    common = []
    for toks in zip(*parts):
        if all(t == toks[0] for t in toks):
            common.append(toks[0])
        else:
            break
    return ".".join(common) if common else f"{layers[0]}..{layers[-1]}"


def layer_units(graph: FloatGraph) -> list[Unit]:
    """One unit per conv/linear layer."""
    groups = [(i, "layer") for i, n in enumerate(_body(graph)) if _is_weighted(n)]
    return _make_units(graph, groups) if groups else network_unit(graph)


def network_unit(graph: FloatGraph) -> list[Unit]:
    return [unit_from_range(graph, 0, len(_body(graph)) - 1, "network", name="network")]


def block_units(graph: FloatGraph) -> list[Unit]:
    """BRECQ-style blocks found from the graph structure (see module docstring)."""
    body = _body(graph)
    index = {n.name: i for i, n in enumerate(body)}
    weighted = [n for n in body if _is_weighted(n)]
    if not weighted:
        return network_unit(graph)
    first = {n.name for n in weighted if _reads_input_only(graph, n)}
    last = weighted[-1].name
    groups: list[tuple[int, str]] = []
    pending: list[FloatNode] = []

    def flush() -> None:
        for p in pending:
            groups.append((index[p.name], "layer"))
        pending.clear()

    for seg in segments(graph):
        has_w = any(_is_weighted(n) for n in seg)
        if len(seg) > 1:                      # multi-path region: a residual block
            flush()
            if has_w:
                groups.append((index[seg[-1].name], "block"))
            continue
        n = seg[0]
        if not has_w:
            if n.op != "flatten":             # pooling etc. ends a chain; flatten is shape-only
                flush()
            continue
        if n.name in first or n.name == last:
            flush()
            groups.append((index[n.name], "layer"))
            continue
        pending.append(n)
        if n.act is None:                     # a linear (bottleneck) output closes a chain block
            if len(pending) > 1:
                groups.append((index[n.name], "block"))
                pending.clear()
            else:
                flush()
    flush()
    return _make_units(graph, groups)


def _reads_input_only(graph: FloatGraph, n: FloatNode) -> bool:
    """True if ``n`` reads the graph input through weight-free, grid-preserving nodes only."""
    t = n.inputs[0]
    while t != graph.input_name:
        p = graph.node(t)
        if float_op(p.op).kind != "grid":
            return False
        t = p.inputs[0]
    return True


def merge_units(graph: FloatGraph, units: list[Unit], pairs: list[int]) -> list[Unit]:
    """Merge unit l with unit l+1 for every l in ``pairs`` (overlapping pairs chain into larger groups)."""
    index = {n.name: i for i, n in enumerate(_body(graph))}
    sel = set(pairs)
    out: list[Unit] = []
    i = 0
    while i < len(units):
        j = i
        while j in sel and j + 1 < len(units):
            j += 1
        if j == i:
            out.append(units[i])
        else:
            grp = units[i:j + 1]
            out.append(unit_from_range(graph, index[grp[0].nodes[0]], index[grp[-1].nodes[-1]], "merged",
                                       name="+".join(u.name for u in grp), members=[u.name for u in grp]))
        i = j + 1
    return out


def discover_units(graph: FloatGraph, granularity: str) -> list[Unit]:
    """Units for ``granularity`` in layer / block / network (MRECG merges start from block units)."""
    if granularity == "layer":
        return layer_units(graph)
    if granularity == "network":
        return network_unit(graph)
    return block_units(graph)
