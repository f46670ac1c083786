"""Ordinary images (PNG, JPEG, GIF, BMP, WebP, plain 8/16-bit TIFF) -> float32 [C, H, W] in [0, 1].

Integer images are divided by their bit depth's maximum (255 or 65535), so values are in [0, 1]
(``stretch="dtype"``, the default; 16-bit images can be stretched like GeoTIFFs instead with ``stretch=``,
e.g. ``"auto"``: 2-98 % per band, for 12-bit data stored in 16 bits, which /65535 leaves almost black);
float TIFFs are returned as stored (``value_range`` None). The EXIF orientation is applied (a phone
photo comes out upright), palette images become RGB, and an alpha channel becomes the valid-pixel
mask ``meta["valid"]`` (alpha > 0) instead of a fourth channel.

Files Pillow would read only in part go through GDAL (rasterio) instead: 16-bit colour PNGs and
TIFFs (Pillow keeps 8 of the 16 bits), and TIFFs with samples Pillow drops (a 2-band TIFF read as
grey, a 4th band that is not alpha). Without rasterio they are read by Pillow with a DomainWarning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DomainWarning, UnreadableFileError, UnsupportedFormatError
from .sniff import check_file, has_tiff_magic, sniff

_GREY = ["grey"]
_RGB = ["R", "G", "B"]


def read_image(path: str | os.PathLike, *, stretch: Any = "dtype") -> tuple[np.ndarray, dict[str, Any]]:
    """Read an ordinary image as ``(float32 [C, H, W], meta)``; C is 1 (grey) or 3 (RGB).

    ``stretch``: how integer images deeper than 8 bits are scaled, as :func:`~domains.geotiff.read_geotiff`
    scales a raster of that type (see :func:`~domains.geotiff.stretch_integer`): ``"dtype"`` (default,
    divide by 65535), ``"auto"`` / ``"percentile"`` (2-98 % per band), ``"none"``, ``"reflectance"``, a
    :class:`~domains.stats.BandStats` or its JSON path. 8-bit and float images are never stretched.

    ``meta``: ``format``, ``path``, ``shape``, ``value_range`` ((0, 1), or None for float data),
    ``channels``, ``bit_depth``, ``mode`` (PIL's), ``n_frames`` (first frame is read), ``valid``
    (bool [H, W], only when the image has an alpha channel).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = check_file(path)
    try:
        with Image.open(p) as img:
            fmt = (img.format or "").lower()
            n_frames = getattr(img, "n_frames", 1)
            partial = _pil_reads_part(img, p, fmt)
            if partial:
                out = _read_with_gdal(p, partial, fmt, stretch)
                if out is not None:
                    return out
            img.load()
            img = ImageOps.exif_transpose(img)
            return _from_pil(img, p, fmt, n_frames, stretch)
    except Image.DecompressionBombError as err:
        if has_tiff_magic(p):
            return _read_tiff_with_rasterio(p, err, stretch)
        raise UnreadableFileError(
            f"{p.name}: {err} Pillow refuses images this large by default; if you trust the file, raise the "
            "limit (PIL.Image.MAX_IMAGE_PIXELS = None) or convert it to a tiled GeoTIFF"
        ) from err
    except UnidentifiedImageError as err:
        if has_tiff_magic(p):
            return _read_tiff_with_rasterio(p, err, stretch)
        fmt = sniff(p)  # UnsupportedFormatError for content that is no image at all
        if fmt == "dicom":
            raise UnsupportedFormatError(f"{p.name} is a DICOM file; read it with domains.load or read_dicom") from err
        raise UnreadableFileError(
            f"{p.name}: starts like a {fmt.upper()} file but its header is damaged or cut short; copy the file again"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, UnsupportedFormatError | UnreadableFileError):
            raise
        if has_tiff_magic(p) and "truncated" not in str(err):
            return _read_tiff_with_rasterio(p, err, stretch)
        raise UnreadableFileError(f"{p.name}: the image data is damaged or cut short ({err})") from err


def _from_pil(img, p: Path, fmt: str, n_frames: int, stretch: Any = "dtype") -> tuple[np.ndarray, dict[str, Any]]:
    mode = img.mode
    valid = None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if mode == "1" else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    m = img.mode
    if m in ("RGBA", "LA", "La", "RGBa"):
        a = np.asarray(img.getchannel("A"))
        valid = a > 0
        img = img.convert("RGB" if m.startswith("RGB") else "L")
        m = img.mode
    if m in ("L", "RGB"):
        arr, depth, vr = np.asarray(img, dtype=np.float32) / 255.0, 8, (0.0, 1.0)
    elif m.startswith("I;16"):
        raw16 = np.asarray(img)
        arr, depth, vr = raw16.astype(np.float32) / 65535.0, 16, (0.0, 1.0)
    elif m == "I":
        raw = np.asarray(img)
        if fmt == "png" or (raw.size and raw.min() >= 0 and raw.max() <= 65535):
            # PIL opens 16-bit grey PNG (and 16-bit TIFF in some versions) as 32-bit "I".
            raw16 = raw.astype(np.uint16)
            arr, depth, vr = raw.astype(np.float32) / 65535.0, 16, (0.0, 1.0)
        else:
            arr, depth, vr = raw.astype(np.float32), 32, None
    elif m == "F":
        arr, depth, vr = np.asarray(img, dtype=np.float32), 32, None
    else:  # pragma: no cover - every PIL mode is converted above
        raise UnsupportedFormatError(f"{p.name}: PIL image mode {m!r} is not supported")
    arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))  # [C, H, W]
    info = None
    if depth == 16 and stretch != "dtype":  # 16-bit grey: stretched as a uint16 GeoTIFF would be
        from .geotiff import stretch_integer

        arr, info = stretch_integer(raw16.astype(np.uint16, copy=False)[None], valid, stretch, name=p.name)
        vr = None if info["method"] in ("none", "reflectance") else (0.0, 1.0)
    if vr is None and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr).all(axis=0)
        valid = ~bad if valid is None else valid & ~bad
        arr = np.where(np.isfinite(arr), arr, 0.0).astype(np.float32)
    meta: dict[str, Any] = {
        "format": fmt or "image",
        "path": str(p),
        "shape": tuple(arr.shape),
        "value_range": vr,
        "channels": list(_GREY if arr.shape[0] == 1 else _RGB),
        "bit_depth": depth,
        "mode": mode,
        "n_frames": n_frames,
    }
    if info is not None:
        meta["stretch"] = info
    if valid is not None:
        meta["valid"] = valid
    return arr, meta


