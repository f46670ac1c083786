"""The domain-IO exceptions.

Every error ``domains`` raises on purpose is a :class:`DomainError` and also subclasses the built-in
exception a Python user would expect, so ``except domains.UnreadableFileError`` and ``except OSError``
both work. Messages name the file, say what is wrong and what to do about it.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every error raised on purpose by ``domains``."""


class UnreadableFileError(DomainError, OSError):
    """The file exists but cannot be read: empty, truncated, corrupt, or not permitted."""


class MissingFileError(UnreadableFileError, FileNotFoundError):
    """The path does not exist (or is a folder where a file was expected)."""


class UnsupportedFormatError(DomainError, ValueError):
    """The content is not a format ``domains`` reads (or a variant of one it does not support)."""


class MissingCodecError(UnsupportedFormatError):
    """The file is compressed with a codec that no installed plugin decodes.

    ``codec`` names it (e.g. the DICOM transfer syntax), ``install`` the pip command that adds it.
    """

    def __init__(self, message: str, *, codec: str = "", install: str = "") -> None:
        super().__init__(message)
        self.codec = codec
        self.install = install


class MissingDependencyError(DomainError, ImportError):
    """An optional package (rasterio, pydicom) that this reader needs is not installed."""


class NoPixelDataError(DomainError, ValueError):
    """The file is valid but holds no image (a DICOM structured report, an RT plan, ...)."""


class NoValidPixelsError(DomainError, ValueError):
    """Every pixel is nodata / masked, so there is nothing to compute statistics or tiles from."""


class BandSelectionError(DomainError, ValueError):
    """Asked-for bands do not exist in the raster (the message lists the ones that do)."""


class GeoreferenceError(DomainError, ValueError):
    """A raster output cannot be placed on the source grid (shapes or scale do not line up)."""


class SeriesError(DomainError, ValueError):
    """A DICOM folder holds no usable series, or the asked-for series is not there."""


class WindowError(DomainError, ValueError):
    """A ``window`` option that is not valid: a DICOM display window (unknown preset, bad width, or a window
    on a colour image) or a raster region / ``out_shape`` (not 4 numbers, empty, not finite)."""


class FrameIndexError(DomainError, IndexError):
    """The asked-for frame does not exist in a multi-frame file (the message gives the frame count)."""


class DomainWarning(UserWarning):
    """Something was read, but with a caveat the user should know (mixed slice sizes, ...)."""


class OptionValueError(DomainError, ValueError):
    """An option has a value the function cannot use (an unknown stretch, edge mode, blend, kind, ...)."""


class OptionError(DomainError, TypeError):
    """An option was passed that the reader chosen for this file does not take."""
