"""Interactive exploration of dense features: the library layer behind the Gradio app and notebooks.

One file in, pictures and a head out, each step a thin composition of the library's own parts:

1. :func:`open_image` reads a PNG/JPEG/TIFF, a GeoTIFF or a DICOM (a file, a multi-frame file or a
   series folder) with :func:`domains.load` / :func:`domains.read_series` into a :class:`LoadedImage`:
   the model input, a display RGB, JSON-ready PHI-safe metadata and, for GeoTIFFs, the georeferencing.
2. :class:`FeatureView` computes one backbone's dense features of it once (:func:`dinoapp.dense_features`,
   optionally through a :class:`dinoapp.FeatureCache`); PCA maps, click similarity and head
   predictions are then numpy on the stored patch grid [h, w, D], with no forward pass.
3. :func:`scribble_mask` turns a painted Gradio ``ImageEditor`` value into class ids, and
   :func:`fit_head_from_scribbles` trains :func:`dinoapp.heads.fit_seg_head` on them in seconds.
4. :func:`export_png` / :func:`export_geotiff` write maps losslessly, GeoTIFFs georeferenced like the input.

Geometry. Features are computed with ``policy="resize"``: the image is resized (aspect kept) so its long
side is ``resolution`` pixels rounded to whole patches, and the patch grid (h, w) covers the *whole*
image. Patch (r, c) covers original rows [r H/h, (r+1) H/h) and columns [c W/w, (c+1) W/w)
(:func:`dinoapp.viz.pixel_to_patch`), so a click maps to a patch exactly and a patch-grid map is
georeferenced by scaling the input's transform by (W/w, H/h).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import heads, viz
from .dense import dense_features
from .errors import InputError
from .extract import block_indices
from .identity import backbone_fingerprint, backbone_identity

UNLABELLED = 255  # scribble masks: pixels nobody painted

# ----------------------------------------------------------------------------------------------- reading


@dataclass
class LoadedImage:
    """One image ready for exploration.

    ``array``: float32 [C, H, W] as :func:`domains.load` returned it (for a DICOM series or multi-frame
    file: the selected slice); ``rgb``: uint8 [H, W, 3] for display (bands, stretch and window applied);
    ``meta``: JSON-serialisable, PHI-safe metadata (no server paths; DICOM: only the technical whitelist
    of :func:`domains.phi.safe_meta`); ``geo``: what :func:`domains.write_geotiff` needs as ``like=``
    (``crs``, ``transform``, ``shape`` of this read, GCPs for GCP-only rasters), for georeferenced
    GeoTIFFs only; ``valid``: bool [H, W] valid-pixel mask (nodata / alpha), when the reader gave one.
    """

    name: str
    array: np.ndarray  # float32 [C, H, W]
    meta: dict
    rgb: np.ndarray  # uint8 [H, W, 3]
    kind: str  # "image" | "geotiff" | "dicom"
    geo: dict | None
    n_slices: int = 1
    slice_index: int = 0
    valid: np.ndarray | None = None  # bool [H, W]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.array.shape[-2]), int(self.array.shape[-1])

    def mask_invalid(self, labels: Any, fill: int = UNLABELLED) -> np.ndarray:
        """A class map [H, W] of this image (a prediction, a ground-truth or scribble mask) with the
        image's nodata pixels (``valid`` False: GeoTIFF nodata, alpha) set to ``fill`` (255, unlabelled),
        so they are left out of label PNGs, pixel counts and metrics (:mod:`dinoapp.metrics` skips true
        labels of 255). A copy; the map as it is when the image has no invalid pixels."""
        lab = np.asarray(labels)
        if lab.shape != self.size:
            raise InputError(f"labels of shape {lab.shape} are not at this image's size {self.size}")
        if self.valid is None or bool(np.all(self.valid)):
            return lab
        if lab.dtype == bool or (np.issubdtype(lab.dtype, np.integer) and np.iinfo(lab.dtype).max < fill):
            lab = lab.astype(np.uint8 if fill <= 255 else np.int64)
        return np.where(np.asarray(self.valid, bool), lab, np.asarray(fill).astype(lab.dtype))

    @property
    def nbytes(self) -> int:
        """Memory held by the pixel arrays (data, display, valid mask)."""
        return int(self.array.nbytes + self.rgb.nbytes + (self.valid.nbytes if self.valid is not None else 0))


def window_presets() -> list[str]:
    """DICOM window names for a dropdown: the CT presets of :data:`domains.WINDOW_PRESETS` (HU) and
    ``"rgb3"`` (lung / mediastinum / bone as R, G, B). ``"auto"`` (the file's own window) is the default."""
    import domains

    return [*domains.WINDOW_PRESETS, "rgb3"]


def open_image(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    bands: None | str | int | Sequence[int | str] = None,
    stretch: Any = None,
    dicom_window: Any = None,
    slice_index: int | None = None,
    max_pixels: int | None = 64_000_000,
) -> LoadedImage:
    """Read an image, GeoTIFF or DICOM for exploration.

    Args:
        path: a file (kind found from its content, not its name), or a folder / list of DICOM files
            (one series; the largest when the folder holds several).
        bands: GeoTIFF only: ``None`` (all bands; ``"rgb"`` for rasters with more than 3 bands, falling
            back to bands 1, 2, 3 when no red/green/blue band can be identified), ``"rgb"``, 1-based band
            numbers or band names (see :func:`domains.read_geotiff`).
        stretch: GeoTIFFs and integer images deeper than 8 bits (16-bit PNG / plain TIFF, e.g. 12-bit data):
            ``None`` (= ``"auto"``: 8-bit data divided by 255, deeper data stretched 2-98 % per band), a
            :data:`domains.geotiff.STRETCHES` name (``"dtype"``: divide by 65535), a
            :class:`domains.BandStats`, or the path of a saved band-statistics JSON. 8-bit and float images
            that are not GeoTIFFs are never stretched.
        dicom_window: DICOM only: ``None``/``"auto"`` (the file's window, else the 0.5-99.5 % range), a
            preset of :func:`window_presets`, ``"center,width"`` (e.g. ``"40,400"``) or a (center, width) pair.
        slice_index: DICOM series / multi-frame only: the slice (frame) to show; default the middle one.
            A volume is read once and kept in a small in-process cache (1 GiB), so moving a slice slider
            costs no disk read (multi-frame files too large for it are read one frame at a time).
        max_pixels: refuse images with more than this many pixels (H x W) before reading their pixels
            (:class:`InputError` saying what to do); ``None`` = no limit.

    Options for other kinds of file are ignored (one set of widgets serves every file). Errors are the
    typed ones of :mod:`domains.errors` (damaged file: ``UnreadableFileError``, an ``OSError``; not an
    image or an undecodable DICOM codec: ``UnsupportedFormatError`` / ``MissingCodecError``, ``ValueError``s)
    and :class:`InputError`.
    """
    import domains

    if isinstance(path, (list, tuple)):
        files = [Path(p).expanduser() for p in path]
        if len(files) == 1:
            return open_image(files[0], bands=bands, stretch=stretch, dicom_window=dicom_window,
                              slice_index=slice_index, max_pixels=max_pixels)  # fmt: skip
        return _open_series(files, _dicom_window(dicom_window), slice_index, max_pixels)
    p = Path(path).expanduser()
    if p.is_dir():
        return _open_series(p, _dicom_window(dicom_window), slice_index, max_pixels)
    kind, _ = domains.reader_for(p)
    if kind == "geotiff":
        return _open_geotiff(p, bands, stretch, max_pixels)
    if kind == "dicom":
        return _open_dicom(p, _dicom_window(dicom_window), slice_index, max_pixels)
    return _open_plain(p, stretch, max_pixels)


def _open_plain(p: Path, stretch, max_pixels: int | None) -> LoadedImage:
    import domains

    _check_pixels(p.name, _image_size(p), max_pixels, "image")
    with _collect_warnings(p) as notes:  # 16-bit data stretched like a uint16 GeoTIFF (8-bit left as it is)
        arr, meta = domains.load(p, stretch="auto" if stretch is None else stretch)
    return _loaded(p.name, arr, meta, "image", notes)


def _open_geotiff(p: Path, bands, stretch, max_pixels: int | None) -> LoadedImage:
    import domains

    info = domains.raster_info(p)
    _check_pixels(p.name, tuple(info["shape"][1:]), max_pixels, "geotiff")
    opts: dict[str, Any] = {}
    if stretch is not None:
        if isinstance(stretch, (str, os.PathLike)) and str(stretch).lower().endswith(".json"):
            opts["stats"] = stretch
        else:
            opts["stretch"] = stretch
    notes: list[str] = []
    with _collect_warnings(p) as more:
        if bands is None and info["shape"][0] > 3:  # an RGB view of a multispectral raster
            try:
                arr, meta = domains.load(p, bands="rgb", **opts)  # bands are resolved before any pixel is read
            except domains.BandSelectionError:
                arr, meta = domains.load(p, bands=[1, 2, 3], **opts)
                notes.append(f"no red/green/blue bands identified among {info['channels']}: showing bands 1, 2, 3 "
                             "(choose other bands to change this)")  # fmt: skip
        else:
            arr, meta = domains.load(p, bands=bands, **opts)
    geo = None
    if meta.get("crs") or meta.get("gcps") or not getattr(meta.get("transform"), "is_identity", True):
        geo = {k: meta[k] for k in ("crs", "transform", "shape", "gcps", "gcp_crs") if meta.get(k) is not None}
        geo["path"] = p.name  # write_geotiff's provenance tag (DINOAPP_SOURCE): the name, never a server path
    return _loaded(p.name, arr, meta, "geotiff", notes + more, geo=geo)


def _open_dicom(p: Path, window: Any, slice_index: int | None, max_pixels: int | None) -> LoadedImage:
    import domains
    from domains.dicom import n_frames, open_dicom

    header = open_dicom(p, stop_before_pixels=True)
    rows, cols = header.get("Rows"), header.get("Columns")
    if rows is not None and cols is not None:
        _check_pixels(p.name, (int(rows), int(cols)), max_pixels, "dicom")
    F = n_frames(header)
    k = _slice(slice_index, F, p.name)
    channels = 3 if window == "rgb3" else int(header.get("SamplesPerPixel") or 1)
    if F == 1 or F * channels * int(rows or 0) * int(cols or 0) * 4 > _VOLUMES.max_bytes:
        # one frame (of a single-frame file, or of a file too large to hold decoded: its own display mapping)
        with _collect_warnings(p) as notes:
            arr, meta = domains.load(p, window=window, frame=k)
        return _loaded(p.name, arr, meta, "dicom", notes, n_slices=F, slice_index=k)
    # multi-frame: all frames read once (one display mapping for the whole file), then any frame is free
    vol, meta, notes = _volume(("frames", _file_key([p]), repr(window)),
                               lambda: domains.read_dicom_frames(p, window=window), p)  # fmt: skip
    meta = {**meta, "frame": k}
    return _loaded(p.name, vol[k], meta, "dicom", notes, n_slices=F, slice_index=k)


_PER_FILE = ("InstanceNumber", "ImagePositionPatient", "SliceLocation", "AcquisitionNumber")


def _open_series(src: Path | list[Path], window: Any, slice_index: int | None, max_pixels: int | None) -> LoadedImage:
    import domains

    files = sorted(q for q in src.rglob("*") if q.is_file()) if isinstance(src, Path) else src
    name = src.name if isinstance(src, Path) else _common_name(src)
    vol, meta, notes = _volume(("series", _file_key(files), repr(window)),
                               lambda: domains.read_series(src, window=window), src)  # fmt: skip
    if vol.ndim == 3:
        vol = vol[:, None]  # [D, 1, H, W]
    _check_pixels(name, tuple(vol.shape[-2:]), max_pixels, "dicom")
    D = vol.shape[0]
    k = _slice(slice_index, D, name)
    meta = {**meta, "slice": k}
    if isinstance(meta.get("dicom"), dict):  # the series' attributes come from one file: drop the per-file ones
        meta["dicom"] = {a: v for a, v in meta["dicom"].items() if a not in _PER_FILE}
    if len(meta.get("slice_positions") or ()) == D:
        meta["slice_position"] = meta["slice_positions"][k]  # mm along the slice normal
    shown = f"{name} (series {meta['series']})" if meta.get("series") else name
    return _loaded(shown, vol[k], meta, "dicom", notes, n_slices=D, slice_index=k)


def _dicom_window(w: Any) -> Any:
    """The ``window`` option for the DICOM readers: ``None``/"auto" -> "auto", "c,w" -> (c, w), else as given."""
    if w is None:
        return "auto"
    if isinstance(w, str):
        s = w.strip().lower()
        if s in ("", "auto"):
            return "auto"
        if "," in s:
            parts = [t.strip() for t in s.split(",")]
            try:
                c, width = (float(t) for t in parts)
            except ValueError:
                from domains.errors import WindowError

                raise WindowError(f"window {w!r}: give 'center,width' as two numbers (e.g. '40,400' in HU), "
                                  "or a preset name") from None  # fmt: skip
            return (c, width)
        return s
    return w


def _slice(index: int | None, n: int, name: str) -> int:
    if index is None:
        return n // 2
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise InputError(f"slice_index must be an integer, got {index!r}")
    if not -n <= index < n:
        raise InputError(f"{name} has {n} slice{'s' if n != 1 else ''} (0..{n - 1}); slice {index} does not exist")
    return int(index) % n


def _image_size(p: Path) -> tuple[int, int] | None:
    """(H, W) from an image file's header (Pillow reads no pixels here); None when Pillow cannot tell."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return int(im.height), int(im.width)
    except Image.DecompressionBombError:
        return (Image.MAX_IMAGE_PIXELS or 0) * 2 + 1, 1  # beyond Pillow's own limit: certainly huge
    except (OSError, ValueError, SyntaxError):
        return None  # the reader raises the typed error


def _check_pixels(name: str, hw: tuple[int, int] | None, max_pixels: int | None, kind: str) -> None:
    if hw is None or max_pixels is None:
        return
    rows, cols = (int(v) for v in hw)
    if rows * cols <= max_pixels:
        return
    how = {
        "geotiff": "open a part of the scene (crop it in QGIS, or gdal_translate -srcwin), a decimated copy "
        "(gdal_translate -outsize 25% 25%), or map the whole scene tile by tile with the command line "
        "(dinoapp pca / dinoapp predict) or dinoapp.scene_features / segment_scene",
        "dicom": "export a smaller region or a downsampled copy of the image",
        "image": "downscale or crop it first (e.g. to a few thousand pixels on the long side)",
    }[kind]
    raise InputError(
        f"{name} is {cols} x {rows} pixels ({_amount(rows * cols)}), above the limit of {_amount(max_pixels)} "
        f"(max_pixels); {how}; or raise max_pixels if this machine has the memory for it"
    )


def _amount(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 100_000 else f"{n} pixels"


class _collect_warnings:
    """Record the readers' warnings (as messages for ``meta["notes"]``, with server paths cut to names)
    and re-issue them, so scripts still see them."""

    def __init__(self, src: Path | Sequence[Path]) -> None:
        paths = [src] if isinstance(src, Path) else list(src)
        dirs = {str(Path(q).parent) for q in paths} | {str(q) for q in paths if Path(q).is_dir()}
        if len(paths) > 1:  # readers name the files' common folder too (e.g. "... holds 2 series")
            dirs.add(os.path.commonpath([os.path.abspath(q) for q in paths]))
        self._dirs = sorted(dirs, key=len, reverse=True)
        self.notes: list[str] = []

    def __enter__(self) -> list[str]:
        self._cm = warnings.catch_warnings(record=True)
        self._got = self._cm.__enter__()
        warnings.simplefilter("always")
        return self.notes

    def __exit__(self, *exc) -> None:
        from domains.errors import DomainWarning

        self._cm.__exit__(*exc)
        for w in self._got:
            msg = str(w.message)
            for d in self._dirs:
                msg = msg.replace(d + os.sep, "").replace(d, Path(d).name)
            if issubclass(w.category, DomainWarning):  # what the user should know about this read
                self.notes.append(msg)
            warnings.warn(msg, w.category, stacklevel=3)


class _VolumeCache:
    """A small thread-safe LRU of decoded DICOM volumes by size in bytes (the newest is always kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[np.ndarray, dict, list[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[np.ndarray, dict, list[str]] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, value: tuple[np.ndarray, dict, list[str]]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(v[0].nbytes for v in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_VOLUMES = _VolumeCache(1 << 30)


def _file_key(files: Sequence[Path]) -> tuple:
    """Identity of a set of files: resolved path, size and modification time of each (content changes miss)."""
    out = []
    for q in files:
        st = Path(q).stat()
        out.append((str(Path(q).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _volume(key: tuple, read: Callable[[], tuple[np.ndarray, dict]], src) -> tuple[np.ndarray, dict, list[str]]:
    got = _VOLUMES.get(key)
    if got is None:
        with _collect_warnings(src) as notes:
            vol, meta = read()
        got = (vol, meta, notes)
        _VOLUMES.put(key, got)
    return got


def _common_name(files: Sequence[Path]) -> str:
    parents = {Path(f).resolve().parent for f in files}
    return next(iter(parents)).name if len(parents) == 1 else Path(files[0]).name


# meta keys that hold server paths or pixel-sized arrays: never in LoadedImage.meta
_PRIVATE_META = ("path", "files", "skipped", "valid", "gcps")


def _jsonable(v: Any) -> Any:
    """A metadata value as plain JSON (CRS -> WKT/EPSG string, Affine -> 6 numbers, NaN -> "nan")."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and not hasattr(v, "to_gdal"):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 256 else f"array of shape {list(v.shape)}"
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if v is None or isinstance(v, (str, int, bool)):
        return v
    if hasattr(v, "to_gdal"):  # affine.Affine
        return [float(x) for x in tuple(v)[:6]]
    if hasattr(v, "to_string"):  # rasterio CRS
        return v.to_string()
    return str(v)


def _display_rgb(arr: np.ndarray) -> np.ndarray:
    """[C, H, W] -> uint8 [H, W, 3]: grey repeated, 3 bands as RGB, the first 3 of more bands, band 1 of 2;
    values in [0, 1] as they are, others stretched 2-98 % per band (:mod:`dinoapp.viz`'s image rule)."""
    a = arr[:1] if arr.shape[0] == 2 else arr[:3]
    return viz._image_rgb_uint8(np.moveaxis(a, 0, -1))  # [H, W, 3]


def _loaded(name, arr, meta, kind, notes, *, geo=None, n_slices=1, slice_index=0) -> LoadedImage:
    arr = np.ascontiguousarray(arr, dtype=np.float32)  # [C, H, W]
    valid = meta.get("valid")
    if valid is not None and valid.ndim == 3:  # a volume's mask [D, H, W]
        valid = valid[slice_index]
    public = {k: _jsonable(v) for k, v in meta.items() if k not in _PRIVATE_META}
    public.update(name=name, kind=kind, shape=list(arr.shape))
    if meta.get("gcps"):
        public["gcps"] = len(meta["gcps"])
    if n_slices > 1:
        public.update(n_slices=n_slices, slice_index=slice_index)
    if notes:
        public["notes"] = list(notes)
    return LoadedImage(name=name, array=arr, meta=public, rgb=_display_rgb(arr), kind=kind, geo=geo,
                       n_slices=n_slices, slice_index=slice_index, valid=valid)  # fmt: skip


# ---------------------------------------------------------------------------------------------- features


@dataclass
class SimilarityResult:
    """What a click gives: ``overlay`` uint8 [H, W, 3] (the heat map over the target image, the clicked
    patch framed when the target is the clicked image), ``patch`` (row, col) clicked, ``top_k``
    [(row, col, cosine)] best first, ``scores`` float32 [h, w] cosine similarity on the target's grid."""

    overlay: np.ndarray  # uint8 [H, W, 3]
    patch: tuple[int, int]
    top_k: list[tuple[int, int, float]]
    scores: np.ndarray  # float32 [h, w]


class FeatureView:
    """One backbone's dense features of one :class:`LoadedImage` at one resolution and block, computed once.

    ``resolution``: long side in pixels the image is resized to (aspect kept, rounded to whole patches);
    ``None`` = the image's own size rounded to whole patches. Inputs above 4096 patches are processed in
    overlapping windows (:func:`dinoapp.dense_features`). ``layer``: block index (``None``/``-1`` = the
    last, normed like the last). ``cache``: a :class:`dinoapp.FeatureCache` to reuse features across views.

    Attributes: ``patches`` torch float32 [h, w, D], ``cls`` [D], ``grid`` (h, w), ``image``,
    ``backbone``, ``block`` (non-negative block index), ``resolution``.
    """

    def __init__(self, backbone, image: LoadedImage, *, resolution: int | None = 448, layer: int | None = None,
                 cache=None) -> None:  # fmt: skip
        if not isinstance(image, LoadedImage):
            raise InputError(f"image must be a LoadedImage (from explore.open_image), got {type(image).__name__}")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
                                       or resolution < backbone.patch_size):  # fmt: skip
            raise InputError(f"resolution must be None or a long side of at least {backbone.patch_size} pixels, "
                             f"got {resolution!r}")  # fmt: skip
        n = int(backbone.n_blocks)
        self.block = n - 1 if layer is None else block_indices([int(layer)], n)[0]
        opts: dict[str, Any] = {"resolution": None if resolution is None else int(resolution), "policy": "resize",
                                "channels_first": True}  # fmt: skip
        if self.block != n - 1:
            opts["layers"] = [self.block]
        df = cache.features(backbone, image.array, **opts) if cache is not None else \
            dense_features(backbone, image.array, **opts)  # fmt: skip
        self.backbone = backbone
        self.image = image
        self.resolution = resolution
        self.patches: torch.Tensor = df.patches if self.block == n - 1 else df.layers[self.block]  # [h, w, D]
        self.cls: torch.Tensor = df.cls  # [D]
        self.input_size = df.input_size
        self.windows = df.windows
        self._np = self.patches.detach().cpu().float().numpy()  # [h, w, D], shared with the tensor on CPU
        self._pca: dict[Any, np.ndarray] = {}
        self._fingerprint: str | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the features and the maps cached from them (not the image, which views share)."""
        return int(self.patches.numel() * self.patches.element_size() + self.cls.numel() * self.cls.element_size()
                   + sum(a.nbytes for a in self._pca.values()))  # fmt: skip

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[0]), int(self.patches.shape[1])

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    def __repr__(self) -> str:
        h, w = self.grid
        return (f"FeatureView({self.image.name!r}, grid {h}x{w}, D={self._np.shape[-1]}, block {self.block}, "
                f"resolution {self.resolution})")  # fmt: skip

    def fingerprint(self) -> str:
        """The backbone's fingerprint (computed once per view; to compare views of other backbone objects)."""
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.backbone)
        return self._fingerprint

    def patch_at(self, x: float, y: float) -> tuple[int, int]:
        """The patch (row, col) under pixel ``(x, y)`` of the image (x = column, y = row, as a click gives)."""
        return viz.pixel_to_patch((x, y), self.image.size, self.grid, xy=True)

    def pca(self, *, foreground: Any = False, basis: viz.PCABasis | None = None, mode: str = "nearest") -> np.ndarray:
        """PCA map (DINOv3 recipe: PCA(3, whiten), sigmoid(2 x)) at the image's size -> uint8 [H, W, 3].

        ``foreground``: ``False`` (fit on every patch), ``True`` (fit on the foreground of
        :func:`foreground_mask`, background dimmed), a bool patch mask [h, w] or a fitted
        :class:`dinoapp.ForegroundClassifier`. ``basis``: a :class:`dinoapp.viz.PCABasis` to use instead of
        fitting one (e.g. from :func:`joint_pca`'s images). ``mode``: ``"nearest"`` (patch blocks, as the
        CLI) or ``"bilinear"`` upsampling.
        """
        return _to_image(pca_grid(self, foreground=foreground, basis=basis), self.image.size, mode)

    def similarity(self, x: float, y: float, *, other: FeatureView | None = None, k: int = 5,
                   alpha: float = 0.6) -> SimilarityResult:  # fmt: skip
        """Cosine similarity of the patch under pixel ``(x, y)`` of this view's image to every patch of
        ``other`` (default: this view) -> :class:`SimilarityResult`. No forward pass: numpy on the stored grid.

        The overlay colours [0, 1] with ``inferno`` over ``other``'s display image (``alpha`` = heat weight);
        for the view itself the clicked patch is framed and is ``top_k[0]`` (similarity 1).
        """
        r, c = self.patch_at(x, y)
        return self.similarity_at(r, c, other=other, k=k, alpha=alpha)

    def similarity_at(self, row: int, col: int, *, other: FeatureView | None = None, k: int = 5,
                      alpha: float = 0.6) -> SimilarityResult:  # fmt: skip
        """:meth:`similarity` for the patch at ``(row, col)`` of the patch grid (e.g. from sliders) instead of
        a pixel. Negative indices count from the end, as in numpy."""
        h, w = self.grid
        for name, v, n in (("row", row, h), ("col", col, w)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -n <= v < n:
                raise InputError(f"{name} must be an integer patch index in [0, {n - 1}] (grid {h}x{w}), got {v!r}")
        r, c = int(row) % h, int(col) % w
        same = other is None or other is self
        target = self if same else other
        if not same:
            _same_features(self, target, "other")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        scores = viz.similarity_map(self._np, (r, c), other=None if same else target._np)  # [h2, w2]
        if same:  # the clicked patch first even where another patch ties at similarity 1
            rest = [t for t in viz.top_k_patches(scores, int(k) + 1) if (t[0], t[1]) != (r, c)]
            top = [(r, c, float(scores[r, c])), *rest][: int(k)]
        else:
            top = viz.top_k_patches(scores, int(k))
        img = viz.overlay(target.image.rgb, scores, alpha=alpha, cmap="inferno", vmin=0.0, vmax=1.0)
        if same:
            img = viz.mark_patch(img, (r, c), self.grid, color=(0, 255, 255), width=max(2, min(img.shape[:2]) // 200))
        return SimilarityResult(overlay=img, patch=(r, c), top_k=top, scores=scores)


def _to_image(grid_rgb: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """uint8 [h, w, 3] on the patch grid -> uint8 [H, W, 3] at the image's size."""
    up = viz.upsample(grid_rgb, size, mode=mode)
    if up.dtype != np.uint8:
        up = np.clip(up + np.float32(0.5), 0, 255).astype(np.uint8)
    return up


def _rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """float colours in [0, 1] -> uint8."""
    return (np.clip(rgb, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def foreground_mask(view: FeatureView) -> np.ndarray | None:
    """A simple unsupervised foreground, bool [h, w]: the sign of the first principal component of the
    patches (the DINOv2 notebooks' rule), the side that holds most of the grid's border being background.

    Meant for object-centric images (a subject on a background); on textures and scenes (satellite
    tiles, CT slices filling the frame) it splits along the strongest contrast instead. ``None`` when the
    split is degenerate (fewer than 3 patches on one side): use every patch. For a learned foreground use
    :func:`dinoapp.heads.fit_foreground` and pass the classifier as ``foreground=``.
    """
    f = view._np
    h, w = f.shape[:2]
    if h * w < 6:
        return None
    pc1 = viz.fit_pca(f, n_components=1).project(f)[..., 0]  # [h, w], zero mean
    fg = pc1 > 0
    border = np.ones((h, w), dtype=bool)
    border[1:-1, 1:-1] = False
    if fg[border].mean() > 0.5:
        fg = ~fg
    if fg.sum() < 3 or (~fg).sum() < 3:
        return None
    return fg


def _fg(view: FeatureView, foreground: Any) -> np.ndarray | None:
    """The patch mask [h, w] that ``foreground`` asks for (None = every patch)."""
    if foreground is None or foreground is False:
        return None
    if foreground is True:
        return foreground_mask(view)
    if hasattr(foreground, "predict") and hasattr(foreground, "score_map"):  # a ForegroundClassifier
        _, m = foreground.predict(view.patches)
        return np.asarray(m, dtype=bool) if m.any() else None
    m = np.asarray(foreground)
    if m.shape != view.grid:
        raise InputError(f"a foreground mask must be bool [h, w] = {view.grid} (patch grid), got shape {m.shape}")
    return m.astype(bool)


def pca_grid(view: FeatureView, *, foreground: Any = False, basis: viz.PCABasis | None = None) -> np.ndarray:
    """The PCA map on the patch grid -> uint8 [h, w, 3] (what :func:`export_geotiff` writes as a map on the
    input's raster: one pixel per patch). Same colours as :meth:`FeatureView.pca`; see there."""
    mask = _fg(view, foreground)
    key = None if basis is not None or not isinstance(foreground, bool) else bool(foreground)
    if key is not None and key in view._pca:
        return view._pca[key]
    rgb = viz.pca_rgb(view._np, basis=basis, mask=mask, background="dim")  # float [h, w, 3]
    out = _rgb_uint8(rgb)
    if key is not None:
        view._pca[key] = out
    return out


def joint_pca(views: Sequence[FeatureView], *, foreground: Any = False, mode: str = "nearest",
              return_basis: bool = False):  # fmt: skip
    """PCA maps of several views in ONE basis fitted on all their (foreground) patches, so colours are
    comparable across images -> list of uint8 [H_i, W_i, 3] at each image's size (and the
    :class:`dinoapp.viz.PCABasis` with ``return_basis=True``). Views must share backbone and block."""
    views = list(views)
    if not views:
        raise InputError("joint_pca needs at least one FeatureView")
    for i, v in enumerate(views[1:], 1):
        _same_features(views[0], v, f"views[{i}]")
    masks = [_fg(v, foreground) for v in views]
    use = None if all(m is None for m in masks) else [np.ones(v.grid, bool) if m is None else m
                                                      for v, m in zip(views, masks)]  # fmt: skip
    maps, basis = viz.joint_pca_rgb([v._np for v in views], masks=use, background="dim")
    out = [_to_image(_rgb_uint8(m), v.image.size, mode) for m, v in zip(maps, views)]
    return (out, basis) if return_basis else out


def _same_features(a: FeatureView, b: FeatureView, name: str) -> None:
    """InputError unless ``b`` holds features of the same backbone and block as ``a`` (else comparing them
    is meaningless even when the widths agree)."""
    if not isinstance(b, FeatureView):
        raise InputError(f"{name} must be a FeatureView, got {type(b).__name__}")
    if a.block != b.block:
        raise InputError(f"{name} holds block {b.block} features, the first view block {a.block}: use one layer")
    if a.backbone is not b.backbone and a.fingerprint() != b.fingerprint():
        raise InputError(f"{name} comes from another backbone: features of different backbones cannot be compared "
                         "(make both views with one backbone)")  # fmt: skip


# -------------------------------------------------------------------------------------------- scribbles


def _rgb_triplet(c: Any) -> tuple[int, int, int]:
    """(R, G, B) from a triple or a colour string ("#e6194b", "rgb(230, 25, 75)", "rgba(...)")."""
    if isinstance(c, str):
        s = c.strip().lower()
        if s.startswith("#") and len(s) in (4, 7):
            s = s[1:]
            if len(s) == 3:
                s = "".join(ch * 2 for ch in s)
            try:
                return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
            except ValueError:
                pass
        elif s.startswith(("rgb(", "rgba(")) and s.endswith(")"):
            try:
                parts = [float(t) for t in s[s.index("(") + 1 : -1].split(",")]
                if len(parts) in (3, 4):
                    return tuple(int(round(v)) for v in parts[:3])  # type: ignore[return-value]
            except ValueError:
                pass
        raise InputError(f"colour {c!r}: give (R, G, B), '#rrggbb' or 'rgb(r, g, b)'")
    try:
        t = tuple(int(v) for v in c)
    except (TypeError, ValueError):
        raise InputError(f"colour {c!r}: give (R, G, B), '#rrggbb' or 'rgb(r, g, b)'") from None
    if len(t) not in (3, 4) or not all(0 <= v <= 255 for v in t):
        raise InputError(f"colour {c!r}: give three values 0..255")
    return t[:3]  # type: ignore[return-value]


def _as_array(im: Any, name: str) -> np.ndarray | None:
    """An ImageEditor image (numpy, PIL, file path or None) -> uint8 array [H, W(, C)] or None."""
    if im is None:
        return None
    if isinstance(im, (str, os.PathLike)):
        from PIL import Image

        with Image.open(im) as pil:
            pil.load()
            im = pil.convert("RGBA") if "A" in pil.getbands() or "transparency" in pil.info else pil.convert("RGB")
    if isinstance(im, torch.Tensor):
        im = im.detach().cpu().numpy()
    a = np.asarray(im)  # numpy, or a PIL image
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise InputError(f"{name} must be an image [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return a


def scribble_mask(editor_value: Any, class_colors: Sequence[Any], *, tolerance: int = 40,
                  shape: tuple[int, int] | None = None) -> np.ndarray:  # fmt: skip
    """Painted strokes -> uint8 class ids [H, W]: index into ``class_colors`` where painted, 255 elsewhere.

    ``editor_value``: a Gradio ``ImageEditor`` value ``{"background", "layers", "composite"}`` (numpy,
    PIL or file paths, i.e. any ``type=``), or a plain array of strokes. Painted pixels are, in order of
    preference: alpha > 0 in the ``layers`` (RGBA; later layers over earlier ones; with
    ``image_mode="RGB"`` layers lose their alpha and any non-black pixel counts); where there are no
    layers, the pixels where ``composite`` differs from ``background``; for a plain RGBA array alpha > 0;
    for a plain RGB array every pixel (so pass strokes on black or use RGBA). A painted pixel gets the
    class whose colour is nearest (Euclidean RGB distance) if within ``tolerance``, else stays 255
    (anti-aliased edges blended with other colours, a stray colour).

    ``class_colors``: (R, G, B) triples or colour strings ("#e6194b", "rgb(230, 25, 75)"), at most 255.
    ``shape``: (H, W) to resize the mask to (nearest neighbour), e.g. the image's size when the editor
    canvas had another size.
    """
    cols = np.asarray([_rgb_triplet(c) for c in class_colors], dtype=np.float32)  # [K, 3]
    if not 1 <= len(cols) <= 255:
        raise InputError(f"give 1 to 255 class colours, got {len(cols)}")
    if not isinstance(tolerance, (int, float, np.integer, np.floating)) or tolerance < 0:
        raise InputError(f"tolerance must be a non-negative number, got {tolerance!r}")
    rgb, painted = _strokes(editor_value)  # uint8 [H, W, 3], bool [H, W]
    d2 = ((rgb[..., None, :].astype(np.float32) - cols) ** 2).sum(-1)  # [H, W, K]
    nearest = d2.argmin(-1)  # [H, W]
    ok = painted & (np.take_along_axis(d2, nearest[..., None], -1)[..., 0] <= float(tolerance) ** 2)
    out = np.full(rgb.shape[:2], UNLABELLED, dtype=np.uint8)
    out[ok] = nearest[ok]
    if shape is not None:
        out = viz.upsample(out, shape, mode="nearest")
    return out


def _strokes(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """(stroke colours uint8 [H, W, 3], painted bool [H, W]) of an editor value or a stroke image."""
    if isinstance(value, dict):
        unknown = set(value) - {"background", "layers", "composite", "id"}
        if unknown:
            raise InputError(f"not an ImageEditor value: unexpected keys {sorted(unknown)}")
        layers = [a for a in (_as_array(x, "layers[i]") for x in (value.get("layers") or [])) if a is not None]
        if layers:
            shapes = {a.shape[:2] for a in layers}
            if len(shapes) > 1:
                raise InputError(f"editor layers differ in size: {sorted(shapes)}")
            rgb = np.zeros((*layers[0].shape[:2], 3), np.uint8)
            painted = np.zeros(layers[0].shape[:2], bool)
            for a in layers:
                c, p = _layer(a, rgb_is_strokes=True)
                rgb[p] = c[p]
                painted |= p
            return rgb, painted
        comp = _as_array(value.get("composite"), "composite")
        bg = _as_array(value.get("background"), "background")
        if comp is None:
            raise InputError("the editor value holds no layers and no composite: paint on the image first")
        c, _ = _layer(comp, rgb_is_strokes=False)
        if bg is None:
            return _layer(comp, rgb_is_strokes=True)
        b, _ = _layer(bg, rgb_is_strokes=False)
        if b.shape != c.shape:
            raise InputError(f"composite {c.shape[:2]} and background {b.shape[:2]} differ in size")
        return c, (c != b).any(-1)
    a = _as_array(value, "strokes")
    if a is None:
        raise InputError("no scribbles given (the editor value is empty)")
    return _layer(a, rgb_is_strokes=False)


def _layer(a: np.ndarray, *, rgb_is_strokes: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (RGB uint8 [H, W, 3], painted bool [H, W]): alpha > 0 when it has alpha; else non-black
    pixels for a stroke layer (``rgb_is_strokes``), every pixel otherwise."""
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 4:
        return np.ascontiguousarray(a[..., :3]), a[..., 3] > 0
    rgb = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    painted = rgb.any(-1) if rgb_is_strokes else np.ones(rgb.shape[:2], bool)
    return np.ascontiguousarray(rgb), painted


# ------------------------------------------------------------------------------------------------- heads


def _check_views(views: Sequence[FeatureView], what: str) -> list[FeatureView]:
    views = list(views)
    if not views:
        raise InputError(f"{what} needs at least one FeatureView")
    for i, v in enumerate(views):
        if not isinstance(v, FeatureView):
            raise InputError(f"views[{i}] must be a FeatureView, got {type(v).__name__}")
    for i, v in enumerate(views[1:], 1):
        _same_features(views[0], v, f"views[{i}]")
    return views


def _patch_strip(views: Sequence[FeatureView], masks: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """All views' patches as one 1 x N "image" [1, 1, N, D] and their masks as the matching p x N*p pixel strip.

    The segmentation head is BatchNorm + Dropout2d + a 1x1 conv: nothing in it looks at neighbouring
    patches, so the grid layout does not matter and views of any grid size train together in one
    :func:`dinoapp.heads.fit_seg_head` call. Each mask is first mapped onto its view's h*p x w*p canvas
    (nearest neighbour, pixel centres: how the image was resized), then cut into p x p patch blocks laid
    side by side, so :func:`dinoapp.heads.patch_targets` computes exactly each patch's labelled-pixel
    class distribution and weight as it would on the view's own grid.
    """
    p = views[0].patch_size
    feats, blocks = [], []
    for v, m in zip(views, masks):
        h, w = v.grid
        canvas = viz.upsample(m, (h * p, w * p), mode="nearest")  # [h*p, w*p]
        blocks.append(canvas.reshape(h, p, w, p).transpose(0, 2, 1, 3).reshape(h * w, p, p))  # [h*w, p, p]
        feats.append(v.patches.reshape(h * w, -1).float())  # [h*w, D]
    b = np.concatenate(blocks)  # [N, p, p]
    strip = b.transpose(1, 0, 2).reshape(p, -1)  # [p, N*p]: patch j at columns [j*p, (j+1)*p)
    return torch.cat(feats)[None, None], strip  # [1, 1, N, D]


def fit_head_from_scribbles(
    views: Sequence[FeatureView],
    masks: Sequence[np.ndarray],
    n_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    epochs: int = 100,
    seed: int = 0,
    progress: Any = None,
) -> heads.SegHead:
    """Train a linear segmentation head (:func:`dinoapp.heads.fit_seg_head`: BatchNorm + 1x1 conv, soft
    per-patch targets weighted by the labelled fraction of each patch) on painted scribbles.

    ``masks``: one uint8 [H, W] per view (class ids, 255 = unlabelled; any size, resized with nearest
    neighbour to the view's image), e.g. from :func:`scribble_mask`. Views may differ in size (see
    :func:`_patch_strip`) but must share backbone and block. ``progress``: ``None``; ``True`` (a tqdm bar
    over epochs, which ``gr.Progress(track_tqdm=True)`` follows); or a callable such as a ``gr.Progress``
    object, called as ``progress(fraction, desc=...)`` before and after training (the bar runs too).

    Returns a :class:`dinoapp.SegHead` that knows its backbone and block (``layers``), ready for
    :func:`predict`, :func:`dinoapp.save_head` and ``head.segment_large``. Raises :class:`InputError` when
    fewer than two classes hold a painted pixel.
    """
    views = _check_views(views, "fit_head_from_scribbles")
    masks = list(masks)
    K = n_classes
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 2 <= K <= 255:
        raise InputError(f"n_classes must be an integer from 2 to 255, got {n_classes!r}")
    if len(masks) != len(views):
        raise InputError(f"got {len(masks)} masks for {len(views)} views: one scribble mask per view")
    clean, painted = [], set()
    for i, m in enumerate(masks):
        a = np.asarray(m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m)
        if a.ndim != 2 or a.size == 0 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise InputError(f"masks[{i}] must be an integer class map [H, W] (255 = unlabelled), got shape "
                             f"{a.shape} and dtype {a.dtype}")  # fmt: skip
        a = a.astype(np.int64)
        bad = (a != UNLABELLED) & ((a < 0) | (a >= K))
        if bad.any():
            raise InputError(f"masks[{i}] has class ids {np.unique(a[bad])[:5].tolist()} outside 0..{K - 1} "
                             "(255 = unlabelled)")  # fmt: skip
        painted |= set(np.unique(a[a != UNLABELLED]).tolist())
        clean.append(a)
    names = [str(c) for c in class_names] if class_names is not None else [f"class {i}" for i in range(K)]
    if len(names) != K:
        raise InputError(f"{len(names)} class names given for {K} classes")
    if not painted:
        raise InputError("no painted pixels: paint a few strokes of at least two classes first")
    if len(painted) < 2:
        only = names[next(iter(painted))]
        raise InputError(f"only class {only!r} is painted: paint at least two classes (the head learns to tell "
                         "them apart)")  # fmt: skip
    X, strip = _patch_strip(views, clean)  # [1, 1, N, D], [p, N*p]
    bar = progress is True or callable(progress)  # not bool(progress): a gr.Progress is falsy (its __len__ is 0)
    if callable(progress):
        progress(0.0, desc="training the head")
    head = heads.fit_seg_head(X, [strip], K, class_names=names, epochs=epochs, seed=seed, backbone=views[0].backbone,
                              policy="resize", patch_size=views[0].patch_size, progress=bar)  # fmt: skip
    if callable(progress):
        progress(1.0, desc="head trained")
    v = views[0]
    head.layers = None if v.block == v.backbone.n_blocks - 1 else [v.block]
    head.preprocessing = {"size": None, "policy": "resize", "patch_size": v.patch_size, "resolution": v.resolution}
    return head


def _head_block(head: Any, backbone) -> int:
    layers = getattr(head, "layers", None)
    n = int(backbone.n_blocks)
    if not layers:
        return n - 1
    if len(layers) != 1:
        raise InputError(f"this head uses blocks {list(layers)} concatenated; a FeatureView holds one block: "
                         "run head.segment_large(backbone, image.array) instead")  # fmt: skip
    return int(layers[0]) % n


def predict(head: heads.SegHead, view: FeatureView) -> tuple[np.ndarray, np.ndarray]:
    """Apply a segmentation head to a view's stored features -> (labels uint8 [H, W], probabilities float32
    [K, H, W]) at the image's size (patch logits upsampled bilinearly, then softmax).

    The image's nodata pixels (``view.image.valid`` False) are labelled :data:`UNLABELLED` (255; 65535 for
    heads of more than 255 classes), so label PNGs, pixel counts and metrics leave them out; mask a
    ground truth the same way with ``view.image.mask_invalid(truth)``. The probabilities are not masked.

    Raises :class:`dinoapp.HeadBackboneMismatchError` for a head of another backbone and
    :class:`InputError` for a head of another block (layer) or an image classifier.
    """
    if not isinstance(head, heads.SegHead):
        raise InputError(f"predict takes a segmentation head (SegHead), got {type(head).__name__}; "
                         "for image classifiers use classify")  # fmt: skip
    if not isinstance(view, FeatureView):
        raise InputError(f"view must be a FeatureView, got {type(view).__name__}")
    heads.check_backbone(head, view.backbone, "this segmentation head")
    want = _head_block(head, view.backbone)
    if want != view.block:
        raise InputError(f"the head was trained on block {want} features, the view holds block {view.block}: "
                         f"make the view with layer={want}")  # fmt: skip
    logits = head.logits(view.patches)  # [1, K, h, w]
    # the view's grid covers the whole image (policy "resize"), whatever the head was trained with
    up = heads.upsample_logits(logits, view.image.size, policy="resize")  # [1, K, H, W]
    probs = up[0].softmax(0)  # [K, H, W]
    labels = probs.argmax(0).numpy().astype(np.uint8 if head.n_classes <= 255 else np.uint16)
    labels = view.image.mask_invalid(labels, UNLABELLED if head.n_classes <= 255 else 65535)  # nodata: unlabelled
    return labels, probs.numpy().astype(np.float32, copy=False)


def embedding(view: FeatureView, mode: str = "cls") -> torch.Tensor:
    """The image embedding [1, D] (``"cls"``) or [1, 2D] (``"cls+mean"``: CLS and mean patch token) of a view,
    as :func:`dinoapp.heads.image_embedding` computes it: what :func:`fit_classifier` trains on."""
    from types import SimpleNamespace

    f = SimpleNamespace(cls=view.cls[None], patches=view.patches[None])  # a batch of one for image_embedding
    return heads.image_embedding(f, mode)  # [1, D] or [1, 2D]


_embedding = embedding


def fit_classifier(views: Iterable[FeatureView], labels: Sequence[Any], *, kind: str = "knn",
                   embedding: str = "cls") -> heads.KNNClassifier | heads.LogisticClassifier:  # fmt: skip
    """An image classifier on the views' embeddings (:func:`dinoapp.heads.image_embedding`: CLS, or CLS +
    mean patch): ``kind="knn"`` (weighted k-NN, cosine, k <= 20) or ``"logistic"`` (C by cross-validation;
    needs two classes). The classifier records the backbone, so :func:`dinoapp.save_head` and
    :func:`classify` check it. ``views`` may be a generator: each view is embedded and let go in turn, so
    a large training set never sits in memory as features."""
    labels = list(labels)
    if kind not in ("knn", "logistic"):
        raise InputError(f"kind must be 'knn' or 'logistic', got {kind!r}")
    first, rows = None, []
    for i, v in enumerate(views):
        if not isinstance(v, FeatureView):
            raise InputError(f"views[{i}] must be a FeatureView, got {type(v).__name__}")
        if first is None:
            first = v
        else:
            _same_features(first, v, f"views[{i}]")
        rows.append(_embedding(v, embedding))
    if first is None:
        raise InputError("fit_classifier needs at least one FeatureView")
    if len(labels) != len(rows):
        raise InputError(f"got {len(labels)} labels for {len(rows)} views: one label per image")
    X = torch.cat(rows)  # [N, D']
    clf = heads.KNNClassifier(embedding=embedding) if kind == "knn" else heads.LogisticClassifier(embedding=embedding)
    clf.fit(X, labels)
    v = first
    clf.identity = backbone_identity(v.backbone)
    clf.preprocessing = {"size": None, "policy": "resize", "patch_size": v.patch_size, "resolution": v.resolution}
    return clf


def classify(clf: Any, view: FeatureView) -> dict[str, float]:
    """Class -> probability for one view (most likely first), with a k-NN or logistic classifier."""
    if not hasattr(clf, "predict_proba") or not hasattr(clf, "classes_"):
        raise InputError(f"classify takes a fitted KNNClassifier or LogisticClassifier, got {type(clf).__name__}")
    heads.check_backbone(clf, view.backbone, "this classifier")
    proba = clf.predict_proba(_embedding(view, getattr(clf, "embedding", "cls")))[0]  # [C]
    order = np.argsort(-proba, kind="stable")
    return {str(clf.classes_[i]): float(proba[i]) for i in order}


def label_overlay(image: LoadedImage | np.ndarray, labels: np.ndarray, *, colors: Any = None,
                  alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """A class map [H, W] (or on the patch grid) coloured over the image -> uint8 [H, W, 3]; label 255
    (unlabelled) leaves the image as it is. ``colors``: [K, 3] (e.g. the scribble colours; default
    :func:`dinoapp.viz.label_colors`)."""
    rgb = image.rgb if isinstance(image, LoadedImage) else viz._image_rgb_uint8(image)  # [H, W, 3]
    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"labels must be an integer class map [H, W], got {lab.dtype} of shape {lab.shape}")
    lab = lab.astype(np.int64)
    lab = viz.upsample(lab, rgb.shape[:2], mode="nearest") if lab.shape != rgb.shape[:2] else lab
    known = lab != UNLABELLED
    n = int(lab[known].max()) + 1 if known.any() else 0
    cols = viz.label_colors(n) if colors is None else np.asarray([_rgb_triplet(c) for c in colors], np.uint8)
    if len(cols) < n:
        raise InputError(f"{len(cols)} colours for labels up to {n - 1}")
    col = viz.labels_to_rgb(np.where(known, lab, -1), cols)  # [H, W, 3], unlabelled black
    out = viz.overlay(rgb, col, alpha=alpha, mode="nearest")
    out[~known] = rgb[~known]
    return out


# ------------------------------------------------------------------------------------------------ export


def export_png(rgb_or_labels: Any, path: str | os.PathLike) -> Path:
    """Write a map losslessly as PNG -> the path. uint8 [H, W] (class ids, grey), uint8 [H, W, 3|4]
    (colours), uint16 [H, W] (16-bit grey / many classes) or bool [H, W] (0 / 255). Floats are refused
    (colour them with :func:`dinoapp.viz.colorize` or scale them to uint8 first)."""
    from PIL import Image

    a = rgb_or_labels.detach().cpu().numpy() if isinstance(rgb_or_labels, torch.Tensor) else np.asarray(rgb_or_labels)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype not in (np.uint8, np.uint16) or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) \
            or (a.dtype == np.uint16 and a.ndim == 3) or a.size == 0:  # fmt: skip
        raise InputError(f"export_png takes uint8 [H, W], [H, W, 3] or [H, W, 4], uint16 [H, W] or bool [H, W]; "
                         f"got {a.dtype} of shape {a.shape} (colour floats with viz.colorize first)")  # fmt: skip
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(p, format="PNG")  # uint16 [H, W] -> 16-bit grey ("I;16")
    return p


def _channels_first(a: np.ndarray) -> np.ndarray:
    """[H, W] -> [1, H, W]; colours channels last (uint8 [H, W, 3|4], as the maps here return them, or float
    [H, W, 3] with H > 3) -> [3, H, W] (alpha dropped); anything else 3-D is taken as [C, H, W]."""
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise InputError(f"values must be [H, W], [H, W, 3] or [C, H, W], got shape {a.shape}")
    if (a.dtype == np.uint8 and a.shape[-1] in (3, 4)) or (a.shape[-1] == 3 and a.shape[0] > 3):
        return np.moveaxis(a[..., :3], -1, 0)
    return a


def _grid_of(H: int, W: int, h: int, w: int) -> bool:
    """Whether an h x w grid is one that resizing an H x W image (aspect kept, each side rounded to whole
    patches, at least one) gives for some scale: ``h = max(1, round(H t))`` and ``w = max(1, round(W t))``
    for one t. Long strips give grids whose cells are far from square (40 x 2400 -> 1 x 28)."""
    def span(n: int, N: int) -> tuple[float, float]:
        return (0.0 if n == 1 else (n - 0.5) / N), (n + 0.5) / N

    (a0, a1), (b0, b1) = span(h, H), span(w, W)
    return h >= 1 and w >= 1 and max(a0, b0) <= min(a1, b1) * (1 + 1e-9)


def export_geotiff(values: Any, image: LoadedImage, path: str | os.PathLike, *, kind: str = "map",
                   class_names: Sequence[str] | None = None, tags: dict | None = None) -> Path:  # fmt: skip
    """Write a map of ``image`` as a GeoTIFF on the input's raster -> the path.

    ``values``: at the image's size or on the patch grid (any grid covering the whole image: the
    transform is the input's scaled by (W/w, H/h)); [H, W] (scores, class ids), [H, W, 3] (colours:
    :meth:`FeatureView.pca`, :func:`pca_grid`, overlays) or [K, H, W] (probabilities from :func:`predict`).
    ``kind``: ``"map"`` (uint8 3-band -> RGB; anything else float32) or ``"labels"`` (a class map with a
    colour table and ``class_names``). At the image's size, the raster's nodata pixels (``image.valid``)
    are written as nodata (255 for labels, NaN for float maps). Raises :class:`InputError` for inputs that
    are not georeferenced GeoTIFFs (export a PNG instead).
    """
    import domains

    if not isinstance(image, LoadedImage):
        raise InputError(f"image must be the LoadedImage the values were computed from, got {type(image).__name__}")
    if image.geo is None:
        raise InputError(f"{image.name} is not a georeferenced GeoTIFF (it is a {image.kind}): export a PNG instead")
    if kind not in ("map", "labels"):
        raise InputError(f"kind must be 'map' or 'labels', got {kind!r}")
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    a = _channels_first(a)  # [C, h, w]
    H, W = (int(v) for v in image.geo["shape"][-2:])
    h, w = a.shape[-2:]
    sx, sy = W / w, H / h
    if not (0.5 <= sx / sy <= 2.0 or _grid_of(H, W, h, w)):
        raise InputError(f"values of {h} x {w} do not cover the {H} x {W} image evenly (source pixels per output "
                         f"pixel {sy:.2f} x {sx:.2f}): were they computed from this image?")  # fmt: skip
    nodata = None
    invalid = None if image.valid is None or (h, w) != (H, W) else ~np.asarray(image.valid, bool)  # [H, W]
    if kind == "labels":
        if a.shape[0] != 1 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise InputError(f"kind='labels' takes an integer class map [H, W], got {a.dtype} of shape {a.shape}")
        gkind = "classes"
        if invalid is not None and invalid.any():  # the raster's nodata pixels stay nodata
            top = int(a[:, ~invalid].max()) if (~invalid).any() else 0  # nodata pixels may already be 255
            if top >= UNLABELLED:
                raise InputError(f"labels up to {top} leave no value for the raster's nodata pixels (255)")
            a, nodata = np.where(invalid[None], UNLABELLED, a), UNLABELLED
    else:
        gkind = "rgb" if a.shape[0] == 3 and a.dtype == np.uint8 else "float"
        if gkind == "float" and invalid is not None and invalid.any():
            a = np.where(invalid[None], np.nan, a.astype(np.float32))  # NaN = nodata in the file
    all_tags = {"map": kind, "grid": f"{h}x{w}"}
    all_tags.update(tags or {})
    return domains.write_geotiff(path, a, like=image.geo, scale=(sx, sy), kind=gkind, nodata=nodata,
                                 class_names=list(class_names) if class_names is not None else None,
                                 tags=all_tags)  # fmt: skip


__all__ = [
    "FeatureView", "LoadedImage", "SimilarityResult", "UNLABELLED", "classify", "export_geotiff", "export_png",
    "fit_classifier", "fit_head_from_scribbles", "foreground_mask", "joint_pca", "label_overlay", "open_image",
    "pca_grid", "predict", "scribble_mask", "window_presets",
]  # fmt: skip
