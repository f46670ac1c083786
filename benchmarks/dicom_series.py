"""Reading a CT series: domains.series (find_series + read_series) against a naive pydicom loop.

Writes N synthetic 512x512 int16 CT slices (tests/dicom_factory.py) in random file order to a temporary
folder, then times, in the same process and interleaved (median of repeats):

* ours: ``read_series(folder)`` -> float32 HU volume [D, H, W], sorted along the slice normal, with
  spacing/orientation meta; and ``find_series(folder)`` (headers only) + ``read_series`` as an app does;
* baseline: ``pydicom.dcmread`` of every file, sort by ImagePositionPatient . normal, ``np.stack`` of
  ``ds.pixel_array`` (stored int16 values: no rescale to HU, no checks);
* baseline + HU: the same, then pydicom's ``apply_modality_lut`` per slice into a float32 volume (the
  output ours gives, without the grouping, checks and meta).

Prints files, seconds, slices/s, MB/s (of DICOM files read) and the ratios baseline time / our time
(> 1: ours is faster).

    python benchmarks/dicom_series.py [--slices 200] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: domains, tests

from domains.series import find_series, read_series  # noqa: E402
from tests.dicom_factory import make_series, oblique_orientation  # noqa: E402


def _sorted_datasets(folder: str) -> list:
    import pydicom

    dss = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)]
    o = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(o[:3], o[3:])
    dss.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)))
    return dss


def naive(folder: str) -> np.ndarray:
    return np.stack([ds.pixel_array for ds in _sorted_datasets(folder)])  # [D, H, W] int16 stored values


def naive_hu(folder: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    dss = _sorted_datasets(folder)
    vol = np.empty((len(dss), dss[0].Rows, dss[0].Columns), dtype=np.float32)  # [D, H, W] HU
    for k, ds in enumerate(dss):
        vol[k] = apply_modality_lut(ds.pixel_array, ds)
    return vol


def ours(folder: str) -> np.ndarray:
    vol, _ = read_series(folder)
    return vol  # [D, H, W] float32 HU


def ours_listed(folder: str) -> np.ndarray:
    find_series(folder)  # list the series first (headers only), as an app does, then read one
    vol, _ = read_series(folder)
    return vol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_series(
            tmp,
            args.slices,
            rows=args.size,
            cols=args.size,
            spacing=1.25,
            orientation=oblique_orientation(15),
            shuffle_seed=1,
        )
        print(f"wrote {args.slices} slices of {args.size}x{args.size} int16 in {time.perf_counter() - t0:.1f} s")
        mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
        a, b, c = ours(tmp), naive(tmp), naive_hu(tmp)  # warm-up (page cache, imports) and a correctness check
        assert np.array_equal(a, b.astype(np.float32) - 1024.0) and np.array_equal(a, c), "volumes differ"
        readers = {
            "naive pydicom loop": naive,
            "naive loop + HU float32": naive_hu,
            "read_series": ours,
            "find_series + read_series": ours_listed,
        }
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, fn in readers.items():
                t0 = time.perf_counter()
                fn(tmp)
                times[name].append(time.perf_counter() - t0)
    print(f"{'reader':<28} {'files':>6} {'seconds':>8} {'slices/s':>9} {'MB/s':>7}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:<28} {args.slices:>6} {t:>8.3f} {args.slices / t:>9.1f} {mb / t:>7.1f}")
    t_ours = med["read_series"]
    print(
        f"ratio naive / read_series: {med['naive pydicom loop'] / t_ours:.2f}; naive + HU / read_series: "
        f"{med['naive loop + HU float32'] / t_ours:.2f}"
    )
    print(f"({mb:.0f} MB of DICOM, median of {args.repeats}, interleaved, warm page cache)")


if __name__ == "__main__":
    main()
