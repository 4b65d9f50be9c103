"""quantize --out into a folder of the user's own files (session 35): files named like a run's artifacts that
ptq2tvm did not write are not replaced or deleted."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

MODEL = '''
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
'''


@pytest.fixture
def project(tmp_path):
    import numpy as np

    (tmp_path / "net.py").write_text(MODEL)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    torch.save(model.state_dict(), tmp_path / "fp32.pt")          # the user's own checkpoint, named fp32.pt
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    return tmp_path


def _quantize(project, out, capsys):
    from ptq2tvm.cli import main

    rc = main(["quantize", "--model", str(project / "net.py") + ":build", "--checkpoint", str(project / "fp32.pt"),
               "--data", str(project / "x.npy"), "--fidelity-images", "0", "--no-progress", "--out", str(out)])
    return rc, capsys.readouterr().err


def test_quantize_out_into_the_users_folder_keeps_their_files(project, capsys):
    """`--checkpoint proj/fp32.pt --out proj` overwrote the user's checkpoint with the run's FP32 model; a model.so
    and a run.json of theirs in the folder were deleted / replaced. Now one line, nothing written; a ptq2tvm run
    directory is still re-quantized in place."""
    before = (project / "fp32.pt").read_bytes()
    (project / "model.so").write_bytes(b"their library")
    (project / "run.json").write_text(json.dumps({"my": "config"}))
    rc, err = _quantize(project, project, capsys)
    assert rc == 2
    assert "is not a ptq2tvm run directory but holds run.json, fp32.pt, model.so" in err and "nothing was written" in err
    assert (project / "fp32.pt").read_bytes() == before
    assert (project / "model.so").read_bytes() == b"their library"
    assert json.loads((project / "run.json").read_text()) == {"my": "config"}
    assert not (project / "model.qgraph.npz").exists() and not (project / "fakequant.pt").exists()
    # a run directory of ptq2tvm's own: quantized again in place, as before
    run = project / "run"
    assert _quantize(project, run, capsys)[0] == 0
    assert _quantize(project, run, capsys)[0] == 0
    assert json.loads((run / "run.json").read_text())["graph_sha256"]
