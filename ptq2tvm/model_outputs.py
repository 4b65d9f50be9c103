"""A model's outputs as one flat list, in the integer graph's order (one tensor; a tuple / list in order; a dict's
values in insertion order: how :mod:`ptq2tvm.frontend.trace` flattens them), with labels for messages, and which
output is the classification one (the first 2-D (N, classes) tensor)."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Iterator, Sequence

from .errors import DataError, first_line

_printed: set[str] = set()


def flatten_outputs(out: Any) -> tuple[list[Any], list[str] | None]:
    """``out`` (a tensor / array, a tuple or list of them, or a dict of them) -> (the outputs in graph order, the dict
    keys or None). Raises :class:`DataError` for anything else."""
    if isinstance(out, dict):
        return list(out.values()), [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return list(out), None
    if hasattr(out, "shape"):
        return [out], None
    raise DataError(f"the model returned {type(out).__name__}, not a tensor or a tuple / list / dict of tensors")


def arrange_outputs(structure: Any, values: Sequence[Any]) -> Any:
    """Per-output ``values`` (graph order) arranged as the traced model returned them, by its ``output_structure``
    (None: the one value; ["tuple", n] / ["list", n]; ["dict", keys])."""
    if not structure:
        return values[0]
    if structure[0] == "dict":
        return dict(zip(structure[1], values))
    return list(values) if structure[0] == "list" else tuple(values)


def structure_keys(structure: Any) -> list[str] | None:
    """The dict keys of an ``output_structure`` (sidecar / graph meta: None, ["tuple", n], ["dict", keys])."""
    return [str(k) for k in structure[1]] if structure and structure[0] == "dict" else None


def output_label(i: int, keys: Sequence[str] | None) -> str:
    """'output 0', or "output 1 'logits'" for a dict model."""
    return f"output {i}" + (f" {keys[i]!r}" if keys else "")


def shape_text(shape: Sequence[int]) -> str:
    """(N, 4) for a batch of (4,) outputs."""
    return "(N" + "".join(f", {int(d)}" for d in shape[1:]) + ")"


#: graph ops whose result is squashed into a range (sigmoid / tanh / ... lookup tables): an (N, k) output they
#: produce is a probability or a bounded regression (a box), not class scores; so is a clamp with an upper bound
#: (ReLU6, Hardtanh; a ReLU alone leaves scores comparable)
SQUASHING_OPS = ("lut",)


def squashed_outputs(graph: Any) -> list[bool]:
    """Per output of ``graph`` (the fake-quant model's FloatGraph), in ``output_names`` order: whether its last op
    squashes it into a range (:data:`SQUASHING_OPS`, or a clamp / fused activation with a finite upper bound), so that
    an (N, k) output is not read as class scores (no softmax-KL sensitivity, no top-1 agreement).
    ``torch.sigmoid(self.box(f))`` is squashed, ``relu(self.fc(f))`` is not; a plain ``nn.Linear`` output reads as
    logits, whatever it means."""
    by_name = {n.name: n for n in graph.nodes}
    names = graph.output_names if isinstance(graph.output_names, list) else [graph.output_names]
    out = []
    for name in names:
        n = by_name.get(name)
        act = getattr(n, "act", None)
        out.append(n is not None and (n.op in SQUASHING_OPS or (act is not None and math.isfinite(act[1]))))
    return out


def first_classification_output(shapes: Sequence[Sequence[int]]) -> int | None:
    """Index of the first 2-D (N, classes) output among batch ``shapes``; None when there is none."""
    return next((i for i, s in enumerate(shapes) if len(s) == 2), None)


def classification_index(shapes: Sequence[Sequence[int]], keys: Sequence[str] | None = None,
                         note: bool = True) -> int:
    """The first output that is 2-D (N, classes): what top-1 is computed on. With several outputs, says once on
    stderr which one is scored (``note``). Raises :class:`DataError` (one line, listing every output's shape) when
    no output is 2-D."""
    idx = first_classification_output(shapes)
    listing = ", ".join(f"{output_label(i, keys)} {shape_text(s)}" for i, s in enumerate(shapes))
    if idx is None:
        raise DataError(f"no output of the model is (N, classes): {listing}; top-1 accuracy needs a classification "
                        "output")
    if len(shapes) > 1 and note:
        msg = (f"note: the model has {len(shapes)} outputs ({listing}); top-1 of {output_label(idx, keys)} "
               f"{shape_text(shapes[idx])}, the first (N, classes) one")
        if msg not in _printed:
            _printed.add(msg)
            print(msg, file=sys.stderr)
    return idx


def batched_forward(model: Any, images: Any, batch_size: int,
                    name: str | None = None) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, model(images[start:stop]))`` over float32 (N, C, H, W) ``images`` in batches of
    ``batch_size`` (as torch tensors; call it under ``torch.no_grad()``). A model that fails on a batch of several
    images but runs on one (a forward that hard-codes batch 1, e.g. ``x.view(1, -1)``) runs one image at a time from
    there on, with a :class:`UserWarning` naming the model (``name``, default its class) and the batch that failed.
    Raises what the model raises when it fails on one image too."""
    import numpy as np
    import torch

    label = name or type(model).__name__
    start, size = 0, max(int(batch_size), 1)
    while start < len(images):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + size]))
        try:
            out = model(x)
        except Exception as e:  # noqa: BLE001 - the model's own error: retried at batch 1 below
            if len(x) <= 1:
                raise
            try:
                model(x[:1])
            except Exception:  # noqa: BLE001 - it fails on one image too: the first error is the one to see
                raise e from None
            warnings.warn(f"{label} fails on a batch of {len(x)} images ({first_line(e)}) and runs on one image: "
                          "running it one image at a time (its forward probably hard-codes batch 1)", UserWarning,
                          stacklevel=2)
            size = 1
            continue
        yield start, start + len(x), out
        start += len(x)


__all__ = ["SQUASHING_OPS", "arrange_outputs", "batched_forward", "classification_index", "first_classification_output", "flatten_outputs",
           "output_label", "shape_text", "squashed_outputs", "structure_keys"]
