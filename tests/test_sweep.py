"""ptq2tvm sweep: config parsing, rows keyed by config, a 2-row sweep on a local Ray instance, resume after an
interrupted sweep (only the missing row runs)."""

from __future__ import annotations

import json
import time

import pytest

from ptq2tvm.sweep import ResultsStore, SweepConfig, SweepError, row_key, run_sweep

MODEL_PY = '''
import torch.nn as nn

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(self.pool(x).flatten(1))

def small():
    return Small()
'''

CONFIG = """
models: [small.py:small]
checkpoints: {{small.py:small: small.pt}}
data: digits
methods: [rtn, qdrop+adaq]
bits: [{bits}]
seeds: [0]
iters: 3
calib: 64
batch_size: 16
eval_limit: 200
cpus_per_task: 1
device: cpu
results: results.json
"""


@pytest.fixture
def sweep_dir(tmp_path):
    import torch

    (tmp_path / "small.py").write_text(MODEL_PY)
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_sweep_model", tmp_path / "small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.small().state_dict(), tmp_path / "small.pt")
    (tmp_path / "sweep.yaml").write_text(CONFIG.format(bits="W8A8"))
    return tmp_path


def test_config_rows_and_errors(sweep_dir, tmp_path, capsys):
    cfg = SweepConfig.load(sweep_dir / "sweep.yaml")
    rows = cfg.rows()
    assert [row_key(r) for r in rows] == ["small.py:small|rtn|layer|-|W8A8|s0|i0|c64|e200",
                                          "small.py:small|qdrop|block|adaq|W8A8|s0|i3|c64|e200"]
    assert cfg.results_path == sweep_dir / "results.json"
    from ptq2tvm.cli import main

    assert main(["sweep", str(sweep_dir / "sweep.yaml"), "--dry-run"]) == 0
    assert "2 of 2 rows to run" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [x]\nbitz: [W4A4]\n")
    with pytest.raises(SweepError, match="unknown key.*bitz"):
        SweepConfig.load(bad)
    bad.write_text("models: [x]\nmethods: [qdrop:blocky]\n")
    with pytest.raises(SweepError, match="unknown granularity 'blocky'"):
        SweepConfig.load(bad)


def test_sweep_on_ray_resumes_only_missing_rows(sweep_dir):
    ray = pytest.importorskip("ray")
    from dataclasses import asdict

    from ptq2tvm.sweep import _builtin_row, runtime_env, slow_host_defaults

    cfg = SweepConfig.load(sweep_dir / "sweep.yaml")
    slow_host_defaults()
    t0 = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    t_ray = time.perf_counter() - t0
    try:
        def rows():
            rs = cfg.rows()
            for r in rs:
                r["_cfg"] = asdict(cfg)
            return rs

        store = ResultsStore(cfg.results_path)

        class Killed(Exception):
            pass

        def kill_after_first(res):
            raise Killed(row_key(res))

        # one CPU: rows run one after the other; the sweep is interrupted when the first row has been written
        with pytest.raises(Killed):
            run_sweep(rows(), _builtin_row, store, cpus_per_task=1, progress=False, on_row=kill_after_first)
        first = json.loads(cfg.results_path.read_text())["rows"]
        assert len(first) == 1
        done_key = row_key(first[0])

        # re-run: only the missing row is submitted; the finished row is kept as it was
        store2 = ResultsStore(cfg.results_path)
        summary = run_sweep(rows(), _builtin_row, store2, cpus_per_task=1, progress=False)
        assert (summary.total, summary.skipped, summary.ran, summary.failed) == (2, 1, 1, [])
        final = {row_key(r): r for r in json.loads(cfg.results_path.read_text())["rows"]}
        assert set(final) == {row_key(r) for r in cfg.rows()}
        assert final[done_key] == first[0]
        for r in final.values():
            # W8A8 keeps the (seeded, untrained) network's decisions: fake-quant top-1 within 3 points of FP32
            assert abs(r["fakequant_top1"] - r["fp32_top1"]) <= 0.03, r
        q = final["small.py:small|qdrop|block|adaq|W8A8|s0|i3|c64|e200"]
        assert q["iterations"] == 3 * q["units"] and q["device"] == "cpu"
        # a third run has nothing to do and does not touch Ray's workers
        assert run_sweep(rows(), _builtin_row, ResultsStore(cfg.results_path), progress=False).ran == 0
    finally:
        ray.shutdown()
    print(f"ray.init took {t_ray:.1f} s, the whole test {time.perf_counter() - t0:.1f} s")
