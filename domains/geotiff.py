"""GeoTIFF (and any GDAL raster) -> float32 [C, H, W] with a valid-pixel mask and georeferencing.

Conventions (GDAL's): bands are numbered from 1; a pixel is nodata when *every* selected band
equals the nodata value (GDAL's dataset mask), or when the GDAL mask / alpha band says so; NaN in
any band also makes a pixel invalid. Invalid pixels are set to ``fill`` (0) after scaling and are
False in ``meta["valid"]``.

Bands with the alpha colour interpretation are a mask, not data: ``bands=None`` leaves them out
(they still make pixels invalid). Complex bands (SAR single-look complex) are read as their
amplitude ``|z|`` (``meta["complex"] == "amplitude"``).

Value scaling (``stretch``), applied per band after the file's scale/offset tags:

==============  =====================================================================  ===========
stretch         what                                                                   value range
==============  =====================================================================  ===========
``"auto"``      ``stats`` when given; uint8 -> ``"dtype"``; other types -> ``"percentile"``  [0, 1]
``"dtype"``     the integer type's range to [0, 1]: divide by its maximum (255, 65535,    [0, 1]
                ...); signed types map [min, max] (int16: -32768..32767) to [0, 1]
``"percentile"`` per-band ``percentiles`` (default 2-98) of this read's valid pixels        [0, 1]
``"reflectance"`` physical units; integer DN without scale tags divided by ``dn_scale``     ~[0, 1]
                (10000: the Sentinel-2 / Landsat C2 convention DN = reflectance x 1e4)   (not clipped)
``"none"``      values as stored (after scale/offset tags)                             physical
:class:`BandStats` the saved per-band stretch (see :mod:`domains.stats`), so training and    [0, 1]
                inference on different scenes use the same mapping
==============  =====================================================================  ===========
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._deps import require
from .errors import (
    BandSelectionError,
    NoValidPixelsError,
    OptionValueError,
    UnreadableFileError,
    UnsupportedFormatError,
    WindowError,
)
from .sniff import check_file, has_tiff_magic

if TYPE_CHECKING:
    from .stats import BandStats

STRETCHES = ("auto", "dtype", "percentile", "reflectance", "none")

# Names that identify visible bands in band descriptions (lower case). Sentinel-2 codes are zero-padded
# ("B04"); bare "B4" is ambiguous between sensors (Landsat 7 B3 is red, Landsat 8 B3 green), so not used.
_COLOUR_NAMES = {
    "red": ("red", "b04", "r"),
    "green": ("green", "b03", "g"),
    "blue": ("blue", "b02", "b"),
}


def open_raster(path: str | os.PathLike):
    """Open a raster with rasterio, translating GDAL failures into typed errors."""
    rasterio = require("rasterio")
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    p = check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(p)
    except RasterioIOError as err:
        msg = str(err)
        if ("not recognized as" in msg or "not a supported file format" in msg) and not has_tiff_magic(p):
            raise UnsupportedFormatError(f"{p.name}: not a raster GDAL can read ({msg})") from err
        raise UnreadableFileError(f"{p.name}: the raster is damaged or cut short ({msg})") from err


def band_names(src) -> list[str]:
    """One name per band: the description, else the colour interpretation, else ``band<i>``."""
    names = []
    for i in range(src.count):
        desc = (src.descriptions[i] or "").strip()
        ci = src.colorinterp[i].name if src.colorinterp else "undefined"
        names.append(desc or (ci if ci not in ("undefined", "gray", "grey") or src.count == 1 else f"band{i + 1}"))
    if len(set(names)) != len(names):  # e.g. two "gray" bands
        names = [f"{n}" if names.count(n) == 1 else f"band{i + 1}" for i, n in enumerate(names)]
    return names


def _is_alpha(src, i: int) -> bool:
    """Whether band ``i`` (0-based) is an alpha (mask) band by its colour interpretation."""
    return bool(src.colorinterp) and src.colorinterp[i].name == "alpha"


def resolve_bands(src, bands: None | str | int | Sequence[int | str]) -> list[int]:
    """Band selection -> 1-based indexes.

    ``None``: all bands except alpha (mask) bands. ``"rgb"``: red, green, blue found by colour
    interpretation or description ("red"/"B04", ...; a "red edge" band is not red). Ints are 1-based
    band numbers (as in GDAL and QGIS). Strings match band names or descriptions (case-insensitive).
    Raises :class:`BandSelectionError` listing what the file has.
    """
    if bands is None:
        data = [i + 1 for i in range(src.count) if not _is_alpha(src, i)]
        return data or list(range(1, src.count + 1))
    names = band_names(src)
    listing = ", ".join(f"{i + 1}={n!r}" for i, n in enumerate(names))
    if isinstance(bands, str) and bands.lower() == "rgb":
        return [_find_colour(src, names, c, listing) for c in ("red", "green", "blue")]
    if isinstance(bands, str | int | np.integer):
        bands = [bands]
    bands = list(bands)
    if not bands:
        raise BandSelectionError(f"bands=[] selects no band; pass None for all bands, or some of: {listing}")
    out = []
    for b in bands:
        if isinstance(b, bool):
            raise BandSelectionError(f"band {b!r} is not a band number or name; the raster has {listing}")
        if isinstance(b, int | np.integer):
            if not 1 <= int(b) <= src.count:
                raise BandSelectionError(
                    f"band {int(b)} does not exist: bands are numbered 1..{src.count} (GDAL convention); "
                    f"the raster has {listing}"
                )
            out.append(int(b))
        elif isinstance(b, str):
            key = b.strip().lower()
            hits = [i + 1 for i, n in enumerate(names) if n.lower() == key]
            if not hits:  # a description shared by several bands is renamed band<i> in ``names``
                hits = [i + 1 for i, d in enumerate(src.descriptions) if (d or "").strip().lower() == key]
            if len(hits) != 1:
                why = "no band is" if not hits else f"several bands ({', '.join(map(str, hits))}) are"
                raise BandSelectionError(f"{why} named {b!r}; pick bands by number; the raster has {listing}")
            out.append(hits[0])
        else:
            raise BandSelectionError(f"band {b!r} is not a band number or name; the raster has {listing}")
    return out


def _find_colour(src, names: list[str], colour: str, listing: str) -> int:
    for i, ci in enumerate(src.colorinterp or ()):
        if ci.name == colour:
            return i + 1
    words = [re.sub(r"[^a-z0-9]+", " ", n.lower()).split() for n in names]
    exact = [i for i, w in enumerate(words) if " ".join(w) in _COLOUR_NAMES[colour]]  # "red", "B04"
    # else a word of the description ("B4 red", "Red (B4)"); "red edge" bands (Sentinel-2 B05-B07) are not red
    loose = [i for i, w in enumerate(words) if "edge" not in w and any(x in _COLOUR_NAMES[colour] for x in w)]
    if exact or loose:
        return (exact or loose)[0] + 1
    if src.count < 3:
        raise BandSelectionError(
            f"bands='rgb' needs three bands, but the raster has only {src.count} ({listing}); "
            "read it with bands=None (a grey image) or pick bands by number"
        )
    raise BandSelectionError(
        f"no {colour} band found (by colour interpretation or a description such as '{colour}' or "
        f"'{_COLOUR_NAMES[colour][1].upper()}'); pick the bands by number, e.g. bands=(4, 3, 2); "
        f"the raster has {listing}"
    )


def to_window(window) -> Any:
    """An integer rasterio ``Window`` from a Window or a ``(col_off, row_off, width, height)`` tuple.

    Fractional offsets are floored and sizes rounded, so the pixels read and the transform of the
    read describe the same grid. Raises :class:`WindowError` for anything else.
    """
    from rasterio.windows import Window

    if window is None:
        return None
    if isinstance(window, str):
        raise WindowError(
            f"window={window!r}: for a raster, window is a region (col_off, row_off, width, height); DICOM display "
            "windows such as 'lung' apply to DICOM files (in a mixed folder pass dicom={'window': ...})"
        )
    try:
        if isinstance(window, Window):
            c, r, w, h = (float(v) for v in (window.col_off, window.row_off, window.width, window.height))
        else:
            c, r, w, h = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise WindowError(
            f"window={window!r}: must be a rasterio Window or (col_off, row_off, width, height) in pixels"
        ) from err
    if not all(math.isfinite(v) for v in (c, r, w, h)):
        raise WindowError(f"window={window!r}: offsets and sizes must be finite numbers")
    w, h = round(w), round(h)
    if w <= 0 or h <= 0:
        raise WindowError(f"window width and height must be positive, got {w} x {h}")
    return Window(math.floor(c), math.floor(r), w, h)


def _check_out_shape(out_shape) -> tuple[int, int] | None:
    """``out_shape`` as two positive ints, or :class:`WindowError`."""
    if out_shape is None:
        return None
    try:
        h, w = (int(v) for v in out_shape)
    except (TypeError, ValueError) as err:
        raise WindowError(f"out_shape={out_shape!r}: must be (height, width) in pixels") from err
    if h < 1 or w < 1:
        raise WindowError(f"out_shape={out_shape!r}: height and width must be at least 1")
    return h, w


def read_geotiff(
    path: str | os.PathLike,
    *,
    bands: None | str | int | Sequence[int | str] = None,
    window=None,
    out_shape: tuple[int, int] | None = None,
    stretch: str | BandStats = "auto",
    stats: BandStats | str | os.PathLike | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
    dn_scale: float = 10000.0,
    apply_scale_offset: bool = True,
    fill: float = 0.0,
    src=None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read bands of a raster as ``(float32 [C, H, W], meta)``.

    ``window``: a region (rasterio Window or ``(col_off, row_off, width, height)``); parts outside
    the raster are filled and marked invalid, so tiles at the edge keep their size. ``out_shape``:
    ``(H, W)`` to read decimated (nearest, through overviews when the file has them). ``stats``: a
    :class:`~domains.stats.BandStats` (or its JSON path) saved from :func:`~domains.stats.compute_band_stats`;
    it must describe the same bands. ``src``: an already open rasterio dataset (the tiler reuses one).

    ``meta``: ``format`` ("geotiff"), ``path``, ``shape``, ``value_range``, ``channels`` (band names),
    ``bands`` (1-based indexes), ``dtype`` (stored), ``nodata``, ``valid`` (bool [H, W]), ``crs``
    (rasterio CRS or None), ``transform`` (Affine of this read's grid), ``window``
    (col_off, row_off, width, height), ``raster_shape`` (full H, W), ``stretch`` (what was applied,
    with the per-band low/high values), ``scale_offset`` (per band, applied or not); for rasters
    georeferenced by ground control points only (e.g. Sentinel-1 GRD), ``gcps`` (moved to this read's
    grid) and ``gcp_crs``, which :func:`~domains.geowrite.write_geotiff` carries over with ``like=``.
    """
    from .stats import BandStats

    own = src is None
    if own:
        src = open_raster(path)
    try:
        name = Path(src.name).name
        idx = resolve_bands(src, bands)
        if stats is not None and not isinstance(stats, BandStats):
            stats = BandStats.load(stats)
        if isinstance(stretch, BandStats):
            stats, stretch = stretch, "auto"
        if not isinstance(stretch, str) or stretch not in STRETCHES:
            raise OptionValueError(f"stretch must be one of {STRETCHES} or a BandStats, got {stretch!r}")
        if stats is not None and stretch not in ("auto",):
            raise OptionValueError(f"stats= and stretch={stretch!r} both given; pass one")
        win = to_window(window)
        out_shape = _check_out_shape(out_shape)
        raw, valid, win = _read_masked(src, idx, win, out_shape, name)
        dtype = np.dtype(src.dtypes[idx[0] - 1])
        if raw.dtype.kind == "c":  # SAR single-look complex: the amplitude |z| (GDAL's "Magnitude")
            valid &= np.isfinite(raw).all(axis=0)
            raw = np.abs(raw)
        scales = [float(src.scales[i - 1]) for i in idx]
        offsets = [float(src.offsets[i - 1]) for i in idx]
        has_tags = apply_scale_offset and any(s != 1.0 or o != 0.0 for s, o in zip(scales, offsets))
        names = band_names(src)
        chan = [names[i - 1] for i in idx]
        if stats is not None:
            stats.check_bands(chan, idx, name)
            method = "stats"
        else:
            method = stretch if stretch != "auto" else ("dtype" if dtype == np.uint8 and not has_tags else "percentile")
        tag_a = np.asarray(scales if has_tags else [1.0] * len(idx), np.float64)
        tag_b = np.asarray(offsets if has_tags else [0.0] * len(idx), np.float64)
        A, B, clip, info, vr = _linear_map(raw, valid, method, dtype, tag_a, tag_b, has_tags, stats, percentiles,
                                           dn_scale, name)
        arr = _apply_map(raw, A, B, clip)  # [C, H, W]
        if not valid.all():
            arr[:, ~valid] = fill
        from affine import Affine

        transform = src.transform @ Affine.translation(win.col_off, win.row_off) if win is not None else src.transform
        if out_shape is not None:
            h0 = win.height if win is not None else src.height
            w0 = win.width if win is not None else src.width
            transform = transform @ Affine.scale(w0 / arr.shape[2], h0 / arr.shape[1])
        meta: dict[str, Any] = {
            "format": "geotiff",
            "path": str(src.name),
            "shape": tuple(arr.shape),
            "value_range": vr,
            "channels": chan,
            "bands": idx,
            "dtype": str(dtype),
            "nodata": src.nodata,
            "valid": valid,
            "crs": src.crs,
            "transform": transform,
            "window": None if win is None else (int(win.col_off), int(win.row_off), int(win.width), int(win.height)),
            "raster_shape": (src.height, src.width),
            "stretch": info,
            "scale_offset": {"scales": scales, "offsets": offsets, "applied": bool(has_tags)},
        }
        if dtype.kind == "c":
            meta["complex"] = "amplitude"
        gcps, gcp_crs = src.gcps
        if gcps and src.transform.is_identity:  # georeferenced by ground control points only (SAR)
            r0, c0 = (win.row_off, win.col_off) if win is not None else (0, 0)
            sy = arr.shape[1] / (win.height if win is not None else src.height)  # output px per source px
            sx = arr.shape[2] / (win.width if win is not None else src.width)
            meta["gcps"] = [_moved_gcp(g, (g.row - r0) * sy, (g.col - c0) * sx) for g in gcps]  # in this read's grid
            meta["gcp_crs"] = gcp_crs
        return arr, meta
    finally:
        if own:
            src.close()


