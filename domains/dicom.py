"""DICOM file -> float32 [C, H, W] (one frame) or [F, C, H, W] (all frames), with PHI-free meta.

The pixel pipeline of PS3.4 Annex N.2 (grayscale), in order:

1. decode the stored values (compressed transfer syntaxes through pydicom's decoder plugins);
2. **modality LUT** (PS3.3 C.11.1): Rescale Slope/Intercept or the Modality LUT Sequence, giving Hounsfield
   units for CT (``modality_lut=True``); per-frame values of enhanced multi-frame files
   (Pixel Value Transformation functional group, C.7.6.16.2.9) are honoured;
3. **VOI LUT / window** (C.11.2) -> display values in [0, 1], chosen by ``window``:

   ====================================  =================================================================
   ``window``                            result
   ====================================  =================================================================
   ``"auto"`` (default)                  the file's VOI LUT Sequence, else its first Window Center/Width
                                         (with its VOI LUT Function), else the 0.5-99.5 percentile range
   ``"lung"``, ``"bone"``, ...           a :data:`WINDOW_PRESETS` window (centre/width in HU)
   ``(center, width)``                   that LINEAR window, in modality units
   3 presets or pairs, or ``"rgb3"``     3 windows -> 3 channels, e.g. ``("lung", "mediastinum", "bone")``;
                                         ``"rgb3"`` is that default triple
   ``None``                              no VOI: the modality values (HU for CT), ``value_range`` None
   ====================================  =================================================================

4. **MONOCHROME1** (min = white) is inverted *after* windowing (x -> 1 - x), so bright means dense for
   every file (``invert_monochrome1=True``). With ``window=None`` nothing is inverted: the values stay
   physical, and ``meta["dicom"]["PhotometricInterpretation"]`` says how they are meant to be shown.

Colour images (RGB, YBR_* decoded to RGB by pydicom, PALETTE COLOR through its palette) come out as
R, G, B in [0, 1], divided by the bit-depth maximum (2**BitsStored - 1, or the palette's entry size).
VOI windows are defined for grayscale only (C.11.2): ``window="auto"`` and ``None`` give that RGB
output; an explicit window on a colour image raises :class:`WindowError`.

Compressed pixel data decodes when a pydicom plugin for its transfer syntax is installed; otherwise
:class:`~domains.errors.MissingCodecError` names the transfer syntax and the (permissively licensed)
package to install. ``meta["dicom"]`` holds only whitelisted technical attributes
(:func:`domains.phi.safe_meta`): no names, IDs, UIDs, dates or free text.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._deps import require
from .errors import (
    DomainWarning,
    FrameIndexError,
    MissingCodecError,
    NoPixelDataError,
    OptionError,
    UnreadableFileError,
    UnsupportedFormatError,
    WindowError,
)
from .phi import safe_meta
from .sniff import DICOM, check_file, sniff

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


# Window presets (centre, width) in Hounsfield units, as shipped by common PACS viewers and radiology
# teaching references (e.g. Radiopaedia "Windowing (CT)"); LINEAR function of PS3.3 C.11.2.1.2.1.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 350.0),  # alias of mediastinum
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "liver": (60.0, 160.0),
    "abdomen": (40.0, 400.0),
    "temporal_bone": (600.0, 2800.0),
}

# window="rgb3": lung / soft tissue / bone in R, G, B.
RGB3: tuple[str, str, str] = ("lung", "mediastinum", "bone")

WindowSpec = str | tuple[float, float] | Sequence[str | tuple[float, float]] | None

_DEFER_BYTES = 64 * 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# pip commands for decoders with permissive licences (MIT/BSD), by transfer syntax UID (PS3.5 Annex A).
_EXTRA = 'pip install "dinoapp[dicom-codecs]"'
# Variants that no permissively licensed decoder handles, by transfer syntax UID.
_NO_PERMISSIVE_DECODER = {
    "1.2.840.10008.1.2.4.51": (
        "12-bit JPEG Extended is decoded only by pylibjpeg-libjpeg, which is GPL-3.0 licensed and so not in "
        "dinoapp's extras: install it yourself (pip install pylibjpeg pylibjpeg-libjpeg) if its licence suits "
        "you, or convert the file to an uncompressed transfer syntax first (e.g. dcmtk: dcmdjpeg in.dcm out.dcm)"
    ),
}
_CODEC_INSTALL: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.50": ("pip install pillow", "or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.51": ("pip install pillow", "8-bit samples; or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.57": ("pip install python-gdcm", ""),
    "1.2.840.10008.1.2.4.70": ("pip install python-gdcm", ""),
    "1.2.840.10008.1.2.4.80": ("pip install pyjpegls", "or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.81": ("pip install pyjpegls", "or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.90": ("pip install pylibjpeg pylibjpeg-openjpeg", "or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.91": ("pip install pylibjpeg pylibjpeg-openjpeg", "or: pip install python-gdcm"),
    "1.2.840.10008.1.2.4.201": ("pip install pylibjpeg pylibjpeg-openjpeg", ""),
    "1.2.840.10008.1.2.4.202": ("pip install pylibjpeg pylibjpeg-openjpeg", ""),
    "1.2.840.10008.1.2.4.203": ("pip install pylibjpeg pylibjpeg-openjpeg", ""),
    "1.2.840.10008.1.2.5": ("pip install pylibjpeg pylibjpeg-rle", "pydicom's own numpy RLE decoder also works"),
}


# ----------------------------------------------------------------------------------------------------
# Windowing (PS3.3 C.11.2.1.2)
# ----------------------------------------------------------------------------------------------------


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window to modality values: float32 in [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3).

    ``function`` (the VOI LUT Function, (0028,1056)):

    * ``"LINEAR"`` (C.11.2.1.2.1): with c' = center - 0.5 and w' = width - 1, x <= c' - w'/2 -> 0,
      x > c' + w'/2 -> 1, else ((x - c') / w' + 0.5). Needs width >= 1.
    * ``"LINEAR_EXACT"`` (C.11.2.1.3.2): the same with c, w unchanged (a true [c - w/2, c + w/2] ramp). width > 0.
    * ``"SIGMOID"`` (C.11.2.1.3.1): 1 / (1 + exp(-4 (x - c) / w)). width > 0.

    The standard maps to the output range [ymin, ymax]; here ymin = 0, ymax = 1.
    """
    fn = str(function or "LINEAR").upper()
    c, w = float(center), float(width)
    x = np.asarray(values, dtype=np.float64)
    if fn in ("LINEAR", "LINEAR_EXACT"):
        if fn == "LINEAR":
            if w < 1:
                raise WindowError(f"a LINEAR window needs width >= 1 (PS3.3 C.11.2.1.2.1), got {width}")
            c, w = c - 0.5, w - 1.0
        elif w <= 0:
            raise WindowError(f"a LINEAR_EXACT window needs width > 0 (PS3.3 C.11.2.1.3.2), got {width}")
        if w == 0:  # LINEAR with width 1: a step at c'
            return (x > c).astype(np.float32)
        return np.clip((x - c) / w + 0.5, 0.0, 1.0).astype(np.float32)  # 0 at x <= c - w/2, 1 above c + w/2
    if fn == "SIGMOID":
        if w <= 0:
            raise WindowError(f"a SIGMOID window needs width > 0 (PS3.3 C.11.2.1.3.1), got {width}")
        with np.errstate(over="ignore"):  # exp overflow far below the centre is exactly 0 after the division
            return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
    raise WindowError(f"unknown VOI LUT Function {function!r}; DICOM defines LINEAR, LINEAR_EXACT and SIGMOID")


