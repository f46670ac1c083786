"""Folders of mixed GeoTIFFs, DICOMs and images as datasets for training, robust to bad files.

:class:`FolderDataset` is map-style (``len``, ``ds[i]``) and iterable, has no torch dependency and
is safe to use from DataLoader workers: it holds only paths and options. A file that cannot be
read is, with ``on_error="skip"`` (the default), recorded (``ds.errors``, the log, and an optional
JSONL ``error_log`` shared by all worker processes) and replaced by the next readable file, so one
corrupt file never kills a long run; ``on_error="raise"`` raises the typed error instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DomainError, MissingFileError, NoValidPixelsError, OptionError, OptionValueError, WindowError
from .sniff import user_path

log = logging.getLogger("domains.datasets")

KNOWN_EXTENSIONS = (
    ".tif", ".tiff", ".gtiff", ".jp2", ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp",
)
SKIP_EXTENSIONS = (".json", ".txt", ".csv", ".xml", ".aux", ".ovr", ".msk", ".md", ".yaml", ".yml", ".py", ".zip")


@dataclass(frozen=True)
class FileError:
    """One file that could not be read: its path, the error's type name and message."""

    path: str
    error: str
    message: str


def find_files(root: str | os.PathLike, *, recursive: bool = True, sniff_unknown: bool = True) -> list[Path]:
    """Readable-looking files under ``root``, sorted: known extensions, plus extension-less files whose
    content is recognised (DICOM files often have no extension). Hidden files and sidecars are skipped."""
    from .sniff import sniff

    base = user_path(root)
    if not base.exists():
        raise MissingFileError(f"{base}: no such folder")
    if base.is_file():
        return [base]
    out = []
    for p in base.rglob("*") if recursive else base.glob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(base).parts):
            continue
        ext = p.suffix.lower()
        if ext in KNOWN_EXTENSIONS:
            out.append(p)
        elif sniff_unknown and ext not in SKIP_EXTENSIONS:
            try:
                sniff(p)
            except (DomainError, OSError):
                continue
            out.append(p)
    return sorted(out)


