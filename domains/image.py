"""Ordinary images (PNG, JPEG, GIF, BMP, WebP, plain 8/16-bit TIFF) -> float32 [C, H, W] in [0, 1].

Integer images are divided by their bit depth's maximum (255 or 65535), so values are in [0, 1];
float TIFFs are returned as stored (``value_range`` None). The EXIF orientation is applied (a phone
photo comes out upright), palette images become RGB, and an alpha channel becomes the valid-pixel
mask ``meta["valid"]`` (alpha > 0) instead of a fourth channel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnreadableFileError, UnsupportedFormatError
from .sniff import check_file, has_tiff_magic

_GREY = ["grey"]
_RGB = ["R", "G", "B"]


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an ordinary image as ``(float32 [C, H, W], meta)``; C is 1 (grey) or 3 (RGB).

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
            img.load()
            img = ImageOps.exif_transpose(img)
            return _from_pil(img, p, fmt, n_frames)
    except UnidentifiedImageError as err:
        if has_tiff_magic(p):
            return _read_tiff_with_rasterio(p, err)
        raise UnsupportedFormatError(f"{p.name}: the image header is not readable as any image format") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, UnsupportedFormatError | UnreadableFileError):
            raise
        if has_tiff_magic(p) and "truncated" not in str(err):
            return _read_tiff_with_rasterio(p, err)
        raise UnreadableFileError(f"{p.name}: the image data is damaged or cut short ({err})") from err


def _from_pil(img, p: Path, fmt: str, n_frames: int) -> tuple[np.ndarray, dict[str, Any]]:
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
        arr, depth, vr = np.asarray(img).astype(np.float32) / 65535.0, 16, (0.0, 1.0)
    elif m == "I":
        raw = np.asarray(img)
        if fmt == "png" or (raw.size and raw.min() >= 0 and raw.max() <= 65535):
            # PIL opens 16-bit grey PNG (and 16-bit TIFF in some versions) as 32-bit "I".
            arr, depth, vr = raw.astype(np.float32) / 65535.0, 16, (0.0, 1.0)
        else:
            arr, depth, vr = raw.astype(np.float32), 32, None
    elif m == "F":
        arr, depth, vr = np.asarray(img, dtype=np.float32), 32, None
    else:  # pragma: no cover - every PIL mode is converted above
        raise UnsupportedFormatError(f"{p.name}: PIL image mode {m!r} is not supported")
    arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))  # [C, H, W]
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
    if valid is not None:
        meta["valid"] = valid
    return arr, meta


def _read_tiff_with_rasterio(p: Path, pil_error: Exception) -> tuple[np.ndarray, dict[str, Any]]:
    """TIFFs Pillow cannot decode (16-bit RGB, 3+ bands, odd compressions) go through GDAL when installed."""
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    except ImportError:
        raise UnsupportedFormatError(
            f"{p.name}: Pillow cannot decode this TIFF ({pil_error}); install rasterio "
            '(pip install "dinoapp[geo]") to read it through GDAL'
        ) from pil_error
    from .geotiff import read_geotiff

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            arr, meta = read_geotiff(p, stretch="dtype")
        except RasterioIOError as err:  # pragma: no cover - read_geotiff translates these
            raise UnreadableFileError(f"{p.name}: the TIFF is damaged ({err})") from err
    meta["format"] = "tiff"
    _ = rasterio
    return arr, meta
