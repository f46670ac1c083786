"""High-resolution Gram crops (MultiCrop(gram_size=...), spec section 3): the global crops' geometry at
another size with no photometry; the other crops and the random stream untouched; batching."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoapp.errors import ConfigError, InputError
from dinoapp.ssl import augment
from dinoapp.ssl.augment import AugmentParams, MultiCrop, apply_geometry, augment_preset
from dinoapp.ssl.data import SSLDataset, StepBatchSampler, collate_crops, make_loader

MEAN3, STD3 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HEAVY = dataclasses.replace(  # every photometric op always on, with the rgb preset's geometry (hflip 0.5)
    augment_preset("rgb"), jitter_p=1.0, grayscale_p=1.0, blur_p=(1.0, 1.0, 1.0), solarize_p=1.0
)

pytestmark = pytest.mark.usefixtures("one_thread")  # as in DataLoader workers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD3).view(-1, 1, 1) + torch.tensor(MEAN3).view(-1, 1, 1)


def smooth_image(h: int = 96, w: int = 120) -> torch.Tensor:
    """Low-frequency colour waves in [0.15, 0.85]: resizing to 2x then averaging 2x2 ~ resizing once."""
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    waves = [torch.sin(2 * math.pi * (xx / 37 + c / 3)) * torch.cos(2 * math.pi * (yy / 29 - c / 5)) for c in range(3)]
    return 0.5 + 0.35 * torch.stack(waves)  # [3, h, w]


def geometric_only(params: AugmentParams) -> AugmentParams:
    return AugmentParams(hflip=params.hflip, vflip=params.vflip, rot90=params.rot90)


def multicrop(params, *, gram_size=None, size=24, n_local=3) -> MultiCrop:
    return MultiCrop(
        global_size=size, local_size=12, n_local=n_local, params=params, mean=MEAN3, std=STD3, gram_size=gram_size
    )


@pytest.fixture
def recorded(monkeypatch):
    """The geometries MultiCrop draws, in order (global crop 1, global crop 2, local crops)."""
    seen = []
    sample = augment.sample_geometry

    def record(*args, **kwargs):
        seen.append(sample(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(augment, "sample_geometry", record)
    return seen


@pytest.mark.parametrize("params", ["rgb", "satellite", "medical", HEAVY])
def test_global_and_local_crops_and_the_random_stream_do_not_change(params):
    img = torch.rand(3, 70, 90)
    off, on = multicrop(params), multicrop(params, gram_size=48)
    for seed in range(15):
        g_off, g_on = gen(seed), gen(seed)
        a, b = off(img, g_off), on(img, g_on)
        assert set(a) == {"global", "local"} and set(b) == {"global", "local", "gram"}
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
        assert torch.equal(g_off.get_state(), g_on.get_state())  # nothing extra drawn
        assert b["gram"].shape == (2, 3, 48, 48) and b["gram"].dtype == torch.float32


@pytest.mark.parametrize("params", [HEAVY, "satellite", "medical"])
def test_gram_crop_is_the_geometric_crop_without_photometry_exactly(params, recorded):
    img = torch.rand(3, 64, 80)
    mc = multicrop(params, gram_size=40)
    geo = multicrop(geometric_only(mc.params), size=40)  # a global crop at Gram size with geometry only
    for seed in range(12):
        recorded.clear()
        out = mc(img, gen(seed))
        # global crop 1: the geometric-only pipeline draws its geometry from the same stream position
        assert torch.equal(out["gram"][0], geo(img, gen(seed))["global"][0])
        # both: the recorded geometry applied at Gram size, then normalised, and nothing else
        for k in range(2):
            want = (apply_geometry(img, recorded[k], 40) - mc.mean) / mc.std
            assert torch.equal(out["gram"][k], want)
    if params is HEAVY:  # the global crops themselves do carry the colour ops
        crops, gram = unnorm(out["global"]), unnorm(out["gram"])
        assert torch.allclose(crops[:, 0], crops[:, 1], atol=1e-5)  # grayscale p 1
        assert not torch.allclose(gram[:, 0], gram[:, 1], atol=1e-2)  # the Gram crops keep their colours


def test_gram_crop_flips_and_rotations_follow_their_global_crop(recorded):
    img = torch.rand(3, 32, 32)
    params = dataclasses.replace(augment_preset("satellite"), jitter_p=0.0, blur_p=(0.0, 0.0, 0.0))
    mc = MultiCrop(
        global_size=32, local_size=8, n_local=0, global_scale=(1.0, 1.0), params=params, mean=MEAN3, std=STD3,
        gram_size=32,
    )  # fmt: skip
    seen = set()
    for seed in range(40):
        recorded.clear()
        out = mc(img, gen(seed))
        assert torch.equal(out["gram"], out["global"])  # same size, no photometry: the same crops
        seen.update((r.hflip, r.vflip, r.rot90) for r in recorded)
    assert len(seen) > 8  # many combinations of flips and quarter turns were exercised


@pytest.mark.parametrize("preset", ["rgb", "satellite", "medical"])
def test_gram_crop_at_2x_pooled_2x_is_the_colour_free_global_crop(preset, recorded):
    img = smooth_image()
    g = 24
    params = dataclasses.replace(  # every photometric op of the preset always on
        augment_preset(preset), jitter_p=1.0, solarize_p=1.0, intensity_p=1.0, blur_p=(1.0, 1.0, 1.0)
    )
    mc = multicrop(params, gram_size=2 * g, size=g)
    geo = multicrop(geometric_only(params), size=g)
    jitter_seen = 0.0
    for seed in range(10):
        recorded.clear()
        out = mc(img, gen(seed))
        pooled = unnorm(F.avg_pool2d(out["gram"], 2))  # [2, C, g, g]
        want = [unnorm(geo(img, gen(seed))["global"][0]), apply_geometry(img, recorded[1], g)]
        for k in range(2):
            torch.testing.assert_close(pooled[k], want[k], rtol=0, atol=0.02)
            jitter_seen = max(jitter_seen, (unnorm(out["global"][k]) - want[k]).abs().max().item())
    assert jitter_seen > 0.1  # the student's global crops differ far more: the tolerance can tell


def test_gram_size_errors():
    for bad in (0, -3, 2.5, True, "512"):
        with pytest.raises(ConfigError, match=r"gram_size=.*crop size in pixels \(>= 1\) or None"):
            multicrop("rgb", gram_size=bad)
    assert multicrop("rgb", gram_size=np.int64(48)).gram_size == 48


# ---------------------------------------------------------------------------------------------- batching


class ArraySource:
    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return self.arrays[i], {"value_range": (0.0, 1.0), "path": f"item{i}.tif"}


def test_dataset_and_collate_pass_gram_crops_through():
    rng = np.random.default_rng(0)
    src = ArraySource([rng.random((3, 40, 48), dtype=np.float32) for _ in range(4)])
    on = SSLDataset(src, multicrop("rgb", gram_size=32, size=16, n_local=2), in_chans=3, seed=1)
    off = SSLDataset(src, multicrop("rgb", size=16, n_local=2), in_chans=3, seed=1)
    item, plain = on[(0, 2)], off[(0, 2)]
    assert set(plain) == {"global", "local", "index"} and item["gram"].shape == (2, 3, 32, 32)
    assert torch.equal(item["global"], plain["global"]) and torch.equal(item["local"], plain["local"])

    items = [on[(0, i)] for i in range(3)]
    batch = collate_crops(items)
    assert batch["gram_crops"].shape == (2, 3, 3, 32, 32)
    for b in range(3):
        for k in range(2):
            assert torch.equal(batch["gram_crops"][k, b], items[b]["gram"][k])
    assert "gram_crops" not in collate_crops([off[(0, i)] for i in range(3)])
    with pytest.raises(InputError, match="1 of 2 items have Gram crops"):
        collate_crops([items[0], plain])

    loader = make_loader(on, StepBatchSampler(len(on), 2, seed=1, total_steps=2))
    for step in loader:
        assert step["gram_crops"].shape == (2, 2, 3, 32, 32) and step["global_crops"].shape == (2, 2, 3, 16, 16)
