"""Session 33 breaker pass on the Python API: what it found, as tests."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import one_torch_thread  # noqa: F401  (fixture)


class SpatialGate(nn.Module):
    """CBAM-style spatial attention: features (N, C, H, W) times a one-channel gate (N, 1, H, W), or (N, 1, 1, 1)
    with ``pooled``; ``gate_first`` swaps the operands."""

    def __init__(self, channels: int, gate_first: bool = False, pooled: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, channels, 3)
        self.b = nn.Conv2d(1, 1, 3)
        self.gate_first, self.pooled = gate_first, pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.a(x), torch.sigmoid(self.b(x))
        if self.pooled:
            g = g.mean((2, 3), keepdim=True)
        return g * a if self.gate_first else a * g


@pytest.mark.parametrize("channels,gate_first,pooled,target", [
    (8, False, False, None), (8, True, False, None), (24, False, False, None), (24, True, True, None),
    (24, False, False, "x86-64-v3"), (8, False, True, "x86-64-v3")])
def test_one_channel_gate_multiply_is_bit_exact(tmp_path, channels, gate_first, pooled, target):
    """A multiply by a one-channel gate broadcast over C channels: the blocked kernel read the gate's padding lanes
    for channels 1..15 (15784 of 21632 output codes wrong, up to 50 codes off; the SE gate (N, C, 1, 1) and same-shape
    multiplies were right). Now every channel reads lane 0 of the gate: the .so equals the reference executor and
    the fake-quant model, on the AVX-512 (this host's default) and AVX2 kernels, with 1 or 2 channel blocks."""
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 1, 20, 20)).astype(np.float32)
    test = rng.standard_normal((4, 1, 20, 20)).astype(np.float32)
    qm = quantize(SpatialGate(channels, gate_first, pooled).eval(), calib, QuantConfig(), progress=False)
    graph = to_integer(qm)
    mul = [n for n in graph.nodes if n.op == "mul"]
    assert len(mul) == 1 and sorted(graph.tensor(i).shape[0] for i in mul[0].inputs) == [1, channels]
    compile_so(graph, tmp_path / "m.so", batch=2, target=target)
    q = graph.input.quantize(test)
    got, want = CompiledModel(tmp_path / "m.so", threads=1).run_int(q), run_reference(graph, q)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} codes differ"
    fq = graph.outputs[0].quantize(qm(torch.from_numpy(test)).detach().numpy())
    assert np.array_equal(want, fq)


def test_one_channel_gate_multiply_in_cuda_emulation():
    """The CUDA build emits the same TE multiply as the x86 build (its arithmetic is checked above against the
    reference): with the one-channel gate's lane-0 indexing it still schedules for CUDA and runs in the CUDA
    emulation equal to the same PrimFunc compiled for this CPU."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    calib = np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)
    graph = to_integer(quantize(SpatialGate(24).eval(), calib, QuantConfig(), progress=False))
    checked = emulate_every_kernel(graph, batch=2, seed=3, only=lambda k: "mul" in k)
    assert checked, "no multiply kernel was emulated"


class GlobalMeanNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def mean_net():
    from ptq2tvm.api import quantize
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    model = GlobalMeanNet().eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    return model, quantize(model, calib, QuantConfig(), progress=False), rng.standard_normal((8, 1, 28, 28)).astype(
        np.float32)


def test_fake_quant_model_refuses_another_input_size(mean_net):
    """Calibrated at 28x28, the fake-quant model's global mean is a 14x14 pool: at 42x42 it averaged the top-left
    corner and returned wrong logits without a word (top-1 agreement 25%), at 20x20 torch's pool error."""
    from ptq2tvm.errors import InputShapeError

    model, qm, test = mean_net
    for shape, hint in (((2, 1, 42, 42), "quantize with images of this size"), ((2, 1, 20, 20), "this size"),
                        ((1, 28, 28), "add the batch dimension"), ((2, 28, 28, 1), "channels-last")):
        with pytest.raises(InputShapeError, match=r"traced for input \(N, 1, 28, 28\), got .*" + hint):
            qm(torch.zeros(shape))
    assert qm(torch.from_numpy(test)).shape == (8, 10)