def _pil_reads_part(img, p: Path, fmt: str) -> str:
    """Why Pillow would read only part of this file's data ('' when it reads all of it)."""
    if fmt == "png":
        with open(p, "rb") as f:
            ihdr = f.read(26)
        if len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 4, 6):  # bit depth 16; RGB, grey+alpha, RGBA
            return "16-bit colour PNG, which Pillow reduces to 8 bits"
    elif fmt == "tiff":
        spp = int(img.tag_v2.get(277, 1) or 1)  # SamplesPerPixel
        bps = img.tag_v2.get(258, (8,))  # BitsPerSample
        bits = max(bps) if isinstance(bps, tuple | list) else int(bps)
        if spp != len(img.getbands()) or img.mode == "RGBX":
            return f"TIFF with {spp} samples per pixel, of which Pillow reads {len(img.getbands())} as {img.mode}"
        if spp > 1 and bits > 8:
            return f"{bits}-bit colour TIFF, which Pillow reduces to 8 bits"
    return ""


def _read_with_gdal(p: Path, why: str, fmt: str, stretch: Any = "dtype") -> tuple[np.ndarray, dict[str, Any]] | None:
    """Read ``p`` through GDAL (all samples, full bit depth); None (after a DomainWarning) without rasterio."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        warnings.warn(
            f"{p.name}: {why}; reading what Pillow reads. Install rasterio "
            '(pip install "dinoapp[geo]") to read all of it through GDAL',
            DomainWarning,
            stacklevel=3,
        )
        return None
    arr, meta = _read_tiff_with_rasterio(p, ValueError(why), stretch)
    meta["format"] = fmt
    return arr, meta


def _read_tiff_with_rasterio(p: Path, pil_error: Exception,
                             stretch: Any = "dtype") -> tuple[np.ndarray, dict[str, Any]]:
    """TIFFs Pillow cannot decode (16-bit RGB, 3+ bands, odd compressions) go through GDAL when installed."""
    try:
        from rasterio.errors import NotGeoreferencedWarning
    except ImportError:
        raise UnsupportedFormatError(
            f"{p.name}: Pillow cannot decode this TIFF ({pil_error}); install rasterio "
            '(pip install "dinoapp[geo]") to read it through GDAL'
        ) from pil_error
    from .geotiff import raster_info, read_geotiff

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dt = np.dtype(raster_info(p)["dtype"])  # the header only; 8-bit and float data are never stretched
        deep = dt.kind in "ui" and dt.itemsize > 1
        arr, meta = read_geotiff(p, stretch=stretch if deep else "dtype")  # GDAL failures come back typed
    meta["format"] = "tiff"
    if meta["dtype"] in ("uint8", "uint16"):
        meta["bit_depth"] = 8 * np.dtype(meta["dtype"]).itemsize
    return arr, meta