def _moved_gcp(g, row: float, col: float):
    """A copy of the ground control point ``g`` at another pixel position (same ground coordinates)."""
    from rasterio.control import GroundControlPoint

    return GroundControlPoint(row=row, col=col, x=g.x, y=g.y, z=g.z, id=g.id, info=g.info)


def _read_masked(src, idx: list[int], win, out_shape, name: str):
    """Read the bands and the valid mask; windows beyond the edges are padded (invalid)."""
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    H, W = src.height, src.width
    if win is None:
        inner, pad = None, None
        shape = (H, W)
    else:
        r0, c0 = int(win.row_off), int(win.col_off)
        r1, c1 = r0 + int(win.height), c0 + int(win.width)
        ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, H), min(c1, W)
        shape = (int(win.height), int(win.width))
        if ir0 >= ir1 or ic0 >= ic1:
            inner = None
            pad = "all"
        else:
            inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
            pad = (ir0 - r0, ic0 - c0) if inner.height != shape[0] or inner.width != shape[1] else None
    if out_shape is not None:
        if pad is not None:
            raise WindowError(
                "out_shape (decimated read) cannot be combined with a window beyond the raster; "
                "read the window without out_shape, or keep the window inside the raster"
            )
        shape = (int(out_shape[0]), int(out_shape[1]))
    dtype = src.dtypes[idx[0] - 1]
    data = np.zeros((len(idx), *shape), dtype=dtype)
    valid = np.zeros(shape, dtype=bool)
    if pad == "all":
        return data, valid, win
    read_win = inner if win is not None else None
    try:
        if pad is None:
            kw = {"out_shape": (len(idx), *shape)} if out_shape is not None else {}
            data = src.read(idx, window=read_win, **kw)
            valid = _valid_mask(src, idx, data, read_win, shape if out_shape is not None else None)
        else:
            sub = src.read(idx, window=inner)
            dy, dx = pad
            data[:, dy : dy + sub.shape[1], dx : dx + sub.shape[2]] = sub
            valid[dy : dy + sub.shape[1], dx : dx + sub.shape[2]] = _valid_mask(src, idx, sub, inner, None)
    except RasterioIOError as err:
        raise UnreadableFileError(
            f"{name}: reading the pixels failed, the file is damaged or cut short ({err})"
        ) from err
    return data, valid, win