def test_fidelity_checks_its_inputs_and_takes_any_float_model(mean_net):
    """fidelity() on one (C, H, W) image, NaN images, images of another size or a model with other outputs: one
    ptq2tvm error each (were IndexError, a silent 'SQNR nan dB', torch's pool error, a numpy broadcast error); a
    float16 / float64 FP32 model is compared through a float32 copy (was 'Input type (float) and bias type (Half)'),
    and the user's model keeps its dtype."""
    from ptq2tvm.api import fidelity
    from ptq2tvm.errors import DataError, InputShapeError, ModelMismatchError

    model, qm, test = mean_net
    with pytest.raises(DataError, match=r"must be \(N, C, H, W\), got shape \(1, 28, 28\)"):
        fidelity(model, qm, test[0])
    with pytest.raises(DataError, match="6272 NaN/Inf values"):
        fidelity(model, qm, np.full_like(test, np.nan))
    with pytest.raises(InputShapeError, match=r"\(8, 1, 32, 32\); the quantized model was traced for \(N, 1, 28, 28"):
        fidelity(model, qm, np.zeros((8, 1, 32, 32), np.float32))
    with pytest.raises(ModelMismatchError, match=r"returns 1 output\(s\) of shape\(s\) \(N, 3, 26, 26\), the "
                                                 r"fake-quant model 1 of \(N, 10\)"):
        fidelity(nn.Conv2d(1, 3, 3).eval(), qm, test)
    ref = fidelity(model, qm, torch.from_numpy(test))            # a torch tensor is fine
    for dtype in (torch.float16, torch.float64):
        other = GlobalMeanNet().to(dtype).eval()
        other.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        rep = fidelity(other, qm, test)
        assert next(other.parameters()).dtype == dtype                       # not converted in place
        assert rep.top1_agreement == ref.top1_agreement and abs(rep.sqnr_db - ref.sqnr_db) < 3, (dtype, rep)


def test_dict_items_give_their_image_or_a_clear_error():
    """{"image": ..., "label": ...} records (HuggingFace / albumentations style), one by one or collated by a
    DataLoader, give their image as (image, label) pairs do; a dict without one image key names the fix (was
    'float() argument must be ... not dict' from numpy)."""
    from ptq2tvm.data.transform import as_images
    from ptq2tvm.errors import DataError

    rng = np.random.default_rng(0)
    items = [{"image": torch.from_numpy(rng.random((1, 8, 8), dtype=np.float32)), "label": i} for i in range(6)]
    want = np.stack([it["image"].numpy() for it in items])
    assert np.array_equal(as_images(items), want)
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    assert np.array_equal(as_images(loader), want)
    assert as_images([{"pixel_values": np.zeros((3, 4, 4), np.float16)}]).dtype == np.float32
    with pytest.raises(DataError, match=r"calibration item 0 is a dict \(keys 'pix', 'y'\) holding none of the keys "
                                        r".*CalibrationData\(loader, lambda b: b\['pix'\]\)"):
        as_images([{"pix": np.zeros((1, 8, 8)), "y": 1}])
    with pytest.raises(DataError, match="holding more than one of the keys"):
        as_images([{"image": np.zeros((1, 8, 8)), "img": np.zeros((1, 8, 8))}])


