"""deploy_examples/imagenet_ptq.py on a tiny synthetic ImageNet-layout folder (train/ and val/ class folders)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("imagenet_ptq", ROOT / "deploy_examples" / "imagenet_ptq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny_imagenet(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            d = tmp_path / "imagenet" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(d / f"{cls}_{i}.JPEG")
    return tmp_path / "imagenet"


def test_imagenet_protocol_rows_on_synthetic_folder(tiny_imagenet, tmp_path, capsys):
    ex = _example()
    out = tmp_path / "res"
    argv = ["--imagenet", str(tiny_imagenet), "--random-init", "--models", "resnet18", "--bits", "W4A4",
            "--methods", "rtn,qdrop+adaq", "--iters", "2", "--calib", "4", "--batch-size", "4", "--resize", "36",
            "--crop", "32", "--device", "cpu", "--threads", "1", "--out", str(out), "--quiet"]
    assert ex.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["method"], r["adaqtransform"], r["iters"]) for r in rows] == [("rtn", False, 0), ("qdrop", True, 2)]
    fmnist_fields = {"model", "method", "granularity", "adaqtransform", "w_bits", "a_bits", "seed", "iters",
                     "n_calib", "eval_images", "fp32_top1", "fakequant_top1", "so_top1", "seconds", "iterations",
                     "iters_per_s", "units", "lam", "mrecg_groups", "resumed_units"}
    for r in rows:
        assert fmnist_fields <= set(r), fmnist_fields - set(r)
        assert r["eval_images_used"] == 4 and r["n_calib"] == 4 and r["dataset"] == "imagenet"
        assert 0.0 <= r["fakequant_top1"] <= 1.0 and r["fakequant_top1"] * 4 == round(r["fakequant_top1"] * 4)
    assert rows[1]["units"] == 10 and rows[1]["iterations"] == 20          # ResNet-18: stem + 8 blocks + fc
    assert (out.parent / "res_ckpt").is_dir()
    # keyed by config: a re-run has nothing left to do
    capsys.readouterr()
    assert ex.main(argv) == 0
    assert "0 of 2 rows to run" in capsys.readouterr().err
    # a checkpoint folder without the torchvision file names the file it expected
    (tmp_path / "ckpts").mkdir()
    args = ex.argparse.Namespace(random_init=False, checkpoints=str(tmp_path / "ckpts"))
    with pytest.raises(ex.ArtifactError, match=r"resnet50-\*\.pth"):
        ex.load_model("resnet50", args)


def test_regnet_x_600mf_matches_torchvision_parameter_count():
    ex = _example()
    m = ex.create("regnet_x_600mf")
    assert sum(p.numel() for p in m.parameters()) == 6_196_040      # torchvision regnet_x_600mf
