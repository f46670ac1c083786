"""Synthetic DICOM files for tests and benchmarks: small CT slices with known geometry and values.

Everything is made with pydicom in a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# Identifying values put into data sets by ``phi=True``: tests search outputs for each of them.
PHI_VALUES = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-99812345",
    "PatientBirthDate": "19610704",
    "StudyDate": "20240229",
    "SeriesDate": "20240229",
    "AcquisitionDateTime": "20240229101530.250000",
    "StudyTime": "101530",
    "InstitutionName": "St Elsewhere General Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "ReferringPhysicianName": "House^Gregory",
    "OperatorsName": "Tech^Tina",
    "AccessionNumber": "ACC77441122",
    "StudyDescription": "CT CHEST Jane Doe follow-up",
    "SeriesDescription": "AXIAL 1mm for Dr House",
    "ImageComments": "patient moved, call 555-0199",
    "StationName": "CTSCANNER-ROOM3",
    "DeviceSerialNumber": "SN-4455-AB",
    "OtherPatientNames": "Smith^Jane",
    "PatientAddress": "42 Elm Street",
}
PRIVATE_VALUE = "PRIVATE-SECRET-0042"


def ct_dataset(
    rows: int = 32,
    cols: int = 32,
    *,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance_number: int | None = 1,
    pixel_array: np.ndarray | None = None,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    pixel_spacing: Sequence[float] = (0.7, 0.8),
    slice_thickness: float = 1.5,
    window: tuple[float, float] | None = None,
    phi: bool = False,
    seed: int = 0,
) -> Dataset:
    """A CT Image Storage data set (int16 stored values) with the given geometry and rescale.

    ``pixel_array`` defaults to a seeded random int16 image in [0, 2000]. ``position`` /
    ``orientation`` / ``instance_number`` / ``slope`` set to None leave the attribute out.
    ``phi=True`` adds the identifying attributes of :data:`PHI_VALUES` and a private tag.
    """
    if pixel_array is None:
        pixel_array = np.random.default_rng(seed).integers(0, 2000, size=(rows, cols), dtype=np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "Synthetic"
    ds.KVP = 120
    ds.BodyPartExamined = "CHEST"
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = slice_thickness
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.set_pixel_data(np.asarray(pixel_array), photometric, 16 if pixel_array.dtype.itemsize == 2 else 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if phi:
        for keyword, value in PHI_VALUES.items():
            setattr(ds, keyword, value)
        ds.PatientWeight, ds.PatientSize = 83.25, 1.815  # numbers PS3.15 still removes
        block = ds.private_block(0x0029, "ACME Secrets", create=True)
        block.add_new(0x01, "LO", PRIVATE_VALUE)
        block.add_new(0x02, "OB", PRIVATE_VALUE.encode())  # binary: no VR rule would catch it
    return ds


def write(ds: Dataset, path: str | os.PathLike) -> str:
    """Save ``ds`` in the DICOM file format (preamble + file meta) and return the path."""
    ds.save_as(path, enforce_file_format=True)
    return os.fspath(path)


def make_ct_slice(
    path: str | os.PathLike,
    rows: int = 32,
    cols: int = 32,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    series_uid: str | None = None,
    instance_number: int | None = 1,
    pixel_array: np.ndarray | None = None,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    **kwargs,
) -> str:
    """Write one CT slice (see :func:`ct_dataset`) to ``path``; returns the path."""
    ds = ct_dataset(
        rows,
        cols,
        position=position,
        orientation=orientation,
        series_uid=series_uid,
        instance_number=instance_number,
        pixel_array=pixel_array,
        slope=slope,
        intercept=intercept,
        photometric=photometric,
        **kwargs,
    )
    return write(ds, path)


def oblique_orientation(angle_deg: float = 20.0) -> tuple[float, ...]:
    """A unit row/column direction pair rotated about the patient's x axis (a tilted-gantry CT)."""
    a = np.deg2rad(angle_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))


def make_series(
    folder: str | os.PathLike,
    n: int = 12,
    *,
    rows: int = 32,
    cols: int = 32,
    spacing: float = 2.5,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-20.0, -30.0, 100.0),
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    misleading_instance_numbers: bool = True,
    positions: bool = True,
    dtype: type = np.int16,
    prefix: str = "slice",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write ``n`` slices of one series along the orientation's normal.

    Slice k (true order) lies at ``origin + k * spacing * normal`` and holds stored values
    ``k * 100 + [0, rows*cols)`` pattern (slice k's pixel [0, 0] = k * 100), so order is checkable.
    Files are written in a shuffled order with names that do not sort in slice order; with
    ``misleading_instance_numbers`` the InstanceNumbers are reversed (true order = descending).

    Returns (paths in true slice order, stored volume int16 [n, rows, cols], positions [n, 3]).
    """
    os.makedirs(folder, exist_ok=True)
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    base = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) % 97
    vol = np.stack([(base + 100 * k).astype(dtype) for k in range(n)])  # [n, rows, cols]
    pos = np.asarray(origin, dtype=float) + np.outer(np.arange(n) * spacing, normal)  # [n, 3]
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    paths: list[str | None] = [None] * n
    for j, k in enumerate(order):
        path = os.path.join(os.fspath(folder), f"{prefix}_{j:03d}_{(k * 7919) % 1000:03d}.dcm")
        ds = ct_dataset(
            rows,
            cols,
            position=pos[k] if positions else None,
            orientation=orientation if positions else None,
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=int(n - k if misleading_instance_numbers else k + 1),
            pixel_array=vol[k],
        )
        paths[k] = write(ds, path)
    return [p for p in paths if p is not None], vol, pos
