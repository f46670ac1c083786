"""Keep protected health information (PHI) out of what ``domains`` returns, and strip it from data sets.

Two tools, two policies:

* :func:`safe_meta` is a **whitelist**: the ``meta["dicom"]`` dict every DICOM reader returns holds only
  the technical attributes named in :data:`SAFE_TAGS` (geometry, pixel encoding, LUTs, scanner
  settings), never names, IDs, UIDs, dates/times, institutions, free-text descriptions or comments, or
  private tags. So meta dicts can be logged, saved next to features or shown in an app.
* :func:`deidentify` returns a copy of a data set to write out again, in the spirit of the DICOM
  *Basic Application Level Confidentiality Profile* (PS3.15 Annex E, Table E.1-1): identifying
  attributes removed (X) or emptied (Z, for Type 2 attributes that must stay present), UIDs replaced
  (U) consistently, private tags and overlays removed. It is conservative where the table is long:
  any attribute whose value representation can carry a name, date, time, age or free text (PN, DA,
  DT, TM, AS, AE, LO, SH, ST, LT, UT, UC, UR, UN) is removed unless it is a known technical one.

Neither looks at the pixels: ultrasound, secondary captures and scanned documents can show names
burned into the image (check ``BurnedInAnnotation``, kept by :func:`safe_meta`), which no tag rule
removes.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# fmt: off
# Technical attributes only (PS3.3 keywords). Each is a number, a code string or a scanner model name;
# none identifies a patient, visit, institution or person.
SAFE_TAGS: tuple[str, ...] = (
    # General image / series / equipment (PS3.3 C.7.3.1, C.7.5.1, C.7.6.1)
    "Modality", "ImageType", "BodyPartExamined", "PatientPosition", "Laterality", "ImageLaterality",
    "ViewPosition", "InstanceNumber", "Manufacturer", "ManufacturerModelName", "BurnedInAnnotation",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    "PresentationIntentType",
    # Image pixel (C.7.6.3), multi-frame (C.7.6.6)
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelAspectRatio",
    # Image plane (C.7.6.2)
    "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
    "ImageOrientationPatient", "ImagePositionPatient",
    # Modality LUT (C.11.1) and VOI LUT (C.11.2)
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
    # CT (C.8.2.1), MR (C.8.3.1), PET (C.8.9.1), RT dose (C.8.8.3) acquisition parameters
    "KVP", "XRayTubeCurrent", "ExposureTime", "Exposure", "ConvolutionKernel", "ReconstructionDiameter",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "EchoTrainLength",
    "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "PixelBandwidth", "Units", "DecayCorrection",
    "DoseUnits", "DoseType", "DoseGridScaling",
)

# Type 2 attributes of the Patient / General Study modules (PS3.3 C.7.1.1, C.7.2.1) that must be present
# but may be empty: PS3.15 action Z.
_BLANK = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "ContentDate", "ContentTime",
})

# Attributes with a harmless-looking VR (CS, DS, US, SQ, ...) that PS3.15 Table E.1-1 still removes (X).
_REMOVE = frozenset({
    "PatientSize", "PatientWeight", "PregnancyStatus", "PatientSexNeutered", "SmokingStatus",
    "OtherPatientIDsSequence", "ReferencedPatientSequence", "RequestAttributesSequence",
    "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence", "PerformedProtocolCodeSequence",
    "ProcedureCodeSequence", "RequestedProcedureCodeSequence", "IconImageSequence", "EncapsulatedDocument",
    "OriginalAttributesSequence", "DigitalSignaturesSequence", "MACParametersSequence",
    "PersonIdentificationCodeSequence", "InstitutionCodeSequence", "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence",
})

# Text-VR attributes that are technical (codes, scanner models) and so survive the VR rule below.
_KEEP_TEXT = frozenset({
    "Manufacturer", "ManufacturerModelName", "RescaleType", "ConvolutionKernel", "CodeValue",
    "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue", "URNCodeValue",
    "LossyImageCompressionMethod", "DeidentificationMethod", "SpecificCharacterSet", "LUTExplanation",
})

# fmt: on

# Value representations that can carry names, dates, times, ages, station titles or free text.
_TEXT_VRS = frozenset({"PN", "DA", "DT", "TM", "AS", "AE", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "UN"})

# UIDs defined by the DICOM standard itself (SOP classes, transfer syntaxes, coding schemes) start here
# (PS3.6 Annex A); they name a kind of object, not an instance, and are kept.
_DICOM_ROOT = "1.2.840.10008."

# Used when no salt is given: random per process, so slices de-identified in one run stay together
# but the new UIDs cannot be recomputed from the originals by someone else.
_PROCESS_SALT = secrets.token_hex(16)

METHOD = "dinoapp PS3.15 basic-profile style, UIDs hashed"  # LO: at most 64 characters


def _plain(value: Any) -> Any:
    """A pydicom value as plain JSON-serialisable Python (DSfloat -> float, IS -> int, MultiValue -> list)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)
    return None  # bytes, sequences and other non-scalar values are never exported