def parse_window(spec: WindowSpec) -> None | str | list[tuple[str, float, float]]:
    """``None``, ``"auto"`` or a list of 1 or 3 ``(name, center, width)``; raises WindowError for anything else."""
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return spec
    if isinstance(spec, np.ndarray):
        spec = spec.tolist()
    if isinstance(spec, str):
        if spec == "rgb3":
            return [_one_window(n) for n in RGB3]
        return [_one_window(spec)]
    if isinstance(spec, (list, tuple)):
        if len(spec) == 2 and all(_is_number(v) for v in spec):
            _, c, w = _one_window(spec)
            return [("grey", c, w)]
        if len(spec) == 3 and not all(_is_number(v) for v in spec):
            return [_one_window(s) for s in spec]
    raise WindowError(
        f"window={spec!r} is not understood; use 'auto', None, a preset name ({', '.join(WINDOW_PRESETS)}), "
        "a (center, width) pair, 'rgb3', or three presets / pairs such as ('lung', 'mediastinum', 'bone')"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _one_window(spec: Any) -> tuple[str, float, float]:
    if isinstance(spec, str):
        key = spec.lower()
        if key not in WINDOW_PRESETS:
            raise WindowError(f"unknown window preset {spec!r}; presets are: {', '.join(WINDOW_PRESETS)}")
        return (key, *WINDOW_PRESETS[key])
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(_is_number(v) for v in spec):
        c, w = float(spec[0]), float(spec[1])
        if not (np.isfinite(c) and np.isfinite(w)):
            raise WindowError(f"window ({c:g}, {w:g}): centre and width must be finite numbers")
        if not w >= 1:
            raise WindowError(f"window ({c:g}, {w:g}): a LINEAR window needs width >= 1 (PS3.3 C.11.2.1.2.1)")
        return (f"c{c:g}_w{w:g}", c, w)
    raise WindowError(f"window {spec!r}: give a preset name or a (center, width) pair")


# ----------------------------------------------------------------------------------------------------
# Opening and decoding
# ----------------------------------------------------------------------------------------------------


def open_dicom(path: str | os.PathLike, *, stop_before_pixels: bool = False, defer_pixels: bool = False) -> Dataset:
    """Read a DICOM data set with typed errors.

    ``stop_before_pixels``: read the header only. ``defer_pixels``: read the header and remember where the
    pixel data (any value over 64 KiB) lies; pydicom reads it from the file when it is first used.

    Content is checked first: a file that is not DICOM at all (another image format, random bytes)
    raises :class:`UnsupportedFormatError`; a DICOM file whose header is damaged or cut short raises
    :class:`UnreadableFileError`. Files without the 128-byte preamble (PS3.10 7.1) are read when their
    first bytes are a plausible data element (``force=True`` only then). A missing Transfer Syntax UID
    is inferred from the encoding pydicom found.
    """
    pydicom = require("pydicom")
    p = check_file(path)
    with open(p, "rb") as f:
        has_preamble = f.read(132)[128:132] == b"DICM"
    # "DICM" wins over other magic numbers: the preamble may hold a TIFF header (PS3.10 7.5, dual-personality
    # files such as pydicom's CT_small.dcm), so the generic sniffer is asked only when it is absent.
    fmt = DICOM if has_preamble else sniff(p)
    if fmt != DICOM:
        raise UnsupportedFormatError(
            f"{p.name} is a {fmt.upper()} file, not DICOM (despite its name); read it with domains.load or read_image"
        )
    try:
        ds = pydicom.dcmread(
            os.fspath(p),
            force=not has_preamble,
            stop_before_pixels=stop_before_pixels,
            defer_size=_DEFER_BYTES if defer_pixels else None,
        )
    except Exception as err:  # pydicom raises many kinds on damaged input
        raise UnreadableFileError(
            f"{p.name}: the DICOM header is damaged or cut short ({type(err).__name__}: {err}); "
            "copy or export the file again"
        ) from err
    if len(ds) == 0:
        raise UnreadableFileError(
            f"{p.name}: the DICOM header ends before any data element; the file was cut short, copy it again"
        )
    if not ds.file_meta.get("TransferSyntaxUID"):
        uid = pydicom.uid
        implicit, little = ds.original_encoding
        explicit = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian if implicit else explicit
    return ds


def _sop_name(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID")
    return getattr(sop, "name", str(sop)) if sop else "DICOM object of unknown SOP class"


def _expects_pixels(ds: Dataset) -> bool:
    """Whether the data set is an image (so missing pixel data means the file was cut short)."""
    name = _sop_name(ds)
    return (
        "Rows" in ds or "Image" in name or name in ("RT Dose Storage", "Segmentation Storage", "Parametric Map Storage")
    )


def check_pixels(ds: Dataset, name: str) -> None:
    """Raise NoPixelDataError (a non-image object) or UnreadableFileError (an image cut short) if ds has no pixels."""
    if any(k in ds for k in _PIXEL_KEYWORDS):
        return
    if _expects_pixels(ds):
        raise UnreadableFileError(
            f"{name}: the file ends before its pixel data ({_sop_name(ds)}); it was cut short, copy it again"
        )
    raise NoPixelDataError(
        f"{name} holds no image: it is a {_sop_name(ds)} (modality {ds.get('Modality') or 'not given'}), "
        "which has no pixel data; open it with software for that object type, or pick the image files of the study"
    )


def codec_error(ds: Dataset, name: str, detail: str = "") -> MissingCodecError:
    """The MissingCodecError for ``ds``'s transfer syntax: its name and UID and the pip command to fix it.

    ``detail``: the decoders' own words when some are installed but refuse this variant of the syntax.
    ``install`` is empty when no permissively licensed package decodes it (12-bit JPEG Extended).
    """
    ts = ds.file_meta.TransferSyntaxUID
    install, note = _CODEC_INSTALL.get(str(ts), ("", ""))
    msg = f"{name}: the pixel data is compressed as {ts.name} ({ts})"
    if detail and str(ts) in _NO_PERMISSIVE_DECODER:
        msg += f" and the installed decoders cannot decode this variant of it ({detail}). "
        msg += _NO_PERMISSIVE_DECODER[str(ts)] + "."
        return MissingCodecError(msg, codec=f"{ts.name} ({ts})", install="")
    if detail:
        msg += f" and the installed decoders cannot decode this variant of it ({detail})"
    else:
        msg += " and no installed decoder handles it"
    msg += f". Install one with: {install}" if install else ". dinoapp knows no Python decoder for it"
    if note:
        msg += f" ({note})"
    msg += f"; or every DICOM decoder dinoapp supports: {_EXTRA}. Then read the file again."
    return MissingCodecError(msg, codec=f"{ts.name} ({ts})", install=install or _EXTRA)


def decode(ds: Dataset, name: str, index: int | None = None) -> tuple[np.ndarray, str]:
    """Decode the stored values: ``(array [F, H, W] or [F, H, W, S], photometric interpretation of the array)``.

    ``index`` picks one frame (F = 1). pydicom converts YBR_FULL / YBR_FULL_422 (and the JPEG 2000
    YBR_ICT / YBR_RCT) to RGB while decoding; the returned interpretation says what the array holds,
    so no colour conversion is done twice. Decoder failures become typed errors.
    """
    require("pydicom")
    from pydicom.pixels import as_pixel_options, get_decoder

    check_pixels(ds, name)
    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as err:
        raise UnsupportedFormatError(
            f"{name}: transfer syntax {ts.name} ({ts}) is not an image encoding pydicom can decode "
            "(video and JPIP syntaxes are not supported); export the images as single frames"
        ) from err
    if not decoder.is_available:
        raise codec_error(ds, name)
    try:
        arr, props = decoder.as_array(ds, index=index, validate=True, raw=False, **as_pixel_options(ds))
    except RuntimeError as err:
        msg = str(err)
        if "missing dependencies" in msg or "does not support" in msg:
            raise codec_error(ds, name, msg.replace("\n", " ").strip()) from err
        raise UnreadableFileError(
            f"{name}: the compressed pixel data could not be decoded ({msg}); "
            "the file is probably damaged, copy or export it again"
        ) from err
    except NotImplementedError as err:
        raise UnsupportedFormatError(f"{name}: this pixel data variant is not supported by pydicom ({err})") from err
    except MemoryError:
        raise
    except AttributeError as err:  # pydicom: "Missing required element: (0028,0100) 'Bits Allocated'"
        raise UnreadableFileError(
            f"{name}: the pixel data cannot be interpreted: {err} (Image Pixel module, PS3.3 C.7.6.3); the file was "
            "written without it, export it again from the source system"
        ) from err
    except Exception as err:  # short pixel data, inconsistent group 0028 values, ...
        raise UnreadableFileError(
            f"{name}: the pixel data cannot be read ({type(err).__name__}: {err}); the file is probably cut short "
            "or damaged, copy or export it again"
        ) from err
    rows, cols, spp = int(props["rows"]), int(props["columns"]), int(props["samples_per_pixel"])
    shape = (-1, rows, cols) if spp == 1 else (-1, rows, cols, spp)
    return arr.reshape(shape), str(props["photometric_interpretation"])


def n_frames(ds: Dataset) -> int:
    """Number of frames (PS3.3 C.7.6.6); 1 when absent or invalid."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


# Attributes lifted from the functional groups of enhanced multi-frame images (PS3.3 C.7.6.16).
_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PlanePositionSequence": ("ImagePositionPatient",),
}
# fmt: off
_VIEW_KEYWORDS = (
    "Modality", "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient", "ImagePositionPatient",
    "InstanceNumber", "DoseGridScaling", "DoseUnits", "Units",
)
# fmt: on


def frame_view(ds: Dataset, frame: int) -> Dataset:
    """The attributes that apply to ``frame``: ``ds`` itself for classic images, else a small data set.

    For enhanced multi-frame images: top-level values, overridden by the Shared, then the Per-frame
    Functional Groups (PS3.3 C.7.6.16), so rescale, window and geometry of each frame are its own.
    For multi-frame RT Dose (and other classic multi-frame images with a Grid Frame Offset Vector,
    PS3.3 C.8.8.3.2), frame f lies ``offset[f] - offset[0]`` mm along the slice normal from the
    Image Position (Patient) of the first frame.
    """
    enhanced = bool(ds.get("SharedFunctionalGroupsSequence") or ds.get("PerFrameFunctionalGroupsSequence"))
    position = None if enhanced else _grid_frame_position(ds, frame)
    if not enhanced and position is None:
        return ds  # a classic image: its own attributes apply to every frame
    view = _top_level_view(ds)
    if position is not None:
        view.ImagePositionPatient = position
        return view
    sources = []
    if ds.get("SharedFunctionalGroupsSequence"):
        sources.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        sources.append(per_frame[frame])
    for item in sources:
        for seq, keywords in _GROUPS.items():
            if item.get(seq):
                sub = item[seq].value[0]
                for kw in keywords:
                    if kw in sub:
                        setattr(view, kw, sub[kw].value)
    return view


def _top_level_view(ds: Dataset) -> Dataset:
    """A small data set with the top-level values of :data:`_VIEW_KEYWORDS` (and ``ds``'s encoding)."""
    from pydicom.dataset import Dataset

    view = Dataset()
    view.file_meta = ds.file_meta  # LUT Data of VR OW needs the byte order
    view.set_original_encoding(*ds.original_encoding)
    for kw in _VIEW_KEYWORDS:
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    return view


def _grid_frame_position(ds: Dataset, frame: int) -> list[float] | None:
    """Image Position (Patient) of ``frame`` from the Grid Frame Offset Vector, or None when it does not apply."""
    total = n_frames(ds)
    if total < 2 or not ds.get("GridFrameOffsetVector"):
        return None
    try:
        offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector], np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if offsets.shape != (total,) or ipp.shape != (3,) or iop.shape != (6,) or not np.isfinite(offsets).all():
        return None
    normal = np.cross(iop[:3], iop[3:])
    if not 0.5 < np.linalg.norm(normal) < 1.5:  # not two unit, orthogonal direction cosines
        return None
    # first offset 0: relative offsets; otherwise z coordinates (axial only), i.e. offset[0] is the first frame's
    return (ipp + (offsets[frame] - offsets[0]) * normal / np.linalg.norm(normal)).tolist()


# ----------------------------------------------------------------------------------------------------
# Stored values -> channels
# ----------------------------------------------------------------------------------------------------


def modality_values(stored: np.ndarray, view: Dataset, modality_lut: bool) -> tuple[np.ndarray, str]:
    """``(values [H, W], units)`` after the modality LUT (PS3.3 C.11.1) when ``modality_lut``.

    ``values`` is float32 ``stored * RescaleSlope + RescaleIntercept`` after a rescale, what pydicom's
    ``apply_modality_lut`` returns after a Modality LUT Sequence (the LUT's unsigned type), or ``stored``
    itself when no LUT applies.

    Units: RescaleType when given (and not ``"US"``, unspecified), ``"HU"`` for CT (C.8.2.1.1.x), the
    dose units of RT Dose (Dose Grid Scaling, C.8.8.3), PET ``Units``, else ``"modality"``;
    ``"stored"`` without the LUT.
    """
    from pydicom.pixels import apply_modality_lut

    if not modality_lut:
        return stored, "stored"
    modality = str(view.get("Modality") or "")
    has_lut = bool(view.get("ModalityLUTSequence")) or ("RescaleSlope" in view and "RescaleIntercept" in view)
    if has_lut and not view.get("ModalityLUTSequence"):
        # plain linear rescale (PS3.3 C.11.1.1.2): computed in float32 directly, 3x faster than pydicom's
        # float64 path and exact for integer stored values with integer slope/intercept
        values = np.multiply(stored, np.float32(float(view.RescaleSlope)), dtype=np.float32)
        values += np.float32(float(view.RescaleIntercept))
    elif has_lut:
        values = apply_modality_lut(stored, view)
    elif modality == "RTDOSE" and view.get("DoseGridScaling"):
        return stored.astype(np.float64) * float(view.DoseGridScaling), str(view.get("DoseUnits") or "modality")
    else:
        values = stored
    rescale_type = str(view.get("RescaleType") or "")
    if rescale_type and rescale_type != "US":
        units = rescale_type
    elif modality == "CT" and has_lut:
        units = "HU"
    elif modality == "PT" and view.get("Units"):
        units = str(view.Units)
    else:
        units = "modality"
    return values, units


def _file_window(view: Dataset) -> tuple[float, float, str] | None:
    """The first Window Center/Width (and VOI LUT Function) of ``view``, or None when absent/invalid."""
    if view.get("WindowCenter") is None or view.get("WindowWidth") is None:
        return None

    from pydicom.multival import MultiValue

    def first(v: Any) -> float:
        return float(v[0]) if isinstance(v, (MultiValue, list, tuple)) else float(v)

    try:
        c, w = first(view.WindowCenter), first(view.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(c) and np.isfinite(w)):
        return None  # e.g. "nan" written by a broken exporter: fall back to the percentile window
    fn = str(view.get("VOILUTFunction") or "LINEAR").upper()
    if fn not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or w <= 0 or (fn == "LINEAR" and w < 1):
        return None
    return c, w, fn


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    """A robust display range: the 0.5 and 99.5 percentiles of the finite values, as (center, width)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2, hi - lo


def render_grey(
    values: np.ndarray,
    views: Sequence[Dataset],
    spec: None | str | list[tuple[str, float, float]],
    voi_ds: Dataset | None,
    monochrome1: bool,
    invert: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality values [F, H, W] -> [F, C, H, W] float32 after the VOI step; also a meta fragment.

    ``views[f]`` gives frame f's window attributes; ``voi_ds`` the data set whose VOI LUT Sequence (if any)
    ``"auto"`` uses, applied to the (modality-LUT) values through pydicom's ``apply_voi``. The percentile
    fallback of ``"auto"`` is computed over all F frames together (one mapping for a volume).
    Non-finite values (NaN / inf in float pixel data) come out as 0, and the fragment then has
    ``valid`` (bool [F, H, W], False there).
    """
    finite = np.isfinite(values)  # [F, H, W]; float pixel data may hold NaN / inf
    out, frag = _render_grey(values, views, spec, voi_ds, monochrome1, invert)
    if not finite.all():
        np.copyto(out, np.float32(0.0), where=~finite[:, None])  # invalid pixels are 0, as in a GeoTIFF read
        frag["valid"] = finite
    return out, frag


def _render_grey(values, views, spec, voi_ds, monochrome1, invert) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.pixels import apply_voi

    F = values.shape[0]
    if spec is None:
        return values.astype(np.float32, copy=False)[:, None], {
            "value_range": None,
            "channels": ["grey"],
            "window": None,
            "inverted": False,
        }
    windows: list[dict[str, Any]]
    if spec == "auto":
        out = np.empty((F, 1, *values.shape[1:]), dtype=np.float32)  # [F, 1, H, W]
        lut = voi_ds is not None and voi_ds.get("VOILUTSequence") and voi_ds.VOILUTSequence[0].get("LUTData")
        if lut:
            bits = int(voi_ds.VOILUTSequence[0].LUTDescriptor[2])
            for f in range(F):
                mapped = apply_voi(np.rint(np.nan_to_num(values[f])).astype(np.int64), voi_ds, 0)
                out[f, 0] = mapped.astype(np.float32) / float(2**bits - 1)
            windows = [{"name": "grey", "source": "VOI LUT Sequence"}]
        else:
            per_frame = [_file_window(v) for v in views]
            if all(w is not None for w in per_frame):
                for f, (c, w, fn) in enumerate(per_frame):
                    out[f, 0] = window(values[f], c, w, fn)
                c, w, fn = per_frame[0]
                windows = [{"name": "grey", "source": "file", "center": c, "width": w, "function": fn}]
                if len(set(per_frame)) > 1:
                    windows[0]["varies_per_frame"] = True
            else:
                c, w = _percentile_window(values)
                out[:, 0] = window(values, c, w, "LINEAR_EXACT")
                windows = [
                    {
                        "name": "grey",
                        "source": "percentile 0.5-99.5",
                        "center": c,
                        "width": w,
                        "function": "LINEAR_EXACT",
                    }
                ]
        channels = ["grey"]
    else:
        out = np.stack([window(values, c, w, "LINEAR") for _, c, w in spec], axis=1)  # [F, C, H, W]
        windows = [
            {
                "name": n,
                "source": "preset" if n in WINDOW_PRESETS else "given",
                "center": c,
                "width": w,
                "function": "LINEAR",
            }
            for n, c, w in spec
        ]
        channels = [n for n, _, _ in spec] if len(spec) > 1 else ["grey"]
    inverted = bool(monochrome1 and invert)
    if inverted:
        np.subtract(1.0, out, out=out)
    return out, {"value_range": (0.0, 1.0), "channels": channels, "window": windows, "inverted": inverted}


def render_colour(stored: np.ndarray, photometric: str, ds: Dataset, name: str) -> np.ndarray:
    """Decoded colour frames [F, H, W, S] (or palette indices [F, H, W]) -> RGB [F, 3, H, W] in [0, 1].

    PALETTE COLOR goes through pydicom's ``apply_color_lut`` (PS3.3 C.7.6.3.1.5) and is divided by the
    palette entry maximum; RGB by 2**BitsStored - 1. YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT arrive
    here as RGB already: pydicom's decoders convert them (``raw=False``), so converting again would be wrong.
    """
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)[..., :3]  # [F, H, W, 3]; drops an alpha palette
        scale = float(np.iinfo(rgb.dtype).max)
    elif photometric == "RGB":
        rgb = stored  # [F, H, W, 3]
        scale = float(2 ** int(ds.get("BitsStored") or 8) - 1)
    else:
        raise UnsupportedFormatError(
            f"{name}: photometric interpretation {photometric} is not supported (MONOCHROME1/2, RGB, YBR_FULL, "
            "YBR_FULL_422, YBR_ICT, YBR_RCT and PALETTE COLOR are); convert the file to RGB"
        )
    return (np.moveaxis(rgb, -1, 1).astype(np.float32) / np.float32(scale)).clip(0.0, 1.0)  # [F, 3, H, W]


def warn_if_not_hu(spec: Any, units: str, name: str, view: Dataset, stacklevel: int) -> None:
    """DomainWarning when HU presets are applied to values that are not Hounsfield units (MR, PET, ...)."""
    if isinstance(spec, list) and units != "HU" and any(n in WINDOW_PRESETS for n, _, _ in spec):
        warnings.warn(
            f"{name}: window presets are in Hounsfield units but these values are in {units!r} "
            f"(modality {view.get('Modality') or 'unknown'}); the result may be blank or saturated",
            DomainWarning,
            stacklevel=stacklevel + 1,
        )


def to_channels(
    stored: np.ndarray,
    photometric: str,
    ds: Dataset,
    views: Sequence[Dataset],
    spec: None | str | list[tuple[str, float, float]],
    name: str,
    modality_lut: bool,
    invert_monochrome1: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decoded frames -> ``(float32 [F, C, H, W], meta fragment)``: the grey or colour pipeline."""
    if photometric in ("MONOCHROME1", "MONOCHROME2") and stored.ndim == 3:
        units = "stored"
        values = np.empty(stored.shape, dtype=np.float64)  # [F, H, W]
        for f in range(stored.shape[0]):
            values[f], units = modality_values(stored[f], views[f], modality_lut)
        warn_if_not_hu(spec, units, name, views[0], stacklevel=4)
        arr, frag = render_grey(values, views, spec, ds, photometric == "MONOCHROME1", invert_monochrome1)
        frag["units"] = units if spec is None else "display"
        return arr, frag
    if isinstance(spec, list):
        raise WindowError(
            f"{name} is a colour image ({photometric}); VOI windows apply to grayscale images only "
            "(PS3.3 C.11.2): use window='auto' or None"
        )
    arr = render_colour(stored, photometric, ds, name)
    return arr, {
        "value_range": (0.0, 1.0),
        "channels": ["R", "G", "B"],
        "window": None,
        "inverted": False,
        "units": "display",
    }


def _spacing(view: Dataset) -> tuple[float, float] | None:
    ps = view.get("PixelSpacing")
    try:
        return (float(ps[0]), float(ps[1])) if ps else None
    except (TypeError, ValueError, IndexError):
        return None


def _read(
    path: str | os.PathLike, frame: int | None, window: WindowSpec, modality_lut: bool, invert_monochrome1: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    spec = parse_window(window)  # option errors before any IO
    ds = open_dicom(path)
    name = Path(path).name
    total = n_frames(ds)
    if frame is not None:
        if not -total <= frame < total:
            raise FrameIndexError(
                f"{name} has {total} frame{'s' if total != 1 else ''} (0..{total - 1}); frame {frame} does not exist"
            )
        frame %= total
    stored, photometric = decode(ds, name, frame)  # [F, H, W(, S)]
    first = 0 if frame is None else frame
    views = [frame_view(ds, first + f) for f in range(stored.shape[0])]
    arr, frag = to_channels(stored, photometric, ds, views, spec, name, modality_lut, invert_monochrome1)
    dicom = safe_meta(ds)
    dicom.update({k: v for k, v in safe_meta(views[0]).items() if k not in ("TransferSyntax", "SOPClass")})
    meta: dict[str, Any] = {
        "format": "dicom",
        "path": os.fspath(path),
        "units": frag.pop("units"),
        **frag,
        "n_frames": total,
        "spacing": _spacing(views[0]),
        "photometric": str(ds.get("PhotometricInterpretation") or photometric),
        "dicom": dicom,
    }
    return arr, meta


def read_dicom(
    path: str | os.PathLike,
    *,
    frame: int = 0,
    window: WindowSpec = "auto",
    modality_lut: bool = True,
    invert_monochrome1: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one frame of a DICOM file as ``(float32 [C, H, W], meta)`` (see the module docstring for the steps).

    ``frame``: the frame of a multi-frame file (negative counts from the end; :class:`FrameIndexError`
    with the frame count when out of range); use :func:`read_dicom_frames` for all of them.

    ``meta``: ``format`` ("dicom"), ``path``, ``shape``, ``value_range`` ((0, 1), or None for physical
    values), ``units`` ("display" after a window; "HU", the RescaleType, dose/PET units, "modality" or
    "stored" with ``window=None``), ``channels`` (["grey"], window names, or ["R", "G", "B"]), ``window``
    (per channel: name, source, center, width, function; None without VOI), ``inverted`` (MONOCHROME1
    flipped), ``frame``, ``n_frames``, ``spacing`` ((row, column) pixel spacing in mm, or None), ``valid``
    (bool [H, W]; only when float pixel data holds NaN / inf, which come out as 0),
    ``photometric`` (the file's Photometric Interpretation) and ``dicom`` (whitelisted technical
    attributes, :func:`domains.phi.safe_meta`, with the frame's functional-group values).

    Errors: MissingFileError, UnsupportedFormatError (not DICOM), UnreadableFileError (empty, damaged,
    truncated), NoPixelDataError (SR, RT plan, ...), MissingCodecError, FrameIndexError, WindowError.
    """
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise OptionError(
            f"frame={frame!r}: give the frame number as an int (0 = first, -1 = last); "
            "read_dicom_frames reads all frames"
        )
    arr, meta = _read(path, int(frame), window, modality_lut, invert_monochrome1)
    arr = arr[0]  # [C, H, W]
    meta.update(shape=tuple(arr.shape), frame=int(frame) % meta["n_frames"])
    if "valid" in meta:
        meta["valid"] = meta["valid"][0]  # [H, W]
    return arr, meta


def read_dicom_frames(
    path: str | os.PathLike,
    *,
    window: WindowSpec = "auto",
    modality_lut: bool = True,
    invert_monochrome1: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read every frame of a DICOM file as ``(float32 [F, C, H, W], meta)``; F = 1 for single-frame files.

    Options and meta as :func:`read_dicom` (without ``frame``). Each frame gets its own modality LUT and
    file window (enhanced multi-frame functional groups); the percentile fallback of ``window="auto"``
    is computed over all frames, so frames share one display mapping. ``meta["window"]`` describes
    frame 0 (with ``varies_per_frame`` when the file's windows differ).
    """
    arr, meta = _read(path, None, window, modality_lut, invert_monochrome1)
    meta["shape"] = tuple(arr.shape)
    return arr, meta
