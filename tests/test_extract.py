"""extract() returns the backbone's own outputs, batched, for every input kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dinoapp
from dinoapp.preprocess import preprocess


@pytest.fixture(scope="module")
def bb():
    return dinoapp.load_backbone("vit_tiny", seed=0)


def test_matches_forward_features(bb, images):
    f = dinoapp.extract(bb, images, size=(64, 80), layers=[0, -1], batch_size=1)
    x = preprocess(images, bb, size=(64, 80))
    with torch.no_grad():
        ref = bb.forward_features(x)
        inter = bb.get_intermediate_layers(x, n=[0])[0]
    assert f.cls.shape == (2, 192) and f.registers.shape == (2, 4, 192) and f.patches.shape == (2, 4, 5, 192)
    assert f.grid == (4, 5)
    assert torch.allclose(f.cls, ref["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(f.registers, ref["x_storage_tokens"], atol=1e-5)
    assert torch.allclose(f.patches.flatten(1, 2), ref["x_norm_patchtokens"], atol=1e-5)
    assert sorted(f.layers) == [0, 3]
    assert torch.allclose(f.layers[0].flatten(1, 2), inter, atol=1e-5)
    assert torch.equal(f.layers[3], f.patches)


def test_lists_of_mixed_image_types(bb):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    imgs = [u8, Image.fromarray(u8), torch.from_numpy(u8).permute(2, 0, 1), u8.mean(-1).astype(np.uint8)]
    f = dinoapp.extract(bb, imgs, size=32, batch_size=3, progress=True)
    assert f.cls.shape == (4, 192)
    assert torch.allclose(f.cls[0], f.cls[1], atol=1e-5) and torch.allclose(f.cls[0], f.cls[2], atol=1e-5)
    single = dinoapp.extract(bb, u8, size=32)
    assert torch.allclose(single.cls[0], f.cls[0], atol=1e-5)


def test_batching_does_not_change_results(bb):
    x = torch.rand(5, 3, 32, 48)
    a = dinoapp.extract(bb, x, size=None, batch_size=5)
    b = dinoapp.extract(bb, x, size=None, batch_size=2)
    assert torch.allclose(a.patches, b.patches, atol=1e-5)


def test_restores_training_mode_and_rejects_mixed_sizes(bb):
    bb.train()
    dinoapp.extract(bb, torch.rand(1, 3, 32, 32), size=None)
    assert bb.training
    bb.eval()
    with pytest.raises(dinoapp.InputError, match="share a size"):
        dinoapp.extract(bb, [np.zeros((32, 32, 3)), np.zeros((64, 64, 3))], size=None)
    with pytest.raises(dinoapp.InputError, match="out of range"):
        dinoapp.extract(bb, torch.rand(1, 3, 32, 32), layers=[9])


@pytest.mark.gpu
def test_cuda_bf16_autocast_close_to_fp32():
    bb = dinoapp.load_backbone("vits16", seed=0, device="cuda")
    x = torch.rand(4, 3, 224, 224)
    f16 = dinoapp.extract(bb, x)
    f32 = dinoapp.extract(bb, x, dtype=torch.float32)
    cos = torch.nn.functional.cosine_similarity(f16.patches.flatten(0, 2), f32.patches.flatten(0, 2), dim=-1)
    assert cos.mean() > 0.99
