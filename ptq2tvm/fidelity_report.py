"""How faithful is the fake-quant model to FP32, without labels: SQNR of each output and top-1 agreement on images
the model was not calibrated on, optionally per layer.

SQNR (dB) = 10 log10( sum(y_fp32^2) / sum((y_q - y_fp32)^2) ) over all elements (signal-to-quantization-noise
ratio, as in e.g. AIMET's and Brevitas' layer reports); top-1 agreement = fraction of images whose argmax is the
same, computed only for an output that is 2-D (N, classes). A model with several outputs (a tuple, list or dict of
tensors) gets one SQNR (and agreement) per output, in the integer graph's order; the report's headline
``sqnr_db`` is the worst output's, ``top1_agreement`` that of the first (N, classes) output (None without one). Per
layer, the fake-quant model's tensor is compared with the same tensor of its FP twin (BN folded,
quantizers off), each on its own inputs (errors accumulate through the network, as at inference).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import InputShapeError, ModelMismatchError
from .frontend.qmodel import QuantModel
from .model_outputs import batched_forward, flatten_outputs, shape_text, squashed_outputs

#: below this output SQNR (dB) or top-1 agreement the summary warns
LOW_SQNR_DB = 10.0
LOW_AGREEMENT = 0.9



def percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal, or two, truncated, where one would round a disagreement up to
    100.0% (0.9998 -> '99.98%', 0.99996 -> '99.99%', not '100.0%'); exactly 1 -> '100.0%'."""
    text = f"{100 * fraction:.1f}%"
    return f"{math.floor(10000 * fraction) / 100:.2f}%" if text == "100.0%" and fraction < 1 else text

