"""Per-band percentile statistics over valid pixels, for one scene or a folder, saved as JSON.

Compute once on the training scenes, save next to the run, and pass the same :class:`BandStats`
to every read at training and inference time, so a pixel value means the same input everywhere
(a per-scene stretch would map the same reflectance to different inputs in different scenes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BandSelectionError, NoValidPixelsError, UnreadableFileError
from .sniff import user_path

RASTER_EXTENSIONS = (".tif", ".tiff", ".gtiff", ".jp2", ".vrt", ".img")


@dataclass
class BandStats:
    """Per-band stretch ``(x - low) / (high - low)`` clipped to [0, 1], plus summary numbers.

    ``low``/``high`` are the ``percentiles`` of the valid pixels in physical units (after the files'
    scale/offset tags); ``mean``/``std`` are of the raw values, ``stretched_mean``/``stretched_std``
    of the stretched ones (usable as a backbone's per-channel normalisation for N-band inputs).
    """

    bands: list[str]
    band_indexes: list[int]
    low: list[float]
    high: list[float]
    percentiles: tuple[float, float] = (2.0, 98.0)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    stretched_mean: list[float] = field(default_factory=list)
    stretched_std: list[float] = field(default_factory=list)
    count: int = 0
    sources: list[str] = field(default_factory=list)
    version: int = 1

    def stretch(self, arr: np.ndarray) -> np.ndarray:
        """float32 [C, H, W] physical values -> [0, 1], in place when ``arr`` is float32."""
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape[0] != len(self.low):
            raise BandSelectionError(f"array has {arr.shape[0]} bands, these stats describe {len(self.low)}")
        lo = np.asarray(self.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.high, np.float32) - np.asarray(self.low, np.float32), np.float32(1e-12))
        arr -= lo
        arr /= span[:, None, None]
        return np.clip(arr, 0.0, 1.0, out=arr)

    def check_bands(self, names: Sequence[str], indexes: Sequence[int], source: str = "") -> None:
        """Raise :class:`BandSelectionError` when a read's bands differ from the ones these stats describe.

        Bands are compared by name (description, colour interpretation, or ``band<i>`` for unnamed
        bands), not by number: a scene that stores the same bands in another order matches when they
        are selected by name (e.g. ``bands=stats.bands`` or ``bands="rgb"``).
        """
        if [n.lower() for n in names] != [b.lower() for b in self.bands]:
            raise BandSelectionError(
                f"{source}: the stats describe bands {self.bands} (numbers {self.band_indexes}) but the read selects "
                f"{list(names)} (numbers {list(indexes)}); select the same bands (e.g. bands={self.bands!r}) "
                "or recompute the stats"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BandStats:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown or "low" not in d or "high" not in d:
            raise ValueError(f"not a band-statistics record (unknown keys {sorted(unknown)} or no low/high)")
        d = dict(d)
        d["percentiles"] = tuple(d.get("percentiles", (2.0, 98.0)))
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        p = user_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> BandStats:
        p = user_path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError as err:
            from .errors import MissingFileError

            raise MissingFileError(f"{p}: no such band-statistics file") from err
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise UnreadableFileError(
                f"{p.name}: not a band-statistics JSON written by BandStats.save ({err})"
            ) from err


def find_rasters(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Raster files (by extension) under ``folder``, sorted; hidden files skipped."""
    root = user_path(folder)
    it = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        p for p in it if p.is_file() and p.suffix.lower() in RASTER_EXTENSIONS and not p.name.startswith(".")
    )


SAMPLE_WINDOW = 512


