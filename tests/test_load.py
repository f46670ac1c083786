"""``domains.load``: content sniffing, the image reader, and every odd input -> a correct array or a typed error."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import domains
from domains import samples
from domains.errors import MissingFileError, OptionError, UnreadableFileError, UnsupportedFormatError
from tests.geo_factory import make_geotiff, smooth_bands


def _png(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return path


def test_png_jpeg_and_alpha(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (21, 33, 3), dtype=np.uint8)
    arr, meta = domains.load(_png(tmp_path / "a.png", rgb))
    assert arr.dtype == np.float32 and arr.shape == (3, 21, 33) and meta["reader"] == "image"
    np.testing.assert_array_equal(arr, rgb.transpose(2, 0, 1) / np.float32(255))
    assert meta["value_range"] == (0.0, 1.0) and meta["channels"] == ["R", "G", "B"] and "valid" not in meta
    rgba = np.dstack([rgb, np.where(np.arange(33)[None, :] < 10, 0, 255).repeat(21, 0).astype(np.uint8)])
    arr, meta = domains.load(_png(tmp_path / "b.png", rgba))
    assert arr.shape == (3, 21, 33) and meta["valid"][:, :10].sum() == 0 and meta["valid"][:, 10:].all()
    yy, xx = np.mgrid[0:21, 0:33]
    smooth = np.dstack([xx * 7, yy * 11, 255 - xx * 7]).astype(np.uint8)
    j, meta = domains.load(_png(tmp_path / "c.jpg", smooth, quality=95))
    assert meta["format"] == "jpeg" and np.abs(j - smooth.transpose(2, 0, 1) / 255).mean() < 0.03


def test_sixteen_bit_grey_png_and_plain_tiffs(tmp_path):
    g16 = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 53).astype(np.uint16)
    arr, meta = domains.load(_png(tmp_path / "g.png", g16))
    assert arr.shape == (1, 40, 30) and meta["bit_depth"] == 16
    np.testing.assert_allclose(arr[0], g16 / 65535.0, rtol=1e-6)
    t, meta = domains.load(_png(tmp_path / "g.tif", g16))
    assert meta["reader"] == "image"
    np.testing.assert_allclose(t[0], g16 / 65535.0, rtol=1e-6)
    # 16-bit RGB TIFF: Pillow cannot hold it, GDAL reads it; not georeferenced -> still the image contract
    rgb16 = smooth_bands(3, 24, 20, high=60000)
    p = make_geotiff(tmp_path / "rgb16.tif", rgb16, crs=None, transform=None, tiled=False)
    import rasterio
    from affine import Affine

    with warnings.catch_warnings(), rasterio.open(p, "r+") as dst:  # a plain, non-georeferenced TIFF
        warnings.simplefilter("ignore")
        dst.transform = Affine.identity()
    arr, meta = domains.load(p)
    assert meta["reader"] == "image" and arr.shape == (3, 24, 20)
    np.testing.assert_allclose(arr, rgb16 / 65535.0, rtol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :5] = 255  # white left strip
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    arr, _ = domains.load(tmp_path / "r.jpg")
    assert arr.shape == (3, 20, 10)
    assert arr[:, :5].mean() > 0.9 and arr[:, -5:].mean() < 0.1  # the strip is now at the top


def test_sniffing_ignores_extensions(tmp_path):
    rgb = np.full((8, 8, 3), 200, np.uint8)
    assert domains.sniff(_png(tmp_path / "png_named.tif", rgb, format="PNG")) == "png"
    arr, meta = domains.load(tmp_path / "png_named.tif")
    assert meta["format"] == "png" and arr.shape == (3, 8, 8)
    Image.fromarray(rgb).save(tmp_path / "jpeg_named.dcm", format="JPEG")
    assert domains.load(tmp_path / "jpeg_named.dcm")[1]["format"] == "jpeg"
    geo = make_geotiff(tmp_path / "geo_named.png", smooth_bands(4, 32, 32))
    assert domains.load(geo)[1]["reader"] == "geotiff"


def _make_odd(tmp_path, kind):
    """Odd inputs: (path, expected error class or None when a correct array must come back)."""
    p = tmp_path / kind
    if kind == "missing.tif":
        return p, MissingFileError
    if kind == "folder":
        p.mkdir()
        return p, MissingFileError
    if kind == "zero_byte.png":
        p.write_bytes(b"")
        return p, UnreadableFileError
    if kind == "random.bin":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
        return p, UnsupportedFormatError
    if kind == "text.tif":
        p.write_text("this is not an image\n" * 20)
        return p, UnsupportedFormatError
    if kind == "truncated.png":
        _png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        p.write_bytes((tmp_path / "full.png").read_bytes()[:2000])
        return p, UnreadableFileError
    if kind == "truncated.jpg":
        _png(tmp_path / "full.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        p.write_bytes((tmp_path / "full.jpg").read_bytes()[:1500])
        return p, UnreadableFileError
    if kind == "truncated_geotiff.tif":
        full = make_geotiff(tmp_path / "full.tif", smooth_bands(4, 256, 256), compress=None)
        p.write_bytes(full.read_bytes()[:60000])
        return p, UnreadableFileError
    if kind == "header_only.tif":
        p.write_bytes(b"II*\x00" + b"\x00" * 4)
        return p, UnreadableFileError
    if kind == "one_pixel.png":
        return _png(p, np.array([[[10, 20, 30]]], np.uint8)), None
    if kind == "one_pixel_geo.tif":
        return make_geotiff(p, np.array([[[7]], [[9]]], np.uint16), nodata=0), None
    if kind == "all_nodata.tif":
        return make_geotiff(p, np.zeros((4, 20, 20), np.uint8), nodata=0), None
    if kind == "nan_float.tif":
        f = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
        f[0, :4] = np.nan
        return make_geotiff(p, f), None
    if kind == "rotated.tif":
        from affine import Affine

        rot = Affine.translation(1000, 2000) @ Affine.rotation(30) @ Affine.scale(5, -5)
        return make_geotiff(p, smooth_bands(3, 40, 40, dtype=np.uint8, high=250), transform=rot), None
    raise AssertionError(kind)


ODD = [
    "missing.tif", "folder", "zero_byte.png", "random.bin", "text.tif", "truncated.png", "truncated.jpg",
    "truncated_geotiff.tif", "header_only.tif", "one_pixel.png", "one_pixel_geo.tif", "all_nodata.tif",
    "nan_float.tif", "rotated.tif",
]


@pytest.mark.parametrize("kind", ODD)
def test_odd_inputs(tmp_path, kind):
    path, err = _make_odd(tmp_path, kind)
    if err is not None:
        with pytest.raises(err) as e:
            domains.load(path)
        assert path.name in str(e.value)  # the message names the file
        return
    arr, meta = domains.load(path, **({"stretch": "dtype"} if kind == "all_nodata.tif" else {}))
    assert arr.dtype == np.float32 and arr.ndim == 3 and np.isfinite(arr).all()
    if kind == "one_pixel.png":
        np.testing.assert_allclose(arr[:, 0, 0], np.array([10, 20, 30]) / 255, rtol=1e-6)
    if kind == "one_pixel_geo.tif":
        assert arr.shape == (2, 1, 1) and meta["valid"].all()
    if kind == "all_nodata.tif":
        assert not meta["valid"].any() and (arr == 0).all()
    if kind == "nan_float.tif":
        assert not meta["valid"][:4].any() and meta["valid"][4:].all()
    if kind == "rotated.tif":
        assert meta["reader"] == "geotiff" and meta["transform"].b != 0


def test_unknown_option_names_the_reader_options(tmp_path):
    p = _png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(OptionError, match="image reader") as e:
        domains.load(p, bands="rgb")
    assert isinstance(e.value, TypeError)
    arr, meta = domains.load(samples.path("sentinel2"), geotiff={"bands": "rgb"}, dicom={"window": "lung"})
    assert meta["channels"] == ["B04", "B03", "B02"]


def test_domains_imports_no_torch_and_no_dinoapp():
    code = (
        "import sys, domains; from domains import samples; domains.load(samples.path('aerial')); "
        "print('torch' in sys.modules, 'dinoapp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- DICOM through the dispatcher -------------------------------------------------------------------------


def _dicom_odd(tmp_path, kind, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    if kind == "dicom_named.png":
        p = tmp_path / kind
        p.write_bytes(Path(ct).read_bytes())
        return p, None
    if kind == "dicom_no_extension":
        p = tmp_path / "IM0001"
        p.write_bytes(Path(ct).read_bytes())
        return p, None
    if kind == "jpeg_ls_without_plugin":
        from pydicom.pixels import get_decoder
        from pydicom.uid import JPEGLSNearLossless

        monkeypatch.setattr(get_decoder(JPEGLSNearLossless), "_available", {})
        return get_testdata_file("JPEGLSNearLossless_16.dcm"), domains.MissingCodecError
    if kind == "dicom_without_pixels":
        return get_testdata_file("rtplan.dcm"), domains.NoPixelDataError
    if kind == "dicom_truncated":
        p = tmp_path / "cut.dcm"
        p.write_bytes(Path(ct).read_bytes()[:20000])
        return p, UnreadableFileError
    if kind == "dicom_header_only":
        p = tmp_path / "hdr.dcm"
        p.write_bytes(b"\x00" * 128 + b"DICM")
        return p, UnreadableFileError
    _ = pydicom
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["dicom_named.png", "dicom_no_extension", "jpeg_ls_without_plugin", "dicom_without_pixels", "dicom_truncated",
     "dicom_header_only"],
)
def test_odd_dicom_inputs(tmp_path, kind, monkeypatch):
    path, err = _dicom_odd(tmp_path, kind, monkeypatch)
    if err is not None:
        with pytest.raises(err) as e:
            domains.load(path)
        if kind == "jpeg_ls_without_plugin":
            assert "JPEG-LS" in str(e.value) and "pip install" in str(e.value) and e.value.codec
        return
    arr, meta = domains.load(path, window="bone")
    assert meta["reader"] == "dicom" and arr.shape == (1, 128, 128) and arr.min() >= 0 and arr.max() <= 1


def test_dicom_preamble_holding_a_tiff_header_is_dicom():
    """CT_small.dcm's preamble is a TIFF header (a dual-personality file): the content is DICOM."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file("CT_small.dcm")
    assert Path(p).read_bytes()[:4] in (b"II*\x00", b"MM\x00*") and domains.sniff(p) == "dicom"
