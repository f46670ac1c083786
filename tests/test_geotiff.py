"""GeoTIFF reading: band selection, nodata/masks, scaling, stats, windows, against what rasterio reads."""

from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import domains  # noqa: E402
from domains import samples  # noqa: E402
from domains.errors import BandSelectionError, NoValidPixelsError  # noqa: E402
from tests.geo_factory import make_geotiff, smooth_bands  # noqa: E402


@pytest.fixture
def scene(tmp_path):
    """5-band uint16, odd size, nodata 0 in a corner block and along a stripe; band descriptions set."""
    data = smooth_bands(5, 157, 203, seed=1)
    data[:, :40, :50] = 0  # nodata corner (all bands)
    data[2, 100:110, :] = 0  # one band zero only: still valid (GDAL dataset mask)
    names = ["B02", "B03", "B04", "B08", "B11"]
    path = make_geotiff(tmp_path / "scene.tif", data, nodata=0, descriptions=names)
    return path, data


def test_values_band_order_and_nodata_mask(scene):
    path, data = scene
    arr, meta = domains.read_geotiff(path, stretch="none")
    assert arr.dtype == np.float32 and arr.shape == (5, 157, 203)
    expected_valid = (data != 0).any(axis=0)
    np.testing.assert_array_equal(meta["valid"], expected_valid)
    assert not meta["valid"][:40, :50].any() and meta["valid"][100:110, 60:].all()
    np.testing.assert_array_equal(arr[:, expected_valid], data[:, expected_valid].astype(np.float32))
    assert (arr[:, ~expected_valid] == 0).all()
    assert meta["channels"] == ["B02", "B03", "B04", "B08", "B11"] and meta["bands"] == [1, 2, 3, 4, 5]
    with rasterio.open(path) as src:
        assert meta["crs"] == src.crs and meta["transform"] == src.transform
        assert np.array_equal(meta["valid"], src.dataset_mask() > 0)

    sub, m2 = domains.read_geotiff(path, bands=[4, "b03"], stretch="none")
    assert m2["bands"] == [4, 2] and m2["channels"] == ["B08", "B03"]
    np.testing.assert_array_equal(sub, arr[[3, 1]])
    rgb, m3 = domains.read_geotiff(path, bands="rgb", stretch="none")
    assert m3["channels"] == ["B04", "B03", "B02"]
    np.testing.assert_array_equal(rgb, arr[[2, 1, 0]])


@pytest.mark.parametrize(
    "bands, needle",
    [
        (0, "numbered 1..5"),
        (6, "numbered 1..5"),
        ("B12", "no band is named"),
        ([1.5], "not a band number"),
        (True, "not a band number"),
    ],
)
def test_bad_band_selection_lists_bands(scene, bands, needle):
    path, _ = scene
    with pytest.raises(BandSelectionError, match=needle) as e:
        domains.read_geotiff(path, bands=bands)
    assert "B08" in str(e.value)  # the message lists what the raster has


def test_rgb_without_colour_names_is_a_clear_error(tmp_path):
    p = make_geotiff(tmp_path / "x.tif", smooth_bands(4, 32, 32))
    with pytest.raises(BandSelectionError, match="no red band"):
        domains.read_geotiff(p, bands="rgb")


