"""Whole-scene and large-image segmentation with a head on frozen features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dinoapp
from dinoapp.heads import fit_seg_head
from dinoapp.predict import segment_scene

rasterio = pytest.importorskip("rasterio")


@pytest.fixture(scope="module")
def bb():
    return dinoapp.load_backbone("vit_tiny", depth=2, seed=0)


def _scene(h, w, seed=0):
    """Yellow discs (class 1) on a dark textured background (class 0): image [H, W, 3] uint8, mask [H, W]."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60 + 20).astype(np.float32)
    mask = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(max(2, h * w // 6000)):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(12, 28)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disc] = (230, 220, 40)
        mask[disc] = 1
    return np.clip(img, 1, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def head(bb):
    imgs, masks = zip(*[_scene(128, 128, s) for s in range(6)])
    f = dinoapp.extract(bb, list(imgs), size=(128, 128), policy="pad")
    return fit_seg_head(f, np.stack(masks), 2, class_names=["ground", "disc"], backbone=bb, epochs=40,
                        size=(128, 128), policy="pad")


def test_segment_large_image_with_sliding_windows(bb, head):
    img, mask = _scene(300, 420, seed=11)
    cls, probs = head.segment_large(bb, img, max_tokens=64, tile=128, overlap=32)
    assert cls.shape == (300, 420) and probs.shape == (2, 300, 420)
    torch.testing.assert_close(probs.sum(0), torch.ones(300, 420), atol=1e-5, rtol=0)
    iou = dinoapp.metrics.mean_iou(mask, cls.numpy(), 2)
    assert iou > 0.6
    one, _ = head.segment_large(bb, img)  # one pass (fits max_tokens) gives nearly the same map
    assert (one == cls).float().mean() > 0.95


def test_segment_scene_writes_georeferenced_maps(bb, head, tmp_path):
    from affine import Affine

    from tests.geo_factory import make_geotiff

    img, mask = _scene(260, 300, seed=5)
    p = make_geotiff(tmp_path / "scene.tif", img.transpose(2, 0, 1), crs="EPSG:32632",
                     transform=Affine(0.5, 0, 600000, 0, -0.5, 5100000))
    out = segment_scene(head, bb, p, tmp_path / "out" / "scene", tile=128, overlap=32, progress=False)
    with rasterio.open(out["classes"]) as dst, rasterio.open(p) as src:
        assert dst.shape == src.shape and dst.transform == src.transform and dst.crs == src.crs
        cls = dst.read(1)
        assert dst.tags()["DINOAPP_CLASSES"] == "ground,disc" and dst.colormap(1)[1] != dst.colormap(1)[0]
    assert set(np.unique(cls)) <= {0, 1, 255}
    assert dinoapp.metrics.mean_iou(mask, np.where(cls == 255, 0, cls), 2) > 0.6
    with rasterio.open(out["probs"]) as dst:
        assert dst.count == 2 and dst.transform == Affine(0.5, 0, 600000, 0, -0.5, 5100000) @ Affine.scale(16)
        pr = dst.read()
        np.testing.assert_allclose(np.nansum(pr, axis=0)[~np.isnan(pr[0])], 1.0, atol=1e-5)
    other = dinoapp.load_backbone("vit_tiny", depth=2, seed=3)
    with pytest.raises(dinoapp.errors.HeadBackboneMismatchError):
        segment_scene(head, other, p, tmp_path / "x", progress=False)


def test_segment_scene_puts_a_copy_of_the_head_on_the_backbones_device(bb, head, tmp_path):
    """fit_seg_head returns heads on the CPU; segment_scene must move the head to where the backbone's features
    are (a CUDA backbone would otherwise fail with a device mismatch) and leave the caller's head as it was.
    On a CPU-only machine the check is that .to(<backbone device>) is called before the head sees features."""
    import dataclasses

    from dinoapp.heads import LinearSegHead
    from tests.geo_factory import make_geotiff

    class DeviceCheckingHead(LinearSegHead):
        placed_on = None  # the device of the last .to(...) call

        def to(self, *args, **kwargs):
            self.placed_on = torch._C._nn._parse_to(*args, **kwargs)[0]
            return super().to(*args, **kwargs)

        def forward(self, x):
            assert self.placed_on == x.device, f"the head was not moved to the features' device {x.device}"
            return super().forward(x)

    checking = DeviceCheckingHead(head.module.in_channels, head.n_classes)
    checking.load_state_dict(head.module.state_dict())
    checking.train()
    seg = dataclasses.replace(head, module=checking)
    img, _ = _scene(130, 140, seed=7)
    p = make_geotiff(tmp_path / "scene.tif", img.transpose(2, 0, 1))
    out = segment_scene(seg, bb, p, tmp_path / "out" / "scene", tile=128, overlap=32, progress=False)
    ref = segment_scene(head, bb, p, tmp_path / "ref" / "scene", tile=128, overlap=32, progress=False)
    with rasterio.open(out["classes"]) as a, rasterio.open(ref["classes"]) as b:
        np.testing.assert_array_equal(a.read(), b.read())  # the copy computes what the head computes
    assert checking.placed_on is None and checking.training  # the caller's head: not moved, not switched to eval
    assert next(checking.parameters()).device == next(bb.parameters()).device


def test_scene_nodata_pixels_stay_nodata_and_empty_scene_warns(bb, head, tmp_path):
    from tests.geo_factory import make_geotiff

    img, _ = _scene(160, 160, seed=7)
    data = img.transpose(2, 0, 1).copy()
    data[:, 50:53, 70:90] = 0  # a few nodata pixels inside otherwise valid patches
    p = make_geotiff(tmp_path / "holes.tif", data, nodata=0)
    out = segment_scene(head, bb, p, tmp_path / "holes", tile=128, overlap=32, probabilities=False, progress=False)
    with rasterio.open(out["classes"]) as dst:
        cls = dst.read(1)
    hole = np.zeros((160, 160), bool)
    hole[50:53, 70:90] = True
    assert (cls[hole] == 255).all() and (cls[~hole] != 255).all()

    empty = make_geotiff(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    with pytest.warns(RuntimeWarning, match="no window"):
        sm = dinoapp.scene_features(bb, empty, tile=64, overlap=0, progress=False)
    assert sm.windows == 0 and not sm.valid.any()


def test_predict_cli_keeps_outputs_of_same_named_inputs_apart(bb, head, tmp_path):
    from PIL import Image

    from dinoapp.cli import main

    dinoapp.save_backbone(bb, tmp_path / "bb.safetensors")
    dinoapp.save_head(head, tmp_path / "head.safetensors", bb)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(_scene(64, 64, seed=ord(sub))[0]).save(tmp_path / sub / "img.png")
    assert main(["predict", str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png"), "--head",
                 str(tmp_path / "head.safetensors"), "--backbone", str(tmp_path / "bb.safetensors"), "--out",
                 str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a_img_classes.png").exists() and (tmp_path / "out" / "b_img_classes.png").exists()
