"""Dense features at high resolution, sliding windows, whole scenes, and the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dinoapp
from dinoapp.cache import FeatureCache
from dinoapp.dense import dense_features, input_size_for, scene_features
from dinoapp.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def bb():
    return dinoapp.load_backbone("vit_tiny", depth=3, seed=0)


def _image(h=200, w=264, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / 9.0), np.cos(yy / 7.0), ((xx + yy) % 40) / 40.0], -1) * 0.5 + 0.5
    img[40:120, 60:180] = (1.0, 0.1, 0.1)
    img += np.random.default_rng(seed).normal(0, 0.05, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def test_one_pass_equals_extract(bb):
    img = _image()
    d = dense_features(bb, img, policy="pad", layers=[0, 1])
    f = dinoapp.extract(bb, [img], size=(208, 272), policy="pad", layers=[0, 1])
    assert d.windows == 1 and d.grid == (13, 17) and d.input_size == (208, 272) and d.image_size == (200, 264)
    torch.testing.assert_close(d.patches, f.patches[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(d.cls, f.cls[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(d.layers[0], f.layers[0][0], atol=1e-5, rtol=0)
    assert set(d.layers) == {0, 1}


def test_sliding_windows_match_each_window_away_from_seams(bb):
    img = _image(256, 384)
    tiled = dense_features(bb, img, policy="pad", max_tokens=100, tile=128, overlap=32)
    assert tiled.windows > 1 and tiled.grid == (16, 24)
    x = dinoapp.preprocess(img, bb, size=(256, 384), policy="pad")  # [C, H, W], normalised
    # the first window (rows 0..7, cols 0..7) alone: patches only it covers (rows/cols < 6) equal its features
    with torch.inference_mode():
        own = bb.get_intermediate_layers(x[None, :, :128, :128], n=1, reshape=True, norm=True)[0][0].permute(1, 2, 0)
    torch.testing.assert_close(tiled.patches[:6, :6], own[:6, :6], atol=1e-5, rtol=0)
    # a seam patch (covered by two windows) is a convex blend: between the two windows' values
    with torch.inference_mode():
        nxt = bb.get_intermediate_layers(x[None, :, :128, 96:224], n=1, reshape=True, norm=True)[0][0].permute(1, 2, 0)
    seam = tiled.patches[2, 6]  # col 6 = own[:, 6] = nxt[:, 0]
    a, b = own[2, 6], nxt[2, 0]
    t = torch.dot(seam - b, a - b) / torch.dot(a - b, a - b)
    assert 0.0 <= t <= 1.0
    torch.testing.assert_close(seam, t * a + (1 - t) * b, atol=1e-4, rtol=0)
    # and the whole map stays close to the single-pass map (context differs, so not equal)
    full = dense_features(bb, img, policy="pad")
    cos = torch.nn.functional.cosine_similarity(tiled.patches, full.patches, dim=-1)
    assert cos.mean() > 0.9


def test_resolution_options(bb):
    assert input_size_for(300, 600, 512, 16, "resize") == (256, 512)
    assert input_size_for(300, 580, None, 16, "pad") == (304, 592)
    assert input_size_for(300, 580, None, 16, "resize") == (304, 576)
    with pytest.raises(ConfigError, match="multiples"):
        input_size_for(300, 600, (300, 600), 16, "resize")
    d = dense_features(bb, _image(), resolution=128)
    assert d.input_size == (96, 128) and d.grid == (6, 8)
    with pytest.raises(InputError, match="layers"):
        dense_features(bb, _image(), layers=[7])


def test_scene_features_georeferenced(bb, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    import domains
    from tests.geo_factory import make_geotiff

    img = (_image(300, 340) * 250 + 1).astype(np.uint8).transpose(2, 0, 1)  # [3, H, W] uint8
    img[:, :, :100] = 0  # nodata strip on the left
    p = make_geotiff(tmp_path / "scene.tif", img, nodata=0)
    sm = scene_features(bb, p, tile=128, overlap=32, progress=False)
    assert sm.values.shape == (192, 19, 22) and sm.scale == 16
    assert not sm.valid[:, :6].any() and sm.valid[:, 7:21].all()  # patches of the nodata strip are not valid
    assert sm.valid[:, 21].all()  # the last column: 4 px of scene (valid) + 12 px of padding, judged on the 4
    # away from seams, a patch equals the features of the tile read on its own
    arr, meta = domains.read_geotiff(p, window=(96, 0, 128, 128))
    d = dense_features(bb, arr, policy="pad", channels_first=True)
    np.testing.assert_allclose(sm.values[:, 1, 9], d.patches[1, 3].numpy(), atol=1e-4)
    red = scene_features(bb, p, tile=128, overlap=32, reduce=lambda f: f.norm(dim=-1, keepdim=True), channels=1,
                         progress=False)
    np.testing.assert_allclose(red.values[0][red.valid], np.linalg.norm(sm.values, axis=0)[sm.valid], rtol=1e-3)
    out = domains.write_geotiff(tmp_path / "norm.tif", red.values[0], like=sm.meta, scale=16, kind="float")
    with rasterio.open(out) as dst, rasterio.open(p) as src:
        assert dst.transform == src.transform @ Affine.scale(16) and dst.crs == src.crs
    with pytest.raises(ConfigError, match="channels"):
        scene_features(bb, p, tile=128, overlap=32, reduce=lambda f: f[..., :2], channels=1, progress=False)


def test_feature_cache_memory_disk_and_invalidation(bb, tmp_path, monkeypatch):
    img = _image(64, 96)
    cache = FeatureCache(disk_dir=tmp_path / "cache")
    a = cache.features(bb, img, resolution=96)
    b = cache.features(bb, img, resolution=96)
    assert b is a and cache.hits == 1 and cache.misses == 1
    c = cache.features(bb, img, resolution=64)  # other options: other entry
    assert c.grid != a.grid and cache.misses == 2
    other = dinoapp.load_backbone("vit_tiny", depth=3, seed=1)
    assert cache.features(other, img, resolution=96) is not a and cache.misses == 3
    img2 = img.copy()
    img2[0, 0, 0] += 0.5
    assert cache.features(bb, img2, resolution=96) is not a and cache.misses == 4

    import dinoapp.cache as cache_mod

    def boom(*args, **kw):
        raise AssertionError("recomputed")

    fresh = FeatureCache(disk_dir=tmp_path / "cache")  # a restarted app finds the features on disk
    monkeypatch.setattr(cache_mod, "dense_features", boom)
    again = fresh.features(bb, img, resolution=96)
    torch.testing.assert_close(again.patches, a.patches)
    assert again.input_size == a.input_size and fresh.hits == 1
    monkeypatch.undo()

    for f in (tmp_path / "cache").glob("*.safetensors"):
        f.write_bytes(b"damaged")
    fresh2 = FeatureCache(disk_dir=tmp_path / "cache")
    torch.testing.assert_close(fresh2.features(bb, img, resolution=96).patches, a.patches)  # recomputed, no error

    with torch.no_grad():  # a training step changes the weights: the old entry must not be served
        bb.vit.blocks[0].mlp.fc1.weight.mul_(1.01)
    try:
        assert not torch.equal(cache.features(bb, img, resolution=96).patches, a.patches)
    finally:
        with torch.no_grad():
            bb.vit.blocks[0].mlp.fc1.weight.div_(1.01)


def test_cache_keys_files_by_identity(bb, tmp_path):
    from PIL import Image

    import domains

    p = tmp_path / "a.png"
    Image.fromarray((_image(48, 64) * 255).astype(np.uint8)).save(p)
    cache = FeatureCache(max_bytes=10**9)
    loader = lambda q: domains.load(q)[0]  # noqa: E731
    a = cache.features(bb, p, loader=loader, channels_first=True)
    assert cache.features(bb, p, loader=loader, channels_first=True) is a
    Image.fromarray((_image(48, 64, seed=3) * 255).astype(np.uint8)).save(p)  # the file changed
    import os

    os.utime(p, ns=(1, 10**18))
    assert cache.features(bb, p, loader=loader, channels_first=True) is not a


def test_cache_evicts_by_bytes(bb):
    cache = FeatureCache(max_bytes=1)  # keeps only the newest entry
    cache.features(bb, _image(32, 32), resolution=32)
    cache.features(bb, _image(32, 32, seed=1), resolution=32)
    assert len(cache) == 1


def test_prefetch_order_errors_and_early_stop():
    import threading

    from dinoapp.dense import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def bad():
        yield 1
        raise ValueError("reader failed")

    got = []
    with pytest.raises(ValueError, match="reader failed"):
        for x in prefetch(bad()):
            got.append(x)
    assert got == [1]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for x in prefetch(endless(), depth=2):
        if x == 3:
            break
    n = len(produced)
    assert n <= 3 + 1 + 2 + 1  # consumed + in the queue + one in hand: the producer stopped
    assert not any(t.name == "dinoapp-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.gpu
def test_dense_and_scene_features_on_cuda(tmp_path):
    """bf16 autocast windows on CUDA agree with fp32 CPU; the scene path runs its reader thread."""
    from tests.geo_factory import make_geotiff

    cpu = dinoapp.load_backbone("vit_tiny", depth=3, seed=0)
    gpu = dinoapp.load_backbone("vit_tiny", depth=3, seed=0, device="cuda")
    img = _image(256, 384)
    a = dense_features(cpu, img, policy="pad", max_tokens=100, tile=128, overlap=32)
    b = dense_features(gpu, img, policy="pad", max_tokens=100, tile=128, overlap=32)
    assert b.patches.device.type == "cpu" and b.windows == a.windows
    assert torch.nn.functional.cosine_similarity(a.patches, b.patches, dim=-1).min() > 0.98
    p = make_geotiff(tmp_path / "s.tif", (img * 250 + 1).astype(np.uint8).transpose(2, 0, 1))
    sa = scene_features(cpu, p, tile=128, overlap=32, progress=False)
    sb = scene_features(gpu, p, tile=128, overlap=32, progress=False)
    fa, fb = torch.from_numpy(sa.values), torch.from_numpy(sb.values)
    assert torch.nn.functional.cosine_similarity(fa, fb, dim=0).min() > 0.98
