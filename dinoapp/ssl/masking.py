"""iBOT block masks over the patch grid (DINOv3 spec, section 2).

Half of the global-crop images (``sample_prob``) get a mask; their masking ratios are evenly
spaced in (0.1, 0.5]. Each mask is a union of BEiT-style random rectangles (area >= 4 patches,
aspect ratio in [0.3, 1/0.3]) topped up with random single patches to an exact count, so every
masked image has a known number of masked patches. All randomness comes from the generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError


class UniformStream:
    """Uniform floats in [0, 1) from a torch generator, fetched in chunks: one torch call per 64 draws
    instead of one per draw (masks are made for every global-crop image at every step)."""

    def __init__(self, generator: torch.Generator, chunk: int = 64) -> None:
        self.generator, self.chunk, self.buf = generator, chunk, []

    def __call__(self) -> float:
        if not self.buf:
            self.buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self.buf.pop()

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self()

    def randint(self, high: int) -> int:
        """Uniform in [0, high)."""
        return min(int(self() * high), high - 1)


def block_mask(
    h: int,
    w: int,
    n_masked: int,
    generator: torch.Generator,
    *,
    min_area: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A bool mask [h, w] with exactly ``n_masked`` True patches: random rectangles, then single patches.

    Rectangles (BEiT's masking generator): area uniform in [min_area, patches still to mask],
    log-uniform aspect ratio in ``aspect``, random position; a rectangle is kept when it adds at
    least one and at most the remaining number of patches. Drawing stops when 10 tries in a row
    add nothing (or fewer than ``min_area`` patches remain); the rest are random unmasked patches.
    """
    n_patches = h * w
    if not 0 <= n_masked <= n_patches:
        raise ConfigError(f"cannot mask {n_masked} patches of a {h} x {w} grid ({n_patches} patches)")
    mask = np.zeros((h, w), dtype=bool)  # [h, w]
    rand = UniformStream(generator)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while n_masked - count >= min_area:
        remaining = n_masked - count
        added = 0
        for _ in range(10):
            area = rand.uniform(min_area, remaining)
            ratio = math.exp(rand.uniform(log_lo, log_hi))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if not (0 < bh <= h and 0 < bw <= w):
                continue
            top, left = rand.randint(h - bh + 1), rand.randint(w - bw + 1)
            block = mask[top : top + bh, left : left + bw]  # [bh, bw] view
            new = bh * bw - int(block.sum())
            if 0 < new <= remaining:
                block[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < n_masked:  # top up with random unmasked patches
        flat = mask.reshape(-1)  # [h * w] view
        free = np.flatnonzero(~flat)  # [n_free]
        flat[free[torch.randperm(free.size, generator=generator)[: n_masked - count].numpy()]] = True
    return torch.from_numpy(mask)


def ibot_masks(
    n_images: int,
    h: int,
    w: int,
    generator: torch.Generator,
    *,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    sample_prob: float = 0.5,
) -> torch.Tensor:
    """Bool masks [n_images, h * w]: ``int(n_images * sample_prob)`` randomly chosen images are masked.

    The i-th masked image (i = 0 .. n_m - 1) masks ``round(ratio_i * h * w)`` patches, with
    ``ratio_i = lo + (i + 1) * (hi - lo) / n_m``: ratios evenly spaced in (lo, hi]. The others are all False.
    """
    lo, hi = ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"mask ratio_range={ratio_range}: give (min, max) with 0 <= min <= max <= 1")
    if not 0.0 <= sample_prob <= 1.0:
        raise ConfigError(f"mask sample_prob={sample_prob} must be in [0, 1] (the fraction of masked images)")
    masks = torch.zeros(n_images, h * w, dtype=torch.bool)  # [n_images, h * w]
    n_m = int(n_images * sample_prob)
    chosen = torch.randperm(n_images, generator=generator)[:n_m].tolist()
    for i, b in enumerate(chosen):
        ratio = lo + (i + 1) * (hi - lo) / n_m
        masks[b] = block_mask(h, w, int(round(ratio * h * w)), generator).view(-1)
    return masks
