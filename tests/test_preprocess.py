"""Images of every common type become the same normalised tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dinoapp
from dinoapp.preprocess import preprocess, target_size, to_tensor

MEAN, STD = dinoapp.LVD_MEAN, dinoapp.LVD_STD


def test_dtypes_and_layouts_agree():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ref = torch.from_numpy(u8).permute(2, 0, 1).float() / 255  # [3, 40, 56]
    for img in (u8, np.transpose(u8, (2, 0, 1)), Image.fromarray(u8), torch.from_numpy(u8).permute(2, 0, 1),
                u8.astype(np.float32) / 255, (u8.astype(np.uint16) * 257)):  # fmt: skip
        assert torch.allclose(to_tensor(img), ref, atol=1e-6), type(img)
    assert torch.allclose(to_tensor(u8.astype(np.uint16) * 40, value_range=(0, 10200)), ref, atol=1e-6)


def test_grey_is_repeated_and_normalised():
    g = np.full((32, 48), 128, dtype=np.uint8)
    x = preprocess(g, mean=MEAN, std=STD, in_chans=3, size=None)
    assert x.shape == (3, 32, 48)
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 48), (128 / 255 - MEAN[c]) / STD[c]))


def test_policies():
    img = np.zeros((50, 70, 3), dtype=np.float32)
    assert preprocess(img, mean=MEAN, std=STD, size=224).shape == (3, 224, 224)
    assert preprocess(img, mean=MEAN, std=STD, size=(64, 96)).shape == (3, 64, 96)
    assert preprocess(img, mean=MEAN, std=STD, size=None).shape == (3, 48, 64)
    padded = preprocess(img, mean=MEAN, std=STD, size=None, policy="pad")
    assert padded.shape == (3, 64, 80) and padded[:, 50:].abs().max() == 0  # mean colour pad
    assert torch.allclose(padded[0, :50, :70], torch.full((50, 70), -MEAN[0] / STD[0]))
    assert target_size(480, 640, 224, "short_side", 16) == (224, 304)


def test_bad_inputs():
    with pytest.raises(dinoapp.ConfigError, match="multiples"):
        preprocess(np.zeros((32, 32, 3)), mean=MEAN, std=STD, size=100)
    with pytest.raises(dinoapp.InputError, match="4 channels"):
        preprocess(np.zeros((32, 32, 4), dtype=np.uint8), mean=MEAN, std=STD)
    with pytest.raises(dinoapp.InputError, match="NaN"):
        to_tensor(np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(dinoapp.InputError, match="does not fit"):
        preprocess(np.zeros((40, 40, 3)), mean=MEAN, std=STD, size=32, policy="pad")
    with pytest.raises(dinoapp.InputError, match="expected a numpy"):
        to_tensor("image.png")
    with pytest.raises(dinoapp.ConfigError, match="policy"):
        preprocess(np.zeros((32, 32, 3)), mean=MEAN, std=STD, policy="stretch")


def test_four_band_backbone_takes_four_band_arrays():
    bb = dinoapp.load_backbone("vit_tiny", depth=1, in_chans=4)
    x = preprocess(np.random.default_rng(1).random((4, 32, 32), dtype=np.float32), bb, size=32)
    assert x.shape == (4, 32, 32)
