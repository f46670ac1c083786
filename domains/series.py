"""DICOM series: find them in a folder (headers only) and read one as a sorted volume.

Slices are ordered by their position along the slice normal (PS3.3 C.7.6.2.1.1): with the row and column
direction cosines r, c of Image Orientation (Patient), the normal is n = r x c and a slice's distance
is d = n . Image Position (Patient). File names and Instance Numbers are not trusted for order; they
are the fallback (said in ``meta["sort"]``) only when positions or orientations are missing.

Series are told apart by Series Instance UID, which is never returned: a series is named by its
``key``, the first 12 hex digits of the UID's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dicom import (
    WindowError,
    WindowSpec,
    decode,
    frame_view,
    modality_values,
    n_frames,
    open_dicom,
    parse_window,
    render_colour,
    render_grey,
    warn_if_not_hu,
)
from .errors import DomainError, DomainWarning, MissingFileError, SeriesError
from .phi import quiet_values, safe_meta
from .sniff import user_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder, from its files' headers.

    ``key``: a short hash of the Series Instance UID (the UID itself is never exposed); ``rows`` /
    ``columns``: the most common image size; ``n_images``: frames over all files (= ``n_files`` for
    classic single-frame series); ``paths``: its files, sorted by name (not slice order).
    """

    key: str
    modality: str
    n_files: int
    rows: int
    columns: int
    paths: tuple[str, ...]
    n_images: int = 0
    sop_class: str = ""


class SeriesList(list):
    """``list[SeriesInfo]``, largest first, with ``skipped``: ``(path, reason)`` of files that are not images."""

    def __init__(
        self,
        items: Iterable[SeriesInfo] = (),
        skipped: Sequence[tuple[str, str]] = (),
        headers: dict[str, Dataset] | None = None,
    ) -> None:
        super().__init__(items)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self._headers: dict[str, Dataset] = headers or {}  # path -> header data set, reused by read_series


