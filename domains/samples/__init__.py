"""Small real sample rasters shipped with the package (see README.md here for sources and licences)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
SAMPLES = {
    "sentinel2": "sentinel2_b2348_256.tif",
    "aerial": "aerial_rgbn_5m.tif",
    "landsat": "landsat_rgb_byte_600m.tif",
}


def path(name: str) -> Path:
    """The file of a named sample: ``sentinel2`` (4-band uint16), ``aerial`` (RGBN uint8, nodata 0),
    ``landsat`` (RGB uint8, rotated footprint with nodata corners)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; samples are {sorted(SAMPLES)}")
    return _HERE / SAMPLES[name]
