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
from .errors import GeoreferenceError

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
    if scale is None:
        sy, sx = src_shape[0] / out_shape[0], src_shape[1] / out_shape[1]
        if not (np.isclose(sy, round(sy)) and np.isclose(sx, round(sx))) and not np.isclose(sy, sx, rtol=1e-2):
            raise GeoreferenceError(
                f"an output of {out_shape} does not evenly cover a read of {src_shape}; pass scale= explicitly"
            )
        return scaled_transform(transform, (sx, sy))
    return scaled_transform(transform, scale)


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
    :func:`grid_transform`), or explicit ``crs`` + ``transform`` of the output grid.

    ``kind``: ``classes`` (uint8/uint16 labels, colour table from ``colormap`` or a default
    palette, ``class_names`` stored as tags), ``probabilities`` / ``float`` (float32, NaN nodata),
    ``rgb`` (uint8 3-band, photometric RGB: PCA maps, overlays; floats in [0, 1] are scaled to
    0..255), ``auto`` (from the dtype and band count). ``tags``: provenance (backbone name, sha256,
    head, ...) stored as ``DINOAPP_<KEY>``.
    """
    rasterio = require("rasterio")
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise GeoreferenceError(f"expected an array [H, W] or [C, H, W], got shape {np.shape(array)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        if arr.dtype.kind in "ui" or arr.dtype == bool:
            kind = "rgb" if arr.shape[0] == 3 and arr.dtype == np.uint8 else "classes" if arr.shape[0] == 1 else "float"
        else:
            kind = "float"
    if kind == "classes":
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise ValueError("kind='classes' needs integer labels; got non-integer floats")
        top = int(arr.max()) if arr.size else 0
        arr = arr.astype(np.uint8 if top < 255 and (nodata is None or nodata <= 255) else np.uint16)
        if arr.shape[0] != 1:
            raise ValueError(f"a class map has one band, got {arr.shape[0]}")
    elif kind == "rgb":
        if arr.shape[0] != 3:
            raise ValueError(f"kind='rgb' needs 3 bands, got {arr.shape[0]}")
        if arr.dtype.kind == "f":
            arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        arr = arr.astype(np.uint8)
    else:
        arr = arr.astype(np.float32)
        if nodata is None and np.isnan(arr).any():
            nodata = float("nan")

    if like is not None:
        if crs is None:
            crs = like.get("crs")
        if transform is None and like.get("transform") is not None:
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
    if H >= 16 and W >= 16:
        b = max(16, min(blocksize, 1 << (min(H, W).bit_length() - 1)) // 16 * 16)
        profile.update(tiled=True, blockxsize=b, blockysize=b)
    if compress and compress.lower() in ("deflate", "lzw", "zstd"):
        profile["predictor"] = 3 if arr.dtype.kind == "f" else 2
    if kind == "rgb":
        profile["photometric"] = "RGB"
        profile["interleave"] = "pixel"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(arr)
            names = list(band_names or [])
            if not names and kind == "rgb":
                names = ["red", "green", "blue"]
            for i, n in enumerate(names[:C]):
                dst.set_band_description(i + 1, str(n))
            if kind == "classes":
                cmap = dict(colormap) if colormap is not None else default_colormap(int(arr.max()) + 1)
                dst.write_colormap(1, {int(k): tuple(int(c) for c in v)[:4] for k, v in cmap.items()})
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
    os.replace(tmp, p)
    return p


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
