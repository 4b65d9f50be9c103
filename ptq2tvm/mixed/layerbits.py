"""Per-layer bits from the user: ``--layer-bits 'layer1.0.conv1=4/8,layer2.*=4/4'`` (fnmatch globs), and the bits
each layer of an integer graph actually got (for run.json, the sidecar and parity).

Precedence: a layer named explicitly (no ``*``, ``?`` or ``[`` in the pattern) gets its own bits whatever the order
of the items (``layer1.0.conv1=8,layer1.*=4`` keeps ``layer1.0.conv1`` at 8 bits); among globs a later one overrides
an earlier one for the layers both match. A module called more than once (one layer per call: ``blk``, ``blk#1``)
gets its name's bits on every call, and a call's own name (``blk#1=8``) overrides that."""

from __future__ import annotations

import fnmatch
from typing import Any

from ..errors import QuantConfigError
from ..frontend.graph import repeated_call_of
from ..frontend.quantizers import check_bits
from ..ir.graph import IntegerGraph

#: candidate (weight bits, input activation bits) settings of the sensitivity analysis and the ILP
CANDIDATES: tuple[tuple[int, int], ...] = ((8, 8), (8, 4), (4, 8), (4, 4), (2, 8), (2, 4))


def candidate_name(wa: tuple[int, int]) -> str:
    return f"W{wa[0]}A{wa[1]}"


def is_glob(pattern: str) -> bool:
    """True when ``pattern`` has fnmatch glob characters (``*``, ``?``, ``[``): it may match several layers."""
    return any(c in pattern for c in "*?[")


def parse_layer_bits(spec: str) -> list[tuple[str, int, int | None]]:
    """'name=W/A,glob=W,...' -> [(pattern, w_bits, a_bits or None)]. Raises QuantConfigError on malformed items and
    on a layer name (or glob) given twice (``conv1=4,conv1=8`` kept the last silently). Different patterns may match
    the same layer: an explicit name wins over every glob in any order, a later glob over an earlier one
    (:func:`resolve_layer_bits`)."""
    items = []
    seen: dict[str, str] = {}
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        pat, eq, bits = raw.partition("=")
        parts = bits.split("/")
        if not eq or not pat.strip() or len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise QuantConfigError(f"--layer-bits item {raw!r} is not LAYER=W/A or LAYER=W (e.g. "
                                   "'layer1.0.conv1=4/8' or 'layer2.*=4')")
        w = check_bits(int(parts[0]), f"weight bits in --layer-bits item {raw!r}")
        a = check_bits(int(parts[1]), f"activation bits in --layer-bits item {raw!r}") if len(parts) == 2 else None
        if pat.strip() in seen:
            raise QuantConfigError(f"--layer-bits names layer {pat.strip()!r} twice ({seen[pat.strip()]!r} and "
                                   f"{raw!r}): give each layer once")
        seen[pat.strip()] = raw
        items.append((pat.strip(), w, a))
    if not items:
        raise QuantConfigError(f"--layer-bits {spec!r} names no layer")
    return items


def resolve_layer_bits(items: list[tuple[str, int, int | None]] | str,
                       layer_names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Expand the patterns over ``layer_names`` -> (layer_w_bits, layer_a_bits). A layer named explicitly (a pattern
    without glob characters, :func:`is_glob`) gets its item's bits whatever the order of the items; globs apply in
    order among themselves (a later glob overrides an earlier one for the layers both match). A pattern that matches no layer, or one given twice
    (:func:`parse_layer_bits`), raises QuantConfigError (the first listing the valid layer names). A module called
    more than once has one layer per call (``blk``, ``blk#1``, ...): its name sets the bits of every call, and a
    call's own name (``blk#1``) overrides that."""
    if isinstance(items, str):
        items = parse_layer_bits(items)
    w_bits: dict[str, int] = {}
    a_bits: dict[str, int] = {}
    globs = [it for it in items if is_glob(it[0])]
    names = [it for it in items if not is_glob(it[0])]
    # tiers, later wins: globs in order (one matching a module's name matches every call of it); a module's name over
    # every call of it (blk -> blk, blk#1, ...); a node's exact name (blk#1=8 keeps the second call at 8 bits)
    tiers = [(it, lambda n, p: fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(repeated_call_of(n) or n, p))
             for it in globs] \
        + [(it, lambda n, p: n == p or repeated_call_of(n) == p) for it in names] \
        + [(it, lambda n, p: n == p) for it in names]
    for (pat, w, a), matches in tiers:
        hit = [n for n in layer_names if matches(n, pat)]
        if not hit:
            raise QuantConfigError(f"--layer-bits: {pat!r} matches no conv/linear layer of this model; valid layer "
                                   f"names: {', '.join(layer_names)}")
        for n in hit:
            w_bits[n] = w
            if a is not None:
                a_bits[n] = a
    return w_bits, a_bits


def graph_layer_bits(graph: IntegerGraph) -> dict[str, dict[str, int]]:
    """{layer: {w_bits, a_bits (its input tensor's bits), out_bits}} for every conv2d/dense node of ``graph``."""
    out: dict[str, dict[str, int]] = {}
    for n in graph.nodes:
        if n.op in ("conv2d", "dense"):
            out[n.name] = dict(w_bits=int(n.attrs.get("w_bits", 8)), a_bits=int(graph.tensor(n.inputs[0]).bits),
                               out_bits=int(n.out.bits))
    return out


def bits_summary(bits: dict[str, dict[str, Any]]) -> str:
    """'W8A8 x3, W4A8 x10, ...' over the layers."""
    counts: dict[str, int] = {}
    for b in bits.values():
        k = f"W{b['w_bits']}A{b['a_bits']}"
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def layer_bits_label(bits: dict[str, dict[str, Any]], mixed_precision: bool, nominal: str) -> str:
    """The W/A label of a run with per-layer bits: a ``--mixed-precision`` plan "mixed W4A8 x11, W2A8 x2, ..." (or,
    when the budget left one setting everywhere, "W8A8 on every layer (the plan --mixed-precision chose)"), else
    ``--layer-bits``: "W4A4 with --layer-bits: ..." (``nominal``: the run's W{w}A{a})."""
    per = bits_summary(bits)
    if not mixed_precision:
        return f"{nominal} with --layer-bits: {per}"
    return f"mixed {per}" if "," in per else f"{per.split(' x')[0]} on every layer (the plan --mixed-precision chose)"


__all__ = ["CANDIDATES", "bits_summary", "candidate_name", "layer_bits_label", "graph_layer_bits", "is_glob", "parse_layer_bits",
           "repeated_call_of", "resolve_layer_bits"]
