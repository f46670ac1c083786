"""Interactive latency: what a click in the app or a notebook cell costs, cold and with cached features.

CPU, ViT-S/16 (DINOv3 architecture, random weights: timing does not depend on the values), a
1024 x 1024 image (64 x 64 = 4096 patches, one pass):

- cold: ``FeatureCache.features`` computes the features, then the PCA map / similarity map;
- warm: the same calls with the features in the cache (what every click after the first costs);
- maps are computed at patch resolution, then brought to the image's size as the app shows them
  (PCA: ``viz.upsample`` nearest; similarity: ``viz.overlay`` on the image);
- the linear segmentation head fitted on cached features of 20 images of 512 px (32 x 32 patches).

Targets (issue): warm similarity < 20 ms, warm PCA < 300 ms, head fit < 10 s. Median of ``--repeats``.

    python benchmarks/interactive.py [--arch vits16] [--size 1024] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import dinoapp
from dinoapp import viz
from dinoapp.cache import FeatureCache
from dinoapp.heads import fit_seg_head


def _image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([np.sin(xx / 31.0), np.cos(yy / 23.0), ((xx + yy) % 97) / 97.0], -1) * 0.4 + 0.5
    for _ in range(6):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20, size // 6))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.random(3)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def _med(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vits16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bb = dinoapp.load_backbone(a.arch, seed=0)
    img = _image(a.size)
    shown = (img * 255 + 0.5).astype(np.uint8)  # the display copy an app / notebook keeps next to the features
    H = W = a.size

    def pca_map(f):
        return viz.upsample(viz.pca_rgb(f.patches), (H, W), mode="nearest")

    def sim_map(f):
        h, w = f.patches.shape[:2]  # query the centre patch, whatever --size gives
        return viz.overlay(shown, viz.similarity_map(f.patches, (h // 2, w // 2)), alpha=0.6, vmin=0.0, vmax=1.0)

    rows = []
    for name, fn in (("PCA map", pca_map), ("similarity map", sim_map)):
        cold = []
        for _ in range(max(1, a.repeats // 2)):
            cache = FeatureCache()
            t0 = time.perf_counter()
            fn(cache.features(bb, img, policy="pad"))
            cold.append(time.perf_counter() - t0)
        cache = FeatureCache()
        cache.features(bb, img, policy="pad")
        warm = _med(lambda fn=fn, cache=cache: fn(cache.features(bb, img, policy="pad")), a.repeats)
        held = cache.features(bb, img, policy="pad")  # features an app keeps in its session state
        only = _med(lambda fn=fn, held=held: fn(held), a.repeats)
        rows.append((name, statistics.median(cold), warm, only))
    print(f"{a.arch}, {a.size} x {a.size} image ({(a.size // 16) ** 2} patches), {a.threads} threads, CPU")
    print(f"{'':<16}{'cold (s)':>10}{'warm (ms)':>11}{'map only (ms)':>15}")
    for name, cold, warm, only in rows:
        print(f"{name:<16}{cold:>10.2f}{warm * 1e3:>11.1f}{only * 1e3:>15.1f}")
    print("warm = cache lookup (input digest + fingerprint) + map; map only = with the features in hand")

    imgs = [_image(512, seed=s) for s in range(20)]
    masks = [(viz.upsample(viz.kmeans_parts([np.asarray(im[::16, ::16])], 3)[0], (512, 512), mode="nearest"))
             for im in imgs]  # 3-class masks from the images' own colours
    cache = FeatureCache()
    t0 = time.perf_counter()
    feats = torch.stack([cache.features(bb, im, policy="pad").patches for im in imgs])  # [20, 32, 32, D]
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_seg_head(feats, np.stack(masks).astype(np.int64), 3)
    t_fit = time.perf_counter() - t0
    print(f"seg head: features of 20 x 512 px {t_feat:.1f} s (cold), fit on cached features {t_fit:.2f} s "
          f"(default 100 epochs)")


if __name__ == "__main__":
    main()
