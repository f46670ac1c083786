"""Multi-crop augmentation (dinoapp.ssl.augment): shapes, determinism, per-domain presets, exact maths."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dinoapp.errors import ConfigError, InputError
from dinoapp.ssl import augment
from dinoapp.ssl.augment import AugmentParams, MultiCrop, augment_preset, crop_params

MEAN3, STD3 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NONE = AugmentParams()  # no photometric or geometric augmentation


pytestmark = pytest.mark.usefixtures("one_thread")  # as in DataLoader workers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def whole(size: int, params, *, mean=MEAN3, std=STD3, n_local: int = 2) -> MultiCrop:
    """Crops that cover the whole (square, size x size) image at its own size: only augmentations change it."""
    return MultiCrop(
        global_size=size,
        local_size=size,
        n_local=n_local,
        global_scale=(1.0, 1.0),
        local_scale=(1.0, 1.0),
        params=params,
        mean=mean,
        std=std,
    )


def unnorm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


def test_shapes_dtype_and_input_untouched():
    img = torch.rand(3, 70, 90)
    keep = img.clone()
    mc = MultiCrop(global_size=32, local_size=16, n_local=3, mean=MEAN3, std=STD3)
    out = mc(img, gen(0))
    assert out["global"].shape == (2, 3, 32, 32) and out["global"].dtype == torch.float32
    assert out["local"].shape == (3, 3, 16, 16)
    assert torch.equal(img, keep)
    assert MultiCrop(global_size=8, local_size=4, n_local=0, mean=MEAN3, std=STD3)(img, gen(0))["local"].shape == (
        0,
        3,
        4,
        4,
    )


def test_small_image_is_upsampled():
    out = MultiCrop(global_size=24, local_size=12, n_local=2, mean=MEAN3, std=STD3)(torch.rand(3, 5, 7), gen(1))
    assert out["global"].shape == (2, 3, 24, 24) and torch.isfinite(out["global"]).all()


@pytest.mark.parametrize("preset", ["rgb", "satellite", "medical"])
def test_same_seed_same_crops_other_seed_other_crops(preset):
    img = torch.rand(3, 64, 64)
    mc = MultiCrop(global_size=32, local_size=16, n_local=4, params=preset, mean=MEAN3, std=STD3)
    a, b, c = mc(img, gen(7)), mc(img, gen(7)), mc(img, gen(8))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(a["global"], c["global"]) and not torch.equal(a["local"], c["local"])


def test_global_rng_is_not_used():
    img = torch.rand(3, 48, 48)
    mc = MultiCrop(global_size=24, local_size=12, n_local=2, mean=MEAN3, std=STD3)
    torch.manual_seed(0)
    a = mc(img, gen(3))
    torch.manual_seed(1)
    b = mc(img, gen(3))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])


def test_normalisation_exact():
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 2.0, 1.5]
    img = torch.rand(4, 16, 16)
    out = whole(16, NONE, mean=mean, std=std)(img, gen(0))
    for c in range(4):
        want = (img[c] - mean[c]) / std[c]
        for crops in (out["global"], out["local"]):
            for k in range(crops.shape[0]):
                torch.testing.assert_close(crops[k, c], want, rtol=0, atol=1e-6)


def test_crop_params_boxes_follow_scale_and_ratio():
    g = gen(0)
    for _ in range(200):
        top, left, h, w = crop_params(60, 80, (0.05, 0.32), (3 / 4, 4 / 3), g)
        assert top >= 0 and top + h <= 60 and left >= 0 and left + w <= 80
        frac = h * w / (60 * 80)
        assert 0.03 < frac < 0.36  # the rounding of h, w moves the area a little
        assert 3 / 4 - 0.15 < w / h < 4 / 3 + 0.15


def test_crop_params_fallback_is_centre_crop_of_allowed_ratio():
    # scale 1 on a 5:1 image: no box of ratio <= 4/3 has the full area, so 10 tries fail -> centre crop
    assert crop_params(20, 100, (1.0, 1.0), (3 / 4, 4 / 3), gen(0)) == (0, (100 - 27) // 2, 20, 27)
    assert crop_params(100, 20, (1.0, 1.0), (3 / 4, 4 / 3), gen(0)) == ((100 - 27) // 2, 0, 27, 20)
    assert crop_params(30, 30, (1.0, 1.0), (3 / 4, 4 / 3), gen(0)) == (0, 0, 30, 30)


def test_flips_and_rot90_are_the_8_symmetries_and_keep_the_pixels():
    img = torch.rand(3, 12, 12)
    params = dataclasses.replace(augment_preset("satellite"), jitter_p=0.0, blur_p=(0.0, 0.0, 0.0))
    mc = whole(12, params, n_local=0)
    dihedral = [torch.rot90(t, k, dims=(1, 2)) for t in (img, img.flip(2)) for k in range(4)]
    seen = set()
    for seed in range(60):
        for x in mc(img, gen(seed))["global"]:
            x = unnorm(x, MEAN3, STD3)
            torch.testing.assert_close(x.flatten(1).sort(1).values, img.flatten(1).sort(1).values, rtol=0, atol=1e-6)
            hits = [i for i, d in enumerate(dihedral) if torch.allclose(x, d, atol=1e-6)]
            assert len(hits) == 1
            seen.add(hits[0])
    assert seen == set(range(8))


def test_each_flip_is_the_one_asked_for():
    img = torch.rand(3, 8, 8)
    for params, want in (
        (AugmentParams(hflip=1.0), img.flip(2)),
        (AugmentParams(vflip=1.0), img.flip(1)),
        (AugmentParams(hflip=1.0, vflip=1.0), img.flip(1, 2)),
    ):
        out = whole(8, params)(img, gen(0))
        for x in torch.cat([out["global"], out["local"]]):
            torch.testing.assert_close(unnorm(x, MEAN3, STD3), want, rtol=0, atol=1e-6)


def test_medical_keeps_orientation_and_intensity_order():
    img = torch.rand(3, 16, 16)
    params = dataclasses.replace(augment_preset("medical"), blur_p=(0.0, 0.0, 0.0))
    mc = whole(16, params)
    order = img.flatten().argsort()
    changed = 0
    for seed in range(20):
        out = mc(img, gen(seed))
        for x in torch.cat([out["global"], out["local"]]):
            x = unnorm(x, MEAN3, STD3).flatten()[order]  # outputs in the order of the input values
            assert (x[1:] - x[:-1] >= -1e-5).all()  # one monotone map: no flips, no channel mixing
            changed += not torch.allclose(x, img.flatten()[order], atol=1e-4)
    assert changed > 20  # the intensity jitter fires (p 0.8)


def test_intensity_jitter_formula():
    p = AugmentParams(intensity_p=1.0, intensity_brightness=0.1, intensity_contrast=0.2, intensity_gamma=0.3)
    img = torch.linspace(0, 1, 64).view(1, 8, 8)
    x = unnorm(whole(8, p, mean=[0.0], std=[1.0], n_local=0)(img, gen(5))["global"][0], [0.0], [1.0])[0]
    # recover (c, b, g) from the output: x = clip((v - 0.5) c + 0.5 + b) ** g must fit with c, b, g in range
    best = math.inf
    for c in torch.linspace(0.8, 1.2, 41):
        for b in torch.linspace(-0.1, 0.1, 41):
            base = ((img[0] - 0.5) * c + 0.5 + b).clamp(0, 1)
            inner = (base > 0.05) & (base < 0.95)
            gamma = (x[inner].log() / base[inner].log()).median()
            if math.log(1 / 1.3) - 1e-3 <= gamma.log() <= math.log(1.3) + 1e-3:
                best = min(best, (base**gamma - x).abs().max().item())
    assert best < 0.01


def test_solarize_only_on_global2_and_never_for_medical():
    img = torch.full((3, 16, 16), 0.9)
    low = {"rgb": [0, 0, 0], "medical": [0, 0, 0]}  # crops with values < 0.5: global1, global2, local
    for preset in low:
        mc = MultiCrop(global_size=8, local_size=8, n_local=2, params=preset, mean=MEAN3, std=STD3)
        for seed in range(40):
            out = mc(img, gen(seed))
            for slot, crops in ((0, out["global"][:1]), (1, out["global"][1:]), (2, out["local"])):
                for x in crops:
                    low[preset][slot] += bool((unnorm(x, MEAN3, STD3) < 0.5).any())
    assert low["medical"] == [0, 0, 0]
    assert low["rgb"][0] == 0 and low["rgb"][2] == 0 and 2 <= low["rgb"][1] <= 18  # p 0.2 of 40


def test_blur_probabilities_per_crop_slot():
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    img = ((yy + xx) % 2).float().expand(3, 16, 16)  # checkerboard: any blur changes it
    mc = whole(16, AugmentParams(blur_p=(0.0, 1.0, 0.5), blur_sigma=(0.8, 2.0)), n_local=4)  # sigma 0.1 ~ identity
    blurred = [0, 0, 0]
    for seed in range(50):
        out = mc(img, gen(seed))
        crops = [(0, out["global"][0]), (1, out["global"][1])] + [(2, x) for x in out["local"]]
        for slot, x in crops:
            blurred[slot] += not torch.allclose(unnorm(x, MEAN3, STD3), img, atol=1e-5)
    assert blurred[0] == 0 and blurred[1] == 50 and 70 <= blurred[2] <= 130  # 200 local crops at p 0.5


def test_rgb_grayscale_and_colour_jitter_use_torchvision():
    img = torch.rand(3, 16, 16)
    gray = whole(16, AugmentParams(grayscale_p=1.0), n_local=0)(img, gen(0))["global"]
    torch.testing.assert_close(unnorm(gray[0], MEAN3, STD3), TF.rgb_to_grayscale(img, 3), rtol=0, atol=1e-6)
    # saturation-only jitter: the output is TF.adjust_saturation(img, s) for one s in [0.8, 1.2]
    sat = unnorm(
        whole(16, AugmentParams(jitter_p=1.0, saturation=0.2), n_local=0)(img, gen(1))["global"][0], MEAN3, STD3
    )
    err = min((TF.adjust_saturation(img, float(s)) - sat).abs().max().item() for s in torch.linspace(0.8, 1.2, 401))
    assert err < 2e-3


def test_multiband_satellite():
    mean, std = [0.3] * 4, [0.2] * 4
    mc = MultiCrop(global_size=16, local_size=8, n_local=2, params="satellite", mean=mean, std=std)
    out = mc(torch.rand(4, 40, 40), gen(0))
    assert out["global"].shape == (2, 4, 16, 16) and out["local"].shape == (2, 4, 8, 8)
    gray = whole(8, AugmentParams(grayscale_p=1.0), mean=mean, std=std, n_local=0)(torch.rand(4, 8, 8), gen(0))
    assert torch.allclose(gray["global"], gray["global"][:, :1].expand(-1, 4, -1, -1))  # channel mean replicated


def test_band_contrast_matches_loop():
    x = torch.rand(5, 6, 7)
    for f in (0.6, 1.0, 1.4):
        want = torch.empty_like(x)
        for c in range(5):
            m = sum(float(v) for v in x[c].flatten()) / x[c].numel()
            for i in range(6):
                for j in range(7):
                    want[c, i, j] = min(max(f * float(x[c, i, j]) + (1 - f) * m, 0.0), 1.0)
        torch.testing.assert_close(augment._band_contrast(x, f), want, rtol=0, atol=1e-6)


def test_presets():
    rgb, sat, med = (augment_preset(n) for n in ("rgb", "satellite", "medical"))
    assert (rgb.brightness, rgb.contrast, rgb.saturation, rgb.hue, rgb.jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert rgb.blur_p == (0.0, 0.9, 0.5) and rgb.solarize_p == 0.2 and rgb.grayscale_p == 0.2 and rgb.hflip == 0.5
    assert sat.rot90 and sat.vflip == 0.5 and sat.hue == 0 and sat.solarize_p == 0 and sat.grayscale_p == 0
    assert med.hflip == 0 and med.jitter_p == 0 and med.solarize_p == 0 and med.grayscale_p == 0
    assert (med.intensity_p, med.intensity_brightness, med.intensity_contrast, med.intensity_gamma) == (
        0.8,
        0.1,
        0.2,
        0.3,
    )


def test_errors():
    with pytest.raises(ConfigError, match="rgb, satellite, medical"):
        augment_preset("xray")
    with pytest.raises(ConfigError, match="probability"):
        AugmentParams(hflip=1.5)
    with pytest.raises(ConfigError, match="3 probabilities"):
        AugmentParams(blur_p=(0.1, 0.2))
    with pytest.raises(ConfigError, match="odd"):
        AugmentParams(blur_kernel=4)
    assert AugmentParams(blur_p=[0.0, 0.5, 0.5]).blur_p == (0.0, 0.5, 0.5)  # YAML lists become tuples
    mc = MultiCrop(global_size=8, local_size=4, mean=MEAN3, std=STD3)
    with pytest.raises(InputError, match="4 channels but mean/std have 3"):
        mc(torch.rand(4, 16, 16), gen(0))
    with pytest.raises(InputError, match=r"float tensor \[C, H, W\]"):
        mc(torch.zeros(3, 16, 16, dtype=torch.uint8), gen(0))
    with pytest.raises(ConfigError, match="one value per channel"):
        MultiCrop(mean=[0.5, 0.5], std=[0.2])