def _valid_mask(src, idx, data: np.ndarray, win, out_shape) -> np.ndarray:
    """bool [H, W]: GDAL's dataset mask restricted to the selected bands, and no NaN."""
    from rasterio.enums import MaskFlags

    flags = [src.mask_flag_enums[i - 1] for i in idx]
    valid = np.ones(data.shape[1:], dtype=bool)
    if all(MaskFlags.nodata in f for f in flags) and src.nodata is not None:
        nd = src.nodata
        valid = ~np.isnan(data).all(axis=0) if np.isnan(nd) else (data != np.asarray(nd).astype(data.dtype)).any(axis=0)
    elif any(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in flags):
        kw = {"out_shape": out_shape} if out_shape is not None else {}
        valid = src.read_masks(idx[0], window=win, **kw) > 0
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return valid


def _apply_map(raw: np.ndarray, A: np.ndarray, B: np.ndarray, clip: bool) -> np.ndarray:
    """float32 ``A * raw + B`` per band ([C] each), then clipped to [0, 1] when ``clip``: one fused pass, no
    intermediate copies. Shared with :mod:`domains.image` so a 16-bit PNG is stretched exactly like a GeoTIFF."""
    arr = np.empty(raw.shape, np.float32)  # [C, H, W]
    np.multiply(raw, A.astype(np.float32)[:, None, None], out=arr, casting="unsafe")
    if B.any():
        arr += B.astype(np.float32)[:, None, None]
    if clip:
        np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def stretch_integer(raw: np.ndarray, valid: np.ndarray | None, stretch: Any = "auto", *,
                    percentiles: tuple[float, float] = (2.0, 98.0), name: str = "") -> tuple[np.ndarray, dict]:
    """An integer array [C, H, W] (e.g. a 12-bit image stored as 16-bit) -> (float32 [C, H, W], info),
    scaled per band exactly as :func:`read_geotiff` scales a raster of that type without scale tags:
    ``stretch`` is a :data:`STRETCHES` name (``"auto"``: ``"dtype"`` for uint8, ``"percentile"`` otherwise),
    a :class:`~domains.stats.BandStats` or its JSON path (one low/high per band). ``valid``: bool [H, W]
    pixels the percentiles are computed on (None = all); invalid pixels are set to 0."""
    from .stats import BandStats

    dtype = np.dtype(raw.dtype)
    if dtype.kind not in "ui":
        raise OptionValueError(f"stretch_integer takes an integer array, got {dtype}")
    stats = None
    if isinstance(stretch, BandStats) or (isinstance(stretch, (str, os.PathLike))
                                          and str(stretch).lower().endswith(".json")):  # fmt: skip
        stats = stretch if isinstance(stretch, BandStats) else BandStats.load(stretch)
        if len(stats.low) != raw.shape[0]:
            raise BandSelectionError(f"{name}: the stats describe {len(stats.low)} bands {stats.bands}, "
                                     f"the image has {raw.shape[0]}")  # fmt: skip
        method = "stats"
    elif not isinstance(stretch, str) or stretch not in STRETCHES:
        raise OptionValueError(f"stretch must be one of {STRETCHES}, a BandStats or its JSON path, got {stretch!r}")
    else:
        method = stretch if stretch != "auto" else ("dtype" if dtype == np.uint8 else "percentile")
    if valid is None:
        valid = np.ones(raw.shape[1:], bool)
    C = raw.shape[0]
    A, B, clip, info, _ = _linear_map(raw, valid, method, dtype, np.ones(C), np.zeros(C), False, stats,
                                      percentiles, 10000.0, name)  # fmt: skip
    arr = _apply_map(raw, A, B, clip)
    if not valid.all():
        arr[:, ~valid] = 0.0
    return arr, info


