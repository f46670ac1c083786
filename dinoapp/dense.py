"""Dense patch features at any resolution: one pass when it fits, overlapping windows beyond that,
and whole GeoTIFF scenes tile by tile into a georeferenced map with bounded memory.

ViT attention is global and DINOv3's RoPE coordinates are normalised to the input's extent, so a
window's features are those of the window seen alone: sliding-window features approximate the
(unaffordable) full-image pass, and overlapping windows are blended with linear ramps
(:class:`domains.Mosaic`) so no seam is visible. Below ``max_tokens`` the image is processed in
one pass and the result is exactly :func:`dinoapp.extract`'s.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domains import Mosaic, tile_grid

from .errors import ConfigError
from .extract import autocast_for, block_indices
from .preprocess import preprocess, to_tensor


@dataclass
class DenseFeatures:
    """Patch features of one image.

    ``patches`` [h, w, D] (last block, normed); ``layers`` {block: [h, w, D]}; ``cls`` [D] (of the
    whole image in one pass; the mean of the windows' CLS when tiled); ``image_size`` (H, W) of the
    input image, ``input_size`` (H', W') it was processed at (multiples of the patch size);
    ``windows``: number of windows (1 = one pass).
    """

    patches: torch.Tensor  # [h, w, D]
    cls: torch.Tensor  # [D]
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    windows: int = 1

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[0]), int(self.patches.shape[1])


def input_size_for(h: int, w: int, resolution: int | Sequence[int] | None, patch: int, policy: str) -> tuple[int, int]:
    """(H', W') an ``h x w`` image is processed at: native (``None``; padded with ``policy="pad"``, else
    rounded), long side ``resolution`` px keeping the aspect (int), or exactly ``(H', W')``."""
    if resolution is None:
        if policy == "pad":
            return h + (-h % patch), w + (-w % patch)
        return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
    if isinstance(resolution, int | np.integer) and not isinstance(resolution, bool):
        if resolution < 1:
            raise ConfigError(f"resolution must be a positive long side in pixels, got {resolution}")
        s = int(resolution) / max(h, w)
        return max(patch, round(h * s / patch) * patch), max(patch, round(w * s / patch) * patch)
    if not isinstance(resolution, Sequence | np.ndarray) or len(resolution) != 2:
        raise ConfigError(f"resolution must be None, an int (long side in px) or (H, W), got {resolution!r}")
    th, tw = (int(v) for v in resolution)
    if th % patch or tw % patch or th <= 0 or tw <= 0:
        raise ConfigError(f"resolution {th}x{tw} must be positive multiples of the patch size {patch}")
    return th, tw


def check_windows(tile: int, overlap: int, batch_size: int, patch: int) -> None:
    """Raise :class:`ConfigError` unless ``tile``/``overlap`` are multiples of the patch size with
    ``0 <= overlap < tile`` and ``batch_size`` is a positive integer."""
    for name, v in (("tile", tile), ("overlap", overlap), ("batch_size", batch_size)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
    if tile < patch or tile % patch or overlap % patch:
        raise ConfigError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the patch size {patch}")
    if not 0 <= overlap < tile:
        raise ConfigError(f"overlap must be in [0, tile) pixels, got overlap={overlap} for tile={tile}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")


def window_shape(height: int, width: int, tile: int, overlap: int, patch: int) -> tuple[tuple[int, int], int]:
    """((tile_h, tile_w), overlap) for a ``height x width`` input: a side shorter than ``tile`` gets windows
    of that side (rounded up to the patch size) instead of windows mostly made of padding; the overlap
    shrinks below the shorter window side when needed (it only matters along the other axis)."""
    th = min(tile, height + (-height % patch))
    tw = min(tile, width + (-width % patch))
    return (th, tw), min(overlap, min(th, tw) - patch)


def layer_width(backbone, block: int) -> int:
    """Feature width of block (ViT) or stage (timm CNN: widths differ per stage) ``block``."""
    dims = getattr(backbone, "stage_dims", None)
    return int(dims[block]) if dims is not None else int(backbone.embed_dim)


def _forward(backbone, x: torch.Tensor, want: list[int]):
    """Last-block + intermediate normed patch grids and CLS of a batch [B, C, H, W]."""
    outs = backbone.get_intermediate_layers(x, n=want, reshape=True, return_class_token=True, norm=True)
    grids = [o[0].permute(0, 2, 3, 1) for o in outs]  # [B, h, w, D] each
    return grids, outs[-1][1]  # CLS [B, D]


def dense_features(
    backbone,
    image: Any,
    *,
    resolution: int | Sequence[int] | None = None,
    policy: str = "resize",
    layers: Sequence[int] | None = None,
    max_tokens: int = 4096,
    tile: int = 512,
    overlap: int = 128,
    batch_size: int = 4,
    value_range: tuple[float, float] | None = None,
    channels_first: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> DenseFeatures:
    """Dense features of one image at high resolution.

    ``resolution``: ``None`` = native size, an int = long side in pixels (aspect kept), or (H, W);
    all multiples of the patch size. ``policy``: ``"resize"`` (bicubic) or ``"pad"`` (native pixels,
    padded to a multiple of 16: patch (r, c) covers pixels [16r, 16r+16) x [16c, 16c+16)).
    When the patch grid has more than ``max_tokens`` patches (4096 = a 1024 x 1024 input), the
    input is processed in ``tile``-pixel windows overlapping by ``overlap`` pixels (multiples of
    16), ``batch_size`` windows per forward, and the patch grids are blended.
    """
    p = backbone.patch_size
    dev = torch.device(device) if device is not None else next(backbone.parameters()).device
    n_blocks = backbone.n_blocks
    keep = block_indices(layers, n_blocks)
    if policy not in ("resize", "pad"):
        raise ConfigError(f"policy must be 'resize' or 'pad' for dense features, got {policy!r}")
    check_windows(tile, overlap, batch_size, p)
    want = sorted(set(keep) | {n_blocks - 1})
    img = to_tensor(image, channels_first=channels_first, value_range=value_range)  # [C, H, W] in [0, 1]
    H, W = img.shape[-2:]
    size = input_size_for(H, W, resolution, p, policy)
    x = preprocess(img, backbone, size=size, policy=policy, channels_first=True)  # [C, H', W']
    h, w = size[0] // p, size[1] // p
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode(), autocast_for(dev, dtype):
            if h * w <= max_tokens:
                grids, cls = _forward(backbone, x[None].to(dev), want)
                out = {b: g[0].float().cpu() for b, g in zip(want, grids)}
                cls_v, n_win = cls[0].float().cpu(), 1
            else:
                out, cls_v, n_win = _sliding(backbone, x, want, tile, overlap, batch_size, dev, progress)
    finally:
        backbone.train(was_training)
    # ordinary tensors, not inference-mode ones: callers normalise them in place or train heads on them
    out = {b: t.clone() if t.is_inference() else t for b, t in out.items()}
    cls_v = cls_v.clone() if cls_v.is_inference() else cls_v
    return DenseFeatures(
        patches=out[n_blocks - 1], cls=cls_v, layers={b: out[b] for b in sorted(set(keep))},
        image_size=(int(H), int(W)), input_size=size, windows=n_win,
    )


def _sliding(backbone, x, want, tile, overlap, batch_size, dev, progress):
    """Blend the patch grids of overlapping windows of a preprocessed image [C, H', W']."""
    p = backbone.patch_size
    Hp, Wp = x.shape[-2:]
    (th, tw), overlap = window_shape(Hp, Wp, tile, overlap, p)
    tiles = tile_grid(Hp, Wp, (th, tw), overlap, edge="shift", align=p)
    mos = {b: Mosaic(Hp, Wp, layer_width(backbone, b), scale=p, overlap=overlap) for b in want}
    cls_sum = torch.zeros(backbone.embed_dim)  # the last block's (want always holds it)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="windows", unit="win")
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        xb = torch.zeros((len(chunk), x.shape[0], th, tw), dtype=x.dtype)  # 0 = the mean colour
        for k, t in enumerate(chunk):
            sub = x[:, t.y0 : t.y0 + th, t.x0 : t.x0 + tw]
            xb[k, :, : sub.shape[1], : sub.shape[2]] = sub
        grids, cls = _forward(backbone, xb.to(dev), want)
        cls_sum += cls.float().sum(0).cpu()
        for b, g in zip(want, grids):
            g = g.float().cpu().numpy()  # [B, th, tw, D]
            for k, t in enumerate(chunk):
                mos[b].add(t, g[k].transpose(2, 0, 1))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    out = {b: torch.from_numpy(m.result().transpose(1, 2, 0).copy()) for b, m in mos.items()}  # [h, w, D]
    return out, cls_sum / len(tiles), len(tiles)


@dataclass
class SceneMap:
    """A per-patch map of a whole raster scene: ``values`` [K, h, w] (float32; with ``memmap_dir`` a
    ``np.memmap`` whose file lives in a ``mosaic-*`` folder there, yours to delete when done),
    ``valid`` [h, w] (patches with at least half of their pixels inside the scene valid, and some window
    covering them),
    ``meta``: the scene's :func:`domains.raster_info` (CRS, transform of the *scene*), so
    ``domains.write_geotiff(path, values, like=meta, scale=16)`` writes it georeferenced."""

    values: np.ndarray
    valid: np.ndarray
    meta: dict[str, Any]
    scale: int
    windows: int


def scene_features(
    backbone,
    path: str | os.PathLike,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels: int | None = None,
    layers: Sequence[int] | None = None,
    bands=None,
    stats=None,
    stretch="auto",
    tile: int = 512,
    overlap: int = 64,
    min_valid: float = 0.01,
    batch_size: int = 4,
    memmap_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> SceneMap:
    """Features (or anything computed from them) over a whole raster, window by window.

    Windows come from :func:`domains.iter_tiles` (one tile in memory at a time, one scene-wide
    stretch or the saved ``stats``), are run ``batch_size`` at a time, and their per-patch outputs
    are blended into a :class:`domains.Mosaic` at patch resolution (``memmap_dir``: on disk, for
    maps larger than RAM). ``reduce`` maps the last-block patch features [B, h, w, D] to the values
    to keep [B, h, w, K] (a head's logits, a PCA projection, ...); ``channels`` is K (default D,
    i.e. the features themselves; a 10000 px scene at ViT-L width is 1.6 GB: pass ``memmap_dir``
    or a ``reduce``). ``layers``: blocks whose features are concatenated (in that order) as the
    input of ``reduce`` instead of the last block alone (heads trained on several blocks).
    """
    import domains

    p = backbone.patch_size
    dev = torch.device(device) if device is not None else next(backbone.parameters()).device
    check_windows(tile, overlap, batch_size, p)
    take = block_indices(layers, backbone.n_blocks) or [backbone.n_blocks - 1]
    want = sorted(set(take))
    K = channels if channels is not None else sum(layer_width(backbone, b) for b in take)
    if not isinstance(K, int | np.integer) or K < 1:
        raise ConfigError(f"channels must be a positive integer (what reduce returns per patch), got {channels!r}")
    info = domains.raster_info(path)
    _, H, W = info["shape"]
    # a scene smaller than a tile is read as one window of its own size (rounded up to the patch size), not as
    # a tile of mostly padding (which min_valid would skip, leaving an empty map)
    tile_hw, overlap = window_shape(H, W, tile, overlap, p)
    mos = Mosaic(H, W, K, scale=p, overlap=overlap, memmap_dir=memmap_dir)
    n_win = 0
    mean = torch.tensor(backbone.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(backbone.std, dtype=torch.float32).view(-1, 1, 1)
    was_training = backbone.training
    backbone.eval()

    def batches():  # runs in a reader thread: windowed reads + stretch + normalisation overlap the forward
        batch: list = []
        for a, m in domains.iter_tiles(path, tile_hw, overlap, bands=bands, stats=stats, stretch=stretch,
                                       min_valid=min_valid, align=p, progress=progress):  # fmt: skip
            x = _normalise_tile(a, backbone, mean, std)  # [C, th, tw]
            if not m["valid"].all():
                x[:, torch.from_numpy(~m["valid"])] = 0.0  # nodata and beyond-the-edge pixels: the mean colour
            batch.append((x, m))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def run(batch: list[tuple[torch.Tensor, dict]]) -> None:
        xb = torch.stack([x for x, _ in batch])  # [B, C, th, tw]
        with torch.inference_mode(), autocast_for(dev, dtype):
            grids, _ = _forward(backbone, xb.to(dev), want)
            by_block = dict(zip(want, grids))
            feats = torch.cat([by_block[i] for i in take], dim=-1) if len(take) > 1 else by_block[take[0]]
            vals = feats if reduce is None else reduce(feats)  # [B, h, w, K]
        if not isinstance(vals, torch.Tensor):
            raise ConfigError(f"reduce must return a torch tensor [B, h, w, K], got {type(vals).__name__}")
        vals = vals.float().cpu().numpy()
        if vals.shape != (*feats.shape[:3], K):
            raise ConfigError(f"reduce returned shape {tuple(vals.shape)} for features {tuple(feats.shape)}; expected "
                              f"[B, h, w, K] = {(*feats.shape[:3], K)} (channels={K})")  # fmt: skip
        for (_, m), v in zip(batch, vals):
            t = m["tile"]
            hh, ww = t.height // p, t.width // p
            n_ok = m["valid"].reshape(hh, p, ww, p).sum(axis=(1, 3))  # [h, w] valid pixels per patch
            # pixels inside the scene per patch: the last patch row/column of a scene whose size is not a
            # multiple of the patch size is judged on its own pixels, not on the padding beyond the edge
            rows = np.clip(H - (t.y0 + p * np.arange(hh)), 0, p)  # [h]
            cols = np.clip(W - (t.x0 + p * np.arange(ww)), 0, p)  # [w]
            n_in = rows[:, None] * cols[None, :]  # [h, w]
            pv = (n_in > 0) & (2 * n_ok >= n_in)  # at least half of the patch's scene pixels are valid
            mos.add(t, v.transpose(2, 0, 1), valid=pv)

    # On a GPU the reader thread hides IO behind the forward; on a CPU the forward already uses every core
    # and a competing thread slows torch's parallel regions more than it saves (measured: 0.77x vs 0.85x).
    source = prefetch(batches(), depth=2) if dev.type != "cpu" else batches()
    try:
        for batch in source:
            n_win += len(batch)
            run(batch)
    finally:
        backbone.train(was_training)
    if n_win == 0:
        warnings.warn(
            f"{Path(str(path)).name}: no window had >= {min_valid:.0%} valid pixels (all nodata?); the map is empty",
            RuntimeWarning,
            stacklevel=2,
        )
    # in place: no second full-size copy; with memmap_dir the values stay in their file (a np.memmap)
    values = mos.result(fill=np.nan, in_place=True)
    return SceneMap(values=values, valid=mos.coverage(), meta=info, scale=p, windows=n_win)


def _normalise_tile(a: np.ndarray, backbone, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A domains tile (float32 [C, H, W] in [0, 1], finite) -> normalised input, in place (no copies);
    other channel counts go through :func:`preprocess` (grey -> RGB, or its error)."""
    if a.shape[0] != backbone.in_chans or a.dtype != np.float32:
        return preprocess(torch.from_numpy(a), backbone, policy="pad", channels_first=True)
    return torch.from_numpy(a).sub_(mean).div_(std)  # [C, H, W]


def prefetch(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (IO and numpy release the GIL).

    An exception in the producer is re-raised in the consumer; stopping early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(("error", err))

    th = threading.Thread(target=produce, name="dinoapp-prefetch", daemon=True)
    th.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(timeout=0.05)


def windows_needed(h: int, w: int, tile: int = 512, overlap: int = 128, patch: int = 16) -> int:
    """How many windows :func:`dense_features` uses for an ``h x w`` input (for progress estimates)."""
    if h * w <= 0:
        return 0
    tile_hw, overlap = window_shape(h, w, tile, overlap, patch)
    return len(tile_grid(h, w, tile_hw, overlap, edge="shift", align=patch))

