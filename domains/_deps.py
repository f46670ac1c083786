"""Lazy imports of the optional IO packages, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

_EXTRAS = {
    "rasterio": ("geo", "GeoTIFF and other raster formats"),
    "pydicom": ("medical", "DICOM files and series"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the dinoapp extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra, what = _EXTRAS.get(module.split(".")[0], ("all", module))
        raise MissingDependencyError(
            f"reading {what} needs the Python package '{module.split('.')[0]}', which is not installed; "
            f'install it with: pip install "dinoapp[{extra}]"'
        ) from err
