"""The outputs of a graph (float or integer): one tensor or several (tuple / list / dict models, e.g. FPN levels)."""

from __future__ import annotations


class GraphOutputs:
    """Mixin of :class:`~ptq2tvm.frontend.graph.FloatGraph` and :class:`~ptq2tvm.ir.graph.IntegerGraph` (dataclasses
    with an ``output_names`` field): a single name given as a str becomes a one-element list, and ``output_name`` is
    the output of a single-output graph."""

    output_names: list[str]
    _noun = "graph"                 # names the graph in the error of ``output_name``

    def __post_init__(self) -> None:
        if isinstance(self.output_names, str):
            self.output_names = [self.output_names]
        self.output_names = list(self.output_names)

    @property
    def output_name(self) -> str:
        """The output of a single-output graph (ValueError for several: use ``output_names``)."""
        if len(self.output_names) != 1:
            raise ValueError(f"the {self._noun} has {len(self.output_names)} outputs; use output_names")
        return self.output_names[0]

    @output_name.setter
    def output_name(self, name: str) -> None:
        self.output_names = [name]