def _linear_map(raw, valid, method, dtype, tag_a, tag_b, has_tags, stats, percentiles, dn_scale, name):
    """The per-band map ``out = A * raw + B`` (float64 [C] each) of a stretch, with clip flag, info and range.

    ``tag_a * raw + tag_b`` are the physical values (the file's scale/offset tags, or identity).
    """
    C = raw.shape[0]
    if method == "dtype" and (dtype.kind not in "ui" or has_tags):
        return tag_a, tag_b, False, {"method": "none", "why": "float or scaled data has no type maximum"}, None
    if method == "none":
        return tag_a, tag_b, False, {"method": "none"}, None
    if method == "dtype":
        low, top = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)  # low is 0 for unsigned types
        span = top - low
        info = {"method": "dtype", "low": [low] * C, "high": [top] * C}
        return np.full(C, 1.0 / span), np.full(C, -low / span), True, info, (0.0, 1.0)
    if method == "reflectance":
        if dtype.kind in "ui" and not has_tags:
            return np.full(C, 1.0 / dn_scale), np.zeros(C), False, {"method": "reflectance", "dn_scale": dn_scale}, (
                0.0, 1.0)
        return tag_a, tag_b, False, {"method": "reflectance", "dn_scale": None}, (0.0, 1.0)
    if method == "stats":
        lo, hi = np.asarray(stats.low, np.float64), np.asarray(stats.high, np.float64)
        info: dict[str, Any] = {"method": "stats", "low": list(stats.low), "high": list(stats.high)}
    elif method == "percentile":
        if not valid.any():
            raise NoValidPixelsError(
                f"{name}: every pixel of this read is nodata, so no percentile stretch can be computed; "
                "pass saved stats= (or stretch='dtype'/'none')"
            )
        p_lo, p_hi = np.percentile(raw[:, valid].astype(np.float32), percentiles, axis=1)  # [C] each, raw units
        lo, hi = tag_a * p_lo + tag_b, tag_a * p_hi + tag_b
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)  # a negative scale tag flips the order
        info = {"method": "percentile", "percentiles": list(percentiles), "low": lo.tolist(), "high": hi.tolist()}
    else:  # pragma: no cover - validated by read_geotiff
        raise OptionValueError(f"unknown stretch {method!r}")
    span = np.maximum(hi - lo, 1e-12)
    return tag_a / span, (tag_b - lo) / span, True, info, (0.0, 1.0)


