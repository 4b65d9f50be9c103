"""Reliability (issue 11): int32 accumulator bounds proven at fold time, degenerate channels and ranges that fold,
non-finite activations that name their cause, artifacts that cannot run code, disk-full and concurrent use."""

from __future__ import annotations

import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.api import load_fp32, quantize, save_fp32, to_integer, ModelSpec
from ptq2tvm.errors import ArtifactError, QuantConfigError, UnsupportedModelError
from ptq2tvm.fold.bounds import INT32_MAX, INT32_MIN, accumulator_range
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.reconstruct import ReconSettings


def _bounded(graph) -> None:
    """Every conv/dense accumulator of ``graph`` provably inside int32, for every input."""
    env_q = {graph.input.name: graph.input}
    for n in graph.nodes:
        env_q[n.name] = n.out
        if n.op in ("conv2d", "dense"):
            lo, hi = accumulator_range(n.arrays["weight"], n.arrays["bias"], env_q[n.inputs[0]].qmax)
            assert lo.min() >= INT32_MIN and hi.max() <= INT32_MAX, n.name


def _compile_exact(tmp_path: Path, graph, q: np.ndarray, schedule: str) -> np.ndarray:
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.backend.runtime import CompiledModel

    so = tmp_path / f"m_{schedule}.so"
    compile_graph(graph, so, batch=len(q), schedule=schedule)
    out = CompiledModel(so).run_int(q)
    ref = run_reference(graph, q)
    assert np.array_equal(out, ref), f"{schedule}: {int((out != ref).sum())} mismatches"
    return out


# ---- 1. int32 accumulator bound ----------------------------------------------------------------------------------
def _wide_conv() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(1400, 4, 7), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        m[0].weight.fill_(0.01)          # every weight code +127 at W8
        m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([[1e-3, 0, 0, 0], [0, 1e-3, 0, 0], [0, 0, 1e-3, 1e-3]]))
        m[2].bias.zero_()
    return m


def _wide_calib() -> np.ndarray:
    calib = np.random.default_rng(0).uniform(0, 1, (6, 1400, 7, 7)).astype(np.float32)
    calib[:2] = 1.0
    return calib


def test_accumulator_bound_conv1400_all_positive_weights(tmp_path):
    """68,600 x 255 x 127 > 2^31: the weight grid of the 4 channels is coarsened just enough (codes 122), the .so
    returns FP32's [0.69, 0.69, 1.37] on the all-ones image (it returned [0, 0, 0])."""
    m = _wide_conv()
    with pytest.warns(RuntimeWarning, match=r"layer '0' channel\(s\) \[0, 1, 2, 3\]"):
        qm = quantize(m, _wide_calib(), QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)
    _bounded(graph)
    assert 120 <= int(graph.nodes[0].arrays["weight"].max()) < 127
    ones = np.ones((1, 1400, 7, 7), np.float32)
    fp = m(torch.from_numpy(ones)).detach().numpy()[0]
    q = graph.input.quantize(ones)
    out = graph.output.dequantize(_compile_exact(tmp_path, graph, q, "auto"))[0]
    fq = qm(torch.from_numpy(ones)).detach().numpy()[0]
    np.testing.assert_allclose(fp, [0.686, 0.686, 1.373], atol=2e-3)
    np.testing.assert_allclose(out, fp, atol=0.01)
    np.testing.assert_array_equal(out, fq)


def test_fold_refuses_an_unbounded_layer_naming_it_and_the_bound():
    m = _wide_conv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(m, _wide_calib(), QuantConfig(8, 8), progress=False)
    qm.layer("0").wq.scale.data.fill_(0.01 / 127)            # the calibrated scale, before the fit
    with pytest.raises(QuantConfigError, match=r"layer '0': the int32 accumulator of output channel 0 can reach "
                                               r"\[0, 2\.2\d*e\+09\].*255 x 68600"):
        to_integer(qm)


# ---- 2. zero-weight channels with a bias ------------------------------------------------------------------------
def _dead_channel_net(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      *([nn.BatchNorm2d(8)] if bn else []), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 5)).eval()
    with torch.no_grad():
        if bn:                                   # gamma 0, beta 0.5: the BN-folded weights are 0, the bias 0.5
            m[3].weight[2] = 0.0
            m[3].bias[2] = 0.5
        else:
            m[2].weight[2] = 0.0
            m[2].bias[2] = 0.5
    return m