def test_api_arguments_of_the_wrong_kind_get_clear_errors(mean_net, tmp_path):
    """to_integer on the FP32 model, compile_so on the fake-quant model, a float or string batch, and an output path
    that is a folder: a message saying what to pass (were AttributeError, TVM's InternalError, '<' not supported,
    IsADirectoryError naming a hidden temp file); nothing is written."""
    from ptq2tvm.api import compile_so, export_onnx, to_integer
    from ptq2tvm.errors import ArtifactError

    model, qm, _ = mean_net
    with pytest.raises(TypeError, match=r"to_integer needs the fake-quant model .*got GlobalMeanNet"):
        to_integer(model)
    graph = to_integer(qm)
    with pytest.raises(TypeError, match=r"got QuantModel; fold the fake-quant model first: to_integer\(qm\)"):
        compile_so(qm, tmp_path / "a.so")
    for batch in (2.5, "4", True):
        with pytest.raises(TypeError, match=r"batch must be an int >= 1, got"):
            compile_so(graph, tmp_path / "b.so", batch=batch)
    (tmp_path / "dir.so").mkdir()
    with pytest.raises(ArtifactError, match=r"dir.so is a directory, not a file"):
        compile_so(graph, tmp_path / "dir.so")
    (tmp_path / "g.npz").mkdir()
    with pytest.raises(ArtifactError, match=r"g.npz: it is an existing directory, not a file; nothing was written"):
        graph.save(tmp_path / "g.npz")
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(ArtifactError, match="existing directory"):
        export_onnx(graph, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.so", "g.npz", "m.onnx"]


def test_wrapped_models_are_looked_through_and_torchscript_is_named():
    """nn.DataParallel and torch.compile wrappers quantize as the module they wrap (the error blamed their
    forward(*inputs, **kwargs)); a TorchScript module is refused with what to pass instead (was fx's assertion)."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.errors import UnsupportedModelError
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    model = GlobalMeanNet().eval()
    calib = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    want = to_integer(quantize(model, calib, QuantConfig(), progress=False)).digest()
    assert to_integer(quantize(nn.DataParallel(model), calib, QuantConfig(), progress=False)).digest() == want
    for scripted in (torch.jit.script(model), torch.jit.trace(model, torch.from_numpy(calib[:1]))):
        with pytest.raises(UnsupportedModelError, match=r"TorchScript module .*pass the nn.Module itself, or export "
                                                        r"it to ONNX"):
            quantize(scripted, calib, QuantConfig(), progress=False)


# ---- a new user's first hour (session 33): a two-headed model, mixed precision --------------------------------------
class TwoHead(nn.Module):
    """Class logits (N, 10) and a sigmoid box (N, 4), as a user's detector-like model returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.body = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.cls = nn.Linear(16, 10)
        self.box = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor):
        f = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.cls(f.mean((2, 3))), torch.sigmoid(self.box(torch.flatten(f, 1)))


def test_a_squashed_output_is_not_read_as_class_scores():
    """A sigmoid (N, 4) box is not logits: no top-1 agreement for it (its 53% 'agreement' raised the low-fidelity
    warning on a 56 dB output), and the sensitivity's loss for it is the MSE, not a softmax KL."""
    from ptq2tvm.api import fidelity, quantize
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.model_outputs import squashed_outputs

    torch.manual_seed(0)
    model = TwoHead().eval()
    rng = np.random.default_rng(0)
    qm = quantize(model, rng.standard_normal((32, 1, 16, 16)).astype(np.float32), QuantConfig(), progress=False)
    assert squashed_outputs(qm.graph) == [False, True]
    rep = fidelity(model, qm, rng.standard_normal((16, 1, 16, 16)).astype(np.float32))
    assert rep.outputs[0].top1_agreement is not None and rep.outputs[1].top1_agreement is None
    assert "top-1" not in rep.summary().splitlines()[-1]             # the box line: SQNR only