def raster_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a raster holds, without reading pixels: ``shape`` (C, H, W), ``crs``, ``transform``,
    ``dtype``, ``nodata``, ``channels`` (band names), ``block_shape``, ``overviews``, ``scales``,
    ``offsets``, ``georeferenced`` (and ``gcps``, ``gcp_crs`` for GCP-only rasters). Usable as
    ``like=`` for :func:`~domains.geowrite.write_geotiff` of a whole-scene output (e.g. a mosaic)."""
    with open_raster(path) as src:
        info: dict[str, Any] = {
            "format": "geotiff",
            "path": str(src.name),
            "shape": (src.count, src.height, src.width),
            "crs": src.crs,
            "transform": src.transform,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "channels": band_names(src),
            "block_shape": tuple(src.block_shapes[0]),
            "overviews": src.overviews(1),
            "scales": list(src.scales),
            "offsets": list(src.offsets),
            "georeferenced": is_georeferenced(src),
        }
        gcps, gcp_crs = src.gcps
        if gcps and src.transform.is_identity:
            info.update(gcps=list(gcps), gcp_crs=gcp_crs)
        return info


def is_georeferenced(path_or_src) -> bool:
    """True when a raster has a CRS, a non-identity geotransform or ground control points."""
    from affine import Affine

    own = not hasattr(path_or_src, "crs")
    src = open_raster(path_or_src) if own else path_or_src
    try:
        return bool(src.crs) or src.transform != Affine.identity() or bool(src.gcps[0])
    finally:
        if own:
            src.close()