def series_key(uid: str) -> str:
    """The public name of a series: the first 12 hex digits of SHA-256 of its Series Instance UID."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


def _files(folder_or_files: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool) -> tuple[str, list[Path]]:
    """``(display path, files)`` for a folder (all files under it), one file, or a list of files."""
    if isinstance(folder_or_files, (str, os.PathLike)):
        root = user_path(folder_or_files)
        if root.is_file():
            return os.fspath(root), [root]
        if not root.is_dir():
            raise MissingFileError(f"{root}: no such folder")
        walk = root.rglob("*") if recursive else root.iterdir()
        return os.fspath(root), sorted(p for p in walk if p.is_file())
    files = [user_path(p) for p in folder_or_files]
    if not files:
        raise SeriesError("an empty list of files was given; pass a folder or DICOM file paths")
    display = os.path.commonpath([os.path.abspath(p) for p in files]) if len(files) > 1 else os.fspath(files[0])
    return display, files


def _scan(files: Sequence[Path], defer_pixels: bool = False) -> SeriesList:
    """Group image files by Series Instance UID from their headers; everything else goes to ``skipped``.

    ``defer_pixels``: keep each file's pixel data position so it can be decoded without parsing the
    file again (pydicom's deferred read); otherwise stop before the pixels.
    """
    groups: dict[str, list[tuple[str, Dataset]]] = {}
    skipped: list[tuple[str, str]] = []
    for p in files:
        try:
            ds = open_dicom(p, stop_before_pixels=not defer_pixels, defer_pixels=defer_pixels)
        except DomainError as err:
            skipped.append((os.fspath(p), str(err)))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            sop = ds.get("SOPClassUID")
            what = getattr(sop, "name", "") or "object without a SOP class"
            skipped.append((os.fspath(p), f"{p.name}: not an image ({what})"))
            continue
        with quiet_values():  # a malformed UID must not be quoted in pydicom's warning / log line
            uid = str(ds.get("SeriesInstanceUID") or "")
        groups.setdefault(uid, []).append((os.fspath(p), ds))
    found = []
    for uid, members in groups.items():
        size, _ = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in members).most_common(1)[0]
        first = members[0][1]
        sop = first.get("SOPClassUID")
        found.append(
            SeriesInfo(
                key=series_key(uid),
                modality=str(first.get("Modality") or ""),
                n_files=len(members),
                rows=size[0],
                columns=size[1],
                paths=tuple(sorted(path for path, _ in members)),
                n_images=sum(n_frames(ds) for _, ds in members),
                sop_class=getattr(sop, "name", "") if sop else "",
            )
        )
    found.sort(key=lambda s: (-s.n_images, s.key))
    return SeriesList(found, skipped, {path: ds for members in groups.values() for path, ds in members})


def find_series(folder: str | os.PathLike, recursive: bool = True) -> SeriesList:
    """The image series under ``folder``, largest first, reading headers only (``stop_before_pixels``).

    Files that are not DICOM images (other formats, damaged files, reports, DICOMDIR indexes, ...) never
    stop the scan: they are listed in the returned list's ``skipped`` as ``(path, reason)``.
    """
    _, files = _files(folder, recursive)
    return _scan(files)


def _choose(found: SeriesList, series: SeriesInfo | str | int | None, where: str) -> SeriesInfo:
    if isinstance(series, SeriesInfo):
        series = series.key
    if not found:
        reasons = Counter(reason.split(": ", 1)[-1][:80] for _, reason in found.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
        raise SeriesError(
            f"no DICOM image series in {where}"
            + (f" ({len(found.skipped)} files skipped: {summary})" if found.skipped else " (no files)")
        )
    keys = [s.key for s in found]
    if series is None:
        if len(found) > 1:
            others = ", ".join(f"{s.key} ({s.modality}, {s.n_images} images)" for s in found[1:])
            warnings.warn(
                f"{where} holds {len(found)} series; reading the largest, {found[0].key} ({found[0].modality}, "
                f"{found[0].n_images} images). The others: {others}. Pick one with series=<key>.",
                DomainWarning,
                stacklevel=3,
            )
        return found[0]
    if isinstance(series, int) and not isinstance(series, bool):
        if -len(found) <= series < len(found):
            return found[series]
        raise SeriesError(
            f"series index {series} does not exist: {where} holds {len(found)} series ({', '.join(keys)})"
        )
    for s in found:
        if s.key == series:
            return s
    raise SeriesError(f"no series with key {series!r} in {where}; the series there are: {', '.join(keys)}")


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _orientation(value: Any) -> np.ndarray | None:
    """Image Orientation (Patient) as 6 floats, or None unless it holds two unit, orthogonal direction cosines."""
    iop = _floats(value, 6)
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    ok = abs(np.linalg.norm(r) - 1) < 0.05 and abs(np.linalg.norm(c) - 1) < 0.05 and abs(np.dot(r, c)) < 0.05
    return iop if ok else None  # e.g. all zeros from a broken exporter: no slice normal to sort along


def slice_order(views: Sequence[Dataset], where: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``(order, geometry)``: the slice order and the volume geometry from each slice's plane attributes.

    geometry: ``sort`` (how the order was found), ``positions`` (mm along the normal, in order, or None),
    ``orientation`` (6 direction cosines) and ``normal``, ``dz`` (median slice distance, mm), ``origin``
    and ``step`` (Image Position of the first slice, and the mean position step per slice; for the
    affine). Warns (DomainWarning) on mixed orientations, duplicate positions and uneven spacing.
    """
    n = len(views)
    iops = [_orientation(v.get("ImageOrientationPatient") or []) for v in views]
    ipps = [_floats(v.get("ImagePositionPatient") or [], 3) for v in views]
    geo: dict[str, Any] = {
        "positions": None,
        "orientation": None,
        "normal": None,
        "dz": None,
        "origin": None,
        "step": None,
    }
    if all(o is not None for o in iops) and all(p is not None for p in ipps):
        rounded = Counter(tuple(np.round(o, 4)) for o in iops)
        majority = rounded.most_common(1)[0][0]
        ref = next(o for o in iops if tuple(np.round(o, 4)) == majority)
        if len(rounded) > 1:
            odd = n - rounded.most_common(1)[0][1]
            warnings.warn(
                f"{where}: {odd} of {n} slices have a different orientation; the volume is sorted along "
                "the majority's normal and is not a regular grid",
                DomainWarning,
                stacklevel=3,
            )
        normal = np.cross(ref[:3], ref[3:])
        normal /= np.linalg.norm(normal) or 1.0
        dist = np.asarray([float(np.dot(p, normal)) for p in ipps])
        order = np.argsort(dist, kind="stable")
        d = dist[order]
        steps = np.diff(d)
        tol = 1e-3  # mm
        dup = int(np.sum(steps < tol))
        if dup:
            warnings.warn(
                f"{where}: {dup} slices share a position with another slice (repeated acquisitions or "
                "several echoes/phases in one series?); all are kept",
                DomainWarning,
                stacklevel=3,
            )
        real = steps[steps >= tol]
        dz = float(np.median(real)) if real.size else None
        if dz is not None and real.size > 1 and float(np.max(np.abs(real - dz))) > 0.01 * dz + tol:
            msg = (
                f"{where}: uneven slice spacing ({real.min():.3g} to {real.max():.3g} mm, median {dz:.3g} mm); "
                "meta['slice_positions'] has each slice's position"
            )
            warnings.warn(msg, DomainWarning, stacklevel=3)
        first, last = ipps[order[0]], ipps[order[-1]]
        geo.update(
            sort="position along the slice normal (ImagePositionPatient . normal)",
            positions=d.tolist(),
            orientation=ref.tolist(),
            normal=normal.tolist(),
            dz=dz,
            origin=first.tolist(),
            step=((last - first) / (n - 1)).tolist() if n > 1 else None,
        )
        return order, geo
    numbers = []
    for i, v in enumerate(views):
        try:
            numbers.append((float(v.InstanceNumber), i))
        except (AttributeError, TypeError, ValueError):
            numbers.append((float("inf"), i))
    have = sum(np.isfinite(k) for k, _ in numbers)
    order = np.asarray([i for _, i in sorted(numbers)])
    how = "InstanceNumber" if have == n else "InstanceNumber, then file name" if have else "file name"
    geo["sort"] = (
        f"{how} (ImagePositionPatient/ImageOrientationPatient missing or invalid, so the order is not verified)"
    )
    warnings.warn(
        f"{where}: slices have no position/orientation (or an invalid one); ordered by {how}, spacing from the "
        "SpacingBetweenSlices/SliceThickness tags",
        DomainWarning,
        stacklevel=3,
    )
    return order, geo


def _affine(geo: dict[str, Any], dy: float | None, dx: float | None, dz: float | None) -> list[list[float]] | None:
    """4x4 matrix taking voxel (i column, j row, k slice, 1) to patient LPS mm (PS3.3 C.7.6.2.1.1)."""
    if geo["orientation"] is None or dy is None or dx is None:
        return None
    r, c = np.asarray(geo["orientation"][:3]), np.asarray(geo["orientation"][3:])
    step = np.asarray(geo["step"]) if geo["step"] is not None else np.asarray(geo["normal"]) * (dz or 0.0)
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2], a[:3, 3] = r * dx, c * dy, step, geo["origin"]
    return a.tolist()


