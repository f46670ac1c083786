"""Write model outputs as GeoTIFFs that sit exactly on the source scene in QGIS / ArcGIS / GDAL.

The output grid is the source grid scaled: a class map at patch resolution (one value per 16 x 16
pixel patch) gets the source transform times ``Affine.scale(16)``, so it covers the same ground with
16x larger pixels; rotated and sheared geotransforms are scaled the same way. Files are tiled,
deflate-compressed (with a predictor), carry band descriptions, an optional colour table for class
maps and provenance tags (``DINOAPP_*``).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._deps import require
from .errors import GeoreferenceError, OptionValueError
from .sniff import user_path

KINDS = ("auto", "classes", "probabilities", "rgb", "float")


def scaled_transform(transform, scale: float | tuple[float, float]):
    """The geotransform of a grid whose pixels are ``scale`` source pixels wide (x, y), same origin."""
    from affine import Affine

    sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    return transform @ Affine.scale(float(sx), float(sy))


def grid_transform(transform, src_shape: tuple[int, int], out_shape: tuple[int, int], scale=None):
    """Transform for an ``out_shape`` output of an ``src_shape`` read.

    ``scale`` (pixels of the source per output pixel) defaults to ``src / out`` per axis, which is
    exact when the output covers the read exactly; pass ``scale=16`` for patch grids of inputs that
    were cropped or padded to a multiple of 16 (then the grid keeps square 16-pixel cells).
    """
    return scaled_transform(transform, _grid_scale(src_shape, out_shape) if scale is None else scale)


def _grid_scale(src_shape: tuple[int, int], out_shape: tuple[int, int]) -> tuple[float, float]:
    """``(sx, sy)``: source pixels per output pixel when the output covers the read exactly."""
    sy, sx = src_shape[0] / out_shape[0], src_shape[1] / out_shape[1]
    if not (np.isclose(sy, round(sy)) and np.isclose(sx, round(sx))) and not np.isclose(sy, sx, rtol=1e-2):
        raise GeoreferenceError(
            f"an output of {out_shape} does not evenly cover a read of {src_shape}; pass scale= explicitly"
        )
    return sx, sy


def write_geotiff(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    crs=None,
    transform=None,
    like: Mapping[str, Any] | None = None,
    scale=None,
    kind: str = "auto",
    nodata: float | int | None = None,
    band_names: Sequence[str] | None = None,
    colormap: Mapping[int, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    tags: Mapping[str, Any] | None = None,
    compress: str = "deflate",
    blocksize: int = 256,
    overviews: bool = False,
) -> Path:
    """Write ``array`` ([H, W] or [C, H, W]) as a tiled, compressed GeoTIFF; returns the path.

    Georeferencing: ``like`` = the ``meta`` of the read the output was computed from (its ``crs``
    and ``transform``; the output transform is scaled by ``scale`` or by the shape ratio, see
    :func:`grid_transform`; ground control points of a GCP-only source are moved the same way),
    or explicit ``crs`` + ``transform`` of the output grid.

    ``kind``: ``classes`` (integer labels stored in the smallest type that holds them and ``nodata``:
    uint8, uint16, uint32, or int16/int32 for negative labels; NaN in a float label map becomes
    ``nodata``, by default 255 or 65535; a colour table from ``colormap`` or a default palette for
    uint8/uint16; ``class_names`` stored as tags), ``probabilities`` / ``float`` (float32; NaN is
    nodata, or is replaced by a given ``nodata``), ``rgb`` (uint8 3-band, photometric RGB: PCA maps,
    overlays; floats in [0, 1] are scaled to 0..255, integers must be 0..255), ``auto`` (from the
    dtype and band count). ``tags``: provenance (backbone name, sha256, head, ...) stored as
    ``DINOAPP_<KEY>``. Labels, colours or nodata that the file type cannot hold raise ValueError
    (nothing is silently wrapped around).
    """
    rasterio = require("rasterio")
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise GeoreferenceError(f"expected an array [H, W] or [C, H, W], got shape {np.shape(array)}")
    if kind not in KINDS:
        raise OptionValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if arr.dtype.kind == "c":
        raise OptionValueError("complex output: write its amplitude (np.abs) or phase (np.angle) instead")
    if kind == "auto":
        if arr.dtype.kind in "ui" or arr.dtype == bool:
            kind = "rgb" if arr.shape[0] == 3 and arr.dtype == np.uint8 else "classes" if arr.shape[0] == 1 else "float"
        else:
            kind = "float"
    if kind == "classes":
        if arr.shape[0] != 1:
            raise OptionValueError(f"a class map has one band, got {arr.shape[0]}")
        arr, nodata = _class_labels(arr, nodata)
    elif kind == "rgb":
        if arr.shape[0] != 3:
            raise OptionValueError(f"kind='rgb' needs 3 bands, got {arr.shape[0]}")
        if arr.dtype.kind == "f":
            arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        elif arr.dtype != bool and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise OptionValueError(
                f"kind='rgb' takes uint8 colours 0..255 or floats in [0, 1]; got integers in "
                f"[{int(arr.min())}, {int(arr.max())}]: scale them first (e.g. arr / 65535 for 16-bit)"
            )
        arr = arr.astype(np.uint8)
        if nodata is not None and not (_is_integer(nodata) and 0 <= nodata <= 255):
            raise OptionValueError(f"nodata={nodata!r} does not fit an RGB (uint8) file; use an integer 0..255 or None")
    else:
        arr = arr.astype(np.float32)
        nan = np.isnan(arr)
        if nodata is None and nan.any():
            nodata = float("nan")
        elif nodata is not None and not np.isnan(nodata) and nan.any():
            arr[nan] = nodata  # NaN pixels are nodata in the file too

    gcps = None
    if like is not None:
        if like.get("gcps") and crs is None and transform is None:  # a GCP-georeferenced source (SAR)
            gcps, crs = _scaled_gcps(like, arr.shape[1:], scale), like.get("gcp_crs")
        if crs is None:
            crs = like.get("crs")
        if transform is None and like.get("transform") is not None and gcps is None:
            src_shape = tuple(like["shape"][-2:])
            transform = grid_transform(like["transform"], src_shape, arr.shape[1:], scale)
    elif scale is not None and transform is not None:
        transform = scaled_transform(transform, scale)

    C, H, W = arr.shape
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": W,
        "height": H,
        "count": C,
        "dtype": arr.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": compress,
        "BIGTIFF": "IF_SAFER",
    }
    if gcps is not None:
        del profile["transform"]
        profile["gcps"] = gcps
    if H >= 16 and W >= 16:
        b = max(16, min(blocksize, 1 << (min(H, W).bit_length() - 1)) // 16 * 16)
        profile.update(tiled=True, blockxsize=b, blockysize=b)
    if compress and compress.lower() in ("deflate", "lzw", "zstd"):
        profile["predictor"] = 3 if arr.dtype.kind == "f" else 2
    if kind == "rgb":
        profile["photometric"] = "RGB"
        profile["interleave"] = "pixel"
    p = user_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        _write(rasterio, tmp, arr, profile, kind, band_names, colormap, class_names, tags, like, overviews)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written hidden file left next to the outputs
        raise
    os.replace(tmp, p)
    return p


def _scaled_gcps(like: Mapping[str, Any], out_shape: tuple[int, int], scale) -> list:
    """``like``'s ground control points moved onto an ``out_shape`` output grid (as :func:`grid_transform` scales)."""
    from .geotiff import _moved_gcp

    if scale is None:
        sx, sy = _grid_scale(tuple(like["shape"][-2:]), out_shape)
    else:
        sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    return [_moved_gcp(g, g.row / float(sy), g.col / float(sx)) for g in like["gcps"]]