def test_stretches(scene):
    path, data = scene
    valid = (data != 0).any(axis=0)
    d, m = domains.read_geotiff(path, stretch="dtype")
    np.testing.assert_allclose(d[:, valid], data[:, valid] / 65535.0, rtol=1e-6)
    assert m["value_range"] == (0.0, 1.0)
    p, m = domains.read_geotiff(path)  # auto: uint16 -> per-read percentiles
    lo, hi = np.percentile(data[:, valid].astype(np.float32), [2, 98], axis=1)
    np.testing.assert_allclose(m["stretch"]["low"], lo, rtol=1e-6)
    np.testing.assert_allclose(m["stretch"]["high"], hi, rtol=1e-6)
    ref = np.clip((data.astype(np.float32) - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1)
    np.testing.assert_allclose(p[:, valid], ref[:, valid], atol=1e-6)
    r, m = domains.read_geotiff(path, stretch="reflectance")
    np.testing.assert_allclose(r[:, valid], data[:, valid] / 10000.0, rtol=1e-6)
    with pytest.raises(ValueError, match="stretch must be one of"):
        domains.read_geotiff(path, stretch="log")


def test_scale_offset_tags_give_physical_values(tmp_path):
    data = smooth_bands(2, 40, 30, seed=2)
    p = make_geotiff(tmp_path / "l2.tif", data, scales=(2.75e-5, 2.75e-5), offsets=(-0.2, -0.2))
    arr, meta = domains.read_geotiff(p, stretch="reflectance")
    np.testing.assert_allclose(arr, data * 2.75e-5 - 0.2, rtol=1e-5, atol=1e-6)
    assert meta["scale_offset"]["applied"] and meta["stretch"]["dn_scale"] is None
    raw, _ = domains.read_geotiff(p, stretch="none", apply_scale_offset=False)
    np.testing.assert_array_equal(raw, data.astype(np.float32))


def test_float_nan_and_gdal_internal_mask(tmp_path):
    f = smooth_bands(3, 33, 47, dtype=np.float32, high=1) .astype(np.float32) / 4000
    f[1, 5, 7] = np.nan
    f[:, 20:, 40:] = np.nan
    p = make_geotiff(tmp_path / "f.tif", f, nodata=float("nan"))
    arr, meta = domains.read_geotiff(p, stretch="none")
    expect = ~np.isnan(f).any(axis=0)
    np.testing.assert_array_equal(meta["valid"], expect)
    assert np.isfinite(arr).all() and (arr[:, ~expect] == 0).all()
    np.testing.assert_array_equal(arr[:, expect], f[:, expect])
    assert meta["value_range"] is None

    mask = np.ones((33, 47), bool)
    mask[10:20, 10:30] = False
    data = smooth_bands(4, 33, 47)
    p2 = make_geotiff(tmp_path / "m.tif", data, mask=mask)
    arr, meta = domains.read_geotiff(p2, stretch="none")
    np.testing.assert_array_equal(meta["valid"], mask)
    np.testing.assert_array_equal(arr[:, mask], data[:, mask].astype(np.float32))


def test_windows_padding_and_decimation(scene):
    path, data = scene
    full, _ = domains.read_geotiff(path, stretch="none")
    w, m = domains.read_geotiff(path, window=(60, 30, 64, 48), stretch="none")
    np.testing.assert_array_equal(w, full[:, 30:78, 60:124])
    with rasterio.open(path) as src:
        assert m["transform"] == src.transform @ Affine.translation(60, 30)
    # a window hanging over the bottom-right edge keeps its size; outside pixels are invalid
    e, m = domains.read_geotiff(path, window=(180, 140, 64, 32), stretch="none")
    assert e.shape == (5, 32, 64)
    np.testing.assert_array_equal(e[:, :17, :23], full[:, 140:, 180:])
    assert not m["valid"][17:].any() and not m["valid"][:, 23:].any() and (e[:, 17:] == 0).all()
    d, m = domains.read_geotiff(path, out_shape=(50, 60), stretch="none")
    assert d.shape == (5, 50, 60)
    with rasterio.open(path) as src:
        t = m["transform"]
        assert t.c == src.transform.c and t.f == src.transform.f
        np.testing.assert_allclose(t.a * 60, src.transform.a * 203)
        np.testing.assert_allclose(t.e * 50, src.transform.e * 157)


def test_band_stats_scene_folder_and_json(tmp_path, scene):
    path, data = scene
    valid = (data != 0).any(axis=0)
    st = domains.compute_band_stats(path, bands=[1, 3])
    lo, hi = np.percentile(data[[0, 2]][:, valid].astype(np.float64), [2, 98], axis=1)
    np.testing.assert_allclose(st.low, lo, rtol=1e-6)
    np.testing.assert_allclose(st.high, hi, rtol=1e-6)
    assert st.count == valid.sum() and st.bands == ["B02", "B04"]
    np.testing.assert_allclose(st.mean, data[[0, 2]][:, valid].mean(axis=1), rtol=1e-5)
    js = st.save(tmp_path / "stats" / "s.json")
    back = domains.BandStats.load(js)
    assert back == st
    arr, meta = domains.read_geotiff(path, bands=[1, 3], stats=js)
    lo32, span32 = np.float32(lo)[:, None, None], np.float32(hi - lo)[:, None, None]
    ref = np.clip((data[[0, 2]].astype(np.float32) - lo32) / span32, 0, 1)
    np.testing.assert_allclose(arr[:, valid], ref[:, valid], atol=1e-6)
    assert meta["stretch"]["method"] == "stats"
    with pytest.raises(BandSelectionError, match="recompute"):
        domains.read_geotiff(path, bands=[1, 2], stats=st)

    folder = tmp_path / "tiles"
    folder.mkdir()
    d2 = smooth_bands(5, 64, 80, seed=9) * 2
    make_geotiff(folder / "a.tif", data, nodata=0, descriptions=["B02", "B03", "B04", "B08", "B11"])
    make_geotiff(folder / "sub" / "b.tif" if (folder / "sub").mkdir() is None else None, d2, nodata=0,
                 descriptions=["B02", "B03", "B04", "B08", "B11"])
    sf = domains.compute_band_stats(folder)
    allv = np.concatenate([data[:, valid], d2.reshape(5, -1)], axis=1).astype(np.float64)
    np.testing.assert_allclose(sf.low, np.percentile(allv, 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(sf.high, np.percentile(allv, 98, axis=1), rtol=1e-6)
    assert sorted(sf.sources) == ["a.tif", "b.tif"]
    make_geotiff(folder / "c.tif", d2[:3])
    with pytest.raises(BandSelectionError, match="same bands"):
        domains.compute_band_stats(folder)
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(domains.UnreadableFileError):
        domains.BandStats.load(tmp_path / "bad.json")


def test_band_stats_decimate_large_scenes(tmp_path):
    data = smooth_bands(2, 300, 400, seed=4)
    p = make_geotiff(tmp_path / "big.tif", data)
    st = domains.compute_band_stats(p, max_pixels=10_000)
    assert st.count <= 12_000
    exact = np.percentile(data.reshape(2, -1), [2, 98], axis=1)
    np.testing.assert_allclose([st.low, st.high], exact, rtol=0.05)  # a sample, close to the exact values


def test_all_nodata_raster(tmp_path):
    p = make_geotiff(tmp_path / "empty.tif", np.zeros((3, 40, 40), np.uint16), nodata=0)
    arr, meta = domains.read_geotiff(p, stretch="dtype")
    assert arr.shape == (3, 40, 40) and not meta["valid"].any() and (arr == 0).all()
    with pytest.raises(NoValidPixelsError, match="nodata"):
        domains.read_geotiff(p)  # auto -> percentile needs valid pixels
    with pytest.raises(NoValidPixelsError):
        domains.compute_band_stats(p)
    assert list(domains.iter_tiles(p, tile=32, overlap=0)) == []


def test_real_sentinel2_sample_matches_rasterio():
    p = samples.path("sentinel2")
    arr, meta = domains.read_geotiff(p, bands=["B08", "B04"], stretch="reflectance")
    with rasterio.open(p) as src:
        raw = src.read([4, 3]).astype(np.float32)
        assert meta["crs"].to_epsg() == 32618 and meta["transform"] == src.transform
    np.testing.assert_allclose(arr, raw / 10000.0, rtol=1e-6)
    assert meta["valid"].all()
    rgb, m = domains.read_geotiff(p, bands="rgb")
    assert m["bands"] == [3, 2, 1] and rgb.min() == 0.0 and rgb.max() == 1.0


def test_real_landsat_rotated_footprint_mask_matches_gdal():
    p = samples.path("landsat")
    arr, meta = domains.read_geotiff(p)
    with rasterio.open(p) as src:
        np.testing.assert_array_equal(meta["valid"], src.dataset_mask() > 0)
        raw = src.read()
    assert 0.4 < meta["valid"].mean() < 0.9  # the nodata corners
    np.testing.assert_allclose(arr[:, meta["valid"]], raw[:, meta["valid"]] / 255.0, rtol=1e-6)
    assert meta["stretch"]["method"] == "dtype"


def test_real_aerial_rgbn_by_colour_interpretation():
    arr, meta = domains.read_geotiff(samples.path("aerial"), bands="rgb")
    assert meta["channels"] == ["red", "green", "blue"]
    nir, m = domains.read_geotiff(samples.path("aerial"), bands="nir", stretch="none")
    assert nir.shape == (1, 212, 276) and m["bands"] == [4]


def _numpy_ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    r, n = red.astype(np.float64), nir.astype(np.float64)
    s = n + r
    return np.where(s != 0, (n - r) / np.where(s != 0, s, 1), 0.0)


def test_ndvi_finds_red_and_nir_by_name_and_matches_numpy(scene):
    """B04 / B08 found by description; 1-based numbers and names give the same; nodata -> NaN."""
    path, data = scene
    v = domains.ndvi(path)
    nodata = (data == 0).all(axis=0)  # the corner; the stripe where only B04 is 0 stays valid
    assert v.dtype == np.float32 and v.shape == data.shape[1:]
    np.testing.assert_array_equal(np.isnan(v), nodata)
    want = _numpy_ndvi(data[2], data[3])
    np.testing.assert_allclose(v[~nodata], want[~nodata], rtol=1e-6, atol=1e-6)
    assert np.nanmax(v) == 1.0  # red 0 in the stripe: NIR / NIR
    for kw in ({"red": 3, "nir": 4}, {"red": "B04", "nir": "b08"}, {"red": 3, "nir": "B08"}):
        np.testing.assert_array_equal(domains.ndvi(path, **kw), v, err_msg=str(kw))
    np.testing.assert_allclose(domains.ndvi(path, red=3, nir=5)[~nodata], _numpy_ndvi(data[2], data[4])[~nodata],
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    part = domains.ndvi(path, window=(60, 50, 40, 30))  # (col_off, row_off, width, height)
    np.testing.assert_array_equal(part, v[50:80, 60:100])


@pytest.mark.parametrize(
    "names, red, nir",
    [
        (["blue", "green", "red", "nir"], 3, 4),
        (["B2", "B3", "B4", "B8"], 3, 4),  # Sentinel-2 as Earth Engine names it (no B5: not Landsat numbering)
        (["B02", "B03", "B04", "B05", "B8A"], 3, 5),  # red edge B05 is not NIR; B8A is
        (["B2", "B3", "B4", "B5", "B8", "B8A"], 3, 5),  # B8A present: Sentinel-2, bare names allowed; B08 preferred
        (["Blue (B2)", "Green", "Red (B4)", "Red edge", "NIR (842 nm)"], 3, 5),  # words of longer descriptions
        (["coastal", "B04 red", "near-infrared"], 2, 3),
    ],
)
def test_ndvi_band_names(tmp_path, names, red, nir):
    data = smooth_bands(len(names), 32, 40, seed=2)
    p = make_geotiff(tmp_path / "x.tif", data, descriptions=names)
    np.testing.assert_allclose(domains.ndvi(p), _numpy_ndvi(data[red - 1], data[nir - 1]), rtol=1e-6, atol=1e-6)


def test_ndvi_names_it_cannot_trust_raise_a_typed_error(tmp_path):
    # Landsat 8 numbering (B4 red, B5 NIR, B8 panchromatic): bare B4/B8 are not taken for Sentinel-2's
    p = make_geotiff(tmp_path / "l8.tif", smooth_bands(6, 16, 16), descriptions=["B1", "B2", "B3", "B4", "B5", "B8"])
    with pytest.raises(BandSelectionError, match=r"no red .*Landsat numbering.* pass red=.* 4='B4', 5='B5'"):
        domains.ndvi(p)
    np.testing.assert_array_equal(domains.ndvi(p, red="B4", nir="B5"), domains.ndvi(p, red=4, nir=5))
    with pytest.raises(BandSelectionError, match=r"near-infrared .*1='red', 2='green', 3='blue'"):
        domains.ndvi(samples.path("landsat"))  # RGB only
    with pytest.raises(BandSelectionError, match="does not exist"):
        domains.ndvi(samples.path("aerial"), nir=9)
    with pytest.raises(BandSelectionError, match="same band"):
        domains.ndvi(samples.path("aerial"), red=4)
    assert isinstance(BandSelectionError("x"), ValueError)


def test_ndvi_division_by_zero_scale_tags_and_range(tmp_path):
    """No nodata declared: NIR + red == 0 gives 0 (not NaN); scale/offset tags are applied; [-1, 1]."""
    red = np.array([[0, 0, 100, 300], [200, 50, 0, 7]], np.uint16)
    nir = np.array([[0, 100, 0, 100], [200, 150, 9, 0]], np.uint16)
    p = make_geotiff(tmp_path / "z.tif", np.stack([red, nir]), descriptions=["red", "nir"], tiled=False)
    v = domains.ndvi(p)
    np.testing.assert_allclose(v, [[0.0, 1.0, -1.0, -0.5], [0.0, 0.5, 1.0, -1.0]], atol=1e-7)
    assert not np.isnan(v).any()
    # surface reflectance with an offset: negative values in red make |NDVI| > 1 without the clip
    q = make_geotiff(tmp_path / "sr.tif", np.stack([red, nir]) + 1000, descriptions=["red", "nir"], tiled=False,
                     scales=(1e-4, 1e-4), offsets=(-0.1, -0.1))  # fmt: skip
    w = domains.ndvi(q)
    phys = _numpy_ndvi(red.astype(np.float64) * 1e-4, nir.astype(np.float64) * 1e-4)
    np.testing.assert_allclose(w, phys, atol=1e-5)
    assert w.min() >= -1.0 and w.max() <= 1.0


def test_ndvi_of_the_sentinel2_and_aerial_samples():
    p = samples.path("sentinel2")  # bands B02, B03, B04, B08
    with rasterio.open(p) as src:
        red, nir = src.read(3), src.read(4)
    v = domains.ndvi(p)
    np.testing.assert_allclose(v, _numpy_ndvi(red, nir), rtol=1e-6, atol=1e-6)
    assert not np.isnan(v).any() and -1 <= v.min() < 0 < 0.5 < v.max() <= 1  # water and vegetation
    a = domains.ndvi(samples.path("aerial"))  # red, green, blue, nir; nodata 0
    with rasterio.open(samples.path("aerial")) as src:
        nodata = (src.read([1, 4]) == 0).all(axis=0)
        want = _numpy_ndvi(src.read(1), src.read(4))
    assert nodata.any()
    np.testing.assert_array_equal(np.isnan(a), nodata)
    np.testing.assert_allclose(a[~nodata], want[~nodata], rtol=1e-6, atol=1e-6)