class FolderDataset:
    """Every readable file under ``root`` as ``(float32 [C, H, W], meta)``.

    ``window``: ``None`` (whole images) or a size (int or (h, w)): each access returns a random
    window of that size; GeoTIFFs read only that window from disk (bounded memory for huge scenes),
    other files are read whole and cropped; windows with fewer than ``min_valid`` valid pixels are
    redrawn (up to 10 times). Randomness is a pure function of ``(seed, epoch, index)``
    (:meth:`set_epoch`), so runs are reproducible with any number of workers.
    ``load_options`` go to :func:`domains.load` (use ``geotiff={...}``, ``dicom={...}`` groups for
    mixed folders), e.g. ``geotiff={"stats": "band_stats.json", "bands": [1, 2, 3, 4]}``.

    Options are configuration, not file content: an option the reader of some file does not take
    (:class:`OptionError`) is raised whatever ``on_error`` says, and a bad ``window`` or DICOM
    display window is refused here. A file that failed for a reason of its own is recorded once and
    not read again by this copy of the dataset (a window draw that found too few valid pixels is
    retried on later accesses).
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        recursive: bool = True,
        window: int | tuple[int, int] | None = None,
        min_valid: float = 0.5,
        on_error: str = "skip",
        error_log: str | os.PathLike | None = None,
        seed: int = 0,
        **load_options: Any,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise OptionValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if isinstance(root, str | os.PathLike):
            self.files = find_files(root, recursive=recursive)
        else:
            self.files = [user_path(p) for p in root]
        if not self.files:
            raise MissingFileError(f"no image, GeoTIFF or DICOM files found under {root}")
        self.window = _window_size(window)
        if "window" in (load_options.get("dicom") or {}):
            from .dicom import parse_window

            parse_window(load_options["dicom"]["window"])  # WindowError now, not once per file later
        self.min_valid = float(min_valid)
        self.on_error = on_error
        self.error_log = Path(error_log) if error_log is not None else None
        self.seed = int(seed)
        self.epoch = 0
        self.load_options = load_options
        self.errors: list[FileError] = []
        self._bad: set[int] = set()  # files that failed for a reason of their own: not read again

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Change the random windows drawn (call once per epoch, in every worker's copy)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        n = len(self.files)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} files")
        i %= n
        for k in range(n):
            got = self._try_read((i + k) % n)
            if got is not None:
                return got
        raise NoValidPixelsError(f"none of the {n} files could be read; see dataset.errors / the error log")

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for j in range(len(self.files)):
            got = self._try_read(j)
            if got is not None:
                yield got

    def _try_read(self, j: int) -> tuple[np.ndarray, dict[str, Any]] | None:
        """File ``j``, or None when it is (or was before) unreadable and ``on_error="skip"``."""
        if j in self._bad:
            return None
        try:
            return self.read(j)
        except (OptionError, OptionValueError):
            raise  # a configuration error, the same for every file of this type
        except (DomainError, OSError, ValueError) as err:
            if self.on_error == "raise":
                raise
            self._record(j, err)
            return None

    def read(self, j: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Read file ``j`` (a random window of it when ``window`` is set); errors propagate."""
        from .load import load, reader_for

        path = self.files[j]
        if self.window is None:
            arr, meta = load(path, **self.load_options)
            meta["index"] = j
            return arr, meta
        rng = np.random.default_rng((self.seed, self.epoch, j))
        wh, ww = self.window
        kind, _ = reader_for(path)
        if kind == "geotiff":
            from .geotiff import open_raster

            with open_raster(path) as src:
                H, W = src.height, src.width
            best = None
            for _ in range(10):
                y, x = _draw(rng, H, wh), _draw(rng, W, ww)
                arr, meta = load(path, window=(x, y, ww, wh), **self.load_options)
                frac = float(meta["valid"].mean())
                if best is None or frac > best[0]:
                    best = (frac, arr, meta)
                if frac >= self.min_valid:
                    break
            frac, arr, meta = best
            if frac < self.min_valid:
                raise NoValidPixelsError(
                    f"{path.name}: no {wh} x {ww} window with >= {self.min_valid:.0%} valid pixels in 10 draws "
                    f"(best {frac:.0%}); the scene is mostly nodata"
                )
        else:
            full, meta = load(path, **self.load_options)
            H, W = full.shape[1:]
            y, x = _draw(rng, H, wh), _draw(rng, W, ww)
            arr = np.zeros((full.shape[0], wh, ww), np.float32)
            sub = full[:, y : y + wh, x : x + ww]
            arr[:, : sub.shape[1], : sub.shape[2]] = sub
            valid = np.zeros((wh, ww), bool)
            v = meta.get("valid")
            valid[: sub.shape[1], : sub.shape[2]] = True if v is None else v[y : y + wh, x : x + ww]
            meta = {**meta, "valid": valid, "window": (x, y, ww, wh), "shape": tuple(arr.shape)}
        meta["index"] = j
        return arr, meta

    def _record(self, j: int, err: BaseException) -> None:
        if not isinstance(err, NoValidPixelsError):
            self._bad.add(j)
        rec = FileError(str(self.files[j]), type(err).__name__, str(err))
        if rec in self.errors:
            return
        self.errors.append(rec)
        log.warning("skipping %s: %s: %s", rec.path, rec.error, rec.message)
        if self.error_log is not None:
            self.error_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.error_log, "a") as f:  # one short line per error: appends are atomic enough
                f.write(json.dumps(rec.__dict__) + "\n")


def _window_size(window: Any) -> tuple[int, int] | None:
    """FolderDataset's ``window``: None, or a positive (height, width) from an int or a pair."""
    if window is None:
        return None
    if isinstance(window, int | np.integer) and not isinstance(window, bool):
        window = (window, window)
    try:
        h, w = window
        ok = all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise WindowError(
            f"window={window!r}: FolderDataset's window is a crop size in pixels (an int or (height, width)); "
            "DICOM display windows go in dicom={'window': 'lung'}"
        )
    return int(h), int(w)


def _draw(rng: np.random.Generator, size: int, win: int) -> int:
    return int(rng.integers(0, size - win + 1)) if size > win else 0
