"""Regressions for reviewer findings: 16-bit image stretch, nodata in predictions, logistic C choice, strip
GeoTIFF export, ``~`` in paths, ``domains.samples`` after ``import domains``, and two error messages."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import dinoapp
import domains
from dinoapp import explore, heads
from dinoapp.errors import InputError
from dinoapp.preprocess import preprocess


def _geotiff(path, data, **kw):
    from affine import Affine
    from geo_factory import make_geotiff

    return make_geotiff(path, data, transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4_600_000.0), **kw)


def test_12bit_png_is_stretched_like_a_uint16_geotiff(tmp_path):
    pytest.importorskip("rasterio")
    from PIL import Image

    g = np.random.default_rng(0)
    a = (g.random((48, 64)) * 4095).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(a).save(tmp_path / "x.png")
    li = explore.open_image(tmp_path / "x.png")
    assert li.rgb.max() - li.rgb.min() >= 240  # not almost black (/65535 gave 0..16)
    assert li.array.std() > 0.2
    geo = explore.open_image(_geotiff(tmp_path / "g.tif", a[None]))
    np.testing.assert_array_equal(li.array, geo.array)
    np.testing.assert_array_equal(li.rgb, geo.rgb)
    old = explore.open_image(tmp_path / "x.png", stretch="dtype")  # the old scaling on request
    np.testing.assert_array_equal(old.array, a[None].astype(np.float32) / 65535.0)
    # 8-bit images are untouched whatever the stretch
    b = g.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(b).save(tmp_path / "b.png")
    for s in (None, "percentile"):
        np.testing.assert_array_equal(explore.open_image(tmp_path / "b.png", stretch=s).rgb, b)
    # domains.read_image keeps dividing by 65535 unless asked
    np.testing.assert_array_equal(domains.read_image(tmp_path / "x.png")[0], old.array)


def test_16bit_colour_png_is_stretched_like_a_geotiff(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    g = np.random.default_rng(1)
    b = (g.random((3, 40, 50)) * 4095).astype(np.uint16)
    with rasterio.open(tmp_path / "c.png", "w", driver="PNG", height=40, width=50, count=3, dtype="uint16") as dst:
        dst.write(b)
    li = explore.open_image(tmp_path / "c.png")
    assert li.kind == "image" and li.rgb.max() == 255
    np.testing.assert_array_equal(li.array, explore.open_image(_geotiff(tmp_path / "g.tif", b,
                                  descriptions=("red", "green", "blue"))).array)  # fmt: skip


def test_predictions_leave_nodata_unlabelled(bb, tmp_path):
    pytest.importorskip("rasterio")
    from geo_factory import smooth_bands

    data = smooth_bands(3, 64, 80)
    data[:, :16, :32] = 0
    li = explore.open_image(_geotiff(tmp_path / "nd.tif", data, nodata=0))
    assert not li.valid[:16, :32].any()
    v = explore.FeatureView(bb, li, resolution=80)
    mask = np.full((64, 80), 255, np.uint8)
    mask[40:48, 5:30], mask[40:48, 50:75] = 0, 1
    head = explore.fit_head_from_scribbles([v], [mask], 2, epochs=5)
    labels, probs = explore.predict(head, v)
    assert (labels[~li.valid] == explore.UNLABELLED).all() and (labels[li.valid] < 2).all()
    counts = {k: int((labels == k).sum()) for k in range(2)}
    assert sum(counts.values()) == int(li.valid.sum())  # pixel counts leave nodata out
    truth = np.zeros((64, 80), np.uint8)  # a ground truth labelling nodata pixels too
    t = li.mask_invalid(truth)
    assert (t[~li.valid] == 255).all() and (t[li.valid] == 0).all()
    from dinoapp.metrics import segmentation_report

    rep = segmentation_report(t, labels, 2, ignore_index=explore.UNLABELLED)
    assert rep["n_pixels"] == int(li.valid.sum())
    import rasterio

    with rasterio.open(explore.export_geotiff(labels, li, tmp_path / "l.tif", kind="labels")) as dst:
        assert dst.nodata == 255 and (dst.read(1)[~li.valid] == 255).all()
    assert explore.open_image(_geotiff(tmp_path / "ok.tif", smooth_bands(3, 32, 32))).mask_invalid(truth[:32, :32]) \
        is not None  # fmt: skip


def test_logistic_classifier_is_confident_on_separable_data():
    g = np.random.default_rng(0)
    centres = g.normal(0, 1, (3, 32)) * 4
    X = np.concatenate([c + g.normal(0, 0.3, (3, 32)) for c in centres])  # 3 samples per class
    y = np.repeat(["a", "b", "c"], 3)
    clf = heads.LogisticClassifier().fit(torch.from_numpy(X).float(), y)
    p = clf.predict_proba(torch.from_numpy(X).float())
    true = p[np.arange(9), np.repeat([0, 1, 2], 3)]
    assert (true > 0.6).all(), (clf.C_, true)
    assert clf.C_ > 1e-4


def test_strip_geotiff_exports_on_the_input_raster(bb, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from geo_factory import smooth_bands

    p = _geotiff(tmp_path / "strip.tif", smooth_bands(3, 40, 2400), descriptions=("red", "green", "blue"))
    li = explore.open_image(p)
    v = explore.FeatureView(bb, li, resolution=448)
    assert v.grid == (1, 28)
    out = explore.export_geotiff(explore.pca_grid(v), li, tmp_path / "pca.tif")
    with rasterio.open(p) as src, rasterio.open(out) as dst:
        assert dst.shape == (1, 28) and dst.crs == src.crs
        np.testing.assert_allclose(tuple(dst.bounds), tuple(src.bounds), atol=1e-6)
    with pytest.raises(InputError, match="do not cover"):
        explore.export_geotiff(np.zeros((3, 28), np.float32), li, tmp_path / "bad.tif")


def test_user_paths_are_expanded(tmp_path, monkeypatch):
    pytest.importorskip("rasterio")
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cache = dinoapp.FeatureCache(disk_dir="~/cache/dinoapp")
    assert cache.disk_dir == tmp_path / "cache" / "dinoapp"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    assert explore.open_image("~/a.png").size == (20, 20)
    assert domains.load("~/a.png")[0].shape == (3, 20, 20)
    assert explore.export_png(np.zeros((4, 4), np.uint8), "~/out/m.png") == tmp_path / "out" / "m.png"
    st = domains.BandStats(bands=["grey"], band_indexes=[1], low=[0.0], high=[1.0])
    assert st.save("~/s.json") == tmp_path / "s.json" and domains.BandStats.load("~/s.json").low == [0.0]
    from affine import Affine

    out = domains.write_geotiff("~/g.tif", np.zeros((1, 8, 8), np.float32), crs="EPSG:32633",
                                transform=Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0))  # fmt: skip
    assert (tmp_path / "g.tif").is_file() and out is not None
    assert not (tmp_path / "~").exists()


def test_samples_after_import_domains():
    code = "import domains; print(domains.samples.path('aerial').name)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "aerial_rgbn_5m.tif"


def test_four_channel_hint_matches_the_layout(bb):
    with pytest.raises(InputError) as e:
        preprocess(np.zeros((4, 32, 32), np.float32), bb)
    assert "image[:3]" in str(e.value) and "bands=" in str(e.value) and "image[..., :3]" not in str(e.value)
    with pytest.raises(InputError) as e:
        preprocess(np.zeros((32, 32, 4), np.float32), bb)
    assert "image[..., :3]" in str(e.value)


def test_pad_that_does_not_fit_suggests_size_none(bb):
    with pytest.raises(InputError, match=r"policy='resize'.*size=None"):
        preprocess(np.zeros((300, 500, 3), np.float32), bb, size=224, policy="pad")
