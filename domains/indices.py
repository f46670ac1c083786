"""Spectral indices computed straight from a raster: NDVI.

The bands are found by their names (band descriptions or colour interpretation, as
:func:`~domains.geotiff.raster_info` reports them in ``channels``) unless given, and read with
``stretch="none"`` (physical values after the file's scale/offset tags), so an index does not
depend on any display stretch.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .errors import BandSelectionError

# Unambiguous names (lower case, punctuation -> spaces). Sentinel-2 writes its codes zero-padded ("B04",
# "B08"); "B8A" is Sentinel-2's narrow NIR. Bare "B4"/"B8" are Sentinel-2 too (Google Earth Engine
# exports), but in Landsat's numbering B4 is NIR (Landsat 4-7) and B8 panchromatic (Landsat 7-9): see
# _bare_sentinel2_names.
_RED = ("red", "b04")
_NIR = ("nir", "b08", "near infrared", "nir08", "b8a")  # in order of preference: broad NIR (B08) before B8A


def _words(name: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", name.lower()).split())


def _bare_sentinel2_names(names: list[str]) -> bool:
    """Whether bare ``B4``/``B8`` can be read as Sentinel-2 red/NIR: the raster has a B8A band (only
    Sentinel-2 has one) or no B5 band (every Landsat band set with a B8 has a B5)."""
    w = {_words(n) for n in names}
    return "b8a" in w or "b5" not in w


def _find(src, names: list[str], wanted: tuple[str, ...], colour: str | None) -> int | None:
    """1-based index of the first band named like one of ``wanted`` (in that order of preference)."""
    if colour is not None:
        for i, ci in enumerate(src.colorinterp or ()):
            if ci.name == colour:
                return i + 1
    words = [_words(n) for n in names]
    for want in wanted:
        for i, w in enumerate(words):
            if w == want:
                return i + 1
    for want in wanted:  # a word of a longer description ("B4 red", "Red (B4)", "NIR, 842 nm"); not "red edge"
        if " " in want:
            continue
        for i, w in enumerate(words):
            if "edge" not in w.split() and want in w.split():
                return i + 1
    return None


def ndvi(
    path: str | os.PathLike,
    *,
    red: int | str | None = None,
    nir: int | str | None = None,
    window=None,
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """NDVI = (NIR - red) / (NIR + red) of a raster -> float32 [H, W] in [-1, 1], NaN where nodata.

    ``red`` / ``nir``: 1-based band numbers (GDAL / QGIS convention) or band names, as
    :func:`domains.load` takes them in ``bands=``. Left out, they are found by colour interpretation
    or band description: red ``"red"`` / ``"B04"``, NIR ``"nir"`` / ``"near infrared"`` / ``"B08"``
    / ``"B8A"`` (B08 preferred), also as a word of a longer description (``"B4 red"``; a red-edge band
    is not red). Bare ``"B4"`` / ``"B8"`` (Sentinel-2 as Earth Engine names them) are used only when
    the raster cannot be Landsat-numbered, where B4 is NIR (Landsat 4-7) and B8 panchromatic (7-9):
    it has a ``B8A`` band or no ``B5``. A band that cannot be found raises
    :class:`~domains.errors.BandSelectionError` listing the raster's bands; pass ``red=`` / ``nir=``.

    Values are the physical ones (``stretch="none"``: the file's scale/offset tags applied, no
    display stretch). Pixels where NIR + red == 0 get 0; nodata pixels (the file's nodata value in
    both bands, its GDAL mask or alpha band, NaN; see :func:`domains.read_geotiff`) get NaN
    (``np.isnan`` gives the mask; comparisons such as ``ndvi > 0.3`` are False there). Values are
    clipped to [-1, 1], which matters only for negative reflectances (surface-reflectance products
    with an offset). ``window`` / ``out_shape`` read a region / decimated, as in :func:`domains.load`.
    """
    from .geotiff import band_names, open_raster, read_geotiff, resolve_bands

    with open_raster(path) as src:
        names = band_names(src)
        listing = ", ".join(f"{i + 1}={n!r}" for i, n in enumerate(names))
        picked: dict[str, int] = {}
        bare = _bare_sentinel2_names(names)
        red_names = (*_RED, "b4") if bare else _RED
        nir_names = (*_NIR[:2], "b8", *_NIR[2:]) if bare else _NIR  # B8 before B8A, as B08
        for role, given, wanted, colour in (("red", red, red_names, "red"), ("nir", nir, nir_names, None)):
            if given is not None:
                picked[role] = resolve_bands(src, [given])[0]  # BandSelectionError for a wrong number / name
                continue
            found = _find(src, names, wanted, colour)
            if found is None:
                what = "red ('red', 'B04')" if role == "red" else "near-infrared ('nir', 'B08', 'B8A')"
                why = ""
                if not bare and {"b4", "b8"} & {_words(n) for n in names}:
                    why = (" (bare 'B4'/'B8' are not read as Sentinel-2's red/NIR here: with a B5 and no B8A this "
                           "may be Landsat numbering, where B4 is NIR or B8 panchromatic)")  # fmt: skip
                raise BandSelectionError(
                    f"{os.path.basename(str(path))}: no {what} band found by name{why}; pass {role}= a band "
                    f"number (1-based) or name, e.g. ndvi(path, red=3, nir=4); the raster has {listing}"
                )
            picked[role] = found
        if picked["red"] == picked["nir"]:
            raise BandSelectionError(
                f"{os.path.basename(str(path))}: red and NIR are the same band ({picked['red']}); "
                f"the raster has {listing}"
            )
        x, meta = read_geotiff(path, bands=[picked["red"], picked["nir"]], stretch="none", window=window,
                               out_shape=out_shape, src=src)  # fmt: skip
    r, n = x[0], x[1]  # float32 [H, W] each
    total = n + r
    out = np.zeros_like(total)
    np.divide(n - r, total, out=out, where=total != 0)
    np.clip(out, -1.0, 1.0, out=out)
    out[~meta["valid"]] = np.nan
    return out
