"""Tiling a scene into overlapping windows, and mosaicking tile outputs back into one grid.

Tiles are aligned to ``align`` pixels (16 = the ViT patch size), so a tile's patch grid lines up
with the scene's patch grid and outputs at patch resolution (scale 16) mosaic without resampling.
Memory stays bounded: :func:`iter_tiles` holds one tile at a time and :class:`Mosaic` holds only
the output grid (optionally as a memory-mapped file).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeoreferenceError, NoValidPixelsError, OptionValueError
from .sniff import user_path

EDGES = ("shift", "pad", "drop")
BLENDS = ("linear", "cosine", "mean")


@dataclass(frozen=True)
class Tile:
    """One window of a scene, in pixels of the scene: rows ``[y0, y0 + height)``, cols ``[x0, x0 + width)``.

    A tile may reach beyond the scene (edge ``pad``): those pixels are filled and invalid.
    """

    index: int
    row: int
    col: int
    y0: int
    x0: int
    height: int
    width: int

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(col_off, row_off, width, height)``, as rasterio's Window takes it."""
        return (self.x0, self.y0, self.width, self.height)


def _offsets(size: int, tile: int, stride: int, edge: str, align: int) -> list[int]:
    if size <= tile:
        return [] if edge == "drop" and size < tile else [0]
    offs = list(range(0, size - tile + 1, stride))
    last_end = offs[-1] + tile
    if last_end < size:
        if edge == "pad":
            offs.append(offs[-1] + stride)
        elif edge == "shift":
            # Move the last tile back to the smallest aligned offset that still covers the edge.
            offs.append(min(offs[-1] + stride, math.ceil((size - tile) / align) * align))
    return offs


def tile_grid(
    height: int, width: int, tile: int | tuple[int, int] = 512, overlap: int = 64, *, edge: str = "shift",
    align: int = 16,
) -> list[Tile]:
    """The tiles covering a ``height x width`` scene, row by row.

    ``tile`` and ``overlap`` are in pixels and multiples of ``align``; the stride is ``tile - overlap``.
    ``edge``: ``shift`` (default) moves the last row/column of tiles back inside the scene (more
    overlap there; at most ``align - 1`` padded pixels when the size is not a multiple of ``align``),
    ``pad`` keeps the stride and pads the last tiles beyond the edge, ``drop`` skips partial tiles.
    A scene smaller than one tile gives one padded tile (none with ``drop``).
    """
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    if edge not in EDGES:
        raise OptionValueError(f"edge must be one of {EDGES}, got {edge!r}")
    for name, v in (("tile height", th), ("tile width", tw), ("overlap", overlap)):
        if v % align:
            raise OptionValueError(
                f"{name} {v} is not a multiple of {align} (the patch size); use e.g. {max(align, v - v % align)}"
            )
    if overlap < 0 or overlap >= min(th, tw):
        raise OptionValueError(f"overlap must be in [0, tile) pixels, got {overlap} for a {th} x {tw} tile")
    if height <= 0 or width <= 0:
        raise OptionValueError(f"scene size must be positive, got {height} x {width}")
    ys = _offsets(height, th, th - overlap, edge, align)
    xs = _offsets(width, tw, tw - overlap, edge, align)
    return [
        Tile(index=i * len(xs) + j, row=i, col=j, y0=y, x0=x, height=th, width=tw)
        for i, y in enumerate(ys)
        for j, x in enumerate(xs)
    ]


