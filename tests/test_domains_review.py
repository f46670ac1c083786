"""Regression tests for odd inputs found in a review of ``domains``: each one failed (a wrong value, a
silent loss of data, an untyped error or a PHI leak) before its fix.

Test files are generated (tests/geo_factory.py, tests/dicom_factory.py) or pydicom's bundled ones,
taken by explicit name from the installed package's own folder (no download).
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

import domains
from domains import (
    BandSelectionError,
    DomainError,
    DomainWarning,
    GeoreferenceError,
    OptionError,
    SeriesError,
    UnreadableFileError,
    WindowError,
)

rasterio = pytest.importorskip("rasterio")
pydicom = pytest.importorskip("pydicom")

from affine import Affine  # noqa: E402
from dicom_factory import ct_dataset, write  # noqa: E402
from geo_factory import make_geotiff, smooth_bands  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from rasterio.enums import ColorInterp  # noqa: E402

BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"


# ------------------------------------------------------------------------------------------------
# GeoTIFF reading
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, values, expected",
    [
        ("int16", [-32768, 0, 32767], [0.0, 32768 / 65535, 1.0]),
        ("int8", [-128, 0, 127], [0.0, 128 / 255, 1.0]),
        ("uint16", [0, 65535, 1], [0.0, 1.0, 1 / 65535]),
    ],
)
def test_dtype_stretch_maps_the_whole_signed_range(tmp_path, dtype, values, expected):
    """stretch='dtype' on signed data used to divide by the maximum and clip every negative value to 0."""
    data = np.resize(np.asarray(values, dtype), (1, 4, 6))
    arr, meta = domains.read_geotiff(make_geotiff(tmp_path / "s.tif", data), stretch="dtype")
    np.testing.assert_allclose(arr[0, 0, :3], expected, atol=1e-6)
    assert meta["value_range"] == (0.0, 1.0)


def test_complex_bands_are_read_as_amplitude(tmp_path):
    data = np.full((1, 8, 8), 3 + 4j, np.complex64)
    data[0, 0, 0] = np.nan
    p = make_geotiff(tmp_path / "slc.tif", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning: the imaginary part is not silently dropped
        arr, meta = domains.read_geotiff(p, stretch="none")
    assert meta["complex"] == "amplitude" and arr[0, 1, 1] == 5.0
    assert not meta["valid"][0, 0] and arr[0, 0, 0] == 0.0 and np.isfinite(arr).all()


def test_fractional_window_pixels_and_transform_agree(tmp_path):
    """A float rasterio Window was read at truncated offsets but georeferenced at the float ones."""
    from rasterio.windows import Window

    data = smooth_bands(2, 64, 64)
    p = make_geotiff(tmp_path / "w.tif", data)
    arr, meta = domains.read_geotiff(p, window=Window(10.7, 5.5, 32.2, 31.6), stretch="none")
    assert meta["window"] == (10, 5, 32, 32)
    np.testing.assert_array_equal(arr, data[:, 5:37, 10:42].astype(np.float32))
    with rasterio.open(p) as src:
        assert meta["transform"] == src.transform @ Affine.translation(10, 5)


@pytest.mark.parametrize(
    "kw",
    [
        {"window": (1, 2, 3)},
        {"window": (0, 0, 0, 5)},
        {"window": (float("nan"), 0, 8, 8)},
        {"window": "lung"},
        {"out_shape": (0, 10)},
        {"out_shape": (8, 8), "window": (-4, 0, 16, 16)},
    ],
)
def test_bad_windows_are_window_errors(tmp_path, kw):
    p = make_geotiff(tmp_path / "w.tif", smooth_bands(1, 32, 32))
    with pytest.raises(WindowError):
        domains.read_geotiff(p, **kw)


def test_alpha_band_is_a_mask_not_a_channel(tmp_path):
    data = np.random.default_rng(0).integers(1, 255, (4, 32, 32)).astype(np.uint8)
    data[3] = 255
    data[3, :8] = 0
    cis = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    p = make_geotiff(tmp_path / "rgba.tif", data, colorinterp=cis)
    arr, meta = domains.load(p)
    assert meta["channels"] == ["red", "green", "blue"] and arr.shape == (3, 32, 32)
    assert meta["valid"].sum() == 24 * 32 and not meta["valid"][:8].any()
    assert domains.load(p, bands=[1, 2, 3, 4])[0].shape[0] == 4  # still selectable on purpose


@pytest.mark.parametrize(
    "descriptions, expected",
    [
        (["red edge", "blue", "green", "red"], [4, 3, 2]),
        (["B05 (Red Edge 1)", "Blue (B2)", "Green (B3)", "Red (B4)"], [4, 3, 2]),
        (["B02", "B03", "B04", "B08"], [3, 2, 1]),
    ],
)
def test_rgb_by_description_skips_red_edge(tmp_path, descriptions, expected):
    p = make_geotiff(tmp_path / "s2.tif", smooth_bands(4, 16, 16), descriptions=descriptions)
    assert domains.read_geotiff(p, bands="rgb")[1]["bands"] == expected


@pytest.mark.parametrize(
    "bands, match",
    [("nir", r"several bands \(1, 2\) are named 'nir'"), ([], "selects no band")],
)
def test_band_selection_errors(tmp_path, bands, match):
    p = make_geotiff(tmp_path / "d.tif", smooth_bands(3, 16, 16), descriptions=["nir", "nir", "red"])
    with pytest.raises(BandSelectionError, match=match):
        domains.read_geotiff(p, bands=bands)


def test_rgb_of_a_one_band_raster_says_so(tmp_path):
    p = make_geotiff(tmp_path / "g.tif", smooth_bands(1, 16, 16))
    with pytest.raises(BandSelectionError, match="only 1"):
        domains.read_geotiff(p, bands="rgb")


def test_band_stats_apply_to_scenes_with_another_band_order(tmp_path):
    data = smooth_bands(3, 40, 40)
    a = make_geotiff(tmp_path / "a.tif", data, descriptions=["blue", "green", "red"])
    b = make_geotiff(tmp_path / "b.tif", data[::-1].copy(), descriptions=["red", "green", "blue"])
    st = domains.compute_band_stats(a, bands="rgb")  # numbers [3, 2, 1] in a.tif
    arr_a, _ = domains.read_geotiff(a, bands="rgb", stats=st)
    arr_b, meta = domains.read_geotiff(b, bands="rgb", stats=st)  # numbers [1, 2, 3] in b.tif
    assert meta["bands"] == [1, 2, 3] and meta["stretch"]["method"] == "stats"
    np.testing.assert_array_equal(arr_a, arr_b)
    st_all = domains.compute_band_stats(a)  # blue, green, red
    with pytest.raises(BandSelectionError, match=r"bands=\['blue', 'green', 'red'\]"):
        domains.read_geotiff(b, stats=st_all)  # all bands in b's order (red first): the hint says how to select


def test_iter_tiles_scene_stats_follow_apply_scale_offset(tmp_path):
    """The scene stats were computed in physical units while tiles were read as raw DN: all clipped to 1."""
    data = smooth_bands(1, 64, 64, high=4000)
    p = make_geotiff(tmp_path / "r.tif", data, scales=[1e-4], offsets=[0.0])
    tiles = list(domains.iter_tiles(p, 32, 0, apply_scale_offset=False))
    st = domains.compute_band_stats(p, apply_scale_offset=False)
    ref, _ = domains.read_geotiff(p, stats=st, apply_scale_offset=False)
    arr, meta = tiles[0]
    np.testing.assert_allclose(arr, ref[:, :32, :32], atol=1e-6)
    assert 0.2 < float(arr.mean()) < 0.8


def test_gcp_georeferenced_raster_round_trips_to_outputs(tmp_path):
    from rasterio.control import GroundControlPoint as G

    gcps = [G(0, 0, 10.0, 20.0), G(63, 0, 10.0, 19.0), G(0, 79, 11.0, 20.0), G(63, 79, 11.0, 19.0)]
    p = tmp_path / "sar.tif"
    with rasterio.open(
        p, "w", driver="GTiff", width=80, height=64, count=1, dtype="uint16", gcps=gcps, crs="EPSG:4326"
    ) as dst:
        dst.write(smooth_bands(1, 64, 80))
    _, meta = domains.read_geotiff(p, window=(16, 16, 32, 32))
    assert (meta["gcps"][0].row, meta["gcps"][0].col) == (-16.0, -16.0) and meta["gcp_crs"] == "EPSG:4326"
    _, meta = domains.read_geotiff(p)
    out = domains.write_geotiff(tmp_path / "map.tif", np.zeros((4, 5), np.uint8), like=meta)  # 16 px cells
    with rasterio.open(out) as dst:
        back, crs = dst.gcps
        assert crs == "EPSG:4326" and (back[3].row, back[3].col) == (63 / 16, 79 / 16)
        assert (back[3].x, back[3].y) == (11.0, 19.0)


# ------------------------------------------------------------------------------------------------
# Tiling and mosaics
# ------------------------------------------------------------------------------------------------


def test_mosaic_rejects_zero_scale_and_clips_tiles_before_the_origin():
    with pytest.raises(GeoreferenceError, match="positive"):
        domains.Mosaic(10, 10, 1, scale=0)
    m = domains.Mosaic(40, 40, 1, scale=16)  # 3 x 3 cells
    m.add(domains.Tile(0, 0, 0, -16, -16, 48, 48), np.arange(9, dtype=np.float32).reshape(1, 3, 3))
    np.testing.assert_array_equal(m.coverage(), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(m.result()[0, :2, :2], [[4, 5], [7, 8]])


# ------------------------------------------------------------------------------------------------
# GeoTIFF writing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, nodata, dtype, file_nodata",
    [
        (np.arange(30).reshape(6, 5) * 3000, None, "uint32", None),  # > 65535: was wrapped to uint16
        (np.arange(30).reshape(6, 5) - 10, None, "int16", None),  # negative: was wrapped to 65526...
        (np.where(np.arange(30).reshape(6, 5) > 20, -1, 3), -1, "int16", -1.0),  # raw rasterio ValueError
        (np.full((6, 5), 255), None, "uint8", None),
    ],
)
def test_class_maps_keep_every_label(tmp_path, labels, nodata, dtype, file_nodata):
    p = domains.write_geotiff(
        tmp_path / "c.tif",
        labels.astype(np.int64),
        crs="EPSG:4326",
        transform=Affine.identity(),
        kind="classes",
        nodata=nodata,
    )
    with rasterio.open(p) as dst:
        assert dst.dtypes[0] == dtype and dst.nodata == file_nodata
        np.testing.assert_array_equal(dst.read(1), labels)


def test_nan_in_a_float_class_map_becomes_nodata(tmp_path):
    labels = np.full((6, 5), 3.0)
    labels[0, 0] = np.nan
    p = domains.write_geotiff(tmp_path / "c.tif", labels, kind="classes", crs="EPSG:4326", transform=Affine.identity())
    with rasterio.open(p) as dst:
        assert dst.dtypes[0] == "uint8" and dst.nodata == 255
        assert dst.read(1)[0, 0] == 255 and (dst.read_masks(1) > 0).sum() == 29


def test_float_nan_is_written_as_the_given_nodata(tmp_path):
    prob = np.full((2, 4, 4), 0.5, np.float32)
    prob[:, 0, 0] = np.nan
    p = domains.write_geotiff(tmp_path / "p.tif", prob, nodata=-9999, crs="EPSG:4326", transform=Affine.identity())
    with rasterio.open(p) as dst:
        assert dst.read()[0, 0, 0] == -9999 and not dst.dataset_mask()[0, 0] and dst.dataset_mask()[1, 1]


@pytest.mark.parametrize(
    "array, kw, match",
    [
        ((np.arange(90).reshape(3, 6, 5) * 700).astype(np.uint16), {"kind": "rgb"}, "0..255"),
        (np.ones((6, 5), np.complex64), {}, "amplitude"),
        (np.ones((6, 5), np.uint8), {"kind": "classes", "nodata": float("nan")}, "integer label"),
        (np.full((6, 5), -3), {"kind": "classes", "colormap": {0: (0, 0, 0)}}, "colour table"),
    ],
)
def test_outputs_a_file_cannot_hold_are_refused_and_leave_no_temp_file(tmp_path, array, kw, match):
    with pytest.raises(ValueError, match=match):
        domains.write_geotiff(tmp_path / "o.tif", array, **kw)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Ordinary images
# ------------------------------------------------------------------------------------------------


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit RGB / RGBA PNG written by hand (Pillow cannot write one)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_16_bit_colour_png_keeps_16_bits(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65535, (10, 12, 3)).astype(np.uint16)
    arr, meta = domains.load(_png16(tmp_path / "rgb16.png", rgb))
    assert meta["bit_depth"] == 16 and arr.shape == (3, 10, 12)
    np.testing.assert_allclose(arr, rgb.transpose(2, 0, 1) / 65535.0, atol=1e-6)  # was the high byte only


def test_16_bit_rgba_png_alpha_is_the_valid_mask(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 65535, (10, 12, 4)).astype(np.uint16)
    rgba[..., 3] = 65535
    rgba[0, :, 3] = 0
    arr, meta = domains.load(_png16(tmp_path / "rgba16.png", rgba))
    assert arr.shape == (3, 10, 12) and meta["valid"].sum() == 9 * 12 and not meta["valid"][0].any()


@pytest.mark.parametrize(
    "count, dtype, photometric",
    [(2, "uint8", None), (4, "uint8", "RGB"), (3, "uint16", "RGB"), (2, "uint16", None)],
)
def test_plain_tiffs_keep_every_band_and_bit(tmp_path, count, dtype, photometric):
    """Pillow read a 2-band TIFF as grey, dropped a 4th non-alpha band, and cut 16-bit RGB to 8 bits."""
    top = np.iinfo(dtype).max
    data = np.random.default_rng(1).integers(0, top, (count, 10, 12)).astype(dtype)
    p = tmp_path / "plain.tif"
    kw = {"photometric": photometric} if photometric else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(p, "w", driver="GTiff", width=12, height=10, count=count, dtype=dtype, **kw) as dst:
            dst.write(data)
    arr, meta = domains.load(p)
    assert meta["reader"] == "image" and meta["bit_depth"] == 8 * np.dtype(dtype).itemsize
    np.testing.assert_allclose(arr, data / top, atol=1e-6)


def test_decompression_bomb_guard_is_a_typed_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(UnreadableFileError, match="MAX_IMAGE_PIXELS"):
        domains.load(tmp_path / "big.png")


def test_cut_jpeg_header_is_unreadable_not_unsupported(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(20))
    with pytest.raises(UnreadableFileError, match="starts like a JPEG"):
        domains.load(tmp_path / "cut.jpg")


def test_option_for_another_reader_names_the_groups(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(OptionError, match=r"its options are: stretch; pass options meant for other file types as geo"):
        domains.load(tmp_path / "a.png", bands=[1])


# ------------------------------------------------------------------------------------------------
# DICOM files
# ------------------------------------------------------------------------------------------------


def _float_dicom(path: Path, values: np.ndarray) -> str:
    ds = ct_dataset(*values.shape, slope=None)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
    return write(ds, path)


@pytest.mark.parametrize("window", ["auto", None, "lung", (0.0, 4.0)])
def test_float_pixel_data_nan_and_inf_are_invalid_zeros(tmp_path, window):
    values = np.linspace(-2, 2, 64).reshape(8, 8)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    p = _float_dicom(tmp_path / "f.dcm", values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DomainWarning)  # HU presets on non-HU values
        arr, meta = domains.load(p, window=window)
    assert np.isfinite(arr).all() and (arr[0, 0, :3] == 0).all()
    assert meta["valid"].sum() == 61 and not meta["valid"][0, :3].any()
    if window is None:
        np.testing.assert_allclose(arr[0, 1:], values[1:], rtol=1e-6)


def test_nan_window_in_the_file_falls_back_to_percentiles(tmp_path):
    ds = ct_dataset(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: invalid DS value
        ds.WindowCenter, ds.WindowWidth = "nan", "nan"
        p = write(ds, tmp_path / "w.dcm")
        arr, meta = domains.load(p)
    assert np.isfinite(arr).all() and meta["window"][0]["source"].startswith("percentile")


@pytest.mark.parametrize("window", [(float("nan"), 400), (40, float("inf"))])
def test_non_finite_given_window_is_a_window_error(tmp_path, window):
    p = write(ct_dataset(8, 8), tmp_path / "ct.dcm")
    with pytest.raises(WindowError, match="finite"):
        domains.load(p, window=window)


def test_numpy_window_pair_is_accepted(tmp_path):
    p = write(ct_dataset(8, 8), tmp_path / "ct.dcm")
    np.testing.assert_array_equal(domains.load(p, window=np.array([40, 400]))[0], domains.load(p, window=(40, 400))[0])


@pytest.mark.parametrize("frame", ["1", None, 1.0, True])
def test_frame_must_be_an_int(frame):
    with pytest.raises(OptionError, match="frame="):
        domains.load(get_testdata_file("SC_rgb_rle_2frame.dcm"), frame=frame)


def test_missing_pixel_attribute_is_named(tmp_path):
    ds = ct_dataset(8, 8)
    del ds.PhotometricInterpretation
    with pytest.raises(UnreadableFileError, match="Photometric Interpretation"):
        domains.load(write(ds, tmp_path / "x.dcm"))


_BUNDLED = sorted(p.name for p in BUNDLED.glob("*.dcm")) if BUNDLED.is_dir() else []


@pytest.mark.parametrize("name", _BUNDLED)
def test_every_bundled_pydicom_file_gives_the_contract_or_a_typed_error(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own notes on odd files
        try:
            arr, meta = domains.load(BUNDLED / name)
        except DomainError:
            return
    assert arr.dtype == np.float32 and arr.ndim == 3 and np.isfinite(arr).all()
    if meta["value_range"] is not None:
        assert arr.min() >= 0.0 and arr.max() <= 1.0


# ------------------------------------------------------------------------------------------------
# DICOM series and PHI
# ------------------------------------------------------------------------------------------------


def test_series_mixing_grey_and_colour_is_a_series_error(tmp_path):
    uid = generate_uid()
    for k in range(2):
        write(ct_dataset(8, 8, position=(0, 0, k), series_uid=uid), tmp_path / f"g{k}.dcm")
    ds = ct_dataset(8, 8, position=(0, 0, 2), series_uid=uid)
    ds.set_pixel_data(np.zeros((8, 8, 3), np.uint8), "RGB", 8)
    write(ds, tmp_path / "colour.dcm")
    with pytest.raises(SeriesError, match="colour.dcm does not match"):  # was a raw numpy broadcast ValueError
        domains.read_series(tmp_path)


def test_degenerate_orientation_falls_back_to_instance_numbers(tmp_path):
    uid = generate_uid()
    for k in range(3):  # true order by InstanceNumber: 3, 2, 1 -> files 2, 1, 0
        write(
            ct_dataset(
                8,
                8,
                position=(0, 0, k),
                orientation=(0,) * 6,
                series_uid=uid,
                instance_number=3 - k,
                pixel_array=np.full((8, 8), 100 * k, np.int16),
            ),
            tmp_path / f"{k}.dcm",
        )
    with pytest.warns(DomainWarning, match="no position/orientation"):
        vol, meta = domains.read_series(tmp_path)
    assert meta["sort"].startswith("InstanceNumber")
    np.testing.assert_array_equal(vol[:, 0, 0], [-824, -924, -1024])


def test_mixed_modalities_in_one_series_warn(tmp_path):
    uid = generate_uid()
    for k, modality in enumerate(["CT", "MR", "CT"]):
        ds = ct_dataset(8, 8, position=(0, 0, k), series_uid=uid)
        ds.Modality = modality
        write(ds, tmp_path / f"{k}.dcm")
    with pytest.warns(DomainWarning, match=r"mixes modalities \(2 CT, 1 MR\)"):
        domains.read_series(tmp_path)


def test_rt_dose_frames_are_placed_by_grid_frame_offsets(tmp_path):
    import shutil

    shutil.copy(get_testdata_file("rtdose.dcm"), tmp_path / "dose.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)  # no "slices share a position" any more
        vol, meta = domains.read_series(tmp_path)
    assert vol.shape == (15, 10, 10) and meta["spacing"] == (5.0, 10.0, 10.0)
    np.testing.assert_allclose(meta["slice_positions"], -761.87 + 5.0 * np.arange(15))


def test_malformed_uids_are_not_quoted_in_warnings_or_logs(tmp_path, caplog):
    secret = "1.2.826.0.1.3680043.99.MRN12345"
    for k in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's validation on write quotes the bad UIDs, as on read
            ds = ct_dataset(8, 8, position=(0, 0, k), series_uid=secret + ".7", phi=True)
            ds.SOPInstanceUID = f"{secret}.{k}"
            write(ds, tmp_path / f"{k}.dcm")
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # writing the files above logged the bad UIDs (pydicom's own validation on write)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        domains.find_series(tmp_path)
        vol, meta = domains.read_series(tmp_path)
        clean = domains.deidentify(pydicom.dcmread(tmp_path / "0.dcm"))
    text = " ".join(str(w.message) for w in seen) + caplog.text + repr(meta)
    assert "MRN12345" not in text
    assert "MRN12345" not in str(clean.SeriesInstanceUID) and vol.shape == (2, 8, 8)


# ------------------------------------------------------------------------------------------------
# Folder datasets
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def mixed_folder(tmp_path):
    write(ct_dataset(40, 40), tmp_path / "ct.dcm")
    make_geotiff(tmp_path / "s.tif", smooth_bands(3, 48, 48))
    (tmp_path / "broken.png").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"window": "lung"}, "crop size"),
        ({"window": 0}, "crop size"),
        ({"window": (32,)}, "crop size"),
        ({"dicom": {"window": "lungs"}}, "unknown window preset"),
    ],
)
def test_folder_dataset_refuses_bad_windows_up_front(mixed_folder, kw, match):
    with pytest.raises(WindowError, match=match):
        domains.FolderDataset(mixed_folder, **kw)


def test_folder_dataset_option_errors_are_not_skipped_as_bad_files(mixed_folder):
    ds = domains.FolderDataset(mixed_folder, stretch="dtype")  # a GeoTIFF option given to every reader
    with pytest.raises(OptionError, match="dicom"):
        list(ds)
    assert all(e.error != "OptionError" for e in ds.errors)


def test_folder_dataset_records_a_bad_file_once(mixed_folder):
    ds = domains.FolderDataset(mixed_folder)
    for _ in range(3):  # three epochs
        assert len(list(ds)) == 2
        ds[0]  # broken.png: replaced by the next file
    assert [e.path.split("/")[-1] for e in ds.errors] == ["broken.png"]


def test_bad_option_values_are_domain_errors_and_never_skipped_as_bad_files(tmp_path):
    import shutil

    from domains import samples
    from domains.errors import DomainError, OptionValueError

    for call in (
        lambda: domains.read_geotiff(samples.path("aerial"), stretch="log"),
        lambda: domains.tile_grid(100, 100, 64, 16, edge="wrap"),
        lambda: domains.Mosaic(10, 10, 1, blend="max"),
        lambda: domains.write_geotiff(tmp_path / "x.tif", np.zeros((4, 4)), kind="mask"),
    ):
        with pytest.raises(OptionValueError) as e:
            call()
        assert isinstance(e.value, DomainError) and isinstance(e.value, ValueError)
    shutil.copy(samples.path("aerial"), tmp_path / "a.tif")
    ds = domains.FolderDataset(tmp_path, geotiff={"stretch": "log"})
    with pytest.raises(OptionValueError):  # a configuration error, not a bad file to skip
        ds[0]
