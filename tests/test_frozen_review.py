"""Regressions from the review of the frozen-feature layer (dense, cache, viz, heads, metrics, predict, CLI).

Each test feeds an odd input that used to crash with an untyped error, give a silently wrong result or
serve stale features, and asserts the value or the exact error class now.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

import dinoapp
from dinoapp import ConfigError, InputError, dense_features, heads, metrics, scene_features, viz
from dinoapp.cache import FeatureCache, input_digest
from dinoapp.dense import windows_needed
from dinoapp.preprocess import to_tensor

rasterio = pytest.importorskip("rasterio")


@pytest.fixture(scope="module")
def bb():
    return dinoapp.load_backbone("vit_tiny", depth=2, seed=0)


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


# ------------------------------------------------------------------------------------------ dense


@pytest.mark.parametrize(
    "kw",
    [
        {"tile": 64, "overlap": 64},  # overlap == tile
        {"tile": 64, "overlap": 96},
        {"tile": 0, "overlap": 0},
        {"tile": 60, "overlap": 16},  # not a multiple of 16
        {"tile": 64, "overlap": -16},
        {"tile": 64, "overlap": 16, "batch_size": 0},
        {"tile": 64.0, "overlap": 16},
    ],
)
def test_bad_window_options_are_config_errors(bb, kw, tmp_path):
    with pytest.raises(ConfigError):
        dense_features(bb, _img(64, 64), max_tokens=1, **kw)
    from tests.geo_factory import make_geotiff

    p = make_geotiff(tmp_path / "s.tif", np.zeros((3, 32, 32), np.uint8) + 9)
    with pytest.raises(ConfigError):
        scene_features(bb, p, progress=False, **kw)


@pytest.mark.parametrize("resolution", [0, -5, 100.0, "96", (96,)])
def test_bad_resolution_is_config_error(bb, resolution):
    with pytest.raises(ConfigError):
        dense_features(bb, _img(64, 64), resolution=resolution)


@pytest.mark.parametrize("shape", [(0, 50, 3), (50, 0), (3, 40, 0)])
def test_empty_image_is_input_error(bb, shape):
    with pytest.raises(InputError, match="empty"):
        dense_features(bb, np.zeros(shape, np.float32), channels_first=len(shape) == 3 and shape[0] == 3)


def test_bool_numpy_image_scales_like_bool_tensor():
    m = np.eye(20, dtype=bool)
    assert torch.equal(to_tensor(m), to_tensor(torch.from_numpy(m))) and float(to_tensor(m).max()) == 1.0


def test_dense_features_are_ordinary_tensors(bb):
    """Not inference-mode tensors: normalising in place and training a torch head on them must work."""
    df = dense_features(bb, _img(48, 64), layers=[0])
    assert not df.patches.is_inference() and not df.cls.is_inference() and not df.layers[0].is_inference()
    df.patches /= df.patches.norm(dim=-1, keepdim=True)
    torch.nn.Linear(192, 2)(df.patches).sum().backward()


def test_windows_fit_a_thin_image(bb):
    """A side shorter than the tile gets windows of that side, not windows of mostly padding."""
    d = dense_features(bb, _img(64, 400), policy="pad", max_tokens=10, tile=128, overlap=32)
    assert d.windows == windows_needed(64, 400, 128, 32) == 4 and d.grid == (4, 25)
    # the first window (64 x 128 px, no padding) alone gives the first patches exactly
    own = dense_features(bb, _img(64, 400)[:, :128], policy="pad")
    torch.testing.assert_close(d.patches[:, :4], own.patches[:, :4], atol=1e-5, rtol=0)


def test_scene_smaller_than_a_tile_is_not_dropped(bb, tmp_path):
    """A 40 x 50 raster with the default 512 px tile used to give an all-NaN map (0 windows)."""
    from tests.geo_factory import make_geotiff

    img = (np.random.default_rng(1).random((3, 40, 50)) * 255).astype(np.uint8)
    p = make_geotiff(tmp_path / "small.tif", img)
    sm = scene_features(bb, p, progress=False)
    assert sm.windows == 1 and sm.values.shape == (192, 3, 4)
    assert sm.valid.all()  # the last patch row / column are judged on their pixels inside the scene
    ref = dense_features(bb, img, policy="pad", channels_first=True)  # the same padded input in one pass
    got = torch.from_numpy(np.ascontiguousarray(sm.values.transpose(1, 2, 0)))
    torch.testing.assert_close(got, ref.patches, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("reduce", "channels"),
    [(lambda f: f[..., :5], 3), (lambda f: f.mean(-1), 1), (lambda f: f[..., :5].numpy(), 5), (lambda f: f, 0)],
)
def test_scene_reduce_shape_is_checked(bb, tmp_path, reduce, channels):
    from tests.geo_factory import make_geotiff

    p = make_geotiff(tmp_path / "s.tif", np.full((3, 40, 50), 90, np.uint8))
    with pytest.raises(ConfigError):
        scene_features(bb, p, reduce=reduce, channels=channels, progress=False)


def test_scene_memmap_values_stay_on_disk(bb, tmp_path):
    from tests.geo_factory import make_geotiff, smooth_bands

    p = make_geotiff(tmp_path / "s.tif", smooth_bands(3, 100, 120))
    mem = scene_features(bb, p, tile=64, overlap=16, progress=False)
    disk = scene_features(bb, p, tile=64, overlap=16, progress=False, memmap_dir=tmp_path)
    assert isinstance(disk.values, np.memmap) and str(tmp_path) in str(disk.values.filename)
    np.testing.assert_array_equal(np.asarray(disk.values), mem.values)
    np.testing.assert_array_equal(disk.valid, mem.valid)


def test_mosaic_in_place_result():
    from domains import Mosaic, tile_grid

    rng = np.random.default_rng(0)
    mos = Mosaic(100, 120, 2, scale=16, overlap=32)
    for t in tile_grid(100, 120, 64, 32):
        mos.add(t, rng.random((2, 4, 4)).astype(np.float32))
    ref = mos.result(fill=np.nan)
    got = mos.result(fill=np.nan, in_place=True)
    np.testing.assert_array_equal(got, ref)
    assert mos.result() is got
    with pytest.raises(RuntimeError, match="finished"):
        mos.add(tile_grid(100, 120, 64, 32)[0], np.zeros((2, 4, 4), np.float32))


# ------------------------------------------------------------------------------------------ cache


def test_cache_keys_normalise_options(bb):
    c, img = FeatureCache(), _img(32, 32)
    assert c.key(bb, img, layers=[-1]) == c.key(bb, img, layers=[1]) == c.key(bb, img, layers=(1, -1))
    assert c.key(bb, img) == c.key(bb, img, max_tokens=4096, layers=[], batch_size=8, progress=True)
    assert c.key(bb, img, resolution=(32, 32)) == c.key(bb, img, resolution=[np.int64(32), 32])
    assert c.key(bb, img) != c.key(bb, img, layers=[0])
    with pytest.raises(ConfigError, match="resoluton"):
        c.key(bb, img, resoluton=32)
    with pytest.raises(InputError, match="out of range"):  # never served from the entry of layers=[1]
        c.features(bb, img, layers=[3])


def test_cache_fingerprint_follows_dtype_and_normalisation():
    bb = dinoapp.load_backbone("vit_tiny", depth=2, seed=0)
    c = FeatureCache()
    fp = c.fingerprint(bb)
    bb.mean = (0.1, 0.2, 0.3)
    assert c.fingerprint(bb) == dinoapp.backbone_fingerprint(bb) != fp
    fp = c.fingerprint(bb)
    bb.half()
    assert c.fingerprint(bb) == dinoapp.backbone_fingerprint(bb) != fp


def test_cache_unwritable_disk_degrades_to_memory(bb, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    c = FeatureCache(disk_dir=tmp_path / "file" / "cache")
    with pytest.warns(RuntimeWarning, match="memory only"):
        a = c.features(bb, _img(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert c.features(bb, _img(32, 32)) is a and c.features(bb, _img(32, 32, seed=1)) is not a


def test_cache_computes_a_key_once_under_concurrency(bb, tmp_path, monkeypatch):
    import dinoapp.cache as cache_mod

    calls = []
    real = cache_mod.dense_features

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "dense_features", slow)
    c, img, got = FeatureCache(disk_dir=tmp_path), _img(32, 32), []
    threads = [threading.Thread(target=lambda: got.append(c.features(bb, img))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert c.misses == 1 and c.hits == 3 and not list(tmp_path.glob(".*.tmp"))


def test_cache_digest_of_half_precision_tensors():
    t = torch.rand(3, 8, 8)
    assert input_digest(t.bfloat16()) != input_digest(t.half()) != input_digest(t)
    assert input_digest(t.bfloat16()) == input_digest(t.bfloat16().clone())


# -------------------------------------------------------------------------------------------- viz


def test_viz_odd_features():
    f = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(viz.pca_rgb(torch.from_numpy(f).bfloat16()), viz.pca_rgb(f), atol=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(viz.pca_rgb(np.ones((4, 5, 8), np.float32)) == 0.5)  # a constant map: grey, no warning
    with pytest.raises(InputError, match="NaN"):
        viz.similarity_map(f, np.full(8, np.nan))
    with pytest.raises(InputError, match="max_samples"):
        viz.kmeans_parts(f, 5, max_samples=3)
    np.testing.assert_allclose(viz.dense_matches(f, f[::-1], chunk=0), viz.dense_matches(f, f[::-1]), atol=1e-6)


def test_overlay_of_signed_integer_ct_is_stretched():
    hu = np.random.default_rng(0).integers(-1000, 1500, (40, 50)).astype(np.int16)
    heat = np.zeros((4, 5))
    np.testing.assert_array_equal(viz.overlay(hu, heat, alpha=0), viz.overlay(hu.astype(np.float32), heat, alpha=0))
    assert viz.overlay(hu, heat, alpha=0).std() > 40  # used to be divided by 32767 and clipped: near black


# ------------------------------------------------------------------------------------------ heads


@pytest.fixture(scope="module")
def feats(bb):
    return dinoapp.extract(bb, torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), size=None,
                           layers=[0, 1])  # fmt: skip


def _masks(n: int = 3, h: int = 64, w: int = 64) -> np.ndarray:
    m = np.zeros((n, h, w), np.int64)
    m[:, :, w // 2 :] = 1
    return m


@pytest.mark.parametrize("kw", [{"epochs": 2.5}, {"batch_size": 1.0}, {"epochs": True}])
def test_seg_head_non_integer_options(feats, kw):
    with pytest.raises(ConfigError):
        heads.fit_seg_head(feats, _masks(), 2, **kw)


def test_seg_head_with_too_few_patches_per_batch():
    with pytest.raises(InputError, match="fewer than 2"):
        heads.fit_seg_head(torch.rand(4, 1, 1, 8), np.zeros((4, 16, 16), int), 2, batch_size=1, epochs=2)


def test_seg_head_negative_layers_with_backbone(bb, feats):
    head = heads.fit_seg_head(feats, _masks(), 2, layers=[0, -1], epochs=2, backbone=bb)
    assert head.layers == [0, 1]
    with pytest.raises(InputError, match="non-negative"):
        heads.fit_seg_head(feats, _masks(), 2, layers=[-1], epochs=2)


def test_seg_head_segments_images_of_different_sizes(bb, feats):
    head = heads.fit_seg_head(feats, _masks(), 2, epochs=2, backbone=bb, size=None)
    maps = head.segment(bb, [torch.rand(3, 40, 50), torch.rand(3, 64, 64)])
    assert [tuple(m.shape) for m in maps] == [(40, 50), (64, 64)]


def test_segment_scene_with_more_than_255_classes(bb, tmp_path):
    from tests.geo_factory import make_geotiff

    K = 300
    mod = heads.LinearSegHead(192, K)
    with torch.no_grad():
        mod.conv.bias.zero_()
        mod.conv.bias[280] = 100.0
    head = heads.SegHead(mod.eval(), K, [f"c{i}" for i in range(K)], identity=dinoapp.backbone_identity(bb))
    p = make_geotiff(tmp_path / "a.tif", np.full((3, 40, 50), 90, np.uint8))
    out = dinoapp.segment_scene(head, bb, p, tmp_path / "o", progress=False, probabilities=False)
    with rasterio.open(out["classes"]) as dst:
        a = dst.read(1)
        assert dst.dtypes[0] == "uint16" and dst.nodata == 65535 and set(np.unique(a)) == {280}


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_odd_inputs():
    rep = metrics.classification_report(["cat", "dog", "dog"], ["cat", "cat", "dog"])
    assert list(rep["per_class"]) == ["cat", "dog"] and rep["accuracy"] == pytest.approx(2 / 3)
    assert rep["per_class"]["dog"]["recall"] == 0.5
    with pytest.raises(InputError, match="empty"):
        metrics.average_precision([], [])
    with pytest.raises(InputError, match="NaN"):
        metrics.average_precision([0, 1], [np.nan, 0.5])
    with pytest.raises(InputError, match="ragged"):
        metrics.accuracy([[0, 1], [0]], [0, 1, 0])


# -------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from PIL import Image

    from tests.geo_factory import make_geotiff, smooth_bands

    d = tmp_path_factory.mktemp("frozen_cli")
    bb = dinoapp.load_backbone("vit_tiny", depth=2, seed=0)
    dinoapp.save_backbone(bb, d / "bb.safetensors")
    for sub in ("images", "masks", "small_masks"):
        (d / sub).mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((48, 64, 3)) * 60 + 20).astype(np.uint8)
        img[8:40, 8:40] = (230, 220, 40)
        mask = np.zeros((48, 64), np.uint8)
        mask[8:40, 8:40] = 1
        Image.fromarray(img).save(d / "images" / f"im{i}.png")
        Image.fromarray(mask).save(d / "masks" / f"im{i}.png")
        Image.fromarray(mask[::2, ::2]).save(d / "small_masks" / f"im{i}.png")
    (d / "one_class.csv").write_text("path,label\nimages/im0.png,a\nimages/im1.png,a\n")
    (d / "masks" / "im0.json").write_text("{}")  # not a mask: ignored
    (d / "masks" / "im2.png").unlink()  # an image without a mask: left out, with a note
    make_geotiff(d / "plain3.tif", smooth_bands(3, 40, 50))  # 3 bands, no colour tags
    make_geotiff(d / "grey.tif", smooth_bands(1, 70, 90))
    return d


def _run(args, capsys):
    from dinoapp.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_user_mistakes_are_one_line_errors(cli_files, tmp_path, capsys):
    d, bb = cli_files, ["--backbone", cli_files / "bb.safetensors"]
    cases = [
        (["fit-head", "--labels", tmp_path / "nope.csv", "--out", tmp_path / "h.safetensors"], "no such CSV"),
        (["fit-head", "--labels", d / "one_class.csv", "--out", tmp_path / "h.safetensors"], "at least 2 classes"),
        (["fit-head", "--images", d / "images", "--masks", d / "masks", "--layers", "x", "--out", tmp_path / "h"],
         "--layers"),
        (["fit-head", "--images", d / "images", "--masks", d / "small_masks", "--out", tmp_path / "h"], "size"),
        (["extract", d / "images" / "im0.png", "--out", tmp_path / "f", "--tile", "64", "--overlap", "64",
          "--max-tokens", "1"], "overlap"),
        (["similarity", d / "plain3.tif", "--pixel", "45", "3", "--out", tmp_path / "s.png"], "40 x 50 image"),
        (["extract", d / "images" / "im0.png", "--out", d / "images" / "im0.png" / "x.safetensors"], "error"),
    ]  # fmt: skip
    for args, needle in cases:
        rc, _, err = _run([*args, *bb], capsys)
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()[-1]) > 10


def test_cli_fit_head_pairs_and_negative_layers(cli_files, tmp_path, capsys):
    d = cli_files
    args = ["fit-head", "--images", d / "images", "--masks", d / "masks", "--epochs", "3", "--layers", "-1"]
    rc, out, err = _run([*args, "--out", tmp_path / "h.safetensors", "--backbone", d / "bb.safetensors"], capsys)
    assert rc == 0 and "1 of 3 images have no mask" in err and "training mIoU" in out
    assert heads.load_head(tmp_path / "h.safetensors").layers == [1]


def test_cli_predict_on_untagged_and_grey_geotiffs(cli_files, tmp_path, capsys):
    d = cli_files
    rc, _, _ = _run(["fit-head", "--images", d / "images", "--masks", d / "masks", "--epochs", "3", "--out",
                     tmp_path / "h.safetensors", "--backbone", d / "bb.safetensors"], capsys)  # fmt: skip
    assert rc == 0
    rc, _, err = _run(["predict", d / "plain3.tif", d / "grey.tif", "--head", tmp_path / "h.safetensors", "--out",
                       tmp_path / "pred", "--backbone", d / "bb.safetensors"], capsys)  # fmt: skip
    assert rc == 0, err
    for name, shape in (("plain3", (40, 50)), ("grey", (70, 90))):  # smaller than a tile, sizes not multiples of 16
        with rasterio.open(tmp_path / "pred" / f"{name}_classes.tif") as dst:
            assert dst.shape == shape and (dst.read(1) != 255).all()  # no nodata: every pixel is valid
