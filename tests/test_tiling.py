"""Tiling a scene and mosaicking tile outputs back: coverage, alignment, mosaic == direct read."""

from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import domains  # noqa: E402
from domains import GeoreferenceError, Mosaic, iter_tiles, tile_grid  # noqa: E402
from tests.geo_factory import make_geotiff, smooth_bands  # noqa: E402


@pytest.mark.parametrize("edge", ["shift", "pad", "drop"])
@pytest.mark.parametrize("hw", [(300, 457), (512, 512), (100, 64), (1, 1)])
def test_grid_covers_scene_aligned(edge, hw):
    H, W = hw
    tiles = tile_grid(H, W, tile=128, overlap=32, edge=edge)
    cover = np.zeros((H, W), int)
    for t in tiles:
        assert t.y0 % 16 == 0 and t.x0 % 16 == 0 and t.height == t.width == 128
        cover[max(t.y0, 0) : t.y0 + 128, max(t.x0, 0) : t.x0 + 128] += 1
    if edge == "drop":
        assert all(t.y0 + 128 <= H and t.x0 + 128 <= W for t in tiles)
        if H >= 128 and W >= 128:
            assert cover[: (H - 128) // 96 * 96 + 128, : (W - 128) // 96 * 96 + 128].min() >= 1
    else:
        assert cover.min() >= 1  # every pixel in some tile
    if edge == "shift" and H >= 128 and W >= 128:
        assert all(t.y0 + 128 - H < 16 and t.x0 + 128 - W < 16 for t in tiles)  # < one patch of padding
    assert [t.index for t in tiles] == list(range(len(tiles)))


@pytest.mark.parametrize(
    "kw, match",
    [({"tile": 100}, "multiple of 16"), ({"overlap": 24}, "multiple of 16"), ({"overlap": 128}, "overlap"),
     ({"edge": "wrap"}, "edge must be")],
)
def test_grid_rejects_bad_parameters(kw, match):
    args = {"tile": 128, "overlap": 32, **kw}
    with pytest.raises(ValueError, match=match):
        tile_grid(300, 300, **args)


@pytest.fixture
def scene(tmp_path):
    data = smooth_bands(4, 333, 401, seed=3)
    data[:, :120, :150] = 0  # a nodata corner bigger than a tile
    return make_geotiff(tmp_path / "s.tif", data, nodata=0, descriptions=["b", "g", "r", "n"]), data


@pytest.mark.parametrize("edge, blend", [("shift", "linear"), ("pad", "cosine"), ("pad", "mean")])
def test_tiled_mosaic_equals_direct_read(scene, edge, blend):
    path, _ = scene
    stats = domains.compute_band_stats(path)
    direct, meta = domains.read_geotiff(path, stats=stats)
    mos = Mosaic(333, 401, 4, overlap=32, blend=blend)
    n = 0
    for arr, m in iter_tiles(path, tile=96, overlap=32, edge=edge, stats=stats):
        assert arr.shape == (4, 96, 96)
        mos.add(m["tile"], arr, valid=m["valid"])
        n += 1
    out = mos.result()
    np.testing.assert_allclose(out[:, meta["valid"]], direct[:, meta["valid"]], atol=2e-6)
    assert np.array_equal(mos.coverage(), meta["valid"])
    assert n < len(tile_grid(333, 401, 96, 32, edge=edge))  # all-nodata tiles were skipped


def test_auto_stretch_is_one_scene_wide_stretch(scene):
    path, _ = scene
    tiles = list(iter_tiles(path, tile=128, overlap=0))
    lows = {tuple(m["stretch"]["low"]) for _, m in tiles}
    assert len(lows) == 1 and tiles[0][1]["stretch"]["method"] == "stats"


def test_min_valid_skips_mostly_nodata_tiles(scene):
    path, data = scene
    valid = (data != 0).any(axis=0)
    kept = [m for _, m in iter_tiles(path, tile=64, overlap=0, edge="pad", min_valid=0.5)]
    every = [m for _, m in iter_tiles(path, tile=64, overlap=0, edge="pad", min_valid=0.0)]
    assert 0 < len(kept) < len(every)
    assert all(m["valid_fraction"] >= 0.5 for m in kept)
    t = kept[0]["tile"]
    pad = np.zeros((400, 448), bool)
    pad[:333, :401] = valid
    assert kept[0]["valid_fraction"] == pytest.approx(pad[t.y0 : t.y0 + 64, t.x0 : t.x0 + 64].mean())


def test_patch_resolution_mosaic_matches_block_means(scene, tmp_path):
    """Outputs at 1/16 (one value per patch), mosaicked, equal block means of the direct read."""
    path, _ = scene
    stats = domains.compute_band_stats(path)
    direct, meta = domains.read_geotiff(path, stats=stats)
    H, W = 333 // 16 * 16, 401 // 16 * 16
    ref = direct[:, :H, :W].reshape(4, H // 16, 16, W // 16, 16).mean(axis=(2, 4))
    for memmap in (None, tmp_path):
        mos = Mosaic(333, 401, 4, scale=16, overlap=32, memmap_dir=memmap)
        for arr, m in iter_tiles(path, tile=128, overlap=32, stats=stats, min_valid=0.0):
            mos.add(m["tile"], arr.reshape(4, 8, 16, 8, 16).mean(axis=(2, 4)))
        out = mos.result()
        assert out.shape == (4, 21, 26)
        np.testing.assert_allclose(out[:, : H // 16, : W // 16], ref, atol=1e-5)


def test_mosaic_rejects_misaligned_and_misshaped_tiles():
    mos = Mosaic(100, 100, 2, scale=16)
    with pytest.raises(GeoreferenceError, match="grid"):
        mos.add(domains.Tile(0, 0, 0, 8, 0, 64, 64), np.zeros((2, 4, 4)))
    with pytest.raises(GeoreferenceError, match="expected"):
        mos.add(domains.Tile(0, 0, 0, 0, 0, 64, 64), np.zeros((2, 8, 8)))


@pytest.mark.parametrize("edge", ["shift", "pad"])
def test_write_tiles_png_follow_iter_tiles_with_aligned_label_crops(scene, tmp_path, edge):
    """PNG tiles: one per iter_tiles tile, named {stem}_{y0}_{x0}, 8-bit display RGB; label crops line up."""
    from PIL import Image

    path, data = scene
    H, W = data.shape[1:]
    labels = (np.arange(H)[:, None] // 7 + np.arange(W)[None, :] // 11) % 5  # [H, W] int64 class ids 0..4
    out = domains.write_tiles(path, tmp_path / "tiles", 96, overlap=32, edge=edge, min_valid=0.2, labels=labels,
                              labels_dir=tmp_path / "labels")  # fmt: skip
    want = list(iter_tiles(path, tile=96, overlap=32, edge=edge, min_valid=0.2, bands="rgb"))
    assert 0 < len(want) < len(tile_grid(H, W, 96, 32, edge=edge))  # the nodata corner's tiles were skipped
    assert [p.name for p in out] == [f"s_{m['tile'].y0:05d}_{m['tile'].x0:05d}.png" for _, m in want]
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir()) == sorted(p.name for p in out)
    for p, (x, m) in zip(out, want):
        t = m["tile"]
        img = np.asarray(Image.open(p))
        assert img.dtype == np.uint8 and img.shape == (96, 96, 3)
        np.testing.assert_array_equal(img, (x.transpose(1, 2, 0) * 255).round().astype(np.uint8))
        lab = np.asarray(Image.open(tmp_path / "labels" / p.name))
        assert lab.dtype == np.uint8 and lab.shape == (96, 96)
        inside = np.zeros((96, 96), bool)
        inside[: H - t.y0, : W - t.x0] = True
        ok = inside & m["valid"]
        assert (lab[~ok] == 255).all()  # beyond the scene or nodata: unlabelled
        ref = np.full((96, 96), -1)
        ref[: min(96, H - t.y0), : min(96, W - t.x0)] = labels[t.y0 : t.y0 + 96, t.x0 : t.x0 + 96]
        np.testing.assert_array_equal(lab[ok], ref[ok])
    if edge == "pad":
        assert any((t := m["tile"]).y0 + 96 > H or t.x0 + 96 > W for _, m in want)  # the padding was exercised


def test_write_tiles_geotiff_tiles_sit_on_their_window(scene, tmp_path):
    """fmt='tif': float tiles of raw values with the scene's CRS and the transform of their window."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    path, data = scene
    out = domains.write_tiles(path, tmp_path / "t", 128, overlap=64, fmt="tif", bands=None, min_valid=0.0)
    want = list(iter_tiles(path, tile=128, overlap=64, bands=None, stretch="none"))
    assert [p.name for p in out] == [f"s_{m['tile'].y0:05d}_{m['tile'].x0:05d}.tif" for _, m in want]
    padded = np.zeros((4, 512, 512), data.dtype)  # "shift" tiles may reach < 16 px beyond the scene
    padded[:, :333, :401] = data
    with rasterio.open(path) as src:
        for p, (x, m) in zip(out, want):
            t = m["tile"]
            with rasterio.open(p) as tif:
                assert tif.crs == src.crs and tif.count == 4 and tif.dtypes[0] == "float32"
                assert tif.transform == window_transform(Window(t.x0, t.y0, t.width, t.height), src.transform)
                assert tif.descriptions == ("b", "g", "r", "n")
                v = tif.read()
            ok = m["valid"]
            np.testing.assert_array_equal(v[:, ok], padded[:, t.y0 : t.y0 + 128, t.x0 : t.x0 + 128][:, ok])
            np.testing.assert_array_equal(v[:, ok], x[:, ok])
            assert np.isnan(v[:, ~ok]).all()  # nodata stays nodata
    back, meta = domains.load(out[0], stretch="none")  # reads back as a georeferenced raster, nodata invalid
    assert np.array_equal(meta["valid"], want[0][1]["valid"])


def test_write_tiles_rejects_what_it_cannot_write(scene, tmp_path):
    path, data = scene
    with pytest.raises(domains.OptionValueError, match="1 .grey. or 3 .RGB. bands"):
        domains.write_tiles(path, tmp_path / "a", 128, bands=None)  # 4 bands as PNG
    with pytest.raises(domains.OptionValueError, match="fmt"):
        domains.write_tiles(path, tmp_path / "b", 128, fmt="jpg")
    with pytest.raises(domains.OptionValueError, match="labels_dir"):
        domains.write_tiles(path, tmp_path / "c", 128, labels=np.zeros(data.shape[1:], np.uint8))
    with pytest.raises(GeoreferenceError, match="333 x 401"):
        domains.write_tiles(path, tmp_path / "d", 128, labels=np.zeros((10, 10), np.uint8), labels_dir=tmp_path / "l")
    with pytest.raises(domains.OptionValueError, match="integers"):
        domains.write_tiles(path, tmp_path / "e", 128, labels=np.zeros(data.shape[1:]), labels_dir=tmp_path / "l")
