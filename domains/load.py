"""``load(path, **options)``: one entry point that recognises the file by content and picks the reader."""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import numpy as np

from . import sniff as _sniff
from .errors import OptionError, UnsupportedFormatError


def reader_for(path: str | os.PathLike) -> tuple[str, Any]:
    """``(kind, reader)`` for a file: kind is ``geotiff``, ``dicom`` or ``image``.

    TIFFs with georeferencing (CRS, geotransform or GCPs), more than 4 bands or a sample type
    Pillow cannot hold go to the GeoTIFF reader; plain 8/16-bit TIFFs to the image reader. JPEG 2000
    goes through GDAL (satellite products ship as .jp2).
    """
    fmt = _sniff.sniff(path)
    if fmt == _sniff.DICOM:
        from .dicom import read_dicom

        return "dicom", read_dicom
    if fmt in (_sniff.TIFF, _sniff.JPEG2000):
        try:
            import rasterio  # noqa: F401
        except ImportError:
            if fmt == _sniff.JPEG2000:
                from ._deps import require

                require("rasterio")
            from .image import read_image

            return "image", read_image
        from .geotiff import is_georeferenced, open_raster

        with open_raster(path) as src:
            plain = (
                fmt == _sniff.TIFF
                and not is_georeferenced(src)
                and src.count in (1, 2, 3, 4)
                and src.dtypes[0] in ("uint8", "uint16")
            )
        if plain:
            from .image import read_image

            return "image", read_image
        from .geotiff import read_geotiff

        return "geotiff", read_geotiff
    from .image import read_image

    return "image", read_image


def load(path: str | os.PathLike, **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Read any supported file as ``(float32 [C, H, W], meta)``, dispatching on its content.

    ``options`` go to the chosen reader (:func:`~domains.geotiff.read_geotiff`,
    :func:`~domains.dicom.read_dicom` or :func:`~domains.image.read_image`); an option that
    reader does not take raises :class:`OptionError` naming the ones it does. Options of the
    *other* readers may be passed together under ``geotiff={...}``, ``dicom={...}``,
    ``image={...}``: only the matching group is used (handy for folders of mixed files).
    """
    kind, reader = reader_for(path)
    groups = {k: options.pop(k) for k in ("geotiff", "dicom", "image") if k in options}
    opts = {**options, **(groups.get(kind) or {})}
    accepted = set(inspect.signature(reader).parameters) - {"path"}
    unknown = sorted(set(opts) - accepted)
    if unknown:
        takes = sorted(accepted - {"src"})
        raise OptionError(
            f"{os.fspath(path)} is read by the {kind} reader, which takes no option {', '.join(unknown)}; "
            + (f"its options are: {', '.join(takes)}" if takes else "it takes no options")
            + "; pass options meant for other file types as geotiff={...}, dicom={...} or image={...}"
        )
    with warnings.catch_warnings():
        try:
            from rasterio.errors import NotGeoreferencedWarning

            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        except ImportError:
            pass
        arr, meta = reader(path, **opts)
    if arr.dtype != np.float32 or arr.ndim != 3:  # pragma: no cover - a reader bug, not user input
        raise UnsupportedFormatError(f"reader for {kind} returned {arr.dtype} {arr.shape}")
    meta.setdefault("reader", kind)
    meta["reader"] = kind
    return arr, meta