def _sample_reads(src, f: Path, idx: list[int], budget: int, apply_scale_offset: bool, read_geotiff):
    """Bounded-memory pixel samples of one raster: the whole raster when small, a decimated read when
    the file has overviews, otherwise random ``SAMPLE_WINDOW``-pixel windows (aligned to the file's
    blocks, so no block is decoded twice) totalling about ``budget`` pixels, at least 16 of them."""
    H, W = src.height, src.width
    opts = {"bands": idx, "stretch": "none", "apply_scale_offset": apply_scale_offset, "src": src}
    if budget >= H * W:
        arr, meta = read_geotiff(f, **opts)
        yield arr, meta["valid"]
        return
    if src.overviews(idx[0]) or 4 * budget >= H * W:
        factor = float(np.sqrt(H * W / budget))
        out_shape = (max(1, round(H / factor)), max(1, round(W / factor)))
        arr, meta = read_geotiff(f, out_shape=out_shape, **opts)
        yield arr, meta["valid"]
        return
    bh, bw = src.block_shapes[idx[0] - 1]
    wh = max(bh, SAMPLE_WINDOW // bh * bh) if bh < H else H
    ww = max(bw, SAMPLE_WINDOW // bw * bw) if bw < W else W
    wh, ww = min(wh, H), min(ww, W)
    rows, cols = range(0, H - wh + 1, wh), range(0, W - ww + 1, ww)
    cells = [(r, c) for r in rows for c in cols]
    n = min(len(cells), max(16, -(-budget // (wh * ww))))
    rng = np.random.default_rng(0)  # the same sample every time: stats are reproducible
    stride = max(1, int(np.ceil(np.sqrt(n * wh * ww / budget))))
    for k in sorted(rng.choice(len(cells), size=n, replace=False)):
        r, c = cells[k]
        arr, meta = read_geotiff(f, window=(c, r, ww, wh), **opts)
        yield arr[:, ::stride, ::stride], meta["valid"][::stride, ::stride]


def compute_band_stats(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    bands=None,
    percentiles: tuple[float, float] = (2.0, 98.0),
    max_pixels: int = 4_000_000,
    apply_scale_offset: bool = True,
    progress: bool = False,
) -> BandStats:
    """Per-band statistics over the valid pixels of one raster, a folder of rasters or a list of them.

    Each file contributes about ``max_pixels / n_files`` pixels: all of a small file, a decimated
    read through GDAL overviews when it has them, else random block-aligned 512-px windows (at
    least 16; the same ones on every call), so time and memory stay bounded for any scene size. Files must share the
    selected bands (same names); nodata, masks and NaN are excluded.
    """
    from .geotiff import band_names, open_raster, read_geotiff, resolve_bands

    if isinstance(sources, str | os.PathLike):
        p = Path(sources)
        files = find_rasters(p) if p.is_dir() else [p]
    else:
        files = [Path(s) for s in sources]
    if not files:
        raise NoValidPixelsError(f"no raster files ({', '.join(RASTER_EXTENSIONS)}) found in {sources}")
    budget = max(1, int(max_pixels) // len(files))
    samples: list[np.ndarray] = []
    ref_names: list[str] | None = None
    ref_idx: list[int] | None = None
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="band statistics", unit="file")
    for f in it:
        with open_raster(f) as src:
            idx = resolve_bands(src, bands)
            names = [band_names(src)[i - 1] for i in idx]
            if ref_names is None:
                ref_names, ref_idx = names, idx
            elif [n.lower() for n in names] != [n.lower() for n in ref_names]:
                raise BandSelectionError(
                    f"{f.name} has bands {names} where {files[0].name} has {ref_names}; "
                    "statistics need the same bands in every file (select them by name, e.g. "
                    f"bands={ref_names!r}, when the files store them in different orders)"
                )
            for arr, valid in _sample_reads(src, f, idx, budget, apply_scale_offset, read_geotiff):
                samples.append(arr[:, valid])  # [C, N]
    values = np.concatenate(samples, axis=1) if samples else np.zeros((0, 0), np.float32)
    if values.shape[1] == 0:
        raise NoValidPixelsError(f"every pixel of {', '.join(f.name for f in files[:5])} is nodata; no statistics")
    lo, hi = np.percentile(values, percentiles, axis=1)
    stats = BandStats(
        bands=list(ref_names or []),
        band_indexes=list(ref_idx or []),
        low=[float(v) for v in lo],
        high=[float(v) for v in hi],
        percentiles=(float(percentiles[0]), float(percentiles[1])),
        mean=[float(v) for v in values.mean(axis=1, dtype=np.float64)],
        std=[float(v) for v in values.std(axis=1, dtype=np.float64)],
        count=int(values.shape[1]),
        sources=[f.name for f in files],
    )
    stretched = stats.stretch(values[:, :, None].copy())[:, :, 0]
    stats.stretched_mean = [float(v) for v in stretched.mean(axis=1, dtype=np.float64)]
    stats.stretched_std = [float(v) for v in stretched.std(axis=1, dtype=np.float64)]
    return stats
