"""A new user's own CNN on Fashion-MNIST, W4A4 reconstruction and mixed precision (session 35): defects found on the
way, each with the check that it stays fixed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn


def _grayscale_model_and_pixels():
    """A conv + BatchNorm stem whose running statistics come from Fashion-MNIST-like pixels normalized with the
    training set's own mean / std (0.286 / 0.353), and raw [0, 1] pixels of the same kind."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # garment-like images: a bright blob on black, values in [0, 1] with mean ~0.29
    pix = np.zeros((256, 1, 16, 16), np.float32)
    pix[:, :, 3:13, 4:12] = rng.uniform(0.3, 1.0, (256, 1, 10, 8)).astype(np.float32)
    pix += rng.uniform(0, 0.05, pix.shape).astype(np.float32)
    mean, std = float(pix.mean()), float(pix.std())
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU())
    model.train()
    with torch.no_grad():
        model(torch.from_numpy((pix - mean) / std))
    return model.eval(), pix, mean, std


def test_forgotten_mean_std_of_a_grayscale_model_is_warned():
    """The README's own-model flow without --mean/--std normalizes grayscale images with ImageNet's averaged
    0.449 / 0.226: on a Fashion-MNIST CNN (0.286 / 0.353) FP32 top-1 fell from 82% to 17%, yet quantize printed no
    warning (RMS ratio 1.7x under the 4x limit, mean shift 0.43 under 1.0) and 95% fidelity agreement. Unnormalized
    [0, 1] images (0.4x) passed too. The right preprocessing still passes, and so does a model whose BatchNorm never
    saw data (random weights keep the loose limit)."""
    from ptq2tvm.data.checks import input_scale_notes

    model, pix, mean, std = _grayscale_model_and_pixels()
    assert input_scale_notes(model, (pix - mean) / std) == []
    imagenet = ((pix - 0.449) / 0.226).astype(np.float32)
    notes = input_scale_notes(model, imagenet)
    assert len(notes) == 1 and "--mean / --std" in notes[0], notes
    notes = input_scale_notes(model, pix)                    # forgot to normalize: [0, 1]
    assert len(notes) == 1 and re.search(r"\d(\.\d+)?x smaller than in training", notes[0]), notes
    fresh = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    assert input_scale_notes(fresh, (pix - mean) / std) == []
