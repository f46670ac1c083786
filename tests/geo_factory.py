"""Generated GeoTIFFs for the domain-IO tests and benchmarks (rasterio writes them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_geotiff(
    path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform=None,
    nodata=None,
    descriptions=None,
    scales=None,
    offsets=None,
    mask: np.ndarray | None = None,
    colorinterp=None,
    tiled: bool = True,
    blocksize: int = 64,
    compress: str | None = "deflate",
) -> Path:
    """Write ``data`` [C, H, W] as a GeoTIFF with the given georeferencing, nodata, tags and GDAL mask."""
    import rasterio
    from affine import Affine

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    C, H, W = data.shape
    profile = {
        "driver": "GTiff", "width": W, "height": H, "count": C, "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform if transform is not None else Affine(10.0, 0, 500000.0, 0, -10.0, 4_600_000.0),
        "nodata": nodata, "photometric": "MINISBLACK",
    }
    if compress:
        profile["compress"] = compress
    if tiled and H >= 16 and W >= 16:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    path = Path(path)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or []):
            dst.set_band_description(i + 1, d)
        if scales is not None:
            dst.scales = tuple(scales)
        if offsets is not None:
            dst.offsets = tuple(offsets)
        if colorinterp is not None:
            dst.colorinterp = colorinterp
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def smooth_bands(C: int, H: int, W: int, seed: int = 0, dtype=np.uint16, high: int = 4000) -> np.ndarray:
    """Smooth, distinct per-band fields with noise: compressible, with a realistic histogram."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((C, H, W), dtype=dtype)
    for c in range(C):
        f = np.sin(x / (17.0 + 5 * c)) * np.cos(y / (23.0 + 3 * c)) + 0.3 * rng.standard_normal((H, W))
        f = (f - f.min()) / (f.max() - f.min() + 1e-9)
        out[c] = (1 + f * (high - 2) * (0.6 + 0.1 * c)).astype(dtype)  # >= 1, so 0 can be nodata
    return out
