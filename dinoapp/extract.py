"""Batched feature extraction with a frozen backbone.

``extract(backbone, images)`` returns CLS [B, D], registers [B, R, D], patch features
[B, h, w, D] and any requested intermediate layers, computed under ``torch.inference_mode``:
fp32 on CPU (bf16 is several times slower on CPUs), bf16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, InputError
from .preprocess import preprocess


@dataclass
class Features:
    """Outputs of :func:`extract`, float32 on ``out_device``."""

    cls: torch.Tensor  # [B, D]
    registers: torch.Tensor  # [B, R, D]
    patches: torch.Tensor  # [B, h, w, D], last block, normed
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> [B, h, w, D]

    @property
    def grid(self) -> tuple[int, int]:
        return self.patches.shape[1], self.patches.shape[2]


def autocast_for(device: torch.device, dtype: torch.dtype | None = None):
    """bf16 autocast on CUDA, nothing on CPU (or when ``dtype`` is float32)."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype or torch.bfloat16)
    return contextlib.nullcontext()


def _batches(images: Any, batch_size: int):
    """Yield lists of images / tensor slices of at most ``batch_size``."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
        return
    if (
        isinstance(images, torch.Tensor)
        or hasattr(images, "convert")
        or (hasattr(images, "ndim") and images.ndim in (2, 3))
    ):
        images = [images]
    if not isinstance(images, Sequence) and not hasattr(images, "__iter__"):
        raise InputError(f"expected an image, a list of images or a [B, C, H, W] tensor, got {type(images)}")
    chunk: list = []
    for im in images:
        chunk.append(im)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _n_images(images: Any) -> int | None:
    if hasattr(images, "convert"):  # one PIL image
        return 1
    if hasattr(images, "ndim"):  # tensor or array: a batch only when 4-D
        return images.shape[0] if images.ndim == 4 else 1
    try:
        return len(images)
    except TypeError:
        return None


def block_indices(layers: Sequence[int] | None, n_blocks: int) -> list[int]:
    """Block indices as non-negative ints, in the given order (-1 = the last block); raises :class:`InputError`
    for any outside ``[-n_blocks, n_blocks)``. ``None`` / empty -> ``[]``."""
    bad = [i for i in (layers or []) if not -n_blocks <= i < n_blocks]
    if bad:
        raise InputError(f"layers {bad} out of range for a {n_blocks}-block backbone")
    return [int(i) % n_blocks for i in (layers or [])]


def extract(
    backbone,
    images: Any,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    size: int | Sequence[int] | None = 224,
    policy: str = "resize",
    value_range: tuple[float, float] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    out_device: str | torch.device = "cpu",
    progress: bool = False,
) -> Features:
    """Features of ``images`` (one image, a list, or a float/int tensor [B, C, H, W] of pixel values).

    Args:
        layers: extra block indices (0-based, negatives count from the end) whose normed patch
            features to return, e.g. four evenly spaced blocks for segmentation heads.
        size, policy, value_range: see :func:`dinoapp.preprocess.preprocess`; all images of one call
            must end up with the same size (``size=None`` with mixed sizes is an error).
        device: defaults to the backbone's device. ``dtype=torch.float32`` turns off bf16 autocast on CUDA.
        progress: show a tqdm bar over batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = torch.device(device) if device is not None else next(backbone.parameters()).device
    n_blocks = backbone.n_blocks
    want = sorted(set(block_indices(layers, n_blocks)) | {n_blocks - 1})
    was_training = backbone.training
    backbone.eval()
    out: dict[str, list[torch.Tensor]] = {"cls": [], "reg": [], "patch": []}
    inter: dict[int, list[torch.Tensor]] = {i: [] for i in want[:-1]}
    grid = None
    total = _n_images(images)
    it = _batches(images, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="extract", unit="img")
    try:
        with torch.inference_mode(), autocast_for(dev, dtype):
            for chunk in it:
                if isinstance(chunk, torch.Tensor):
                    x = preprocess(chunk.to(dev), backbone, size=size, policy=policy, value_range=value_range)
                else:
                    xs = [preprocess(im, backbone, size=size, policy=policy, value_range=value_range) for im in chunk]
                    shapes = {tuple(t.shape) for t in xs}
                    if len(shapes) > 1:
                        raise InputError(f"images of one call must share a size after preprocessing, got {shapes}: "
                                         "pass size=... (or call extract per image)")  # fmt: skip
                    x = torch.stack(xs).to(dev)
                outs = backbone.get_intermediate_layers(
                    x, n=want, reshape=False, return_class_token=True, return_extra_tokens=True, norm=True
                )
                h, w = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
                if grid is not None and grid != (h, w):
                    raise InputError(f"batches gave different patch grids {grid} and {(h, w)}: pass size=...")
                grid = (h, w)
                B = x.shape[0]
                patches, cls, regs = outs[-1]
                out["cls"].append(cls.float().to(out_device))
                out["reg"].append(regs.float().to(out_device))
                out["patch"].append(patches.reshape(B, h, w, -1).float().to(out_device))
                for i, (p, _, _) in zip(want[:-1], outs[:-1], strict=True):
                    inter[i].append(p.reshape(B, h, w, -1).float().to(out_device))
                if bar is not None:
                    bar.update(B)
    finally:
        if bar is not None:
            bar.close()
        backbone.train(was_training)
    if not out["cls"]:
        raise InputError("no images were given")
    layers_out = {i: torch.cat(v) for i, v in inter.items()}
    if layers and (n_blocks - 1) in {i % n_blocks for i in layers}:
        layers_out[n_blocks - 1] = torch.cat(out["patch"])
    return Features(
        cls=torch.cat(out["cls"]),
        registers=torch.cat(out["reg"]),
        patches=torch.cat(out["patch"]),
        layers={i: layers_out[i] for i in sorted(layers_out)},
    )
