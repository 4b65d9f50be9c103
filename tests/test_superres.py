"""Super-resolution helpers (ptq2tvm.superres) and the L1 training path of ptq2tvm.train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptq2tvm.data import Dataset
from ptq2tvm.errors import DataError, Ptq2TvmError
from ptq2tvm.superres import bilinear_baseline, downsample, evaluate_psnr, psnr_per_image
from ptq2tvm.train import SRRecipe, recipe_for, train_builtin


def test_downsample_is_block_mean():
    x = np.arange(2 * 1 * 4 * 6, dtype=np.float32).reshape(2, 1, 4, 6)
    lr = downsample(x, 2)
    assert lr.shape == (2, 1, 2, 3) and isinstance(lr, np.ndarray)
    assert lr[0, 0, 0, 0] == np.mean([0, 1, 6, 7]) and lr[1, 0, 1, 2] == np.mean(x[1, 0, 2:, 4:])
    assert torch.equal(downsample(torch.from_numpy(x), 2), torch.from_numpy(lr))
    with pytest.raises(DataError, match="5x6 is not a multiple of the super-resolution scale 2"):
        downsample(np.zeros((1, 1, 5, 6), np.float32), 2)


def test_psnr_values():
    target = np.zeros((2, 1, 4, 4))
    pred = np.full((2, 1, 4, 4), 0.1)
    np.testing.assert_allclose(psnr_per_image(pred, target), [20.0, 20.0])  # MSE 0.01
    assert psnr_per_image(pred - 5.0, target).tolist() == [100.0, 100.0]  # clipped to 0, MSE floored at 1e-10
    # normalized inputs are de-normalized first: x * std + mean
    np.testing.assert_allclose(psnr_per_image(np.full((1, 1, 2, 2), 1.0), np.zeros((1, 1, 2, 2)), (0.0,), (0.1,)),
                               [20.0])
    with pytest.raises(DataError, match="differs from target"):
        psnr_per_image(pred, np.zeros((2, 1, 8, 8)))


def test_evaluate_psnr_callable_and_module():
    img = np.full((5, 1, 8, 8), 0.25, np.float32)
    ds = Dataset(img, None, "const", (1, 8, 8), (0.5,), (0.5,))
    assert evaluate_psnr(bilinear_baseline(2), ds, batch_size=2) == 100.0  # a constant image upsamples exactly
    up = torch.nn.Upsample(scale_factor=2, mode="nearest").train()
    assert evaluate_psnr(up, ds) == 100.0 and up.training  # training mode restored


def test_recipe_dispatch():
    assert isinstance(recipe_for("edsr_small_fm", "fashion-mnist"), SRRecipe)
    assert recipe_for("edsr_small_fm", "fashion-mnist").epochs == 1
    assert recipe_for("mobilenet_v3_small_fm", "fashion-mnist").epochs == 3
    with pytest.raises(Ptq2TvmError, match="resnet18_fpn.*features model"):
        recipe_for("resnet18_fpn", "fashion-mnist")


def test_train_sr_on_digits_beats_bilinear_and_caches(tmp_path):
    model, info = train_builtin("edsr_small_fm", "digits", epochs=2, cache_dir=tmp_path, progress=False, threads=1)
    assert info["cached"] is False and "test_top1" not in info
    assert info["input_shape"] == [1, 4, 4] and info["output_shape"] == [1, 8, 8]
    assert info["test_psnr_db"] > info["bilinear_psnr_db"] + 0.5
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 4, 4)).shape == (1, 1, 8, 8)
    again, info2 = train_builtin("edsr_small_fm", "digits", epochs=2, cache_dir=tmp_path, progress=False, threads=1)
    assert info2["cached"] is True and info2["test_psnr_db"] == info["test_psnr_db"]
    assert evaluate_psnr(again, "digits") == pytest.approx(info["test_psnr_db"], abs=1e-9)


def test_cli_calibrates_builtin_sr_models_on_low_resolution():
    from argparse import Namespace

    from ptq2tvm.cli import _sr_calibration
    from ptq2tvm.models import create_model

    x = np.zeros((3, 1, 28, 28), np.float32)
    sr = create_model("edsr_small_fm")
    assert _sr_calibration(sr, Namespace(data="fashion-mnist", model="edsr_small_fm"), x).shape == (3, 1, 14, 14)
    assert _sr_calibration(sr, Namespace(data="my.npz", model="edsr_small_fm"), x) is x  # user data: as given
    assert _sr_calibration(None, Namespace(data="fashion-mnist", model="resnet_small"), x) is x