def read_series(
    folder_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    series: SeriesInfo | str | int | None = None,
    window: WindowSpec = None,
    modality_lut: bool = True,
    invert_monochrome1: bool = True,
    recursive: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one series as a volume sorted along the slice normal.

    Returns float32 ``[D, H, W]`` for one channel (grey, the default ``window=None`` gives modality values:
    HU for CT) or ``[D, C, H, W]`` for 3 windows / colour, and meta.

    ``series``: a :class:`SeriesInfo` (or its key) or an index into :func:`find_series`'s list; default the largest
    series (a DomainWarning lists the other series' keys). ``window``, ``modality_lut``,
    ``invert_monochrome1``: as :func:`~domains.dicom.read_dicom` (each slice gets its own rescale and
    file window; the percentile fallback of ``"auto"`` is over the whole volume).

    Slices of a size other than the most common one are dropped (DomainWarning with the count, and
    ``meta["dropped"]``); mixed orientations, duplicate positions and uneven spacing warn too.

    meta: the common keys (``format``, ``path``, ``shape``, ``value_range``, ``units``, ``channels``,
    ``window``, ``inverted``, ``photometric``), plus ``series`` (key), ``n_slices``, ``spacing``
    ((dz, dy, dx) mm; dz from positions, else the SpacingBetweenSlices/SliceThickness tag, else None),
    ``orientation`` (6 direction cosines), ``normal``, ``slice_positions`` (mm along the normal),
    ``affine`` (voxel (i, j, k) -> patient LPS mm), ``sort``, ``files`` (in slice order), ``dropped``,
    ``skipped`` ((path, reason) of non-image files), ``other_series`` (keys) and ``dicom`` (the first
    slice's whitelisted technical attributes).
    """
    spec = parse_window(window)  # option errors before any IO
    where, files = _files(folder_or_files, recursive)
    found = _scan(files, defer_pixels=True)
    info = _choose(found, series, where)

    datasets = [(path, found._headers[path]) for path in info.paths]  # [(path, header Dataset)]
    size_counts = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in datasets)
    (rows, cols), _ = size_counts.most_common(1)[0]
    dropped = sum(n for s, n in size_counts.items() if s != (rows, cols))
    if dropped:
        others = ", ".join(f"{n} of {r}x{c}" for (r, c), n in size_counts.items() if (r, c) != (rows, cols))
        warnings.warn(
            f"{where}: series {info.key} mixes image sizes; kept the {size_counts[(rows, cols)]} slices of "
            f"{rows}x{cols}, dropped {dropped} ({others})",
            DomainWarning,
            stacklevel=2,
        )
        datasets = [(p, ds) for p, ds in datasets if (int(ds.Rows), int(ds.Columns)) == (rows, cols)]

    modalities = Counter(str(ds.get("Modality") or "unknown") for _, ds in datasets)
    if len(modalities) > 1:
        warnings.warn(
            f"{where}: series {info.key} mixes modalities ({', '.join(f'{n} {m}' for m, n in modalities.items())}); "
            "their values are not on one scale, so check the files or pick them with a list of paths",
            DomainWarning,
            stacklevel=2,
        )

    slices = [(i, f, frame_view(ds, f)) for i, (_, ds) in enumerate(datasets) for f in range(n_frames(ds))]
    order, geo = slice_order([v for _, _, v in slices], where)
    slices = [slices[k] for k in order]
    D = len(slices)

    # Read and decode the files in slice order, keeping only the last one (a multi-frame file gives many slices).
    decoded: dict[int, tuple[np.ndarray, str]] = {}
    expect_grey: bool | None = None  # set from the first slice: every file must be grey, or every file colour

    def stored_frame(i: int, f: int) -> tuple[np.ndarray, str]:
        if i not in decoded:
            decoded.clear()
            path = datasets[i][0]
            decoded[i] = decode(datasets[i][1], Path(path).name)  # [F, H, W(, S)]; a deferred read of the pixels
        arr, pi = decoded[i]
        grey_file = pi in ("MONOCHROME1", "MONOCHROME2")
        if (
            arr.shape[1:3] != (rows, cols)
            or grey_file != (arr.ndim == 3)  # photometric and samples per pixel disagree
            or (expect_grey is not None and grey_file != expect_grey)  # grey and colour files in one series
        ):
            raise SeriesError(
                f"{Path(datasets[i][0]).name} does not match the rest of series {info.key} "
                f"({pi}, {arr.shape[1]}x{arr.shape[2]} after decoding); remove it or pick the files to read"
            )
        return arr[f], pi

    first_ds = datasets[slices[0][0]][1]
    _, photometric = stored_frame(slices[0][0], slices[0][1])
    grey = expect_grey = photometric in ("MONOCHROME1", "MONOCHROME2")
    if grey:
        values = np.empty((D, rows, cols), dtype=np.float32)  # [D, H, W] modality values
        units = "stored"
        for k, (i, f, view) in enumerate(slices):
            stored, _ = stored_frame(i, f)
            values[k], units = modality_values(stored, view, modality_lut)
        warn_if_not_hu(spec, units, where, slices[0][2], stacklevel=2)
        vol, frag = render_grey(
            values, [v for _, _, v in slices], spec, first_ds, photometric == "MONOCHROME1", invert_monochrome1
        )  # [D, C, H, W]
        frag["units"] = units if spec is None else "display"
        if vol.shape[1] == 1:
            vol = vol[:, 0]  # [D, H, W]
    else:
        if isinstance(spec, list):
            raise WindowError(
                f"series {info.key} is colour ({photometric}); VOI windows apply to grayscale only "
                "(PS3.3 C.11.2): use window='auto' or None"
            )
        vol = np.empty((D, 3, rows, cols), dtype=np.float32)  # [D, 3, H, W]
        for k, (i, f, _) in enumerate(slices):
            stored, pi = stored_frame(i, f)
            vol[k] = render_colour(stored[None], pi, datasets[i][1], Path(datasets[i][0]).name)[0]
        frag = {
            "value_range": (0.0, 1.0),
            "channels": ["R", "G", "B"],
            "window": None,
            "inverted": False,
            "units": "display",
        }

    view0 = slices[0][2]
    ps = view0.get("PixelSpacing")
    dy, dx = (float(ps[0]), float(ps[1])) if ps else (None, None)
    dz = geo["dz"]
    if dz is None:
        tag = view0.get("SpacingBetweenSlices") or view0.get("SliceThickness")
        dz = float(tag) if tag else None
    dicom = safe_meta(first_ds)
    dicom.update({k: v for k, v in safe_meta(view0).items() if k not in ("TransferSyntax", "SOPClass")})
    meta: dict[str, Any] = {
        "format": "dicom",
        "path": where,
        "shape": tuple(vol.shape),
        "units": frag.pop("units"),
        **frag,
        "photometric": str(first_ds.get("PhotometricInterpretation") or photometric),
        "series": info.key,
        "n_slices": D,
        "spacing": (dz, dy, dx),
        "orientation": geo["orientation"],
        "normal": geo["normal"],
        "slice_positions": geo["positions"],
        "affine": _affine(geo, dy, dx, dz),
        "sort": geo["sort"],
        "files": [datasets[i][0] for i, _, _ in slices],
        "dropped": dropped,
        "skipped": found.skipped,
        "other_series": [s.key for s in found if s.key != info.key],
        "dicom": dicom,
    }
    return vol, meta
