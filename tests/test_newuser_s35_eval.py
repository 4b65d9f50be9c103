"""eval's top-1 in run.json says what it was measured on (session 35)."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn


def test_eval_on_other_data_records_which_data_in_run_json(tmp_path, capsys):
    """`ptq2tvm eval RUN --data other.npz` wrote that file's top-1 into run.json's fp32_top1 / fakequant_top1 /
    so_top1, next to the run's own "data": a later reader took 0-30% on a mislabeled or raw-pixel file for the run's
    accuracy. The figures now come with top1_on = the data, image count, --n seed and library they were measured on."""
    from ptq2tvm.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    (tmp_path / "net.py").write_text("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), "
                                     "nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))\n")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", images=x, labels=rng.integers(0, 3, 40))
    np.savez(tmp_path / "other.npz", images=x[:10], labels=rng.integers(0, 3, 10))
    run = tmp_path / "run"
    assert main(["quantize", "--model", f"{tmp_path / 'net.py'}:build", "--checkpoint", str(tmp_path / "w.pt"),
                 "--data", str(tmp_path / "calib.npz"), "--calib-size", "30", "--fidelity-images", "0",
                 "--no-progress", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--trust-code", "--no-progress"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["top1_on"] == dict(data=str(tmp_path / "calib.npz"), n=10, seed=None, so=None)
    assert main(["eval", str(run), "--trust-code", "--no-progress", "--data", str(tmp_path / "other.npz"),
                 "--n", "5"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["top1_on"] == dict(data=str(tmp_path / "other.npz"), n=5, seed=0, so=None)
    assert info["data"] == str(tmp_path / "calib.npz")
    capsys.readouterr()
