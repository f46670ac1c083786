"""Recognise a file's format from its first bytes, not its extension."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingFileError, UnreadableFileError, UnsupportedFormatError

# Format names returned by :func:`sniff`.
TIFF, DICOM, PNG, JPEG, JPEG2000, GIF, BMP, WEBP = "tiff", "dicom", "png", "jpeg", "jpeg2000", "gif", "bmp", "webp"

_MAGIC: list[tuple[int, bytes, str]] = [
    (128, b"DICM", DICOM),  # first: a DICOM preamble may itself hold a TIFF header (dual-personality files)
    (0, b"II*\x00", TIFF),
    (0, b"MM\x00*", TIFF),
    (0, b"II+\x00", TIFF),  # BigTIFF
    (0, b"MM\x00+", TIFF),
    (0, b"\x89PNG\r\n\x1a\n", PNG),
    (0, b"\xff\xd8\xff", JPEG),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", JPEG2000),
    (0, b"\xff\x4f\xff\x51", JPEG2000),  # raw J2K codestream
    (0, b"GIF87a", GIF),
    (0, b"GIF89a", GIF),
    (0, b"BM", BMP),
]

# Groups a DICOM data set without the 128-byte preamble usually starts with (little endian, even group).
_DICOM_NO_PREAMBLE_GROUPS = {0x0002, 0x0008}


def user_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path with ``~`` / ``~user`` expanded (every public function taking a path uses it)."""
    return Path(os.fspath(path)).expanduser()


def check_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path (``~`` expanded), or raise the typed error for a missing, empty or unreadable file."""
    p = user_path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file")
    if p.is_dir():
        raise MissingFileError(f"{p} is a folder; give one file (or use a folder dataset / series reader)")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        raise UnreadableFileError(f"{p}: cannot be read ({err.strerror or err})") from err
    if size == 0:
        raise UnreadableFileError(f"{p.name}: the file is empty (0 bytes); the copy or download probably failed")
    return p


def sniff(path: str | os.PathLike) -> str:
    """The format of ``path`` from its content: one of ``tiff, dicom, png, jpeg, jpeg2000, gif, bmp, webp``.

    Raises :class:`MissingFileError`, :class:`UnreadableFileError` (empty/unreadable) or
    :class:`UnsupportedFormatError` for content that is none of these.
    """
    p = check_file(path)
    with open(p, "rb") as f:
        head = f.read(132)
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if _looks_like_dicom_without_preamble(head):
        return DICOM
    raise UnsupportedFormatError(
        f"{p.name}: not a format dinoapp reads (starts with bytes {head[:8].hex(' ')}); supported are "
        "GeoTIFF/TIFF, DICOM, PNG, JPEG, JPEG 2000, GIF, BMP and WebP"
    )


def has_tiff_magic(path: str | os.PathLike) -> bool:
    """True when the file starts like a TIFF / BigTIFF (damaged or not)."""
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """A raw data set: a first tag of group 0002/0008, element 0000..0020, and (explicit VR) a valid VR."""
    if len(head) < 8:
        return False
    order = "little" if int.from_bytes(head[0:2], "little") in _DICOM_NO_PREAMBLE_GROUPS else "big"
    group = int.from_bytes(head[0:2], order)
    element = int.from_bytes(head[2:4], order)
    if group not in _DICOM_NO_PREAMBLE_GROUPS or element > 0x0020:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR little endian
    length = int.from_bytes(head[4:8], order)  # implicit VR: a 4-byte length that fits the file header
    return length < 1024
