"""The pretraining data stream (dinoapp.ssl.data): step-addressed batches, folder reading, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoapp.errors import ConfigError, InputError
from dinoapp.ssl.augment import AugmentParams, MultiCrop
from dinoapp.ssl.data import (
    SSLDataset,
    StepBatchSampler,
    batch_plan,
    collate_crops,
    derive_seed,
    make_loader,
)

pytest.importorskip("rasterio")
pytest.importorskip("pydicom")

from domains import FolderDataset  # noqa: E402
from tests.dicom_factory import make_ct_slice  # noqa: E402
from tests.geo_factory import make_geotiff, smooth_bands  # noqa: E402

MEAN3, STD3 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


pytestmark = pytest.mark.usefixtures("one_thread")  # as in DataLoader workers


def small_multicrop(params="rgb", mean=MEAN3, std=STD3, n_local=2) -> MultiCrop:
    return MultiCrop(global_size=16, local_size=8, n_local=n_local, params=params, mean=mean, std=std)


@pytest.fixture
def folder(tmp_path):
    """RGB PNG, grey PNG, 3-band uint16 GeoTIFF, CT DICOM and one corrupt PNG."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(root / "b_grey.png")
    make_geotiff(root / "c_scene.tif", smooth_bands(3, 40, 44))
    make_ct_slice(root / "d_ct.dcm", rows=32, cols=32)
    (root / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    return root


def naive_plan(step, global_batch, n_items, seed):
    stream = []  # the epochs' permutations laid end to end, as long as needed
    epoch = 0
    while len(stream) < (step + 1) * global_batch:
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
        stream += [(epoch, int(i)) for i in perm]
        epoch += 1
    return stream[step * global_batch : (step + 1) * global_batch]


@pytest.mark.parametrize(("global_batch", "n_items"), [(4, 10), (3, 3), (7, 5), (5, 20), (16, 3)])
def test_batch_plan_matches_naive_stream(global_batch, n_items):
    for step in range(12):
        assert batch_plan(step, global_batch, n_items, seed=11) == naive_plan(step, global_batch, n_items, 11)


def test_batch_plan_covers_each_index_once_per_epoch():
    n, gb = 10, 4
    keys = [k for step in range(10) for k in batch_plan(step, gb, n, seed=0)]  # 40 keys = 4 epochs
    for epoch in range(4):
        assert sorted(i for e, i in keys if e == epoch) == list(range(n))
    assert [i for e, i in keys if e == 0] != [i for e, i in keys if e == 1]  # a new order every epoch
    assert batch_plan(3, gb, n, seed=0) != batch_plan(3, gb, n, seed=1)


def test_sampler_resumes_and_ranks_partition_the_global_batch():
    full = list(StepBatchSampler(13, 6, seed=5, total_steps=9))
    assert len(full) == 9 and full == [batch_plan(s, 6, 13, 5) for s in range(9)]
    resumed = StepBatchSampler(13, 6, seed=5, start_step=4, total_steps=9)
    assert len(resumed) == 5 and list(resumed) == full[4:]
    ranks = [list(StepBatchSampler(13, 6, seed=5, total_steps=9, rank=r, world_size=3)) for r in range(3)]
    for step in range(9):
        assert [k for r in range(3) for k in ranks[r][step]] == full[step]
        assert all(len(ranks[r][step]) == 2 for r in range(3))


def test_sampler_errors():
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        StepBatchSampler(10, 6, seed=0, total_steps=3, world_size=4)
    with pytest.raises(ConfigError, match="rank 2"):
        StepBatchSampler(10, 6, seed=0, total_steps=3, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="empty"):
        StepBatchSampler(0, 6, seed=0, total_steps=3)


def test_dataset_reads_mixed_folder(folder):
    src = FolderDataset(folder)
    ds = SSLDataset(src, small_multicrop(), in_chans=3, seed=0)
    assert len(ds) == 5
    for i in range(len(ds)):
        item = ds[(0, i)]
        assert item["global"].shape == (2, 3, 16, 16) and item["local"].shape == (2, 3, 8, 8)
        assert item["index"] == i and torch.isfinite(item["global"]).all()
    assert [e.path.endswith("e_corrupt.png") for e in src.errors] == [True]
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(a["global"], b["global"])
    assert not torch.equal(a["global"], ds[(1, 1)]["global"])  # the epoch is part of the seed


def test_multiband_geotiff_needs_matching_in_chans(tmp_path):
    make_geotiff(tmp_path / "s2.tif", smooth_bands(4, 32, 32))
    src = FolderDataset(tmp_path)
    with pytest.raises(InputError, match=r"4 channels .* in_chans=3: select bands .*bands"):
        SSLDataset(src, small_multicrop(), in_chans=3, seed=0)[(0, 0)]
    assert [e.error for e in src.errors] == ["InputError"]  # recorded (errors log), like an unreadable file
    mc4 = small_multicrop("satellite", mean=[0.5] * 4, std=[0.25] * 4)
    assert SSLDataset(FolderDataset(tmp_path), mc4, in_chans=4, seed=0)[(0, 0)]["global"].shape == (2, 4, 16, 16)


def test_band_names_from_the_config_reach_the_geotiff_reader(tmp_path):
    """data.bands=[B04,B03,B02] selects those bands by description in the training folder's GeoTIFFs."""
    from dinoapp.ssl.config import load_config
    from dinoapp.ssl.train import build_source

    data = smooth_bands(4, 32, 32)
    (tmp_path / "data").mkdir()
    make_geotiff(tmp_path / "data" / "s2.tif", data, descriptions=["B02", "B03", "B04", "B08"])
    cfg = load_config("cpu-smoke", [f"data.path={tmp_path / 'data'}", "data.bands=[B04,B03,B02]", "data.stats=null"])
    src = build_source(cfg.data, seed=0, run_dir=tmp_path / "run")
    x, meta = src[0]
    assert meta["channels"] == ["B04", "B03", "B02"] and meta["bands"] == [3, 2, 1] and x.shape == (3, 32, 32)
    assert src.errors == []
    item = SSLDataset(src, small_multicrop(), in_chans=3, seed=0)[(0, 0)]
    assert item["global"].shape == (2, 3, 16, 16)


def test_files_the_model_cannot_take_are_skipped(tmp_path):
    """A 2-band raster among RGB ones is recorded and replaced by the next file; the run goes on."""
    make_geotiff(tmp_path / "a_two_bands.tif", smooth_bands(2, 32, 32))
    make_geotiff(tmp_path / "b_rgb.tif", smooth_bands(3, 32, 32))
    src = FolderDataset(tmp_path)
    item = SSLDataset(src, small_multicrop(), in_chans=3, seed=0)[(0, 0)]
    assert item["global"].shape == (2, 3, 16, 16)
    assert [Path(e.path).name for e in src.errors] == ["a_two_bands.tif"] and "2 channels" in src.errors[0].message


class ArraySource:
    """A minimal source: fixed arrays with a value range, recording the epochs it was set to."""

    def __init__(self, arrays, value_range=(0.0, 1.0)):
        self.arrays, self.value_range, self.epoch, self.epochs = arrays, value_range, 0, []

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        self.epochs.append(self.epoch)
        return self.arrays[i], {"value_range": self.value_range, "path": f"item{i}.tif", "channels": ["B1", "B2"]}


def test_value_range_scaling_clipping_and_channel_repeat():
    arr = np.array([[[-500.0, 1000.0], [6000.0, 21000.0]]], np.float32)  # [1, 2, 2]
    mc = MultiCrop(
        global_size=2,
        local_size=2,
        n_local=1,
        global_scale=(1, 1),
        local_scale=(1, 1),
        params=AugmentParams(),
        mean=[0.0] * 3,
        std=[1.0] * 3,
    )
    src = ArraySource([arr], value_range=(1000.0, 11000.0))
    out = SSLDataset(src, mc, in_chans=3, seed=0)[(4, 0)]
    want = torch.tensor([[0.0, 0.0], [0.5, 1.0]]).expand(3, 2, 2)
    torch.testing.assert_close(out["global"][0], want)
    torch.testing.assert_close(out["local"][0], want)
    assert src.epochs == [4]


def test_physical_values_and_wrong_channels_are_input_errors():
    mc = small_multicrop()
    with pytest.raises(InputError, match="item0.tif: values are physical .*window"):
        SSLDataset(ArraySource([np.zeros((1, 8, 8), np.float32)], value_range=None), mc, in_chans=3, seed=0)[(0, 0)]
    with pytest.raises(InputError, match=r"item0.tif has 2 channels \(B1, B2\)"):
        SSLDataset(ArraySource([np.zeros((2, 8, 8), np.float32)]), mc, in_chans=3, seed=0)[(0, 0)]


def test_collate_is_crop_major():
    items = [
        {
            "global": torch.full((2, 3, 4, 4), float(b)) + torch.arange(2.0).view(2, 1, 1, 1) * 10,
            "local": torch.full((5, 3, 2, 2), float(b)) + torch.arange(5.0).view(5, 1, 1, 1) * 10,
            "index": 7 + b,
        }
        for b in range(3)
    ]
    out = collate_crops(items)
    assert out["global_crops"].shape == (2, 3, 3, 4, 4) and out["local_crops"].shape == (5, 3, 3, 2, 2)
    for b in range(3):
        for k in range(2):
            assert torch.equal(out["global_crops"][k, b], items[b]["global"][k])
        for k in range(5):
            assert torch.equal(out["local_crops"][k, b], items[b]["local"][k])
    assert out["index"].tolist() == [7, 8, 9] and out["index"].dtype == torch.long


def run_loader(folder, num_workers):
    src = FolderDataset(folder, window=24)  # random windows: depend on the epoch set by each key
    ds = SSLDataset(src, small_multicrop(), in_chans=3, seed=3)
    sampler = StepBatchSampler(len(ds), 3, seed=3, total_steps=5)
    return list(make_loader(ds, sampler, num_workers=num_workers))


def test_loader_is_identical_with_0_or_2_workers_and_survives_a_corrupt_file(folder):
    serial, parallel = run_loader(folder, 0), run_loader(folder, 2)
    assert len(serial) == len(parallel) == 5  # every step, the corrupt file included in the plan
    assert 4 in {i for step in range(5) for _, i in batch_plan(step, 3, 5, 3)}  # e_corrupt.png was requested
    for a, b in zip(serial, parallel, strict=True):
        assert a["global_crops"].shape == (2, 3, 3, 16, 16) and a["local_crops"].shape == (2, 3, 3, 8, 8)
        for key in ("global_crops", "local_crops", "index"):
            assert torch.equal(a[key], b[key])
