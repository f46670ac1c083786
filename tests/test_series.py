"""domains.series: grouping, slice order along the normal, fallbacks and warnings, on synthetic CT series."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from domains.dicom import WINDOW_PRESETS, window  # noqa: E402
from domains.errors import DomainWarning, SeriesError  # noqa: E402
from domains.series import SeriesInfo, find_series, read_series, series_key  # noqa: E402
from tests.dicom_factory import AXIAL, ct_dataset, make_series, oblique_orientation, write  # noqa: E402


def test_oblique_shuffled_series_is_sorted_along_the_normal(tmp_path):
    orientation = oblique_orientation(25.0)
    paths, stored, pos = make_series(tmp_path, 12, orientation=orientation, spacing=2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean series warns about nothing
        vol, meta = read_series(tmp_path)
    assert vol.dtype == np.float32 and vol.shape == (12, 32, 32)
    np.testing.assert_array_equal(vol, stored.astype(np.float32) - 1024.0)  # true order, HU
    assert meta["files"] == paths and meta["sort"].startswith("position")
    assert meta["n_slices"] == 12 and meta["units"] == "HU" and meta["value_range"] is None
    dz, dy, dx = meta["spacing"]
    assert dz == pytest.approx(2.5, abs=1e-6) and (dy, dx) == (0.7, 0.8)
    normal = np.cross(orientation[:3], orientation[3:])
    np.testing.assert_allclose(meta["normal"], normal, atol=1e-6)
    np.testing.assert_allclose(meta["slice_positions"], pos @ normal, atol=1e-6)
    np.testing.assert_allclose(meta["orientation"], orientation, atol=1e-6)
    affine = np.asarray(meta["affine"])
    for k in (0, 5, 11):  # voxel (i, j, k) -> patient mm: slice origins and a pixel step along a row
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*pos[k], 1], atol=1e-5)
    np.testing.assert_allclose(
        affine @ [3, 2, 0, 1] - affine @ [0, 0, 0, 1],
        [*(3 * 0.8 * np.asarray(orientation[:3]) + 2 * 0.7 * np.asarray(orientation[3:])), 0],
        atol=1e-6,
    )
    assert meta["series"] == series_key(pydicom.dcmread(paths[0]).SeriesInstanceUID)


def test_falls_back_to_instance_number_without_positions(tmp_path):
    paths, stored, _ = make_series(tmp_path, 6, positions=False, misleading_instance_numbers=False)
    with pytest.warns(DomainWarning, match="no position"):
        vol, meta = read_series(tmp_path)
    np.testing.assert_array_equal(vol, stored - 1024.0)
    assert meta["sort"].startswith("InstanceNumber") and meta["slice_positions"] is None
    assert meta["spacing"] == (1.5, 0.7, 0.8) and meta["affine"] is None  # dz from SliceThickness


def test_mixed_sizes_keep_the_majority(tmp_path):
    uid = generate_uid()
    _, stored, _ = make_series(tmp_path, 8, series_uid=uid)
    for k in range(3):
        write(ct_dataset(16, 16, series_uid=uid, position=(0, 0, 500 + k)), tmp_path / f"small{k}.dcm")
    with pytest.warns(DomainWarning, match="dropped 3"):
        vol, meta = read_series(tmp_path)
    assert vol.shape == (8, 32, 32) and meta["dropped"] == 3
    np.testing.assert_array_equal(vol, stored - 1024.0)


def test_two_series_in_one_folder(tmp_path):
    make_series(tmp_path / "a", 12, prefix="a")
    _, small, _ = make_series(tmp_path / "b", 5, prefix="b", rows=16, cols=16)
    found = find_series(tmp_path)
    assert [s.n_files for s in found] == [12, 5] and all(isinstance(s, SeriesInfo) for s in found)
    assert (found[1].rows, found[1].columns, found[1].modality) == (16, 16, "CT")
    assert all(len(s.key) == 12 and int(s.key, 16) >= 0 for s in found)
    with pytest.warns(DomainWarning, match=found[1].key):
        vol, meta = read_series(tmp_path)
    assert vol.shape[0] == 12 and meta["other_series"] == [found[1].key]
    for choice in (found[1].key, 1, -1):
        vol, meta = read_series(tmp_path, series=choice)
        np.testing.assert_array_equal(vol, small - 1024.0)
    with pytest.raises(SeriesError, match=found[0].key):
        read_series(tmp_path, series="0123456789ab")
    with pytest.raises(SeriesError, match="2 series"):
        read_series(tmp_path, series=2)
    assert len(find_series(tmp_path, recursive=False)) == 0


def test_junk_files_are_skipped_not_fatal(tmp_path):
    paths, stored, _ = make_series(tmp_path, 6)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "random.dcm").write_bytes(np.random.default_rng(3).bytes(2000))
    (tmp_path / "sub").mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), tmp_path / "sub" / "plan.dcm")
    with open(paths[0], "rb") as f:
        (tmp_path / "cut.dcm").write_bytes(f.read()[:300])
    found = find_series(tmp_path)
    assert len(found) == 1 and found[0].n_files == 6
    skipped = dict(found.skipped)
    assert set(skipped) == {
        os.fspath(tmp_path / n) for n in ("notes.txt", "empty.dcm", "random.dcm", "sub/plan.dcm", "cut.dcm")
    }
    assert "empty" in skipped[os.fspath(tmp_path / "empty.dcm")]
    assert "RT Plan Storage" in skipped[os.fspath(tmp_path / "sub" / "plan.dcm")]
    vol, meta = read_series(tmp_path)
    np.testing.assert_array_equal(vol, stored - 1024.0)
    assert len(meta["skipped"]) == 5


def test_no_series_is_a_series_error(tmp_path):
    with pytest.raises(SeriesError, match="no files"):
        read_series(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SeriesError, match="1 files skipped"):
        read_series(tmp_path)


def test_duplicate_and_uneven_positions_warn(tmp_path):
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.0, 4.0, 4.0, 6.0]):
        write(ct_dataset(series_uid=uid, position=(0, 0, z), seed=k), tmp_path / f"d{k}.dcm")
    with pytest.warns(DomainWarning, match="share a position"):
        vol, meta = read_series(tmp_path)
    assert vol.shape[0] == 5 and meta["spacing"][0] == 2.0
    other = tmp_path / "uneven"
    other.mkdir()
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.0, 4.0, 9.0]):
        write(ct_dataset(series_uid=uid, position=(0, 0, z)), other / f"u{k}.dcm")
    with pytest.warns(DomainWarning, match="uneven slice spacing"):
        _, meta = read_series(other)
    assert meta["slice_positions"] == [0.0, 2.0, 4.0, 9.0]


def test_mixed_orientations_warn(tmp_path):
    uid = generate_uid()
    for k in range(4):
        write(ct_dataset(series_uid=uid, position=(0, 0, 2.0 * k)), tmp_path / f"o{k}.dcm")
    write(ct_dataset(series_uid=uid, position=(0, 0, 8.0), orientation=oblique_orientation(30)), tmp_path / "odd.dcm")
    with pytest.warns(DomainWarning, match="1 of 5 slices have a different orientation"):
        _, meta = read_series(tmp_path)
    assert meta["orientation"] == list(AXIAL)


def test_three_window_volume_and_file_list(tmp_path):
    paths, stored, _ = make_series(tmp_path, 4)
    vol, meta = read_series(list(reversed(paths)), window="rgb3")
    assert vol.shape == (4, 3, 32, 32) and meta["channels"] == ["lung", "mediastinum", "bone"]
    np.testing.assert_allclose(vol[:, 2], window(stored - 1024.0, *WINDOW_PRESETS["bone"]), atol=1e-6)
    grey, meta = read_series(tmp_path, window="auto")  # percentile over the whole volume: one mapping
    assert grey.shape == (4, 32, 32) and meta["window"][0]["source"].startswith("percentile")


def test_enhanced_multiframe_file_is_sorted_by_per_frame_position(tmp_path):
    z = [6.0, 0.0, 4.0, 2.0]  # frames stored out of order
    stored = np.stack([np.full((8, 8), int(v * 10), dtype=np.int16) for v in z])  # [4, 8, 8]
    ds = ct_dataset(8, 8, pixel_array=stored, position=None, orientation=None)
    shared = Dataset()
    plane = Dataset()
    plane.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = DicomSequence([plane])
    per_frame = []
    for v in z:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, v]
        item.PlanePositionSequence = DicomSequence([pos])
        per_frame.append(item)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    write(ds, tmp_path / "enhanced.dcm")
    found = find_series(tmp_path)
    assert found[0].n_files == 1 and found[0].n_images == 4
    vol, meta = read_series(tmp_path, series=found[0])
    np.testing.assert_array_equal(vol[:, 0, 0], [-1024.0, -1004.0, -984.0, -964.0])
    assert meta["slice_positions"] == [0.0, 2.0, 4.0, 6.0] and meta["spacing"][0] == 2.0


def test_presets_on_a_non_ct_series_warn(tmp_path):
    paths, _, _ = make_series(tmp_path, 3)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Modality, ds.RescaleType = "MR", "US"
        ds.save_as(p)
    with pytest.warns(DomainWarning, match="Hounsfield"):
        read_series(tmp_path, window="brain")