def _is_integer(v: Any) -> bool:
    try:
        return float(v).is_integer()
    except (TypeError, ValueError):
        return False


def _class_labels(arr: np.ndarray, nodata) -> tuple[np.ndarray, int | None]:
    """Integer labels [1, H, W] in the smallest GDAL type that holds them and ``nodata`` (NaN -> nodata)."""
    if nodata is not None and not _is_integer(nodata):
        raise OptionValueError(f"nodata={nodata!r}: a class map's nodata must be an integer label (e.g. 255)")
    nodata = None if nodata is None else int(nodata)
    if arr.dtype.kind == "f":
        nan = np.isnan(arr)
        labels = arr[~nan]
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise OptionValueError("kind='classes' needs integer labels; got non-integer floats")
        if nan.any():
            if nodata is None:  # the type's maximum, when no label uses it
                top = int(labels.max()) if labels.size else 0
                nodata = 255 if top < 255 else 65535 if top < 65535 else None
                if nodata is None:
                    raise OptionValueError("NaN labels need a nodata value; pass nodata= (an unused label)")
            arr = np.where(nan, nodata, arr)
    arr = arr.astype(np.int64) if arr.dtype.kind in "fb" else arr
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if nodata is not None:
        lo, hi = min(lo, nodata), max(hi, nodata)
    for dt in (np.uint8, np.uint16, np.uint32, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return arr.astype(dt), nodata
    raise OptionValueError(f"class labels (and nodata) span [{lo}, {hi}], beyond what a GeoTIFF integer band holds")


def _write(rasterio, tmp: Path, arr, profile, kind, band_names, colormap, class_names, tags, like, overviews) -> None:
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    C, H, W = arr.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(arr)
            names = list(band_names or [])
            if not names and kind == "rgb":
                names = ["red", "green", "blue"]
            for i, n in enumerate(names[:C]):
                dst.set_band_description(i + 1, str(n))
            if kind == "classes" and arr.dtype in (np.uint8, np.uint16):  # GeoTIFF colour tables: 8/16-bit only
                cmap = dict(colormap) if colormap is not None else default_colormap(int(arr.max()) + 1)
                dst.write_colormap(1, {int(k): tuple(int(c) for c in v)[:4] for k, v in cmap.items()})
            elif kind == "classes" and colormap is not None:
                raise OptionValueError(
                    f"a colour table needs labels 0..65535 (uint8/uint16), these are stored as {arr.dtype}"
                )
            all_tags = {
                "DINOAPP_KIND": kind,
                "DINOAPP_CREATED": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "TIFFTAG_SOFTWARE": "dinoapp",
            }
            if like is not None and like.get("path"):
                all_tags["DINOAPP_SOURCE"] = Path(str(like["path"])).name
            if class_names is not None:
                all_tags["DINOAPP_CLASSES"] = ",".join(map(str, class_names))
            for k, v in (tags or {}).items():
                key = str(k).upper()
                all_tags[key if key.startswith(("DINOAPP_", "TIFFTAG_")) else f"DINOAPP_{key}"] = str(v)
            dst.update_tags(**all_tags)
            if overviews and min(H, W) >= 512:
                from rasterio.enums import Resampling

                factors = [f for f in (2, 4, 8, 16, 32) if min(H, W) // f >= 256]
                dst.build_overviews(factors, Resampling.nearest if kind == "classes" else Resampling.average)


def default_colormap(n: int) -> dict[int, tuple[int, int, int, int]]:
    """A distinct colour per class (tab20-like); class 0 is dark grey."""
    base = [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
        (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
        (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
        (219, 219, 141), (158, 218, 229),
    ]
    cmap = {0: (64, 64, 64, 255)}
    for i in range(1, max(n, 1)):
        r, g, b = base[(i - 1) % len(base)]
        cmap[i] = (r, g, b, 255)
    return cmap
