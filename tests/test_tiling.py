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
