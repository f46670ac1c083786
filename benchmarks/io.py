"""Domain-IO benchmark: tiled GeoTIFF reading vs raw rasterio windowed reads, peak memory, DICOM series assembly.

1. Generates an ``--size`` x ``--size`` x 4 uint16 GeoTIFF (tiled 512, deflate, nodata corner) in a temp
   folder (written window by window: the generator stays small too).
2. Each reader runs in its own subprocess (so its peak RSS is its own), twice, alternating, best time:
   - ``raw``: ``src.read(window=w)`` for every 512 px tile of the grid (uint16, no mask, no scaling), with
     GDAL's default block cache (5 % of RAM) and with the 256 MiB cap ``iter_tiles`` sets (``raw+cache256``);
   - ``domains``: ``iter_tiles(path, 512, overlap)`` with saved band stats: float32 [C, 512, 512] tiles with
     valid mask and the stats stretch (what a training/inference loop consumes);
   - ``domains+auto``: the same with ``stretch="auto"`` (scene stats computed first, from a decimated read).
   Prints MB/s of decoded uint16 pixels, the ratio to ``raw`` (target >= 0.8) and peak RSS (VmHWM of the
   reader process; target < 1 GB).
3. DICOM series assembly (``benchmarks/dicom_series.py``): 200 generated 512 x 512 slices in random order.

    python benchmarks/io.py [--size 8192] [--tile 512] [--overlap 0] [--skip-dicom]
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
        "driver": "GTiff", "width": size, "height": size, "count": 4, "dtype": "uint16", "nodata": 0,
        "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5_000_000), "tiled": True,
        "blockxsize": 512, "blockysize": 512, "compress": "deflate", "predictor": 2, "BIGTIFF": "IF_SAFER",
    }
    rng = np.random.default_rng(0)
    step = 1024
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, step):
            y = np.arange(r, min(r + step, size), dtype=np.float32)[:, None]
            x = np.arange(size, dtype=np.float32)[None, :]
            block = np.empty((4, len(y), size), np.uint16)
            for c in range(4):
                f = 2000 + 1500 * np.sin(x / (90.0 + 13 * c)) * np.cos(y / (70.0 + 7 * c))
                block[c] = np.clip(f + rng.normal(0, 150, f.shape), 1, 65535).astype(np.uint16)
            if r < size // 8:
                block[:, :, : size // 8] = 0  # nodata corner
            dst.write(block, window=Window(0, r, size, len(y)))


def _child(mode: str, path: str, tile: int, overlap: int, stats_path: str) -> None:
    t0 = time.perf_counter()
    n = 0
    if mode.startswith("raw"):
        import rasterio
        from rasterio.windows import Window

        from domains import tile_grid

        env = rasterio.Env(GDAL_CACHEMAX=256 * 2**20) if mode == "raw+cache256" else rasterio.Env()
        with env, rasterio.open(path) as src:
            for t in tile_grid(src.height, src.width, tile, overlap, edge="shift"):
                a = src.read(window=Window(t.x0, t.y0, t.width, t.height))
                n += a.shape[1] * a.shape[2]
    else:
        from domains import BandStats, iter_tiles

        stats = BandStats.load(stats_path) if mode == "domains" else None
        for a, _m in iter_tiles(path, tile, overlap, stats=stats):
            n += a.shape[1] * a.shape[2]
    dt = time.perf_counter() - t0
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec)
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM")][0]
    rss = int(hwm.split()[1]) / 1024  # MiB
    print(json.dumps({"mode": mode, "seconds": dt, "pixels": n, "rss_mib": rss}))


def run_child(mode, path, tile, overlap, stats_path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--path", str(path), "--tile", str(tile), "--overlap", str(overlap),
         "--stats", str(stats_path)],
        capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-dicom", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--stats")
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.path, a.tile, a.overlap, a.stats)
        return
    sys.path.insert(0, str(ROOT))
    from domains import compute_band_stats

    with tempfile.TemporaryDirectory(prefix="dinoapp-io-") as d:
        path = Path(d) / "scene.tif"
        t0 = time.perf_counter()
        generate(path, a.size)
        print(f"generated {a.size} x {a.size} x 4 uint16 ({path.stat().st_size / 2**20:.0f} MiB deflate) "
              f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        stats = compute_band_stats(path)
        stats_path = stats.save(Path(d) / "stats.json")
        print(f"band stats (sampled, {stats.count} px): {time.perf_counter() - t0:.2f} s")
        best: dict[str, dict] = {}
        for _ in range(a.repeats):
            for mode in ("raw", "raw+cache256", "domains", "domains+auto"):
                r = run_child(mode, path, a.tile, a.overlap, stats_path)
                if mode not in best or r["seconds"] < best[mode]["seconds"]:
                    best[mode] = {**r, "rss_mib": max(r["rss_mib"], best.get(mode, {}).get("rss_mib", 0))}
        raw = best["raw"]["seconds"]
        print(f"\ntiles {a.tile} px, overlap {a.overlap}, best of {a.repeats}")
        print(f"{'reader':<14}{'seconds':>9}{'MB/s':>9}{'ratio':>8}{'peak RSS MiB':>14}")
        for mode, r in best.items():
            mbs = r["pixels"] * 4 * 2 / 2**20 / r["seconds"]
            print(f"{mode:<14}{r['seconds']:>9.2f}{mbs:>9.1f}{raw / r['seconds']:>8.2f}{r['rss_mib']:>14.0f}")
    if not a.skip_dicom:
        print()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dicom_series.py")], check=False, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main()
