"""Writing outputs as GeoTIFF: CRS/transform round trip on the scaled grid, tiling, compression, tags."""

from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import domains  # noqa: E402
from domains import samples  # noqa: E402
from tests.geo_factory import make_geotiff, smooth_bands  # noqa: E402


def test_class_map_at_patch_resolution_round_trip(tmp_path):
    arr, meta = domains.read_geotiff(samples.path("sentinel2"), bands="rgb")
    classes = (np.arange(16 * 16).reshape(16, 16) % 5).astype(np.int64)  # a 256 px scene -> 16 x 16 patches
    out = domains.write_geotiff(tmp_path / "o" / "classes.tif", classes, like=meta, class_names=list("abcde"),
                                tags={"backbone": "vits16", "sha256": "ab12"})
    with rasterio.open(out) as dst, rasterio.open(samples.path("sentinel2")) as src:
        assert dst.crs == src.crs
        assert dst.transform == src.transform @ Affine.scale(16)
        assert dst.transform.a == 160.0 and dst.bounds == src.bounds  # same ground, 16x bigger pixels
        np.testing.assert_array_equal(dst.read(1), classes)
        assert dst.dtypes[0] == "uint8" and dst.block_shapes[0] == (16, 16) and dst.compression.name == "deflate"
        assert dst.colormap(1)[3][:3] != dst.colormap(1)[4][:3]
        tags = dst.tags()
        assert tags["DINOAPP_BACKBONE"] == "vits16" and tags["DINOAPP_SHA256"] == "ab12"
        assert tags["DINOAPP_CLASSES"] == "a,b,c,d,e" and tags["DINOAPP_SOURCE"] == "sentinel2_b2348_256.tif"
        assert tags["DINOAPP_KIND"] == "classes"


def test_rotated_geotransform_round_trip(tmp_path):
    rot = Affine.translation(300000, 5000000) @ Affine.rotation(20) @ Affine.scale(2.0, -2.0)
    p = make_geotiff(tmp_path / "rot.tif", smooth_bands(3, 64, 96), transform=rot)
    arr, meta = domains.read_geotiff(p, window=(32, 16, 64, 32))
    assert meta["transform"] == rot @ Affine.translation(32, 16)
    sim = np.random.default_rng(0).random((2, 4)).astype(np.float32)  # one value per 16 px patch
    out = domains.write_geotiff(tmp_path / "sim.tif", sim, like=meta)
    with rasterio.open(out) as dst:
        t = dst.transform
        assert t.almost_equals(rot @ Affine.translation(32, 16) @ Affine.scale(16))
        # the centre of output pixel (1, 2) is the centre of source pixels rows 16+16..16+32, cols 32+32..32+48
        np.testing.assert_allclose(t * (2.5, 1.5), rot * (32 + 40, 16 + 24))
        np.testing.assert_array_equal(dst.read(1), sim)
        assert dst.dtypes[0] == "float32"


def test_probabilities_rgb_and_nan(tmp_path):
    tr = Affine(10, 0, 0, 0, -10, 0)
    prob = np.random.default_rng(1).random((3, 40, 50)).astype(np.float32)
    prob[:, :3, :3] = np.nan
    p = domains.write_geotiff(tmp_path / "p.tif", prob, crs="EPSG:4326", transform=tr, band_names=["a", "b", "c"],
                              kind="probabilities")
    with rasterio.open(p) as dst:
        back = dst.read()
        assert np.isnan(dst.nodata) and dst.descriptions == ("a", "b", "c")
        np.testing.assert_array_equal(np.isnan(back), np.isnan(prob))
        np.testing.assert_array_equal(back[~np.isnan(back)], prob[~np.isnan(prob)])
    rgb = domains.write_geotiff(tmp_path / "rgb.tif", np.clip(prob, 0, 1), crs="EPSG:4326", transform=tr, kind="rgb")
    with rasterio.open(rgb) as dst:
        assert dst.dtypes[0] == "uint8" and dst.colorinterp[0].name == "red"
        np.testing.assert_array_equal(dst.read()[:, 5:, 5:], (prob[:, 5:, 5:] * 255 + 0.5).astype(np.uint8))
    again, meta = domains.load(rgb)  # our reader reads our writer
    assert meta["reader"] == "geotiff" and meta["channels"] == ["red", "green", "blue"]


def test_shape_mismatch_is_a_georeference_error(tmp_path):
    arr, meta = domains.read_geotiff(samples.path("aerial"))  # 212 x 276
    with pytest.raises(domains.GeoreferenceError, match="scale="):
        domains.write_geotiff(tmp_path / "x.tif", np.zeros((10, 40)), like=meta)
    p = domains.write_geotiff(tmp_path / "y.tif", np.zeros((13, 17)), like=meta, scale=16)  # 212//16, 276//16
    with rasterio.open(p) as dst:
        assert dst.transform.a == 80.0
    with pytest.raises(ValueError, match="integer labels"):
        domains.write_geotiff(tmp_path / "z.tif", np.full((4, 4), 0.5), like=meta, kind="classes", scale=16)


def test_scene_mosaic_written_on_the_patch_grid(tmp_path):
    """Tile a scene, mosaic per-patch outputs, write with the scene's info: the file sits on the scene."""
    data = smooth_bands(3, 200, 230, seed=5)
    p = make_geotiff(tmp_path / "s.tif", data, crs="EPSG:32631")
    info = domains.raster_info(p)
    assert info["shape"] == (3, 200, 230) and info["georeferenced"]
    mos = domains.Mosaic(200, 230, 1, scale=16, overlap=32)
    for arr, m in domains.iter_tiles(p, tile=96, overlap=32):
        mos.add(m["tile"], arr.mean(axis=0).reshape(6, 16, 6, 16).mean(axis=(1, 3)))
    out = domains.write_geotiff(tmp_path / "map.tif", mos.result(), like=info, scale=16, kind="float")
    with rasterio.open(out) as dst, rasterio.open(p) as src:
        assert dst.shape == (13, 15) and dst.crs == src.crs
        assert dst.transform == src.transform @ Affine.scale(16)
        # the map's top-left pixel covers exactly the scene's top-left 16 x 16 pixels
        assert dst.xy(0, 0) == src.xy(8, 8, offset="ul")  # map pixel centre = corner shared by src px 7 and 8
