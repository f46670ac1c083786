"""Whole-scene dense features: ``scene_features`` over a generated GeoTIFF vs pure forward passes.

Generates a ``--size`` x ``--size`` x 3 uint8 GeoTIFF (tiled, deflate; benchmarks/io.py's generator
adapted to 3 bands), then runs in separate processes (so each peak RSS is its own):

- ``forward``: the backbone's forward over the same windows, read and normalised into RAM before the
  clock starts (pure compute: no reading, no preprocessing, no blending) -> the baseline (its peak RSS
  includes those held tiles);
- ``scene``: ``dinoapp.dense.scene_features(bb, path, tile, overlap)``: windowed reads, the
  scene-wide stretch, normalisation, forward, blending every window's patch features into the
  scene's [D, h, w] map at patch resolution.

Prints windows/s, the ratio scene / forward throughput (target >= 0.9) and peak RSS (target < 2 GB).

    python benchmarks/scene.py [--size 8192] [--tile 512] [--overlap 64] [--arch vit_tiny] [--depth 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, size: int) -> None:
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "nodata": 0,
        "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5_000_000), "tiled": True,
        "blockxsize": 512, "blockysize": 512, "compress": "deflate", "predictor": 2,
    }
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 1024):
            y = np.arange(r, min(r + 1024, size), dtype=np.float32)[:, None]
            x = np.arange(size, dtype=np.float32)[None, :]
            block = np.empty((3, len(y), size), np.uint8)
            for c in range(3):
                f = 128 + 100 * np.sin(x / (60.0 + 11 * c)) * np.cos(y / (45.0 + 9 * c))
                block[c] = np.clip(f + rng.normal(0, 12, f.shape), 1, 255).astype(np.uint8)
            dst.write(block, window=Window(0, r, size, len(y)))


def _hwm_mib() -> float:
    line = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) / 1024


def _child(a) -> None:
    import torch

    import dinoapp
    from dinoapp.dense import scene_features

    torch.set_num_threads(os.cpu_count() or 1)
    bb = dinoapp.load_backbone(a.arch, depth=a.depth, seed=0) if a.depth else dinoapp.load_backbone(a.arch, seed=0)
    with torch.inference_mode():  # warm-up
        bb.get_intermediate_layers(torch.randn(a.batch, 3, a.tile, a.tile), n=1, reshape=True)
    t0 = time.perf_counter()
    if a.child == "forward":
        # the same tiles, read and normalised before the clock starts (held in RAM: ~3 MB each)
        from domains import iter_tiles

        mean = torch.tensor(bb.mean).view(-1, 1, 1)
        std = torch.tensor(bb.std).view(-1, 1, 1)
        xs = [torch.from_numpy(t).sub_(mean).div_(std) for t, _ in iter_tiles(a.path, a.tile, a.overlap)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(xs), a.batch):
                bb.get_intermediate_layers(torch.stack(xs[i : i + a.batch]), n=1, reshape=True, norm=True)
        windows = len(xs)
    else:
        sm = scene_features(bb, a.path, tile=a.tile, overlap=a.overlap, batch_size=a.batch, progress=False)
        windows = sm.windows
    dt = time.perf_counter() - t0
    print(json.dumps({"mode": a.child, "seconds": dt, "windows": windows, "rss_mib": _hwm_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--child")
    ap.add_argument("--path")
    a = ap.parse_args()
    if a.child:
        _child(a)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="dinoapp-scene-") as d:
        path = Path(d) / "scene.tif"
        t0 = time.perf_counter()
        generate(path, a.size)
        print(f"generated {a.size} x {a.size} x 3 uint8 in {time.perf_counter() - t0:.1f} s; "
              f"{a.arch} depth {a.depth}, tile {a.tile}, overlap {a.overlap}, batch {a.batch}, "
              f"{os.cpu_count()} CPU threads")
        res = {}
        for mode in ("forward", "scene"):
            cmd = [sys.executable, __file__, "--child", mode, "--path", str(path)]
            cmd += ["--tile", str(a.tile), "--overlap", str(a.overlap), "--batch", str(a.batch)]
            cmd += ["--arch", a.arch, "--depth", str(a.depth)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    f, s = res["forward"], res["scene"]
    print(f"{'run':<10}{'windows':>9}{'seconds':>9}{'win/s':>8}{'peak RSS MiB':>14}")
    for r in (f, s):
        print(f"{r['mode']:<10}{r['windows']:>9}{r['seconds']:>9.1f}{r['windows'] / r['seconds']:>8.2f}"
              f"{r['rss_mib']:>14.0f}")
    ratio = (s["windows"] / s["seconds"]) / (f["windows"] / f["seconds"])
    print(f"scene / forward throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
