"""Readers of labelled data: the formats the CLI and the library share.

- image classification: a CSV with a header and columns ``path,label`` (:func:`read_label_csv`);
  relative paths are taken from the CSV's folder (or from ``images_dir``);
- semantic segmentation: a folder of images and a folder of label images with the same file stems,
  ``images/a.jpg <-> masks/a.png`` (:func:`seg_pairs`); a mask is a single-band image of class
  indices, 255 = unlabelled (:func:`read_mask`).

Errors are :class:`~dinoapp.errors.InputError` with a message that names the file and what to fix.
``flag`` / ``flags`` say how the caller named the input (``--labels`` for the CLI, ``labels_csv`` for
:func:`dinoapp.distill.evaluate.evaluate_backbones`), so the message points at what the user typed.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError

MASK_EXT = (".png", ".tif", ".tiff", ".bmp", ".gif")


def read_label_csv(
    path: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    flag: str | None = None,
) -> tuple[list[Path], list[str]]:
    """``(paths, labels)`` from a CSV with a header holding columns ``path`` and ``label`` (others are ignored).

    A relative ``path`` is joined to ``images_dir`` if given, else to the CSV's folder; an absolute one
    is kept. Labels are strings as written. Files are not opened here.
    """
    p = Path(path).expanduser()
    where = f"{flag} {path}" if flag else str(path)
    if not p.is_file():
        raise InputError(f"{where}: no such CSV file")
    with open(p, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames or []
    if not {"path", "label"} <= set(header):
        raise InputError(f"{path}: needs a header with columns 'path' and 'label'")
    if not rows:
        raise InputError(f"{path}: has a header but no rows (one row per image: path,label)")
    base = Path(images_dir) if images_dir else p.parent
    return [base / r["path"] for r in rows], [r["label"] for r in rows]


def seg_pairs(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    flags: tuple[str, str] = ("images", "masks"),
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem, in the images' sorted order.

    Images are every readable file under ``images_dir`` (recursive, :func:`domains.find_files`); masks
    are the files of ``masks_dir`` with a mask extension (:data:`MASK_EXT`). Images without a mask are
    left out and counted in a note on stderr; no pair at all is an error.
    """
    from domains import find_files

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for flag, d in zip(flags, (images_dir, masks_dir), strict=True):
        if not d.is_dir():
            raise InputError(f"{flag} {d} is not a folder")
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.is_file() and p.suffix.lower() in MASK_EXT}
    images = find_files(images_dir)
    if not images:
        raise InputError(f"no input files in {[str(images_dir)]}")
    pairs = [(p, masks[p.stem]) for p in images if p.stem in masks]
    if not pairs:
        example = next((m.name for m in masks.values()), None)
        raise InputError(f"no image in {images_dir} has a mask with the same file stem in {masks_dir} (masks are "
                         f"matched by name: images/a.jpg <-> masks/a.png; e.g. {images[0].name!r} vs "
                         f"{example!r})")  # fmt: skip
    if len(pairs) < len(images):
        missing = [p.name for p in images if p.stem not in masks]
        print(f"note: {len(missing)} of {len(images)} images have no mask and are left out (e.g. {missing[:3]})",
              file=sys.stderr)  # fmt: skip
    return pairs


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label image as a 2-D array of class indices [H, W] (its own integer dtype; 255 = unlabelled)."""
    from PIL import Image

    with Image.open(path) as im:
        mask = np.asarray(im)
    if mask.ndim != 2:
        raise InputError(f"{path}: masks must be single-band label images (PNG with class indices, "
                         "255 = unlabelled)")  # fmt: skip
    return mask
