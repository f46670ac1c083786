"""domains.phi: readers never return PHI; deidentify strips it, keeps pixels and series structure."""

from __future__ import annotations

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.datadict import dictionary_VR  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from domains.dicom import read_dicom  # noqa: E402
from domains.phi import SAFE_TAGS, deidentify, safe_meta  # noqa: E402
from domains.series import find_series, read_series  # noqa: E402
from tests.dicom_factory import PHI_VALUES, PRIVATE_VALUE, ct_dataset, make_series, write  # noqa: E402


def secrets_of(ds: Dataset) -> list[str]:
    """Every identifying string in ``ds``: the PHI values, the private value and each instance UID."""
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    uids = [str(ds[k].value) for k in keys]
    return [*PHI_VALUES.values(), PRIVATE_VALUE, *uids]


def assert_free_of(text: str, secrets: list[str]) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"leaked: {leaked}"


def phi_slice(tmp_path, name="phi.dcm", **kwargs):
    ds = ct_dataset(phi=True, window=(40, 400), **kwargs)
    return ds, write(ds, tmp_path / name)


def test_safe_tags_hold_no_identifying_value_representation():
    for keyword in SAFE_TAGS:
        assert dictionary_VR(keyword) not in ("PN", "DA", "DT", "TM", "AS", "UI", "LT", "ST", "UT"), keyword
    assert not {"PatientName", "PatientID", "InstitutionName", "SeriesDescription", "StudyDate"} & set(SAFE_TAGS)


def test_read_dicom_meta_has_no_phi(tmp_path):
    ds, path = phi_slice(tmp_path)
    for window in ("auto", None, "rgb3"):
        _, meta = read_dicom(path, window=window)
        text = str(meta) + json.dumps(meta)
        assert_free_of(text, secrets_of(ds))
    assert set(meta["dicom"]) <= set(SAFE_TAGS) | {"TransferSyntax", "SOPClass"}
    assert meta["dicom"]["Modality"] == "CT" and meta["dicom"]["SOPClass"] == "CT Image Storage"


def test_series_meta_and_listing_have_no_phi(tmp_path):
    uid = generate_uid()
    kept = []
    for k in range(3):
        ds, _ = phi_slice(tmp_path, f"s{k}.dcm", series_uid=uid, position=(0, 0, 3.0 * k), seed=k)
        kept.append(ds)
    _, meta = read_series(tmp_path)
    found = find_series(tmp_path)
    text = str(meta) + json.dumps(meta) + repr(found) + repr(found.skipped)
    for ds in kept:
        assert_free_of(text, secrets_of(ds))


def test_safe_meta_is_plain_and_whitelisted(tmp_path):
    ds, _ = phi_slice(tmp_path)
    meta = safe_meta(ds)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["PixelSpacing"] == [0.7, 0.8] and meta["Rows"] == 32 and meta["RescaleIntercept"] == -1024.0
    assert_free_of(json.dumps(meta), secrets_of(ds))


def test_deidentify_removes_phi_and_keeps_pixels(tmp_path):
    ds, _ = phi_slice(tmp_path)
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.OperatorsName = PHI_VALUES["OperatorsName"]  # a name hidden in a sequence
    item.StudyDate = PHI_VALUES["StudyDate"]
    ds.ReferencedImageSequence = DicomSequence([item])
    original = ds.copy()
    clean = deidentify(ds, uid_salt="s3cret")
    out = tmp_path / "clean.dcm"
    clean.save_as(out, enforce_file_format=True)
    assert_free_of(str(clean) + out.read_bytes().decode("latin-1"), secrets_of(original))
    assert not any(elem.tag.is_private for elem in clean.iterall())
    assert clean.PixelData == original.PixelData
    assert clean.PatientIdentityRemoved == "YES" and clean.DeidentificationMethod
    assert clean.PatientName == "" and clean.PatientID == "" and "PatientName" in clean  # Type 2: present, empty
    assert "PatientWeight" not in clean and "PatientSize" not in clean and "PatientWeight" in original
    assert "InstitutionName" not in clean and "SeriesDescription" not in clean and "StudyDescription" not in clean
    assert clean.Modality == "CT" and clean.PixelSpacing == original.PixelSpacing and clean.KVP == original.KVP
    assert clean.SOPClassUID == original.SOPClassUID  # a class, not an instance: kept
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.ReferencedImageSequence[0].ReferencedSOPInstanceUID == clean.SOPInstanceUID  # references follow
    assert "OperatorsName" not in clean.ReferencedImageSequence[0]
    assert ds == original  # the input is not modified
    arr, _ = read_dicom(out, window=None)
    np.testing.assert_array_equal(arr[0], read_dicom(tmp_path / "phi.dcm", window=None)[0][0])


def test_deidentify_keeps_series_together_and_uids_reproducible(tmp_path):
    paths, _, _ = make_series(tmp_path, 3)
    slices = [pydicom.dcmread(p) for p in paths]
    a = [deidentify(ds, uid_salt="one") for ds in slices]
    assert len({d.SeriesInstanceUID for d in a}) == 1 and len({d.StudyInstanceUID for d in a}) == 1
    assert len({d.SOPInstanceUID for d in a}) == 3
    assert a[0].SeriesInstanceUID != slices[0].SeriesInstanceUID and a[0].SeriesInstanceUID.startswith("2.25.")
    assert deidentify(slices[0], uid_salt="one").SeriesInstanceUID == a[0].SeriesInstanceUID
    assert deidentify(slices[0], uid_salt="two").SeriesInstanceUID != a[0].SeriesInstanceUID
    assert deidentify(slices[0]).SeriesInstanceUID == deidentify(slices[1]).SeriesInstanceUID  # per-process salt
    assert all(len(d.SOPInstanceUID) <= 64 for d in a)