def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(|ref|^2 / |got - ref|^2) in dB; +inf when equal."""
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((np.asarray(got, np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


@dataclass
class LayerFidelity:
    name: str
    op: str
    sqnr_db: float


@dataclass
class OutputFidelity:
    """One network output: ``name`` (the dict key of a dict model, else 'output i'), its ``shape`` over the compared
    images (N first), SQNR in dB, the top-1 agreement (fraction of images) when it is 2-D (N, classes), and the
    per-pixel argmax agreement (fraction of pixels) when it is a (N, classes, H, W) score map (segmentation)."""

    name: str
    shape: list[int]
    sqnr_db: float
    top1_agreement: float | None
    pixel_agreement: float | None = None


@dataclass
class FidelityReport:
    n_images: int
    held_out: bool | None        # False: measured on the calibration images themselves; None: not said (API)
    sqnr_db: float               # network output(s), fake-quant vs FP32: the worst output's
    top1_agreement: float | None  # of the first (N, classes) output; None when no output is 2-D
    per_layer: list[LayerFidelity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: list[OutputFidelity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sqnr_db"] = _db(d["sqnr_db"])
        for p in d["per_layer"] + d["outputs"]:
            p["sqnr_db"] = _db(p["sqnr_db"])
        return d

    @property
    def low(self) -> bool:
        agree = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        if self.top1_agreement is not None:
            agree.append(self.top1_agreement)
        return self.sqnr_db < LOW_SQNR_DB or any(a < LOW_AGREEMENT for a in agree)

    def summary(self, advice: str | None = None) -> str:
        """The report in lines; a low-fidelity warning ends with ``advice`` (:func:`low_fidelity_advice` of what the
        run already did; default: the advice for a calibration-only run)."""
        where = (f"{self.n_images} images" if self.held_out is None else
                 f"{self.n_images} images not used for calibration" if self.held_out else
                 f"{self.n_images} calibration images (no held-out images left)")
        if len(self.outputs) > 1:
            label = {o.name: o.name if o.name.startswith("output ") else repr(o.name) for o in self.outputs}
            wn = max(len(v) for v in label.values())
            ws = max(len(shape_text(o.shape)) for o in self.outputs)
            lines = [f"fidelity vs FP32 (no labels; {where}): {len(self.outputs)} outputs"]
            lines += [f"  {label[o.name]:<{wn}}  {shape_text(o.shape):<{ws}}  SQNR {o.sqnr_db:5.1f} dB"
                      + (f", top-1 agreement {percent(o.top1_agreement)}" if o.top1_agreement is not None else "")
                      + _pixel_text(o) for o in self.outputs]
        else:
            lines = [f"fidelity vs FP32 (no labels; {where}): output SQNR {self.sqnr_db:.1f} dB"
                     + (f", top-1 agreement {percent(self.top1_agreement)}" if self.top1_agreement is not None
                        else "") + (_pixel_text(self.outputs[0]) if self.outputs else "")]
        lines += [f"warning: {n}" for n in self.notes]        # about the images compared (raw pixels, NHWC, ...)
        if self.low:
            lines.append(f"warning: low fidelity (SQNR < {LOW_SQNR_DB:g} dB or agreement < {100 * LOW_AGREEMENT:g}%): "
                         "check the calibration data's preprocessing, or "
                         + (advice or low_fidelity_advice()))
        if self.per_layer:
            w = max(len(p.name) for p in self.per_layer)
            lines.append("per layer (fake-quant vs FP, SQNR dB):")
            lines += [f"  {p.name:<{w}}  {p.op:<7} {p.sqnr_db:6.1f}" for p in self.per_layer]
        return "\n".join(lines)


def low_fidelity_advice(method: str = "rtn", adaqtransform: bool = False, iters: int | None = None,
                        bits: tuple[int, int] | None = None, mixed: bool = False) -> str:
    """What to try after low fidelity, given what the run already did: calibration only (``method`` rtn) -> a
    reconstruction method; a reconstruction -> more ``iters``, AdaQTransform, more bits, mixed precision (only those
    not used already; ``bits`` = (W, A) of the run, ``mixed``: bits chosen per layer)."""
    more_bits = bits is None or min(bits) < 8
    if method == "rtn":
        return ("use more bits / " if more_bits else "") + "a reconstruction method (--method qdrop)"
    tries = [f"more --iters (this run: {iters})" if iters else "more --iters"]
    if not adaqtransform:
        tries.append("--adaqtransform")
    if method == "adaround":
        tries.append("block-wise --method qdrop")
    if method == "brecq":       # its roundings never saw quantized activations (paper / reference code): first
        tries.insert(0, "--method qdrop (BRECQ learns the roundings with FP activations, QDrop with quantized ones)")
    if more_bits:
        tries.append("more bits (--w-bits / --a-bits)")
    if not mixed and more_bits:
        tries.append("--mixed-precision (8 bits where the model is sensitive)")
    return f"--method {method} already reconstructed: try " + ", ".join(tries)


#: the layers --per-layer reports: every op that rounds onto a new grid (a lookup table's output grid, a squeeze-
#: excitation multiply, a concat's requantized inputs, an average pool's requantize are error sources of their own,
#: e.g. a 4-bit SiLU output; data movement (flatten, max pool, slices) only copies codes)
_REQUANTIZING_OPS = ("conv", "linear", "add", "mul", "lut", "clamp", "concat", "avgpool")


@torch.no_grad()
def fidelity_report(model: nn.Module, qm: QuantModel, images: np.ndarray, held_out: bool | None = None,
                    per_layer: bool = False, batch_size: int = 64,
                    model_name: str = "the FP32 model", image_notes: bool = True) -> FidelityReport:
    """Compare ``qm`` (fake-quant) with the FP32 ``model`` on ``images`` (float32 NCHW); see the module docstring.
    A model that only runs at batch 1 is run one image at a time, with a warning naming ``model_name``
    (:func:`ptq2tvm.model_outputs.batched_forward`). Raises DataError for images that are not a finite (N, C, H, W)
    array (numpy or torch), InputShapeError for images of another shape than the quantized model was traced for,
    and ModelMismatchError when the two models' outputs differ in number or shape. A float16 / bfloat16 / float64
    ``model`` runs as a float32 copy (the fake-quant model is float32). ``image_notes``: warn in the report about
    images that look unprocessed (raw 0..255 pixels, an integer dtype, channels-last: ``data.arrays.array_notes``);
    the command line warns about its data itself."""
    from .data import validate_images
    from .data.arrays import array_notes

    if isinstance(images, torch.Tensor):      # numpy has no bfloat16; integer tensors keep their dtype for the notes
        images = images.detach().cpu()
        images = (images.float() if images.dtype == torch.bfloat16 else images).numpy()
    notes = array_notes(images, "the fidelity image array") if image_notes and isinstance(images, np.ndarray) else []
    images = validate_images(images, "the fidelity image array")
    want = qm.graph.input_shape
    if want is not None and tuple(images.shape[1:]) != tuple(want):
        raise InputShapeError(f"the fidelity images are {tuple(images.shape)}; the quantized model was traced for "
                              f"(N, {', '.join(map(str, want))}) (the calibration images' shape)")
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).float()         # the user's model is left as it is
    model.eval()
    qm.eval()
    ref: list[list[np.ndarray]] = []
    got: list[list[np.ndarray]] = []
    keys = None
    for i, j, out in batched_forward(model, images, batch_size, model_name):   # batch 1 if it needs that
        x = torch.from_numpy(np.ascontiguousarray(images[i:j]))
        r, keys = flatten_outputs(out)
        g, _ = flatten_outputs(qm(x))
        if len(r) != len(g) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(r, g)):
            raise ModelMismatchError(
                f"{model_name} returns {len(r)} output(s) of shape(s) {', '.join(shape_text(t.shape) for t in r)}, "
                f"the fake-quant model {len(g)} of {', '.join(shape_text(t.shape) for t in g)}: compare the "
                "quantized model with the model it was quantized from")
        ref.append([t.float().numpy() for t in r])
        got.append([t.float().numpy() for t in g])
    outs: list[OutputFidelity] = []
    squashed = squashed_outputs(qm.graph)       # a sigmoid box / probability output: SQNR only, no top-1
    for j in range(len(ref[0])):
        ref_a = np.concatenate([b[j] for b in ref])
        got_a = np.concatenate([b[j] for b in got])
        agree = float(np.mean(ref_a.argmax(1) == got_a.argmax(1))) if ref_a.ndim == 2 and not squashed[j] else None
        pixels = (float(np.mean(ref_a.argmax(1) == got_a.argmax(1)))
                  if ref_a.ndim == 4 and ref_a.shape[1] > 1 and not squashed[j] else None)
        outs.append(OutputFidelity(keys[j] if keys else f"output {j}", list(ref_a.shape), sqnr_db(ref_a, got_a),
                                   agree, pixels))
    top1 = next((o.top1_agreement for o in outs if o.top1_agreement is not None), None)
    rep = FidelityReport(int(len(images)), held_out, min(o.sqnr_db for o in outs), top1, outputs=outs, notes=notes)
    if per_layer:
        fp = copy.deepcopy(qm).set_quant(weights=False, acts=False)
        sub = torch.from_numpy(np.ascontiguousarray(images[:batch_size]))
        env_q, env_f = qm(sub, return_all=True), fp(sub, return_all=True)
        for n in qm.graph.nodes:
            if n.op in _REQUANTIZING_OPS and n.name in env_q:
                rep.per_layer.append(LayerFidelity(n.name, n.op, sqnr_db(env_f[n.name].numpy(),
                                                                         env_q[n.name].numpy())))
    return rep


def _pixel_text(o: OutputFidelity) -> str:
    """', per-pixel argmax agreement 99.1%' for a (N, classes, H, W) score map; '' otherwise."""
    return "" if o.pixel_agreement is None else f", per-pixel argmax agreement {percent(o.pixel_agreement)}"


def _db(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 2)


__all__ = ["FidelityReport", "LayerFidelity", "OutputFidelity", "fidelity_report", "low_fidelity_advice", "sqnr_db"]
