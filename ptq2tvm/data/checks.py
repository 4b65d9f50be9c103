"""Does the calibration data fit the model? Checks run before tracing, so a mismatch gets one clear line.

- :func:`check_input_channels`: the images' channel count against the ``Conv2d`` that runs first on the input
  (``in_channels``; :func:`first_conv`: call order, not registration order), with a hint when the array looks
  channels-last. Only when that conv reads the network input itself: a model that changes the channels before its
  first conv (a space-to-depth ``PixelUnshuffle`` stem, ``torch.cat([x, x, x], 1)`` for grayscale input) or whose
  first conv cannot be found gets no verdict (the trace and the calibration report a real mismatch).
- :func:`check_fixed_input_shape`: the images' (H, W) against a model's fixed input dimensions (an ONNX model's
  input: ``model.fixed_input_shape``, set by :func:`ptq2tvm.onnx_import.onnx_to_torch`); channels are the first
  check's.
- :func:`input_scale_notes`: the scale of the first conv's output on the data against the running statistics of
  the ``BatchNorm2d`` after it, i.e. against the inputs the model saw in training. Raw 0..255 pixels given to a model
  trained on normalized inputs come out ~100x off.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn

from ..errors import DataError
from .arrays import looks_nhwc


class _Reached(Exception):
    """Raised by the probe's forward pre-hook at the first ``nn.Conv2d`` a forward reaches; ``reads_input``: the
    conv was called on the very tensor passed to the model."""

    def __init__(self, name: str, reads_input: bool):
        super().__init__(name)
        self.name = name
        self.reads_input = reads_input


#: modules that cannot change the channel count of their input (between the network input and its first conv)
_SAME_CHANNEL_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: tensor methods that keep the shape (``x.float()``, ``x.contiguous()``)
_SAME_SHAPE_METHODS = ("float", "contiguous", "clone", "detach")


def _reads_input(node, modules: dict[str, nn.Module]) -> bool:
    """True when fx ``node`` is the network input (the graph's first placeholder) or is computed from it only by
    ops that cannot change its channel count: :data:`_SAME_CHANNEL_MODULES`, :data:`_SAME_SHAPE_METHODS` and
    ``+ - * /`` by plain numbers (normalization by constants; a tensor operand could broadcast the channels, so it
    stops the walk). Anything else (``PixelUnshuffle``, ``torch.cat``, a user module) -> False."""
    import operator

    arith = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div)
    while True:
        if node.op == "placeholder":
            return next(n for n in node.graph.nodes if n.op == "placeholder") is node
        if node.op == "call_module" and type(modules.get(str(node.target))) in _SAME_CHANNEL_MODULES and node.args:
            node = node.args[0]
        elif node.op == "call_method" and node.target in _SAME_SHAPE_METHODS and len(node.args) == 1:
            node = node.args[0]
        elif (node.op == "call_function" and node.target in arith and len(node.args) == 2 and not node.kwargs
              and sum(hasattr(a, "op") for a in node.args) == 1
              and all(hasattr(a, "op") or isinstance(a, (int, float)) for a in node.args)):
            node = next(a for a in node.args if hasattr(a, "op"))
        else:
            return False
        if not hasattr(node, "op"):
            return False


def _traced_first_conv(model: nn.Module) -> tuple[str, str | None, bool] | None:
    """(name of the first ``nn.Conv2d`` called in the model's torch.fx graph, name of the module called on its output
    or None, whether it reads the network input itself (:func:`_reads_input`)); None when fx cannot trace the model
    or its graph calls no Conv2d. Every Conv2d is a leaf (a subclass too), so the graph's call order is the order the
    convs run in."""
    import torch.fx as fx

    from ..frontend.trace import _forward_params

    class ConvLeaf(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)

    params = _forward_params(model) or []
    concrete = {p.name: p.default for p in params[1:]
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not p.empty}
    modules = dict(model.named_modules())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = ConvLeaf().trace(model, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - fx raises many types; the probe below decides
        return None
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Conv2d):
            users = [u for u in node.users if u.op == "call_module"]
            reads = bool(node.args) and hasattr(node.args[0], "op") and _reads_input(node.args[0], modules)
            return str(node.target), (str(users[0].target) if len(node.users) == 1 and users else None), reads
    return None


@torch.no_grad()
def _probed_first_conv(model: nn.Module) -> tuple[str, bool] | None:
    """(name of the first ``nn.Conv2d`` a forward on zeros reaches (forward pre-hooks stop it there), whether that
    conv is called on the tensor passed to the model itself (``is``)), trying each distinct ``in_channels`` of the
    model's convs at 224x224 and 32x32; the first whose conv takes that many channels. None when no probe reaches
    one."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    probe: list[torch.Tensor] = []

    def stop(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            raise _Reached(name, bool(args) and bool(probe) and args[0] is probe[0])
        return hook

    handles = [m.register_forward_pre_hook(stop(n)) for n, m in convs]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for c in dict.fromkeys(int(m.in_channels) for _, m in convs):
            for size in (224, 32):
                probe[:] = [torch.zeros(1, c, size, size)]
                try:
                    model(probe[0])
                except _Reached as r:
                    if int(dict(convs)[r.name].in_channels) == c:
                        return r.name, r.reads_input
                except Exception:  # noqa: BLE001 - this probe does not fit the model: try the next
                    continue
    finally:
        for h in handles:
            h.remove()
        for m, was in flags:
            m.training = was
        probe.clear()
    return None


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The ``nn.Conv2d`` that runs first, reading the network input itself (the stem of a usual CNN), or None.

    Found in the model's torch.fx graph (call order; the conv's input must be the graph's input, directly or through
    ops that cannot change the channel count: :func:`_reads_input`), else by a probe forward that stops at the first
    conv it reaches (:func:`_probed_first_conv`; the conv must be called on the tensor passed in). None when the model
    has no Conv2d, when its first conv reads something computed from the input (``PixelUnshuffle``, ``torch.cat``,
    ...: its ``in_channels`` says nothing about the data's channels), and when neither finds the first conv (no guess
    from registration order: a model may register its head before its stem). Raises nothing."""
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.Conv2d) for m in modules.values()):
        return None
    traced = _traced_first_conv(model)
    if traced is not None:
        name = traced[0] if traced[2] else None
    else:
        probed = _probed_first_conv(model)
        name = probed[0] if probed is not None and probed[1] else None
    return (name, modules[name]) if name is not None else None


def expected_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: ``in_channels`` of the Conv2d that runs first on the input
    (:func:`first_conv`); None when there is none, or it cannot be told."""
    fc = first_conv(model)
    return int(fc[1].in_channels) if fc is not None else None


def check_input_channels(model: nn.Module, images: np.ndarray, what: str = "calibration data",
                         source: str | None = None) -> None:
    """Raise :class:`DataError` when ``images`` (N, C, H, W) do not have the channels of the model's first conv.
    No verdict (nothing raised for the channels) when :func:`first_conv` finds none that reads the input itself.

    The hint fits where the images came from (``source``): ``"folder"`` (an image folder: ``--channels``),
    ``"preprocess"`` (a ``--preprocess`` function: what it must return), ``"builtin"`` (the 1-channel built-in
    datasets), ``"array"`` or None (an array: convert its channels); an array that looks channels-last gets the
    transpose whatever the source. Then :func:`check_fixed_input_shape` (height and width), so that a channel
    mismatch gets the channel hint even for a model with a fixed input."""
    fc = first_conv(model)
    if fc is not None and images.ndim == 4:
        name, conv = fc
        want, have = int(conv.in_channels), int(images.shape[1])
        if have != want:
            raise DataError(f"the model expects {want}-channel input (its first conv '{name}' has "
                            f"in_channels={want}), the {what} has {have} channel(s) "
                            f"(shape {tuple(images.shape)}){channel_hint(want, have, images.shape, source)}")
    check_fixed_input_shape(model, images, what)


def check_fixed_input_shape(model: nn.Module, images: np.ndarray, what: str = "calibration data") -> None:
    """Raise :class:`DataError` when ``model.fixed_input_shape`` (e.g. an ONNX input's dims: ints where fixed, None
    where dynamic) fixes a height / width that differs from the images' (N, C, H, W). The batch dimension is not
    compared, nor the channels: :func:`check_input_channels` checks them against the first conv, with hints that fit
    the data (channels-last arrays, ``--channels`` for a folder). Models without the attribute pass."""
    fixed = getattr(model, "fixed_input_shape", None)
    if fixed is None or images.ndim != 4 or len(fixed) != 4:
        return
    if all(f is None or int(f) == int(h) for f, h in zip(fixed[2:], images.shape[2:])):
        return
    shown = "(" + ", ".join("?" if f is None else str(f) for f in fixed) + ")"
    source = getattr(model, "fixed_input_source", "the model")
    raise DataError(f"{source} has the fixed input shape {shown}, the {what} has shape {tuple(images.shape)}: give "
                    f"images of that size, or export the model at the data's size (or with dynamic height/width)")


def channel_hint(want: int, have: int, shape: tuple[int, ...], source: str | None) -> str:
    """The '; ...' end of the channel-mismatch message for data from ``source`` (see :func:`check_input_channels`)."""
    nhwc = looks_nhwc(shape) and shape[3] == want
    if source == "preprocess":
        return ("; the --preprocess function returns channels-last (H, W, C) arrays: return arr.transpose(2, 0, 1)"
                if nhwc else f"; the --preprocess function must return ({want}, H, W) arrays (channels first), "
                f"it returned {have} channel(s)")
    if nhwc:
        return "; the array looks channels-last (N, H, W, C): use x.transpose(0, 3, 1, 2)"
    if source == "folder":
        return f"; pass --channels {want}" if want in (1, 3) else \
            f"; a {want}-channel model needs --preprocess file.py:fn returning ({want}, H, W) arrays"
    if source == "builtin":
        return f"; the built-in datasets are 1-channel: give {want}-channel data of your own (--data)"
    how = ("x.mean(1, keepdims=True) for grayscale" if want == 1 else
           "np.repeat(x, 3, axis=1) for grayscale images" if want == 3 and have == 1 else
           f"keep the model's {want} channels")
    return (f"; convert the array's channels before saving it (e.g. {how})" if source == "array" else
            f"; convert the images' channels (e.g. {how})")


@torch.no_grad()
def input_scale_notes(model: nn.Module, images: np.ndarray, max_images: int = 64, factor: float = 4.0,
                      mean_shift: float = 0.3, trained_factor: float = 1.5) -> list[str]:
    """A warning when the data's scale differs by more than ``factor`` from what the model saw in training, judged
    at the first conv: the RMS of its output on the data (minus the BN running mean) against the BN's running std;
    or when its per-channel mean is on average more than ``mean_shift`` running stds from the BN's running mean (a
    wrong mean, same scale; skipped for a BatchNorm that never saw a batch). Measured on a user's model: right
    preprocessing 0.00-0.01, ImageNet's mean/std on grayscale data trained at 0.05 / 0.2: 1.5.

    A BatchNorm that has seen data (running statistics moved from their initial 0 / 1, or batches counted) is judged
    by ``trained_factor`` instead of ``factor``: on Fashion-MNIST models (mean 0.286, std 0.353; a user's CNN and the
    zoo's resnet_small trained with crop + flip), the right preprocessing gives an RMS ratio of 0.99-1.05 and a shift
    of 0.01, while the image-folder defaults (ImageNet's mean/std averaged: 0.449 / 0.226, what ``--mean``/``--std``
    left out gives) give 1.67-1.75x and 0.41-0.48 (FP32 top-1 82% -> 17%), unnormalized [0, 1] images 0.39-0.45x,
    and mean/std 0.5 / 0.5 0.79-0.83x with a shift of 0.27-0.31 (80% agreement with FP32): all passed the 4x / 1.0
    thresholds. A BatchNorm at its initial statistics (random weights) keeps the loose ``factor``: a fresh conv's
    output has no training scale to compare with. Empty when the model has no Conv2d followed by a BatchNorm2d, or
    when the data fits."""
    modules = dict(model.named_modules())
    traced = _traced_first_conv(model)
    if traced is not None:
        fc = (traced[0], modules[traced[0]]) if traced[2] else None
    else:
        fc = first_conv(model)
    if fc is None:
        return []
    cname, conv = fc
    bn = modules.get(traced[1]) if traced is not None and traced[1] is not None else None   # called on its output
    if not isinstance(bn, nn.BatchNorm2d):            # else the first BatchNorm2d registered after the conv
        names = list(modules)
        bn = next((modules[n] for n in names[names.index(cname) + 1:] if isinstance(modules[n], nn.BatchNorm2d)),
                  None)
    if bn is None or bn.num_features != conv.out_channels or bn.running_var is None:
        return []
    x = torch.from_numpy(np.ascontiguousarray(images[:max_images], dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != conv.in_channels:
        return []
    try:
        y = conv(x)
    except Exception:  # noqa: BLE001 - a shape problem is reported by the trace, not here
        return []
    dev = (y - bn.running_mean.view(1, -1, 1, 1)).pow(2).mean((0, 2, 3))
    var = bn.running_var.clamp_min(1e-12)
    ratio = math.sqrt(float((dev / var).mean()))
    # a BatchNorm that saw data: counted batches, or running statistics away from their initial 0 / 1 (a checkpoint
    # converted without num_batches_tracked loads it as 0)
    trained = (bn.num_batches_tracked is None or int(bn.num_batches_tracked) > 0
               or bool((bn.running_mean != 0).any()) or bool((bn.running_var != 1).any()))
    size = f"{ratio:.3g}x larger" if ratio > 1 else f"{1 / ratio:.3g}x smaller"
    scale_note = [f"the first conv '{cname}' sees inputs about {size} than in training (its output against the "
                  "running statistics of the BatchNorm after it): the data is probably not preprocessed like the "
                  "training data (raw 0..255 pixels? unnormalized 0..1? other mean/std: --mean / --std?)"]
    if not 1 / factor <= ratio <= factor:
        return scale_note
    # a wrong mean keeps the scale: grayscale images normalized with ImageNet's 0.449 / 0.226 instead of the
    # training set's 0.05 / 0.2 shifted every channel of the first conv by 1.5 of its training std (rms ratio 1.9)
    shift = float(((y.mean((0, 2, 3)) - bn.running_mean).abs() / var.sqrt()).mean())
    if trained and shift > mean_shift:
        return [f"the first conv '{cname}' sees inputs centred {shift:.2g} of its training standard deviation away "
                "from where they were in training (its output's mean against the running mean of the BatchNorm "
                "after it, averaged over channels): the data is probably normalized with another mean than the "
                "training data (--mean / --std?)"]
    if trained and not 1 / trained_factor <= ratio <= trained_factor:
        return scale_note
    return []


__all__ = ["channel_hint", "check_fixed_input_shape", "check_input_channels", "expected_channels", "first_conv", "input_scale_notes"]
