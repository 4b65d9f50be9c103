"""The canonical float graph: what a traced model becomes before quantization.

Every node is one future integer operation (or a data movement on integer codes). Which ops exist and what they
mean is defined by the op registry (:mod:`ptq2tvm.ops`, one module per op family). Fusion is decided here, once, so
the fake-quant model and the integer graph agree on where the quantization points are:

- weighted ops (``conv`` / ``linear``): weight (BN folded in), bias, an optional fused residual input
  (``residual``) and an optional clamp ``act`` = (lo, hi) applied after the residual add (ReLU = (0, inf)).
- requantizing ops (``add``, ``mul``, ``concat``, ``avgpool``, ``lut``): a new quantization point, optional ``act``.
- grid-preserving ops (``maxpool``, ``clamp``, ``flatten``, ``upsample``, shuffles, ``slice``): same grid as the
  input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir.outputs import GraphOutputs

OPS_WITH_WEIGHTS = ("conv", "linear")


@dataclass
class FloatNode:
    """One operation of the canonical float graph."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act: tuple[float, float] | None = None
    residual: str | None = None

    @property
    def data_inputs(self) -> list[str]:
        """All tensor inputs, the fused residual included."""
        return self.inputs + ([self.residual] if self.residual else [])


@dataclass
class FloatGraph(GraphOutputs):
    """Topologically ordered float nodes; ``input_name`` is the graph input, ``output_names`` its outputs in the
    order the model returns them (``output_structure``: None for one tensor, ``["tuple", n]`` / ``["list", n]`` /
    ``["dict", keys]`` for several)."""

    nodes: list[FloatNode]
    input_name: str
    output_names: list[str] | str
    input_shape: tuple[int, ...] | None = None
    output_structure: Any = None
    #: layers of the model whose results reach no output, removed by the tracer (frontend/trace.remove_dead_layers)
    dead_layers: list[str] = field(default_factory=list)

    def node(self, name: str) -> FloatNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def users(self, name: str) -> list[FloatNode]:
        return [n for n in self.nodes if name in n.data_inputs]


def repeated_call_of(layer: str) -> str | None:
    """The module name behind a later call of the same module (the tracer names the calls ``blk``, ``blk#1``,
    ``blk#2``, ...; frontend/trace.py), else None."""
    base, sep, k = layer.rpartition("#")
    return base if sep and k.isdigit() else None