def safe_meta(ds: Dataset) -> dict[str, Any]:
    """The technical attributes of ``ds`` named in :data:`SAFE_TAGS`, as plain JSON-serialisable values.

    Also ``"TransferSyntax"`` and ``"SOPClass"``: the *names* of the transfer syntax and SOP class
    (e.g. ``"JPEG-LS Lossless Image Compression"``, ``"CT Image Storage"``), never a UID. Empty and
    absent attributes are left out. Private tags are never read.
    """
    out: dict[str, Any] = {}
    for keyword in SAFE_TAGS:
        raw = ds.get(keyword)
        if raw is None or raw == "":
            continue
        value = _plain(raw)
        if value is not None and value != []:
            out[keyword] = value
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        out["TransferSyntax"] = ts.name
    sop = ds.get("SOPClassUID")
    if sop:
        out["SOPClass"] = sop.name
    return out


@contextmanager
def quiet_values() -> Iterator[None]:
    """Turn off pydicom's value validation for the block.

    pydicom warns *and logs* ``Invalid value for VR UI: '<the value>'`` when it converts a malformed
    value, so reading a bad UID, name or date would copy it into warnings and log files. Values are
    still parsed; only the validation (and its message) is skipped. (pydicom's setting is global, so
    this is meant for short blocks.)
    """
    from pydicom import config

    with config.disable_value_validation():
        yield


def hashed_uid(uid: str, salt: str) -> str:
    """A new UID derived from ``uid`` and ``salt``: ``2.25.<128-bit integer>`` (PS3.5 B.2, UUID-derived form).

    The same (uid, salt) always gives the same result, so every reference to one study, series or frame
    of reference is rewritten to the same new value.
    """
    digest = hashlib.sha256(f"{salt}\x00{uid}".encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def _is_instance_uid(keyword: str, value: str) -> bool:
    """UIDs that identify an instance (study, series, SOP instance, frame of reference, ...), not a class."""
    return bool(value) and not value.startswith(_DICOM_ROOT) and not keyword.endswith("ClassUID")


def _clean(ds: Dataset, salt: str) -> None:
    """Apply the removal / blanking / UID rules to ``ds`` in place, recursing into sequences."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        keyword = elem.keyword
        if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000):
            # private tags; curves (50xx) and overlays (60xx), which can hold burned-in annotations
            del ds[tag]
        elif keyword in _BLANK:
            elem.value = ""
        elif keyword in _REMOVE:
            del ds[tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, salt)
        elif elem.VR == "UI":
            if elem.VM > 1:
                elem.value = [hashed_uid(v, salt) if _is_instance_uid(keyword, v) else v for v in elem.value]
            elif elem.value and _is_instance_uid(keyword, str(elem.value)):
                elem.value = hashed_uid(str(elem.value), salt)
        elif elem.VR in _TEXT_VRS and keyword not in _KEEP_TEXT:
            del ds[tag]


def deidentify(ds: Dataset, *, uid_salt: str | None = None) -> Dataset:
    """A de-identified copy of ``ds`` (PS3.15 Annex E Basic Profile style); the pixel data is untouched.

    * Patient/study identifiers and dates that DICOM requires to be present (PatientName, PatientID,
      PatientBirthDate, PatientSex, StudyDate, StudyTime, AccessionNumber, StudyID,
      ReferringPhysicianName) are emptied (action Z); every other name, date, time, age, AE title and
      free-text attribute is removed (X), as are private tags, overlays, curves, icon images and the
      attributes of Table E.1-1 with numeric or coded values (PatientSize, PatientWeight, ...).
      Scanner settings, geometry and codes are kept.
    * Every UID that is not a DICOM-defined one (``1.2.840.10008.*``) and not a class UID is replaced by
      :func:`hashed_uid` of itself and ``uid_salt`` (action U), everywhere in the data set, so slices of
      one series keep one (new) SeriesInstanceUID and references stay consistent. The file meta
      MediaStorageSOPInstanceUID is set to the new SOPInstanceUID.
    * ``PatientIdentityRemoved`` = ``"YES"``, ``DeidentificationMethod`` names this function and
      ``LongitudinalTemporalInformationModified`` = ``"REMOVED"`` (PS3.15 E.1.1).

    ``uid_salt``: a secret string; the same salt gives the same new UIDs in every run (so later batches of
    one study stay linked). Default: a random salt drawn once per Python process.

    No ``DeidentificationMethodCodeSequence`` is written: the tag rules above are not a certified
    implementation of the profile, and burned-in text in the pixels is not removed.
    """
    salt = _PROCESS_SALT if uid_salt is None else uid_salt
    out = copy.deepcopy(ds)
    with quiet_values():  # a malformed name or UID must not be quoted in a warning or log line
        _clean(out, salt)
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = METHOD
        out.LongitudinalTemporalInformationModified = "REMOVED"
        file_meta = getattr(out, "file_meta", None)
        if file_meta is not None:
            if "SourceApplicationEntityTitle" in file_meta:
                del file_meta.SourceApplicationEntityTitle
            if "SOPInstanceUID" in out:
                file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out