@pytest.mark.parametrize("bn,schedule", [(False, "auto"), (True, "plain")])
def test_zero_weight_channel_with_bias_folds_exactly(tmp_path, bn, schedule):
    m = _dead_channel_net(bn)
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"layer '2' channel\(s\) \[2\].*1 channel\(s\) with all-zero integer weights"):
        qm = quantize(m, x, QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)                      # raised "the int32 bias overflows (6.5e+15)"
    _bounded(graph)
    conv = graph.nodes[1]
    assert not conv.arrays["weight"][2].any() and abs(int(conv.arrays["bias"][2])) > 1 << 30
    acc_scale = float(qm.layer("2").wq.scale.detach()[2]) * graph.nodes[0].out.scale
    assert abs(conv.arrays["bias"][2] * acc_scale - 0.5) < 1e-8           # the constant, exactly
    q = graph.input.quantize(x[:4])
    out = graph.output.dequantize(_compile_exact(tmp_path, graph, q, schedule))
    fq = qm(torch.from_numpy(x[:4])).detach().numpy()
    fp = m(torch.from_numpy(x[:4])).detach().numpy()
    np.testing.assert_array_equal(out, fq)
    assert np.abs(out - fp).max() < 0.02 * np.abs(fp).max()


# ---- 3. the same after QDrop + AdaQTransform --------------------------------------------------------------------
class _InvRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.exp = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                nn.ReLU6())
        self.proj = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.proj(self.dw(self.exp(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_qdrop_adaqtransform_with_zero_channels_folds(tmp_path):
    torch.manual_seed(0)
    m = _InvRes().eval()
    with torch.no_grad():
        for bn in (m.exp[1], m.dw[1], m.proj[1]):
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        m.exp[0].weight[5] = 0.0
        m.dw[0].weight[7] = 0.0
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(m, x, QuantConfig(4, 4), method="qdrop", progress=False,
                      settings=ReconSettings(method="qdrop", adaqtransform=True, iters=12, batch_size=4))
    assert float(qm.layer("dw.0").eta.detach().abs()[7]) > 0          # eta learned on the all-zero channel
    graph = to_integer(qm)                       # failed on 'dw.0' (weight scale ~1e-13)
    _bounded(graph)
    dw = next(n for n in graph.nodes if n.name == "dw.0")
    assert not dw.arrays["weight"][7].any()
    q = graph.input.quantize(x)
    out = graph.output.dequantize(run_reference(graph, q))
    fq = qm(torch.from_numpy(x)).detach().numpy()
    assert np.abs(out - fq).max() <= 2 * graph.output.scale


# ---- 4. degenerate activation ranges ----------------------------------------------------------------------------
def test_all_zero_calibration_images_fold_and_name_the_collapsed_input():
    m = _dead_channel_net(False)
    zeros = np.zeros((8, 3, 16, 16), np.float32)
    with pytest.warns(RuntimeWarning, match=r"range of tensor 'input\w*' collapsed to \[0, 0\]"):
        qm = quantize(m, zeros, QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)
    _bounded(graph)
    out = graph.output.dequantize(run_reference(graph, graph.input.quantize(zeros[:2])))
    fp = m(torch.from_numpy(zeros[:2])).detach().numpy()
    assert np.abs(out - fp).max() <= graph.output.scale               # the constant output, one LSB


def test_relu_dead_on_every_image_folds_and_is_named():
    m = _dead_channel_net(False)
    with torch.no_grad():
        m[0].bias.fill_(-100.0)                 # the first ReLU outputs 0 on every image
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"range of tensor '0' collapsed to \[0, 0\].*after a ReLU"):
        qm = quantize(m, x, QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)                      # the next layer ('2') was blamed: "the int32 bias overflows"
    _bounded(graph)
    out = graph.output.dequantize(run_reference(graph, graph.input.quantize(x)))
    fp = m(torch.from_numpy(x)).detach().numpy()
    assert np.abs(out - fp).max() <= 2 * graph.output.scale


def test_residual_sum_dead_on_every_image_folds():
    """Found by the fuzzer: relu(shortcut(x) + f(x)) is 0 on every calibration image, so its scale collapsed to
    1e-8 / qmax and the fused residual's multiplier s_r / s_out was 2.5e9 ("requantization multiplier too large")."""
    from ptq2tvm.fuzz import check_spec

    spec = {"input_shape": [1, 12, 9], "chain": [
        {"op": "residual", "two": False, "shortcut": True, "depthwise": True, "act": "relu", "lo": 0.25, "hi": 1.25,
         "degenerate": "none", "channels": []}, {"op": "maxpool", "k": 3, "stride": 1, "padding": 1}],
        "seed": 2, "a_bits": 2, "w_bits": [2, 4, 3], "first_last_8bit": True, "data": "const_channel"}
    r = check_spec(spec, Path("."), schedules=())
    assert r.status == "ok" and r.max_local_lsb <= 1, r.message


#: found by the fuzzer: a tiny-weight channel (weights x 1e-9, bias 0.5) in a conv with a fused residual
_RESIDUAL_TINY = {'input_shape': [1, 5, 9], 'chain': [{'op': 'residual', 'two': True, 'shortcut': True, 'depthwise': False, 'act': 'none', 'lo': -1.0, 'hi': 1.0, 'degenerate': 'none', 'channels': []}, {'op': 'residual', 'two': False, 'shortcut': False, 'depthwise': False, 'act': 'none', 'lo': 0.25, 'hi': 1.25, 'degenerate': 'tiny', 'channels': [0], 'const': 0.5}, {'op': 'maxpool', 'k': 3, 'stride': 2, 'padding': 0}, {'op': 'residual', 'two': False, 'shortcut': False, 'depthwise': False, 'act': 'hardtanh', 'lo': 0.0, 'hi': 0.5, 'degenerate': 'none', 'channels': []}], 'seed': 35919, 'a_bits': 5, 'w_bits': [8, 2, 8, 6, 3, 5, 8, 5, 7], 'first_last_8bit': True, 'data': 'normal'}


def test_constant_channel_with_fused_residual_stays_within_one_lsb():
    """The bias floor had put that channel's bias near 2^31 steps; the conv term then shared the residual's shift with
    a mantissa of 3 (2 LSB off fake-quant). The floor now keeps |bias| <= 2^27 / M_res there."""
    from ptq2tvm.fuzz import check_spec

    r = check_spec(_RESIDUAL_TINY, Path("."), schedules=())
    assert r.status == "ok" and r.max_local_lsb <= 1, r.message


# ---- 5. non-finite activations name their cause -----------------------------------------------------------------
def test_batchnorm_eps0_zero_var_is_named():
    m = _dead_channel_net(True)
    m[3].eps = 0.0
    m[3].running_var[4] = 0.0
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm2d '3' \(folded into conv '2'\): running_var \+ eps "
                                                    r"<= 0 in channel\(s\) \[4\] \(eps=0, running_var=0\)"):
        quantize(m, x, QuantConfig(8, 8), progress=False)


def test_nonfinite_activation_names_the_first_node_and_parameter():
    m = _dead_channel_net(False)
    with torch.no_grad():
        m[2].weight[1] = float("nan")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with pytest.raises(QuantConfigError, match=r"node '2' \(conv\) is the first whose output is NaN/Inf \(image 0, "
                                               r"channel\(s\) \[1\]\): its weight .* output channel\(s\) \[1\]"):
        quantize(m, x, QuantConfig(8, 8), progress=False)
    with torch.no_grad():
        m[2].weight[1] = 1e38                    # finite parameters, float32 overflow
    with pytest.raises(QuantConfigError, match=r"node '2' .*parameters are finite .*overflows"):
        quantize(m, x, QuantConfig(8, 8), progress=False)


# ---- artifacts cannot run code ----------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls ``Path.write_text``: a stand-in for arbitrary code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_malicious_pickles_are_refused(tmp_path, tiny_model, tiny_data):
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))          # the payload is live: plain unpickling runs it
    assert probe.read_text() == "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ptq2tvm-fakequant", "version": 1, "state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(ArtifactError, match=r"evil\.pt: refusing to load the fake-quant model: the file contains "
                                            r"pickled Python objects, which run code when loaded \(global \w+\)"):
        QuantModel.load(evil)
    with pytest.raises(ArtifactError, match=r"evil\.pt: refusing to load the FP32 model.*--trust-code"):
        load_fp32(evil)
    assert not marker.exists()
    # what ptq2tvm itself writes loads with weights_only=True
    qm = quantize(tiny_model, tiny_data[:8], QuantConfig(8, 8), progress=False)
    torch.load(qm.save(tmp_path / "fq.pt"), weights_only=True)
    save_fp32(tmp_path / "fp32.pt", tiny_model, ModelSpec("resnet_small", {"num_classes": 10, "in_channels": 1}))
    blob = torch.load(tmp_path / "fp32.pt", weights_only=True)
    assert blob["spec"]["name"] == "resnet_small"
    save_fp32(tmp_path / "mod.pt", tiny_model, None)          # no spec, no flag: tensors only
    with pytest.raises(ArtifactError, match="holds only a state_dict"):
        load_fp32(tmp_path / "mod.pt")
    save_fp32(tmp_path / "mod.pt", tiny_model, None, trust_code=True)
    with pytest.raises(ArtifactError, match="refusing to load the FP32 model"):
        load_fp32(tmp_path / "mod.pt")
    x = torch.from_numpy(tiny_data[:2])
    assert torch.equal(load_fp32(tmp_path / "mod.pt", trust_code=True)(x), tiny_model(x))