def test_mixed_precision_plan_is_measured_against_the_uniform_plans_that_fit(tmp_path):
    """The ILP's plan against every uniform plan that meets the same budgets (none dominated), by the measured
    label-free output loss after RTN: the lowest wins and run.json says so (a user's two-head model got an ILP
    plan at 61% top-1 where uniform W4A8 fitting the budget gave 79%). A bad plan loses to uniform W8A8."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.mixed.allocate import MixedPlan
    from ptq2tvm.mixed.pipeline import pick_measured_plan, plan_mixed_precision

    torch.manual_seed(0)
    model = TwoHead().eval()
    calib = np.random.default_rng(0).standard_normal((64, 1, 16, 16)).astype(np.float32)
    plan = plan_mixed_precision(model, calib, QuantConfig(), {"size": "0.4"}, tmp_path, samples=2,
                                progress=False)
    losses = plan.measured.get("losses", {})
    assert set(losses) == {"ILP", "uniform W2A8"}, (plan.bits, losses)     # W2A4 is dominated by W2A8
    assert plan.measured["chosen"] == min(losses, key=losses.get) == plan.label()
    assert plan.predicted["size"] <= 0.4 * plan.w8a8["size"]
    # a plan with every free layer at W2A4 against uniform W8A8: the measurement picks W8A8
    layers = list(to_integer(quantize(model, calib, QuantConfig(), progress=False)).meta["layer_bits"])
    fixed = ["stem", "cls"]
    bad = MixedPlan({n: [8, 8] if n in fixed else [2, 4] for n in layers}, "hessian", 0.0, {}, {}, {}, fixed)
    bad.uniform = [MixedPlan({n: [8, 8] for n in layers}, "hessian", 1.0, {}, {}, {}, fixed, source="uniform W8A8")]
    chosen = pick_measured_plan(model, calib, QuantConfig(), bad)
    assert chosen.label() == "uniform W8A8" and chosen.measured["losses"]["ILP"] > chosen.measured["losses"][
        "uniform W8A8"]


def test_bundle_prints_top1_only_for_class_scores(tmp_path):
    """The bundle's run_model.py printed 'box (N, 4) top-1: [2, 2, 3 ...]' for a sigmoid box: now the class scores
    get top-1 and the squashed output its integer codes (and that --output holds them dequantized)."""
    import subprocess
    import sys

    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.bundle import make_bundle
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    graph = to_integer(quantize(TwoHead().eval(), rng.standard_normal((32, 1, 16, 16)).astype(np.float32),
                                QuantConfig(), progress=False))
    assert graph.meta["squashed_outputs"] == [False, True]
    compile_so(graph, tmp_path / "m.so")
    make_bundle(tmp_path / "m.so", tmp_path / "b", graph=graph)
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 1, 16, 16)).astype(np.float32))
    r = subprocess.run([sys.executable, str(tmp_path / "b" / "run_model.py"), "--input", str(tmp_path / "x.npy"),
                        "--output", str(tmp_path / "y.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, second = graph.output_names
    assert f"{first} (N, 10) top-1:" in r.stdout and f"{second} (N, 4) integer codes " in r.stdout, r.stdout
    assert "(--output holds them dequantized)" in r.stdout and f"{second} (N, 4) top-1" not in r.stdout


def test_loose_images_beside_a_class_folder_are_named(tmp_path):
    """A flat folder of 35 images plus one stray sub-folder calibrated on the sub-folder's single image, with only
    'only 1 calibration image(s)' to go by: the unused top-level images are now named in a warning."""
    from PIL import Image

    from ptq2tvm.data.image_folder import index_folder

    for i in range(5):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / f"img {i}.png")
    (tmp_path / "sub dir").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sub dir" / "x.png")
    with pytest.warns(UserWarning, match=r"the 5 image\(s\) directly in it \(img 0.png, ...\) are not used: it has "
                                         r"class folder\(s\) \(sub dir\) with 1 image\(s\)"):
        idx = index_folder(tmp_path)
    assert [p.name for p in idx.files] == ["x.png"]


def test_a_wrong_mean_is_noticed_at_the_first_batchnorm():
    """Grayscale images normalized with ImageNet's mean/std (0.449 / 0.226) for a model trained at 0.05 / 0.2 passed
    the scale check (RMS 1.9x, under its 4x) and quantized with 100% fidelity agreement; eval then read 12% top-1.
    The first conv's per-channel mean against its BatchNorm's running mean catches it; the right data does not warn,
    nor does a model whose BatchNorm never saw a batch."""
    from ptq2tvm.data.checks import input_scale_notes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU())
    raw = (np.random.default_rng(0).random((64, 1, 16, 16)) < 0.05).astype(np.float32)   # sparse strokes on black
    right, wrong = (raw - 0.05) / 0.2, (raw - 0.449) / 0.226
    assert input_scale_notes(model, right) == []                         # untrained BatchNorm: no verdict
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(right))
    model.eval()
    assert input_scale_notes(model, right) == []
    notes = input_scale_notes(model, wrong)
    assert len(notes) == 1 and "normalized with another mean than the training data (--mean / --std?)" in notes[0]


def test_segmentation_output_gets_a_per_pixel_agreement():
    """A (N, classes, H, W) score map gets the per-pixel argmax agreement next to its SQNR (a new user wrote their
    own mIoU script to see it); a (N, classes) output keeps top-1, and neither gets the other's figure."""
    from ptq2tvm.api import fidelity, quantize
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    rng = np.random.default_rng(0)
    calib, test = (rng.standard_normal((n, 1, 12, 12)).astype(np.float32) for n in (32, 8))
    qm = quantize(model, calib, QuantConfig(), progress=False)
    rep = fidelity(model, qm, test)
    o = rep.outputs[0]
    with torch.no_grad():
        want = float(np.mean(model(torch.from_numpy(test)).argmax(1).numpy() == qm(torch.from_numpy(test)).argmax(1)
                             .numpy()))
    assert o.top1_agreement is None and o.pixel_agreement == want > 0.9
    assert f"per-pixel argmax agreement {100 * want:.1f}%" in rep.summary()
    assert rep.to_dict()["outputs"][0]["pixel_agreement"] == want


