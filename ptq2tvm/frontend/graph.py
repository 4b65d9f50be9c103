"""The canonical float graph: what a traced model becomes before quantization.

Every node is one future integer operation. Fusion is decided here, once, so the fake-quant model and the integer
graph agree on where the quantization points are:

- ``conv`` / ``linear``: weight (BN folded in), bias, an optional fused residual input (``residual``) and an optional
  clamp ``act`` = (lo, hi) applied after the residual add (ReLU = (0, inf), ReLU6 = (0, 6)).
- ``add``: standalone residual add of two tensors, with optional ``act``.
- ``maxpool`` / ``avgpool``: 2-D pooling (global average pooling is an ``avgpool`` whose kernel is the input size).
- ``flatten``: (N, C, H, W) -> (N, C*H*W).
- ``clamp``: a standalone activation that could not be fused into its producer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

OPS_WITH_WEIGHTS = ("conv", "linear")
#: ops whose output lies on the same integer grid as their (first) input: no new quantizer.
GRID_PRESERVING_OPS = ("maxpool", "flatten", "clamp")


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
class FloatGraph:
    """Topologically ordered float nodes; ``input_name`` is the graph input, ``output_name`` its output."""

    nodes: list[FloatNode]
    input_name: str
    output_name: str
    input_shape: tuple[int, ...] | None = None

    def node(self, name: str) -> FloatNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def users(self, name: str) -> list[FloatNode]:
        return [n for n in self.nodes if name in n.data_inputs]