def test_code_file_model_spec_needs_trust(tmp_path, tiny_model):
    save_fp32(tmp_path / "fp32.pt", tiny_model, ModelSpec(str(tmp_path / "evil.py") + ":make"))
    with pytest.raises(ArtifactError, match=r"built by make\(\) of the Python file .*evil\.py, which would run.*trust_code=True"):
        load_fp32(tmp_path / "fp32.pt")


# ---- disk full, concurrent calls --------------------------------------------------------------------------------
def test_disk_full_gives_a_clear_error_and_nothing_partial(tmp_path, monkeypatch, tiny_model, tiny_data):
    import resource
    import signal

    from ptq2tvm.atomic import write_json

    qm = quantize(tiny_model, tiny_data[:8], QuantConfig(8, 8), progress=False)
    target = tmp_path / "fq.pt"
    target.write_bytes(b"old")
    # a real failing write: the process may not write files over 4 kB (EFBIG, as a full disk gives ENOSPC)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(ArtifactError, match=r"cannot write .*run\.json: file too large .*nothing was written"):
            write_json(tmp_path / "run.json", {"a": "x" * 100000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    # torch's zip writer reports a full disk as a RuntimeError without errno (message as torch 2.13 prints it)
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                     "file write failed")))
    monkeypatch.setattr("shutil.disk_usage", lambda d: type("U", (), {"free": 512})())
    with pytest.raises(ArtifactError, match=r"cannot write .*fq\.pt: no space left on device .*fq\.pt is unchanged"):
        qm.save(target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["fq.pt"]


def test_compiled_model_from_several_threads(tmp_path):
    from conftest import tiny_integer_graph

    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.backend.runtime import CompiledModel

    graph = tiny_integer_graph(8, 8)
    compile_graph(graph, tmp_path / "m.so", batch=1)
    cm = CompiledModel(tmp_path / "m.so", threads=1)
    q = np.random.default_rng(1).integers(0, 256, (24, *graph.input.shape)).astype(np.uint8)
    want = run_reference(graph, q)
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                got[i] = cm.run_int(q[i::6])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(6):
        assert np.array_equal(got[i], want[i::6])


def test_a_killed_writer_leaves_no_artifact_and_the_next_write_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys

    from ptq2tvm.atomic import write_json

    target = tmp_path / "model.json"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ptq2tvm.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    open(tmp, 'w').write('{half')\n    print('writing', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].startswith(f".model.json.{child.pid}.")
    write_json(target, {"ok": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_disjoint_clamps_compose_like_torch():
    """Found by the fuzzer: Hardtanh(-0.5, 0) then Hardtanh(0.25, 1.25) fused as (max lo, min hi) = (0.25, 0.0), a
    clamp with lo > hi that numpy and the blocked kernels resolved differently (every output wrong on 'auto')."""
    from ptq2tvm.frontend.trace import trace_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.Hardtanh(-0.5, 0.0), nn.Hardtanh(0.25, 1.25), nn.ReLU(),
                      nn.Hardtanh(0.0, 0.5)).eval()
    g = trace_model(m, (2, 2, 2))
    assert g.node(g.output_name).act == (0.25, 0.25)
    x = torch.randn(4, 2, 2, 2)
    qm = QuantModel(g, QuantConfig(8, 8)).set_quant(weights=False, acts=False)
    assert torch.equal(qm(x), m(x))
