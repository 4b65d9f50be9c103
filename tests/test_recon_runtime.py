"""Reconstruction runtime: fused activation fake-quant (values and gradients vs the plain expression), QDrop masks,
explicit --device cpu with the cache memory plan, time budget and early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from ptq2tvm.errors import QuantConfigError
from ptq2tvm.frontend import fused_quant
from ptq2tvm.frontend.fused_quant import DropMasks, act_clamp
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.frontend.quantizers import ActQuantizer
from ptq2tvm.reconstruct import ReconSettings, reconstruct
from ptq2tvm.reconstruct.budget import BudgetPlanner, EarlyStop, deadline_rate, parse_duration
from ptq2tvm.reconstruct.device import resolve_device


pytestmark = pytest.mark.usefixtures("one_torch_thread")


MASK_SOURCES = {"torch.Generator": lambda: torch.Generator().manual_seed(7), "DropMasks": lambda: DropMasks(7)}


@pytest.mark.parametrize("nonneg,z,lsq,drop,source", [(True, 0, False, None, "torch.Generator"),
                                                      (False, 3, True, None, "torch.Generator"),
                                                      (True, 0, True, 0.5, "torch.Generator"),
                                                      (False, 5, False, 0.3, "torch.Generator"),
                                                      (True, 0, True, 0.5, "DropMasks"),
                                                      (False, 5, False, 0.3, "DropMasks")])
def test_fused_fake_quant_matches_plain_expression(nonneg, z, lsq, drop, source):
    """Both forward paths, with either QDrop mask source (the plain path could not draw from DropMasks before)."""
    q = ActQuantizer(3, nonneg)
    q.scale.data.fill_(0.37)
    q.zero_point.fill_(z)
    q.enabled, q.lsq_grad_scale, q.drop_prob = True, lsq, drop
    x0 = torch.randn(4, 6, 28, 56, generator=torch.Generator().manual_seed(1)) * 2   # (>= fused_quant.SMALL elements)
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    res = []
    for fused in (True, False):
        fused_quant.ENABLED = fused
        try:
            q.drop_generator = MASK_SOURCES[source]()                  # the same masks on both paths
            x = x0.clone().requires_grad_(True)
            q.scale.grad = None
            y = q(x)
            y.backward(g)
            res.append((y.detach(), x.grad, q.scale.grad.clone()))
        finally:
            fused_quant.ENABLED = True
    (yf, gxf, gsf), (yr, gxr, gsr) = res
    assert torch.equal(yf, yr)                                         # forward: bit-identical
    assert torch.allclose(gxf, gxr, rtol=0, atol=1e-6)                # autograd's g * s / s vs exact g
    assert gsf.item() == pytest.approx(gsr.item(), rel=1e-5, abs=1e-6)
    if drop is not None:                                               # both outputs of the select occur
        assert bool((yf == x0).any()) and bool((yf != x0).any())


def test_drop_masks_probability_and_determinism():
    like = torch.zeros(1)
    for p in (0.5, 0.25, 0.3):
        keep, drop = DropMasks(3).masks((200_000,), p, like)
        small = DropMasks(3).masks((1000,), p, like)[0]
        assert set(small.unique().tolist()) == {0.0, 1.0}
        assert float(keep.mean()) == pytest.approx(p, abs=0.005)
        assert torch.equal(keep + drop, torch.ones_like(keep)) and set(keep.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(keep, DropMasks(3).masks((200_000,), p, like)[0])
    assert not torch.equal(DropMasks(3).masks((1000,), 0.5, like)[0], DropMasks(4).masks((1000,), 0.5, like)[0])
    x = torch.tensor([-1.0, 0.0, 0.5, 7.0], requires_grad=True)
    assert act_clamp(x, 0.0, 6.0).tolist() == [0.0, 0.0, 0.5, 6.0]
    assert act_clamp(x, 0.0, math.inf).tolist() == [0.0, 0.0, 0.5, 7.0]


def test_device_cpu_explicit_and_cache_plan(tiny_model, calib, capsys):
    with pytest.raises(QuantConfigError, match="unknown device 'tpu'"):
        ReconSettings(device="tpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(QuantConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    s = ReconSettings(method="qdrop", adaqtransform=True, iters=5, batch_size=8, seed=0, chunk=16, device="cpu")
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
    cap = capsys.readouterr()
    err = cap.out + cap.err
    assert "reconstruction caches for 32 images" in err and "-> caches in cpu memory" in err
    plan = rep.cache_plan
    assert rep.device == "cpu" and plan["cache_device"] == "cpu" and not plan["pinned"]
    # the stem unit: quantized + FP input (1x12x12), its output (8x12x12) as target and as streamed output
    first = next(iter(plan["per_unit"]))
    assert plan["per_unit"][first] == 32 * 4 * (2 * 144 + 2 * 8 * 144)          # 331,776 bytes
    assert plan["peak_bytes"] == max(plan["per_unit"].values())
    assert all(c["device"] == "cpu" and c["peak_rss_mb"] > 0 for c in rep.curves.values())
    assert next(qm.parameters()).device.type == "cpu"


def test_time_budget_planner_and_parse():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(QuantConfigError, match="time budget '10 minutes'"):
        parse_duration("10 minutes")
    import time

    pl = BudgetPlanner(time.perf_counter() + 100.0, max_iters=20000, min_iters=50,
                       sec_per_iter={"a": 0.01, "b": 0.03}, overhead=2.0)
    n = pl.iters_for("joint/a", [("a", 1.0), ("b", 1.0)])
    assert 2350 <= n <= 2400                         # (100 - 2 * 2) / 0.04 = 2400, minus the time spent so far
    pl.record("a", n, optim_seconds=2 * n * 0.01, seconds=2 * n * 0.01 + 2.0)   # the machine got 2x slower
    n2 = pl.iters_for("joint/b", [("b", 1.0)])
    assert n2 < (100 - 2) / 0.03 / 1.9              # the measured/probed ratio (2.0) shrinks the estimate
    assert BudgetPlanner(time.perf_counter() + 1, 20000, 50, {"a": 1.0}).iters_for("x", [("a", 1.0)]) == 50


def test_time_budget_run_and_early_stop(tiny_model, calib):
    s = ReconSettings(method="qdrop", iters=400, batch_size=8, seed=0, chunk=16, time_budget="8s", min_iters=10)
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
    dec = rep.budget["decisions"]
    assert [d["unit"] for d in dec] == list(rep.curves) and set(rep.budget["probed_sec_per_iter"]) == {
        u["name"] for u in rep.units}
    # a unit ends its planned schedule, or compresses it to meet its deadline when the machine slowed down
    assert all(10 <= c["iters"] <= c["planned_iters"] <= 400 for c in rep.curves.values())
    assert all("deadline" in c for c in rep.curves.values() if c["iters"] < c["planned_iters"])
    # early stopping: converged windows + decided rounding stop a unit; soft rounding compresses the schedule;
    # a still-improving loss does neither
    es = EarlyStop(iters=1000, warmup=0.2)
    assert es.window == 50 and es.tail(1000) == 100
    acts = [(it, a) for it in range(1000) if (a := es.update(it, 1.0, lambda: 0.0))]
    assert acts[0] == (249, "stop")                                    # first check after warm-up with 2 windows
    es = EarlyStop(iters=1000, warmup=0.2)
    assert not any(es.update(it, 1.0 / (1 + it), lambda: 0.0) for it in range(1000))
    es = EarlyStop(iters=1000, warmup=0.2)
    assert [es.update(it, 1.0, lambda: 0.5) for it in range(250)][-1] == "compress"
    s = ReconSettings(method="qdrop", iters=400, batch_size=8, seed=0, chunk=16, early_stop=True)
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
    early = [c for c in rep.curves.values() if "early_stop" in c]
    assert early and all(c["iters"] < 400 and "converged at iteration" in c["early_stop"] for c in early)
    for c in early:
        if "compressed" in c["early_stop"]:      # the rounding regulariser still reached its last beta
            assert c["beta"][-1] == pytest.approx(2.0, abs=0.1) and c["iters"] < 400
    assert all(layer.wq.alpha is None for layer in qm.layers.values())


def test_unit_deadline_compresses_the_schedule_instead_of_taking_later_units_time(tiny_model, calib, monkeypatch):
    """Measured: a load surge made one unit run at 4.5 it/s against 15 probed; it kept its planned iterations and the
    last two units got 50 each. With a per-unit deadline the slow unit compresses the rest of its schedule."""
    import time

    assert deadline_rate(100, 0.1, 20.0, 50) is None                  # 100 steps x 0.1 s fit in 20 s
    assert deadline_rate(100, 0.1, 5.0, 20) == pytest.approx(2.0)      # 50 affordable steps: twice as fast
    assert deadline_rate(100, 0.1, 0.0, 20) == pytest.approx(5.0)      # past the deadline: the min_steps floor
    assert deadline_rate(10, 0.1, 0.0, 50) is None                     # fewer steps left than the floor
    pl = BudgetPlanner(time.perf_counter() + 100.0, 20000, 50, {"a": 0.01, "b": 0.03}, overhead=2.0)
    share = pl.unit_deadline([("a", 1.0), ("b", 1.0)]) - time.perf_counter()
    assert 23.0 <= share <= 24.0                                       # (100 - 2 x 2) x 0.01 / 0.04
    s = ReconSettings(method="qdrop", iters=400, batch_size=8, seed=0, chunk=16, min_iters=30)
    from ptq2tvm.reconstruct import recon

    real = recon.optimize_unit
    calls = []

    def past_deadline(*a, **k):                 # every unit is already late: each must stop after the floor
        k["deadline"] = time.perf_counter()
        res = real(*a, **k)
        calls.append(res)
        return res

    monkeypatch.setattr(recon, "optimize_unit", past_deadline)
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
    assert calls and all(c["planned_iters"] == 400 for c in calls)
    assert all(recon.DEADLINE_CHECK_EVERY + 29 <= c["iters"] <= recon.DEADLINE_CHECK_EVERY + 31 for c in calls)
    assert all("schedule compressed" in c["deadline"] for c in calls)
    for c in calls:
        if c["beta"][-1] is not None:            # the rounding regulariser still reached its last beta
            assert c["beta"][-1] == pytest.approx(2.0, abs=0.1)
    assert all(layer.wq.alpha is None for layer in qm.layers.values())   # roundings hardened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU reconstruction path runs on GPU "
                    "hosts only (scripts/device/gpu_check.sh ran it on an H200)")
@pytest.mark.parametrize("method,gran,adaq", [("qdrop", None, True), ("nwq", None, True),
                                              ("qdrop", "mrecg-authors", False)])
def test_cuda_reconstruction_runs_and_matches_cpu(tiny_model, calib, method, gran, adaq):
    """Every tensor of the loop on the GPU (AdaQTransform's xi/eta made after the model moved, NWQ's QDrop masks from
    a CPU generator, the integer-bound fit reading CUDA weights): the three faults the first H200 run found. The
    result comes back on the CPU, folds, and computes what the CPU run computes up to float nondeterminism."""
    from ptq2tvm.fold.fold import fold_to_integer        # (ptq2tvm.api imports TVM, which GPU hosts may lack)

    outs = []
    for device in ("cuda", "cpu"):
        s = ReconSettings(method=method, granularity=gran, adaqtransform=adaq, iters=20, batch_size=8, seed=0,
                          chunk=16, device=device)
        qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
        assert rep.device == device and next(qm.parameters()).device.type == "cpu"
        fold_to_integer(qm)                                             # folds without a device error
        with torch.no_grad():
            outs.append(qm.eval()(torch.from_numpy(calib[:16])))
    gpu, cpu = outs
    assert float((gpu - cpu).norm() / cpu.norm()) < 0.1
