"""domains.dicom: modality LUT, windowing, MONOCHROME1, colour, frames, codecs and typed errors.

Reference values come from pydicom itself (read independently) or are computed by hand.
Test files: pydicom's bundled ones (get_testdata_file with an explicit name only: never the
plural glob, which goes to the network) and synthetic ones from tests/dicom_factory.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_color_lut, apply_windowing, convert_color_space, get_decoder  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSNearLossless, generate_uid  # noqa: E402

from domains.dicom import (  # noqa: E402
    RGB3,
    WINDOW_PRESETS,
    FrameIndexError,
    WindowError,
    read_dicom,
    read_dicom_frames,
    window,
)
from domains.errors import (  # noqa: E402
    DomainWarning,
    MissingCodecError,
    MissingFileError,
    NoPixelDataError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from tests.dicom_factory import ct_dataset, write  # noqa: E402


def data(name: str) -> str:
    return get_testdata_file(name)


def file_bytes(name: str) -> bytes:
    with open(data(name), "rb") as f:
        return f.read()


def hu(name: str) -> np.ndarray:
    """Modality values of a test file computed with pydicom alone: stored * slope + intercept."""
    ds = pydicom.dcmread(data(name))
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# ---------------------------------------------------------------------------------------------- modality LUT


def test_ct_values_are_hounsfield_units():
    arr, meta = read_dicom(data("CT_small.dcm"), window=None)
    ds = pydicom.dcmread(data("CT_small.dcm"))
    stored = int(ds.pixel_array[10, 20])
    assert arr.dtype == np.float32 and arr.shape == (1, 128, 128)
    assert arr[0, 10, 20] == stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(arr[0], hu("CT_small.dcm"))
    assert meta["units"] == "HU" and meta["value_range"] is None and meta["channels"] == ["grey"]
    assert meta["format"] == "dicom" and meta["shape"] == (1, 128, 128) and meta["spacing"] == (0.661468, 0.661468)
    raw, meta_raw = read_dicom(data("CT_small.dcm"), window=None, modality_lut=False)
    np.testing.assert_array_equal(raw[0], ds.pixel_array)
    assert meta_raw["units"] == "stored"
    json.dumps(meta)  # plain values only


# ---------------------------------------------------------------------------------------------- windowing


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # inside pydicom's SIGMOID
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40.0, 80.0), (-600.0, 1500.0), (0.0, 1.0), (1000.5, 3.0)])
def test_window_matches_pydicom_apply_windowing(function, center, width):
    if function != "LINEAR" and width <= 1:
        width = 2.0
    values = np.arange(-2048, 4096, dtype=np.int16)  # every value around each window
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 16, 1
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    ref = apply_windowing(values, ds)  # output range [-32768, 32767]
    ref = (ref + 32768.0) / 65535.0
    np.testing.assert_allclose(window(values, center, width, function), ref, atol=1e-6)


def test_window_hand_computed_values():
    x = np.array([-1.0, 0.0, 39.5, 40.0, 79.0, 80.0])
    # LINEAR, c=40 w=80: c' = 39.5, w' = 79, 0 at x <= 0, 1 at x > 79, (x - 39.5)/79 + 0.5 between.
    np.testing.assert_allclose(window(x, 40, 80), [0, 0, 0.5, 0.5 / 79 + 0.5, 1, 1], atol=1e-7)
    np.testing.assert_allclose(window([-50.0, 25.0, 50.0], 0, 100, "LINEAR_EXACT"), [0, 0.75, 1], atol=1e-7)
    np.testing.assert_allclose(window([0.0, 25.0], 0, 100, "SIGMOID"), [0.5, 1 / (1 + np.exp(-1))], atol=1e-7)
    np.testing.assert_array_equal(window([39.0, 39.5, 39.6], 40, 1), [0, 0, 1])  # width 1: a step at c - 0.5
    assert window(np.zeros((2, 3)), 0, 10).dtype == np.float32


@pytest.mark.parametrize(
    ("c", "w", "fn"), [(0, 0.5, "LINEAR"), (0, 0, "LINEAR_EXACT"), (0, -1, "SIGMOID"), (0, 10, "GAMMA")]
)
def test_window_rejects_invalid(c, w, fn):
    with pytest.raises(WindowError):
        window([0.0], c, w, fn)


def test_presets_and_three_window_channel_order():
    values = hu("CT_small.dcm")
    arr, meta = read_dicom(data("CT_small.dcm"), window="lung")
    np.testing.assert_allclose(arr[0], window(values, -600, 1500), atol=1e-6)
    assert meta["value_range"] == (0.0, 1.0) and meta["units"] == "display"
    assert meta["window"] == [
        {"name": "lung", "source": "preset", "center": -600.0, "width": 1500.0, "function": "LINEAR"}
    ]
    assert WINDOW_PRESETS["mediastinum"] == WINDOW_PRESETS["soft_tissue"] == (50.0, 350.0)
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0) and WINDOW_PRESETS["bone"] == (400.0, 1800.0)

    rgb, meta3 = read_dicom(data("CT_small.dcm"), window=("lung", "mediastinum", "bone"))
    assert rgb.shape == (3, 128, 128) and meta3["channels"] == ["lung", "mediastinum", "bone"]
    for i, name in enumerate(RGB3):
        np.testing.assert_allclose(rgb[i], window(values, *WINDOW_PRESETS[name]), atol=1e-6)
    same, _ = read_dicom(data("CT_small.dcm"), window="rgb3")
    np.testing.assert_array_equal(same, rgb)

    mixed, meta_m = read_dicom(data("CT_small.dcm"), window=("bone", (40, 400), "lung"))
    np.testing.assert_allclose(mixed[1], window(values, 40, 400), atol=1e-6)
    np.testing.assert_array_equal(mixed[0], rgb[2])
    assert meta_m["channels"] == ["bone", "c40_w400", "lung"]
    pair, _ = read_dicom(data("CT_small.dcm"), window=(40, 400))
    np.testing.assert_array_equal(pair[0], mixed[1])


@pytest.mark.parametrize("bad", ["lungs", ("lung", "bone"), (1, 2, 3), 5, ("lung", "bone", "nope")])
def test_bad_window_option_raises_before_reading(bad, tmp_path):
    with pytest.raises(WindowError):
        read_dicom(tmp_path / "does-not-exist.dcm", window=bad)


def test_auto_uses_the_file_window():
    arr, meta = read_dicom(data("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    ds = pydicom.dcmread(data("MR_small.dcm"))
    np.testing.assert_allclose(arr[0], window(ds.pixel_array, 600, 1600), atol=1e-6)
    assert meta["window"][0]["source"] == "file" and meta["window"][0]["center"] == 600.0


def test_auto_falls_back_to_percentiles():
    arr, meta = read_dicom(data("CT_small.dcm"))  # no window in the file
    lo, hi = np.percentile(hu("CT_small.dcm"), [0.5, 99.5])
    w = meta["window"][0]
    assert w["source"].startswith("percentile") and np.isclose(w["center"] - w["width"] / 2, lo)
    np.testing.assert_allclose(arr[0], np.clip((hu("CT_small.dcm") - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_auto_uses_voi_lut_sequence(tmp_path):
    stored = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    ds = ct_dataset(64, 64, pixel_array=stored, slope=None)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = DicomSequence([item])
    ds.WindowCenter, ds.WindowWidth = 100, 50  # the LUT takes precedence (PS3.3 C.11.2)
    arr, meta = read_dicom(write(ds, tmp_path / "voi.dcm"))
    np.testing.assert_allclose(arr[0], lut[stored] / 65535.0, atol=1e-6)
    assert meta["window"] == [{"name": "grey", "source": "VOI LUT Sequence"}]


def test_presets_on_non_hu_images_warn():
    with pytest.warns(DomainWarning, match="Hounsfield"):
        read_dicom(data("MR_small.dcm"), window="brain")


# ---------------------------------------------------------------------------------------------- MONOCHROME1


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = tmp_path / "mono1.dcm"
    ds.save_as(mono1)
    for win in ("auto", "lung", "rgb3", (40, 400)):
        ref, _ = read_dicom(data("CT_small.dcm"), window=win)
        out, meta = read_dicom(mono1, window=win)
        np.testing.assert_allclose(out, 1.0 - ref, atol=1e-6)
        assert meta["inverted"] is True
    kept, meta = read_dicom(mono1, window="lung", invert_monochrome1=False)
    np.testing.assert_array_equal(kept, read_dicom(data("CT_small.dcm"), window="lung")[0])
    physical, meta = read_dicom(mono1, window=None)  # physical values: never inverted
    np.testing.assert_array_equal(physical[0], hu("CT_small.dcm"))
    assert meta["inverted"] is False and meta["dicom"]["PhotometricInterpretation"] == "MONOCHROME1"


# ---------------------------------------------------------------------------------------------- colour


def test_rgb_is_scaled_by_bit_depth():
    arr, meta = read_dicom(data("examples_rgb_color.dcm"))
    ref = pydicom.dcmread(data("examples_rgb_color.dcm")).pixel_array
    np.testing.assert_allclose(arr, ref.transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert meta["channels"] == ["R", "G", "B"] and meta["value_range"] == (0.0, 1.0)
    arr16, _ = read_dicom(data("SC_rgb_rle_16bit.dcm"))
    ref16 = pydicom.dcmread(data("SC_rgb_rle_16bit.dcm")).pixel_array
    np.testing.assert_allclose(arr16, ref16.transpose(2, 0, 1) / 65535.0, atol=1e-7)


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_is_converted_to_rgb_exactly_once(name):
    arr, meta = read_dicom(data(name))
    ycc = pydicom.pixels.pixel_array(data(name), raw=True)  # decoded, still YCbCr
    rgb = convert_color_space(ycc, "YBR_FULL", "RGB")
    np.testing.assert_allclose(arr, rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    twice = convert_color_space(rgb, "YBR_FULL", "RGB")
    assert not np.allclose(arr, twice.transpose(2, 0, 1) / 255.0, atol=0.02)
    assert meta["photometric"].startswith("YBR_FULL") and meta["channels"] == ["R", "G", "B"]


def test_palette_colour_goes_through_the_palette():
    ds = pydicom.dcmread(data("examples_palette.dcm"))
    ref = apply_color_lut(ds.pixel_array, ds)
    arr, meta = read_dicom(data("examples_palette.dcm"))
    np.testing.assert_allclose(arr, ref.transpose(2, 0, 1) / np.iinfo(ref.dtype).max, atol=1e-7)
    assert arr.shape == (3, 350, 800) and meta["photometric"] == "PALETTE COLOR"


def test_explicit_window_on_colour_is_an_error():
    with pytest.raises(WindowError, match="colour"):
        read_dicom(data("examples_rgb_color.dcm"), window="lung")
    a, _ = read_dicom(data("examples_rgb_color.dcm"), window=None)
    b, _ = read_dicom(data("examples_rgb_color.dcm"), window="auto")
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- frames


def test_multiframe_frame_selection():
    ds = pydicom.dcmread(data("rtdose.dcm"))  # 15 frames, Dose Grid Scaling
    ref = ds.pixel_array * float(ds.DoseGridScaling)  # [15, 10, 10]
    for k in (0, 7, 14, -1):
        arr, meta = read_dicom(data("rtdose.dcm"), frame=k, window=None)
        np.testing.assert_allclose(arr[0], ref[k], rtol=1e-6)
        assert meta["frame"] == k % 15 and meta["n_frames"] == 15
    assert meta["units"] == str(ds.DoseUnits)
    with pytest.raises(FrameIndexError, match="15 frames"):
        read_dicom(data("rtdose.dcm"), frame=15)
    frames, meta = read_dicom_frames(data("rtdose.dcm"), window=None)
    assert frames.shape == (15, 1, 10, 10) and meta["shape"] == (15, 1, 10, 10)
    np.testing.assert_allclose(frames[:, 0], ref, rtol=1e-6)
    rgb, _ = read_dicom_frames(data("SC_rgb_rle_2frame.dcm"))
    ref_rgb = pydicom.dcmread(data("SC_rgb_rle_2frame.dcm")).pixel_array
    assert rgb.shape == (2, 3, 100, 100)
    np.testing.assert_allclose(rgb, ref_rgb.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    one, _ = read_dicom(data("CT_small.dcm"))
    all_, _ = read_dicom_frames(data("CT_small.dcm"))
    np.testing.assert_array_equal(all_, one[None])


def test_enhanced_multiframe_uses_per_frame_rescale(tmp_path):
    stored = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    ds = ct_dataset(8, 8, pixel_array=stored, slope=None, position=None, orientation=None)
    shared, f0, f1 = Dataset(), Dataset(), Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.25]
    shared.PixelMeasuresSequence = DicomSequence([measures])
    for item, (slope, intercept) in ((f0, (1.0, -1000.0)), (f1, (2.0, -10.0))):
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, intercept, "HU"
        item.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([f0, f1])
    path = write(ds, tmp_path / "enhanced.dcm")
    arr1, meta = read_dicom(path, frame=1, window=None)
    np.testing.assert_array_equal(arr1[0], stored[1] * 2.0 - 10.0)
    assert meta["spacing"] == (0.5, 0.25) and meta["dicom"]["RescaleIntercept"] == -10.0
    frames, _ = read_dicom_frames(path, window=None)
    np.testing.assert_array_equal(frames[0, 0], stored[0] - 1000.0)


# ---------------------------------------------------------------------------------------------- sample types


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_integer_sample_types(dtype, tmp_path):
    info = np.iinfo(dtype)
    stored = np.linspace(info.min, info.max, 16 * 16).astype(dtype).reshape(16, 16)
    ds = ct_dataset(16, 16, pixel_array=stored, slope=None)
    arr, meta = read_dicom(write(ds, tmp_path / "x.dcm"), window=None)
    np.testing.assert_array_equal(arr[0], stored.astype(np.float32))
    assert meta["dicom"]["PixelRepresentation"] == int(info.min < 0)


def test_32_bit_and_big_endian():
    arr, _ = read_dicom(data("rtdose.dcm"), window=None, modality_lut=False)  # uint32
    np.testing.assert_array_equal(arr[0], pydicom.dcmread(data("rtdose.dcm")).pixel_array[0])
    big, meta = read_dicom(data("MR_small_bigendian.dcm"), window=None)
    little, _ = read_dicom(data("MR_small.dcm"), window=None)
    np.testing.assert_array_equal(big, little)
    assert meta["dicom"]["TransferSyntax"] == "Explicit VR Big Endian"


@pytest.mark.parametrize(("keyword", "dtype"), [("FloatPixelData", np.float32), ("DoubleFloatPixelData", np.float64)])
def test_float_pixel_data(keyword, dtype, tmp_path):
    values = np.random.default_rng(0).normal(0, 1e3, size=(12, 10)).astype(dtype)
    ds = ct_dataset(12, 10, slope=None)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 8 * values.itemsize
    setattr(ds, keyword, values.tobytes())
    path = write(ds, tmp_path / "float.dcm")
    arr, meta = read_dicom(path, window=None)
    np.testing.assert_array_equal(arr[0], values.astype(np.float32))
    shown, meta = read_dicom(path)
    assert 0.0 <= shown.min() < shown.max() <= 1.0 and meta["window"][0]["source"].startswith("percentile")


# ---------------------------------------------------------------------------------------------- codecs


def test_jpeg_ls_decodes_with_the_installed_plugin():
    if not get_decoder(JPEGLSNearLossless).is_available:
        pytest.skip("no JPEG-LS decoder installed")
    arr, meta = read_dicom(data("JPEGLSNearLossless_16.dcm"), window=None, modality_lut=False)
    np.testing.assert_array_equal(arr[0], pydicom.dcmread(data("JPEGLSNearLossless_16.dcm")).pixel_array)
    assert meta["dicom"]["TransferSyntax"] == JPEGLSNearLossless.name


def test_missing_jpeg_ls_plugin_names_syntax_and_install(monkeypatch):
    monkeypatch.setattr(get_decoder(JPEGLSNearLossless), "_available", {})
    with pytest.raises(MissingCodecError) as info:
        read_dicom(data("JPEGLSNearLossless_16.dcm"))
    err = info.value
    assert str(JPEGLSNearLossless) in err.codec and "JPEG-LS" in err.codec
    assert err.install == "pip install pyjpegls"
    msg = str(err)
    assert "JPEGLSNearLossless_16.dcm" in msg and "pip install pyjpegls" in msg and "dinoapp[dicom-codecs]" in msg


def test_decoder_failures_are_translated(monkeypatch):
    def unsupported(src, runner):
        raise RuntimeError("this plugin does not support 12-bit samples")

    def broken(src, runner):
        raise RuntimeError("corrupt marker segment")

    decoder = get_decoder(JPEGLSNearLossless)
    monkeypatch.setattr(decoder, "_available", {"fake": unsupported})
    with pytest.raises(MissingCodecError, match="pyjpegls"):
        read_dicom(data("JPEGLSNearLossless_16.dcm"))
    monkeypatch.setattr(decoder, "_available", {"fake": broken})
    with pytest.raises(UnreadableFileError, match="damaged"):
        read_dicom(data("JPEGLSNearLossless_16.dcm"))


# ---------------------------------------------------------------------------------------------- odd inputs


def _png(path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path, format="PNG")


ODD_INPUTS = {
    "zero-byte": (lambda p: p.write_bytes(b""), UnreadableFileError),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), UnsupportedFormatError),
    "png-named-dcm": (_png, UnsupportedFormatError),
    "half-a-ct": (lambda p: p.write_bytes(file_bytes("CT_small.dcm")[:19603]), UnreadableFileError),
    "header-cut": (lambda p: p.write_bytes(file_bytes("CT_small.dcm")[:1000]), UnreadableFileError),
    "preamble-only": (lambda p: p.write_bytes(file_bytes("CT_small.dcm")[:140]), UnreadableFileError),
    "rt-plan": (lambda p: p.write_bytes(file_bytes("rtplan.dcm")), NoPixelDataError),
    "structured-report": (lambda p: p.write_bytes(file_bytes("test-SR.dcm")), NoPixelDataError),
    "mr-truncated": (lambda p: p.write_bytes(file_bytes("MR_truncated.dcm")), UnreadableFileError),
    "missing": (lambda p: None, MissingFileError),
    "a-folder": (lambda p: p.mkdir(), MissingFileError),
}


@pytest.mark.parametrize("case", list(ODD_INPUTS))
def test_odd_inputs_raise_the_exact_typed_error(case, tmp_path):
    make, expected = ODD_INPUTS[case]
    path = tmp_path / f"{case}.dcm"
    make(path)
    with pytest.raises(expected) as info:
        read_dicom(path)
    assert type(info.value) is expected
    assert path.name in str(info.value)


def test_no_pixel_data_names_the_object():
    with pytest.raises(NoPixelDataError, match="RT Plan Storage"):
        read_dicom(data("rtplan.dcm"))
    with pytest.raises(NoPixelDataError, match="Comprehensive SR"):
        read_dicom(data("test-SR.dcm"))


@pytest.mark.parametrize("implicit", [False, True])
def test_file_without_preamble_reads(implicit, tmp_path):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=implicit, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    arr, meta = read_dicom(path, window=None)
    np.testing.assert_array_equal(arr[0], hu("CT_small.dcm"))
    assert meta["dicom"]["TransferSyntax"] == ("Implicit" if implicit else "Explicit") + " VR Little Endian"


def test_dual_personality_tiff_preamble_is_read_as_dicom():
    assert file_bytes("CT_small.dcm")[:4] == b"II*\x00"  # a TIFF header in the preamble (PS3.10 7.5)
    arr, _ = read_dicom(data("CT_small.dcm"), window=None)
    assert arr.shape == (1, 128, 128)


def test_meta_contract_keys(tmp_path):
    ds = ct_dataset(16, 16, window=(40, 400))
    ds.SeriesInstanceUID = generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr, meta = read_dicom(write(ds, tmp_path / "c.dcm"))
    assert {
        "format",
        "path",
        "shape",
        "value_range",
        "units",
        "channels",
        "dicom",
        "window",
        "frame",
        "n_frames",
        "spacing",
        "photometric",
        "inverted",
    } <= set(meta)
    assert meta["shape"] == arr.shape == (1, 16, 16) and meta["path"] == str(tmp_path / "c.dcm")
    assert meta["dicom"]["Modality"] == "CT" and meta["dicom"]["WindowCenter"] == 40.0
    assert ExplicitVRLittleEndian.name == meta["dicom"]["TransferSyntax"]


def test_12_bit_jpeg_extended_names_the_licence_problem():
    try:
        read_dicom(data("JPGExtended.dcm"))
    except MissingCodecError as err:
        assert err.install == "" and "GPL" in str(err) and "1.2.840.10008.1.2.4.51" in err.codec
    else:
        pytest.skip("a 12-bit JPEG decoder (pylibjpeg-libjpeg) is installed here")