@pytest.mark.parametrize("returns,says", [
    ("{'a': self.d(y), 'b': {'inner': y}}", "in the dict it returns, key 'b' is a dict"),
    ("(y, (y, y))", "in the tuple it returns, element 1 is a tuple"),
    ("[self.d(y), 3]", "in the list it returns, element 1 is an int"),
    ("()", "the model returns an empty tuple")])
def test_nested_outputs_name_the_element_at_fault(tmp_path, returns, says):
    """A nested output structure was refused without saying which key or element is nested."""
    import importlib.util

    from ptq2tvm.api import quantize
    from ptq2tvm.errors import UnsupportedModelError

    (tmp_path / "nested.py").write_text(
        "import torch.nn as nn\n\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.c, self.d = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1)\n\n    def forward(self, x):\n"
        f"        y = self.c(x)\n        return {returns}\n")
    spec = importlib.util.spec_from_file_location("nested_s33", tmp_path / "nested.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(UnsupportedModelError, match=re.escape(says)):
        quantize(mod.M().eval(), np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32), progress=False)


# ---- breaker pass on this session's changes ---------------------------------------------------------------------
class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blk, self.mid = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(
            8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.blk(torch.relu(self.mid(torch.relu(self.blk(torch.relu(self.stem(x))))))))
        return self.fc(x.mean((2, 3)))