def iter_tiles(
    path: str | os.PathLike,
    tile: int | tuple[int, int] = 512,
    overlap: int = 64,
    *,
    edge: str = "shift",
    align: int = 16,
    min_valid: float = 0.0,
    bands=None,
    stretch="auto",
    stats=None,
    progress: bool = False,
    gdal_cache_mb: int | None = 256,
    **read_options: Any,
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield ``(float32 [C, th, tw], meta)`` for each tile of a raster, one window read at a time.

    Tiles whose fraction of valid pixels is below ``min_valid`` (e.g. 0.5: mostly nodata) are
    skipped. One stretch is used for the whole scene: ``stats`` (a BandStats or its JSON path) when
    given; otherwise with ``stretch="auto"`` integer data other than uint8 gets the scene's own
    percentile stats, computed once from a decimated read. ``meta`` is :func:`read_geotiff`'s for
    the window, plus ``tile`` (:class:`Tile`) and ``valid_fraction``. ``gdal_cache_mb`` caps GDAL's
    block cache while tiling (GDAL's default is 5 % of RAM, which would hold most of a big scene).
    """
    import rasterio

    from .geotiff import open_raster, read_geotiff
    from .stats import BandStats, compute_band_stats

    env = rasterio.Env(GDAL_CACHEMAX=int(gdal_cache_mb) * 2**20) if gdal_cache_mb else rasterio.Env()  # bytes
    with env, open_raster(path) as src:
        if stats is None and stretch in ("auto", "percentile"):
            dtype = np.dtype(src.dtypes[0])
            tagged = any(s != 1.0 or o != 0.0 for s, o in zip(src.scales, src.offsets))
            if stretch == "percentile" or dtype != np.uint8 or tagged:
                # the scene's own stats, computed the way the tiles are read (same percentiles and tags)
                kw = {k: read_options[k] for k in ("apply_scale_offset",) if k in read_options}
                if "percentiles" in read_options:
                    kw["percentiles"] = read_options.pop("percentiles")
                try:
                    stats = compute_band_stats(path, bands=bands, **kw)
                except NoValidPixelsError:
                    return
                stretch = "auto"
        elif stats is not None and not isinstance(stats, BandStats):
            stats = BandStats.load(stats)
        tiles = tile_grid(src.height, src.width, tile, overlap, edge=edge, align=align)
        it = tiles
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(tiles, desc=f"tiles of {Path(str(path)).name}", unit="tile")
        for t in it:
            arr, meta = read_geotiff(
                path, bands=bands, window=t.window, stretch=stretch, stats=stats, src=src, **read_options
            )
            frac = float(meta["valid"].mean())
            if frac < min_valid or frac == 0.0:
                continue
            meta["tile"] = t
            meta["valid_fraction"] = frac
            yield arr, meta


FORMATS = ("png", "tif")


def write_tiles(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile: int | tuple[int, int],
    *,
    overlap: int = 0,
    bands="rgb",
    stretch: str | None = None,
    stats=None,
    fmt: str = "png",
    min_valid: float = 0.0,
    edge: str = "shift",
    align: int = 16,
    labels: np.ndarray | None = None,
    labels_dir: str | os.PathLike | None = None,
    progress: bool = False,
    **read_options: Any,
) -> list[Path]:
    """Cut a raster into tile files in ``out_dir`` -> their paths, in :func:`iter_tiles` order.

    Tiling is :func:`iter_tiles`'s (``tile``, ``overlap``, ``edge``, ``align``, ``min_valid``,
    ``bands``, ``stats`` and the read options mean the same; one scene-wide stretch). Files are named
    ``{scene stem}_{y0:05d}_{x0:05d}.{fmt}`` (the tile's top-left pixel in the scene).

    ``fmt="png"``: 8-bit display images of 1 (grey) or 3 (RGB) bands, values in [0, 1] (clipped)
    times 255; nodata pixels are black. ``stretch`` defaults to ``"auto"`` (uint8 / 255, other types
    the scene's 2-98 % percentiles) or the saved ``stats``. ``fmt="tif"``: float32 GeoTIFFs of any
    number of bands written with :func:`~domains.geowrite.write_geotiff` (``like=`` the tile's read:
    the CRS and the tile's own transform, so each tile sits on the scene in a GIS), band names kept,
    nodata pixels NaN (read back as invalid). ``stretch`` defaults to ``"none"`` (values as stored,
    after scale/offset tags: stretch them when reading, e.g. with the same saved band statistics
    everywhere), or to ``stats`` when given.

    ``labels``: an integer (or bool) array [H, W] on the scene's pixel grid, e.g. class ids; the crop
    of each written tile goes to ``labels_dir`` as a PNG with the tile's stem (uint8; uint16 when an
    id is above 255). Pixels of the crop outside the scene or nodata in the scene get 255 (65535 for
    uint16): the "unlabelled" value the heads and the monitor ignore (so 255 is not a class).
    """
    from .geotiff import raster_info
    from .geowrite import write_geotiff

    if fmt not in FORMATS:
        raise OptionValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if stretch is None:
        stretch = "auto" if fmt == "png" or stats is not None else "none"
    lab, ignore = None, None
    if labels is not None:
        if labels_dir is None:
            raise OptionValueError("labels= needs labels_dir= (the folder of the label crops)")
        lab = np.asarray(labels)
        shape = tuple(raster_info(path)["shape"][1:])
        if lab.shape != shape:
            raise GeoreferenceError(
                f"labels have shape {lab.shape}, but {Path(str(path)).name} is {shape[0]} x {shape[1]} px: "
                "labels must be [H, W] on the scene's pixel grid"
            )
        if lab.dtype == bool:
            lab = lab.astype(np.uint8)
        if lab.dtype.kind not in "ui":
            raise OptionValueError(f"labels must be integers (class ids) or bool, got {lab.dtype}")
        top = int(lab.max()) if lab.size else 0
        if lab.size and int(lab.min()) < 0:
            raise OptionValueError(f"labels must be >= 0 (class ids), got a minimum of {int(lab.min())}")
        if top > 65535:
            raise OptionValueError(f"labels up to 65535 fit a PNG, got a maximum of {top}")
        dtype = np.uint8 if top <= 255 else np.uint16
        ignore = 255 if dtype == np.uint8 else 65535
        lab = lab.astype(dtype, copy=False)
    out = user_path(out_dir)
    ldir = None if labels_dir is None else user_path(labels_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lab is not None:
        ldir.mkdir(parents=True, exist_ok=True)
    stem = Path(str(path)).stem
    written: list[Path] = []
    for x, m in iter_tiles(path, tile, overlap, edge=edge, align=align, min_valid=min_valid, bands=bands,
                           stretch=stretch, stats=stats, progress=progress, **read_options):  # fmt: skip
        t: Tile = m["tile"]
        name = f"{stem}_{t.y0:05d}_{t.x0:05d}"
        valid = m["valid"]  # bool [th, tw]
        if fmt == "png":
            if x.shape[0] not in (1, 3):
                raise OptionValueError(
                    f"fmt='png' writes 1 (grey) or 3 (RGB) bands, got {x.shape[0]} ({m['channels']}); "
                    "pick bands= (e.g. 'rgb') or write fmt='tif'"
                )
            img = (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # [C, th, tw]
            p = _save_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), out / f"{name}.png")
        else:
            if not valid.all():
                x = x.copy()
                x[:, ~valid] = np.nan  # nodata stays nodata in the tile file
            p = write_geotiff(out / f"{name}.tif", x, like=m, kind="float", band_names=m["channels"])
        if lab is not None:
            crop = np.full((t.height, t.width), ignore, lab.dtype)  # tiles may reach beyond the scene
            H, W = lab.shape
            y1, x1 = min(t.y0 + t.height, H), min(t.x0 + t.width, W)
            crop[: y1 - t.y0, : x1 - t.x0] = lab[t.y0 : y1, t.x0 : x1]
            crop[~valid] = ignore
            _save_png(crop, ldir / f"{name}.png")
        written.append(p)
    return written


def _save_png(a: np.ndarray, path: Path) -> Path:
    """uint8 [H, W] / [H, W, 3] or uint16 [H, W] -> a lossless PNG (domains does not import dinoapp's writers)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(path, format="PNG")  # uint16 [H, W] -> 16-bit grey
    return path


def _ramp(n: int, ramp: int, blend: str) -> np.ndarray:
    """1-D weights, rising over ``ramp`` samples at both ends; always > 0."""
    if blend == "mean" or ramp <= 0:
        return np.ones(n, np.float32)
    d = np.minimum(np.arange(n), np.arange(n)[::-1]).astype(np.float32) + 0.5  # distance to the nearest end
    w = np.clip(d / ramp, 0.0, 1.0)
    if blend == "cosine":
        w = 0.5 - 0.5 * np.cos(np.pi * w)
    return np.maximum(w, 1e-3).astype(np.float32)


class Mosaic:
    """Accumulate tile outputs into one ``[C, H_out, W_out]`` grid with overlap blending.

    ``height``/``width`` are the scene's size in input pixels; ``scale`` the output's pixel size in
    input pixels (1: full resolution, 16: one value per ViT patch), so the output grid is
    ``ceil(H / scale) x ceil(W / scale)``. ``blend``: ``linear`` (default; weights ramp up over
    ``overlap`` pixels from each tile edge, which hides seams), ``cosine``, or ``mean``. Pixels no
    tile covered get ``fill`` and weight 0 (see :meth:`coverage`). ``memmap_dir``: keep the
    accumulators in files there instead of RAM, for outputs larger than memory.
    """

    def __init__(
        self, height: int, width: int, channels: int, *, scale: int = 1, overlap: int = 0, blend: str = "linear",
        memmap_dir: str | os.PathLike | None = None,
    ) -> None:
        if blend not in BLENDS:
            raise OptionValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if int(scale) < 1 or int(height) < 1 or int(width) < 1 or int(channels) < 1:
            raise GeoreferenceError(
                f"a mosaic needs a positive size, channel count and scale, got {height} x {width} px, "
                f"{channels} channels, scale {scale}"
            )
        self.height, self.width, self.channels, self.scale = int(height), int(width), int(channels), int(scale)
        self.out_h, self.out_w = math.ceil(self.height / self.scale), math.ceil(self.width / self.scale)
        self.blend, self.ramp = blend, max(0, int(overlap) // self.scale)
        shape = (self.channels, self.out_h, self.out_w)
        if memmap_dir is not None:
            d = Path(tempfile.mkdtemp(prefix="mosaic-", dir=memmap_dir))
            self._sum = np.lib.format.open_memmap(d / "sum.npy", mode="w+", dtype=np.float32, shape=shape)
            self._w = np.lib.format.open_memmap(d / "weight.npy", mode="w+", dtype=np.float32, shape=shape[1:])
        else:
            self._sum = np.zeros(shape, np.float32)
            self._w = np.zeros(shape[1:], np.float32)
        self._finished = False

    def add(self, tile: Tile, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one tile's output ``[C, tile.height / scale, tile.width / scale]`` (``valid``: bool of that size)."""
        s = self.scale
        if self._finished:
            raise RuntimeError("this mosaic was finished by result(in_place=True); start a new Mosaic")
        if tile.y0 % s or tile.x0 % s or tile.height % s or tile.width % s:
            raise GeoreferenceError(
                f"tile at ({tile.y0}, {tile.x0}) of {tile.height} x {tile.width} px is not on the x{s} output grid; "
                f"tile with align={s}"
            )
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 2:
            values = values[None]
        th, tw = tile.height // s, tile.width // s
        if values.shape != (self.channels, th, tw):
            raise GeoreferenceError(
                f"tile output has shape {values.shape}, expected {(self.channels, th, tw)} "
                f"({self.channels} channels at 1/{s} of a {tile.height} x {tile.width} tile)"
            )
        w = _ramp(th, self.ramp, self.blend)[:, None] * _ramp(tw, self.ramp, self.blend)[None, :]  # [th, tw]
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != (th, tw):
                raise GeoreferenceError(f"valid mask has shape {valid.shape}, expected {(th, tw)}")
            w = w * valid
        y0, x0 = tile.y0 // s, tile.x0 // s
        # the part of the tile inside the output grid (a tile may reach beyond any edge)
        ty, tx = max(0, -y0), max(0, -x0)
        y1, x1 = min(y0 + th, self.out_h), min(x0 + tw, self.out_w)
        y0, x0 = max(y0, 0), max(x0, 0)
        if y1 <= y0 or x1 <= x0:
            return
        w = w[ty : ty + y1 - y0, tx : tx + x1 - x0]
        self._sum[:, y0:y1, x0:x1] += values[:, ty : ty + y1 - y0, tx : tx + x1 - x0] * w
        self._w[y0:y1, x0:x1] += w

    def coverage(self) -> np.ndarray:
        """bool [H_out, W_out]: pixels that received a (valid) tile value."""
        return np.asarray(self._w) > 0

    def result(self, fill: float = 0.0, *, in_place: bool = False) -> np.ndarray:
        """The blended ``float32 [C, H_out, W_out]``; uncovered pixels are ``fill``.

        ``in_place=True`` blends into the accumulator itself, a block of rows at a time, and returns it:
        no second full-size array, and with ``memmap_dir`` the result stays in its file (never all in RAM).
        The mosaic is then finished: :meth:`add` is refused, :meth:`coverage` still works.
        """
        w = np.asarray(self._w)
        if self._finished:
            return self._sum
        if not in_place:
            return np.divide(self._sum, w, out=np.full(self._sum.shape, fill, np.float32), where=w > 0)
        step = max(1, 2**22 // max(1, self.channels * self.out_w))  # rows per block: ~16 MB of float32
        for r in range(0, self.out_h, step):
            blk, ww = self._sum[:, r : r + step], w[r : r + step]  # views: [C, rows, W_out], [rows, W_out]
            np.divide(blk, ww, out=blk, where=ww > 0)
            blk[:, ww <= 0] = fill
        self._finished = True
        return self._sum
