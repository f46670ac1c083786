"""Folder datasets: mixed files, per-file error policy, reproducible random windows from large rasters."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("rasterio")

import domains  # noqa: E402
from domains import FolderDataset  # noqa: E402
from tests.geo_factory import make_geotiff, smooth_bands  # noqa: E402


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(root / "a.png")
    make_geotiff(root / "sub" / "scene.tif", smooth_bands(4, 300, 280), nodata=0)
    (root / "sub" / "broken.tif").write_bytes(b"II*\x00" + bytes(100))  # damaged TIFF
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "sub" / "deeper" / "noext", format="PNG")
    (root / "notes.txt").write_text("not data")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def test_skip_policy_records_and_keeps_going(mixed, tmp_path):
    log = tmp_path / "errors.jsonl"
    ds = FolderDataset(mixed, error_log=log)
    names = sorted(p.name for p in ds.files)
    assert names == ["a.png", "broken.tif", "empty.jpg", "noext", "scene.tif"]  # txt/hidden skipped, noext sniffed
    got = list(ds)
    assert sorted(m["path"].split("/")[-1] for _, m in got) == ["a.png", "noext", "scene.tif"]
    assert all(a.dtype == np.float32 and a.ndim == 3 for a, _ in got)
    assert sorted(e.path.split("/")[-1] for e in ds.errors) == ["broken.tif", "empty.jpg"]
    assert {e.error for e in ds.errors} == {"UnreadableFileError"}
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2 and all("message" in x for x in lines)
    bad = [i for i, p in enumerate(ds.files) if p.name == "broken.tif"][0]
    arr, meta = ds[bad]  # replaced by the next readable file
    assert meta["index"] != bad
    pickle.loads(pickle.dumps(ds))  # picklable for DataLoader workers


def test_raise_policy(mixed):
    ds = FolderDataset(mixed, on_error="raise")
    with pytest.raises(domains.UnreadableFileError):
        list(ds)
    with pytest.raises(ValueError, match="on_error"):
        FolderDataset(mixed, on_error="ignore")
    with pytest.raises(domains.MissingFileError):
        FolderDataset(mixed / "nope")


def test_random_windows_are_reproducible_and_valid(tmp_path):
    data = smooth_bands(4, 400, 500)
    data[:, :, :300] = 0  # 60 % nodata on the left
    p = make_geotiff(tmp_path / "big.tif", data, nodata=0)
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(tmp_path / "small.png")
    ds = FolderDataset(tmp_path, window=64, min_valid=0.9, seed=3, geotiff={"stretch": "dtype"})
    gi = [i for i, f in enumerate(ds.files) if f == p][0]
    a1, m1 = ds[gi]
    a2, m2 = ds[gi]
    assert a1.shape == (4, 64, 64) and m1["window"] == m2["window"] and np.array_equal(a1, a2)
    assert m1["valid"].mean() >= 0.9 and m1["window"][0] + 64 > 300
    x, y = m1["window"][:2]
    np.testing.assert_allclose(a1, data[:, y : y + 64, x : x + 64] / 65535.0, rtol=1e-6)
    ds.set_epoch(1)
    windows = {ds[gi][1]["window"] for _ in range(1)} | {m1["window"]}
    assert len(windows) == 2  # a new epoch draws a new window
    small, ms = ds[1 - gi]  # smaller than the window: padded, padding invalid
    assert small.shape == (3, 64, 64) and ms["valid"][:20, :24].all() and not ms["valid"][20:].any()