def test_every_call_of_a_module_gets_its_bits_from_globs_and_the_api():
    """`--layer-bits '*blk=2'` / `'bl?=2'` and QuantConfig(layer_w_bits={'blk': 4}) reached the first call only
    (blk#1 stayed W8)."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.mixed.layerbits import resolve_layer_bits

    names = ["stem", "blk", "mid", "blk#1", "fc"]
    for spec in ("*blk=2", "bl?=2", "blk=2"):
        assert resolve_layer_bits(spec, names)[0] == {"blk": 2, "blk#1": 2}, spec
    assert resolve_layer_bits("*blk=2,blk#1=8", names)[0] == {"blk": 2, "blk#1": 8}
    torch.manual_seed(0)
    calib = np.random.default_rng(0).standard_normal((16, 1, 10, 10)).astype(np.float32)
    config = QuantConfig(layer_w_bits={"blk": 4})
    bits = to_integer(quantize(CalledTwice().eval(), calib, config, progress=False)).meta["layer_bits"]
    assert bits["blk"]["w_bits"] == bits["blk#1"]["w_bits"] == 4 and bits["mid"]["w_bits"] == 8
    assert config.layer_w_bits == {"blk": 4}                                  # the caller's config is unchanged


def test_a_relu_classifier_is_still_class_scores_and_relu6_is_squashed():
    """`relu(fc(x))` lost its top-1 agreement (any fused activation counted as squashing); a bounded one (ReLU6)
    squashes."""
    from ptq2tvm.api import quantize
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.model_outputs import squashed_outputs

    class Head(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.c, self.fc, self.act = nn.Conv2d(1, 4, 3), nn.Linear(4, 5), act

        def forward(self, x):
            return self.act(self.fc(torch.relu(self.c(x)).mean((2, 3))))

    calib = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    for act, squashed in ((nn.ReLU(), False), (nn.ReLU6(), True), (nn.Sigmoid(), True), (nn.Identity(), False)):
        torch.manual_seed(0)
        qm = quantize(Head(act).eval(), calib, QuantConfig(), progress=False)
        assert squashed_outputs(qm.graph) == [squashed], act


def test_hf_batch_features_and_pil_images_in_calibration_items():
    """A HuggingFace BatchFeature (a UserDict) with pixel_values was read as its keys ('could not convert string to
    float'); a PIL image got a channels-last hint."""
    from collections import UserDict

    from PIL import Image

    from ptq2tvm.data.transform import as_images
    from ptq2tvm.errors import DataError

    batch = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    assert np.array_equal(as_images([UserDict({"pixel_values": batch})]), batch)
    with pytest.raises(DataError, match=r"calibration item 0 is a PIL image \(Image, mode L\).*transform_fn"):
        as_images([{"image": Image.fromarray(np.zeros((8, 8), np.uint8)), "label": 1}])


def test_fidelity_warns_about_raw_pixel_images(mean_net):
    """fidelity() on raw 0..255 images reported SQNR 0.5 dB and blamed the calibration preprocessing; the images
    passed in are now named."""
    from ptq2tvm.api import fidelity

    model, qm, test = mean_net
    raw = np.round(np.random.default_rng(1).random((4, 1, 28, 28)) * 255).astype(np.uint8)
    text = fidelity(model, qm, raw).summary()
    assert "warning: the fidelity image array has integer dtype uint8" in text
    assert "warning: the fidelity image array values lie in [" in text and "look like raw pixels" in text
    assert "warning: the fidelity image array" not in fidelity(model, qm, test).summary()


def test_compiled_model_returns_the_models_structure_on_request(tmp_path):
    """`CompiledModel(...)(x)` gives a list for a dict model, so `out["logits"]` broke when the .so replaced the
    fake-quant model; `.structured(x)` gives the dict (a tuple model's tuple, one model's array), equal to the
    fake-quant model's outputs under no_grad."""
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig

    class DictHead(TwoHead):
        def forward(self, x):
            logits, box = super().forward(x)
            return {"logits": logits, "box": box}

    rng = np.random.default_rng(0)
    calib, test = (rng.standard_normal((n, 1, 16, 16)).astype(np.float32) for n in (32, 4))
    for cls, kind in ((DictHead, dict), (TwoHead, tuple)):
        torch.manual_seed(0)
        qm = quantize(cls().eval(), calib, QuantConfig(), progress=False)
        compile_so(to_integer(qm), tmp_path / f"{cls.__name__}.so")
        cm = CompiledModel(tmp_path / f"{cls.__name__}.so", threads=1)
        out = cm.structured(test)
        with torch.no_grad():
            fq = qm(torch.from_numpy(test))
        assert type(out) is kind and type(fq) is kind and isinstance(cm(test), list)
        pairs = [(out[k], fq[k]) for k in fq] if kind is dict else list(zip(out, fq))
        assert list(out) == list(fq) if kind is dict else len(out) == 2
        for got, want in pairs:
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
