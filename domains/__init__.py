"""dinoapp domains: files -> (array float32 [C, H, W], meta dict) and back.

numpy + rasterio + pydicom only (no torch, no dinoapp), so GIS and PACS scripts can use it alone.
rasterio and pydicom are imported only when a GeoTIFF / DICOM is read; a missing one raises
:class:`MissingDependencyError` naming the extra to install.

Read the modules in this order: ``errors``, ``sniff``, ``load`` (the dispatcher), ``image``,
``geotiff`` (+ ``stats``, ``tiling``, ``geowrite``, ``indices``), ``dicom`` (+ ``series``, ``phi``), ``datasets``.
"""

from . import samples  # pathlib only (0.5 ms): domains.samples.path(...) after `import domains`
from .datasets import FileError, FolderDataset, find_files
from .dicom import WINDOW_PRESETS, read_dicom, read_dicom_frames
from .errors import (
    BandSelectionError,
    DomainError,
    DomainWarning,
    FrameIndexError,
    GeoreferenceError,
    MissingCodecError,
    MissingDependencyError,
    MissingFileError,
    NoPixelDataError,
    NoValidPixelsError,
    OptionError,
    OptionValueError,
    SeriesError,
    UnreadableFileError,
    UnsupportedFormatError,
    WindowError,
)
from .geotiff import raster_info, read_geotiff, resolve_bands
from .geowrite import grid_transform, scaled_transform, write_geotiff
from .image import read_image
from .indices import ndvi
from .load import load, reader_for
from .phi import deidentify, safe_meta
from .series import SeriesInfo, find_series, read_series
from .sniff import sniff
from .stats import BandStats, compute_band_stats
from .tiling import Mosaic, Tile, iter_tiles, tile_grid, write_tiles

__all__ = [
    "BandSelectionError", "BandStats", "DomainError", "DomainWarning", "FileError", "FolderDataset",
    "GeoreferenceError", "MissingCodecError", "MissingDependencyError", "MissingFileError", "Mosaic",
    "NoPixelDataError", "NoValidPixelsError", "OptionError", "OptionValueError", "SeriesError", "Tile",
    "UnreadableFileError",
    "UnsupportedFormatError", "compute_band_stats", "find_files", "grid_transform", "iter_tiles", "load",
    "raster_info", "read_geotiff", "read_image", "reader_for", "resolve_bands", "scaled_transform", "sniff",
    "tile_grid", "write_geotiff", "WindowError", "FrameIndexError", "WINDOW_PRESETS", "read_dicom",
    "read_dicom_frames", "deidentify", "safe_meta", "SeriesInfo", "find_series", "read_series", "ndvi",
    "write_tiles", "samples",
]
