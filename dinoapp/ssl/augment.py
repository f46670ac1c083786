"""Multi-crop augmentation for DINO/iBOT pretraining (DINOv3 spec, section 2), per domain.

One image [C, H, W] in [0, 1] becomes 2 global crops (224 px, scale (0.32, 1.0)) and ``n_local``
local crops (96 px, scale (0.05, 0.32)), each with its own random geometry and photometry, then
normalised with the backbone's mean/std. The web-image photometry of the spec (colour jitter,
grayscale, solarize) is wrong for CT Hounsfield windows and multispectral bands, and flips break
laterality in medical images, so everything is an :class:`AugmentParams` field with a preset per
domain (:func:`augment_preset`: ``rgb``, ``satellite``, ``medical``).

Per crop, in order: RandomResizedCrop (crop first, then one bicubic antialiased resize), flips and
90-degree rotations, colour jitter + grayscale (or the medical intensity jitter), Gaussian blur,
solarize (global crop 2 only), normalisation. All operations run on the small output crop.

Gram anchoring's high-resolution trick (spec, section 3): with ``gram_size`` set, each global crop
also comes as a *Gram crop*, the same box with the same flips and rotation resized to ``gram_size``
(e.g. 2x the global size), with no colour, intensity, blur or solarize operation, normalised alike.

All randomness comes from the ``torch.Generator`` passed to :meth:`MultiCrop.__call__`, so the crops
are a pure function of its seed (identical for any number of DataLoader workers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..errors import ConfigError, InputError

SOLARIZE_THRESHOLD = 128 / 255  # PIL's threshold 128 on uint8 images, on [0, 1] data


@dataclass(frozen=True, kw_only=True)
class AugmentParams:
    """Augmentation strengths and probabilities; the defaults are *no* augmentation (see :func:`augment_preset`).

    Probabilities: ``hflip``, ``vflip``, ``jitter_p`` (colour jitter), ``grayscale_p``, ``blur_p``
    (global crop 1, global crop 2, local crops: the spec's effective 0 / 0.9 / 0.5), ``solarize_p``
    (global crop 2 only), ``intensity_p`` (medical window-space jitter). ``rot90``: a uniform random
    multiple of 90 degrees (overhead imagery has no "up").

    Colour jitter (as torchvision's ColorJitter, random order): brightness/contrast/saturation
    factors in [1 - s, 1 + s], hue shift in [-hue, hue]. Images with C != 3 get brightness and
    contrast only (contrast blends each band with its own mean, keeping band ratios of the mean);
    grayscale is then the channel mean replicated.

    Intensity jitter: ``x' = clip((x - 0.5) * c + 0.5 + b, 0, 1) ** g`` with c in [1 - contrast,
    1 + contrast], b in [-brightness, brightness], log g uniform in [-ln(1 + gamma), ln(1 + gamma)];
    one monotone map for all channels, so it never reorders intensities.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: bool = False
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_p: float = 0.0
    intensity_p: float = 0.0
    intensity_brightness: float = 0.0
    intensity_contrast: float = 0.0
    intensity_gamma: float = 0.0

    def __post_init__(self) -> None:
        for name in ("blur_p", "blur_sigma"):  # YAML gives lists
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if len(self.blur_p) != 3:
            raise ConfigError(f"blur_p={self.blur_p}: give 3 probabilities (global crop 1, global crop 2, local)")
        probs = {
            "hflip": self.hflip,
            "vflip": self.vflip,
            "jitter_p": self.jitter_p,
            "grayscale_p": self.grayscale_p,
            "solarize_p": self.solarize_p,
            "intensity_p": self.intensity_p,
        }
        probs.update({f"blur_p[{i}]": p for i, p in enumerate(self.blur_p)})
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augmentation {name}={p}: a probability must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation", "intensity_brightness", "intensity_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augmentation {name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        for name in ("contrast", "saturation", "intensity_contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augmentation {name}={getattr(self, name)} must be in [0, 1] (factors 1 +- it)")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augmentation hue={self.hue} must be in [0, 0.5] (a fraction of the colour wheel)")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ConfigError(f"blur_sigma={self.blur_sigma}: give (min, max) with 0 < min <= max")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(f"blur_kernel={self.blur_kernel} must be a positive odd number of pixels")


_PRESETS = {
    # spec section 2: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur 0/0.9/0.5, solarize 0.2, hflip 0.5
    "rgb": AugmentParams(
        hflip=0.5,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=(0.0, 0.9, 0.5),
        solarize_p=0.2,
    ),
    # overhead imagery: any orientation; no hue, grayscale or solarize (they destroy spectral signatures)
    "satellite": AugmentParams(
        hflip=0.5,
        vflip=0.5,
        rot90=True,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        blur_p=(0.0, 0.9, 0.5),
    ),
    # intensity jitter in window space instead of colour ops on HU windows; blur kept; no flips (laterality)
    "medical": AugmentParams(
        blur_p=(0.0, 0.9, 0.5), intensity_p=0.8, intensity_brightness=0.1, intensity_contrast=0.2, intensity_gamma=0.3
    ),
}


def augment_preset(name: str) -> AugmentParams:
    """The :class:`AugmentParams` of a domain: ``rgb`` (the spec's), ``satellite`` or ``medical``.

    Change single fields with ``dataclasses.replace(augment_preset("medical"), hflip=0.5)``.
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown augmentation preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return _PRESETS[name]


def _rand(g: torch.Generator) -> float:
    return torch.rand((), generator=g, dtype=torch.float64).item()


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _randint(g: torch.Generator, high: int) -> int:
    """Uniform in [0, high)."""
    return int(torch.randint(high, (), generator=g).item())


def crop_params(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, height, width)``, sampled as torchvision does: 10 tries of an
    area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else a centre crop."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(g, h - ch + 1), _randint(g, w - cw + 1), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class CropGeometry:
    """The geometric part of one crop: a box ``(top, left, height, width)`` in the source image, then
    (after resizing) a horizontal flip, a vertical flip and ``rot90`` counter-clockwise quarter turns."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0


def sample_geometry(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], params: AugmentParams, g: torch.Generator
) -> CropGeometry:
    """Draw one crop's geometry from ``g``: the box (:func:`crop_params`), then a flip decision for each
    enabled flip and a quarter-turn count when ``params.rot90``, in that order."""
    top, left, ch, cw = crop_params(h, w, scale, ratio, g)
    hflip = bool(params.hflip) and _rand(g) < params.hflip
    vflip = bool(params.vflip) and _rand(g) < params.vflip
    rot = _randint(g, 4) if params.rot90 else 0
    return CropGeometry(top, left, ch, cw, hflip, vflip, rot)


def apply_geometry(image: torch.Tensor, geom: CropGeometry, size: int) -> torch.Tensor:
    """Cut ``geom``'s box from ``image`` [C, H, W], resize it to [C, size, size] (bicubic, antialiased,
    clamped to [0, 1]; skipped when the box already has that size), then flip and rotate."""
    x = image[:, geom.top : geom.top + geom.height, geom.left : geom.left + geom.width]  # [C, h, w] view
    if (geom.height, geom.width) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp_(0.0, 1.0)  # [C, size, size]
    if geom.hflip:
        x = x.flip(-1)
    if geom.vflip:
        x = x.flip(-2)
    if geom.rot90:
        x = torch.rot90(x, geom.rot90, dims=(-2, -1))
    return x  # [C, size, size]


class MultiCrop:
    """``image [C, H, W] in [0, 1] -> {"global": [2, C, g, g], "local": [n_local, C, l, l]}``, normalised.

    ``params``: an :class:`AugmentParams` or a preset name. ``mean``/``std``: the backbone's per-channel
    normalisation (one value per input channel). ``ratio``: RandomResizedCrop's aspect-ratio range.

    ``gram_size``: also return ``"gram": [2, C, G, G]``, each global crop's box with its flips and
    rotation resized to ``G = gram_size`` with no photometric operation, for a high-resolution Gram
    teacher (spec, section 3: 2x the global size). It draws nothing from the generator, so the
    global and local crops are the same with or without it. ``None`` (default): no Gram crops.
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        params: AugmentParams | str = "rgb",
        mean: Sequence[float],
        std: Sequence[float],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        gram_size: int | None = None,
    ) -> None:
        if gram_size is not None and (
            isinstance(gram_size, bool) or not isinstance(gram_size, numbers.Integral) or gram_size < 1
        ):
            raise ConfigError(f"gram_size={gram_size!r}: give the Gram teacher's crop size in pixels (>= 1) or None")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise ConfigError(
                f"crop sizes must be >= 1 px and n_local >= 0, got global_size={global_size}, "
                f"local_size={local_size}, n_local={n_local}"
            )
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale), ("ratio", ratio)):
            if not 0 < lo <= hi:
                raise ConfigError(f"{name}=({lo}, {hi}): give (min, max) with 0 < min <= max")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"mean {list(mean)} and std {list(std)} need one value per channel, std > 0")
        self.params = augment_preset(params) if isinstance(params, str) else params
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.gram_size = None if gram_size is None else int(gram_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
            got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
            raise InputError(f"MultiCrop takes a float tensor [C, H, W] scaled to [0, 1], got {got}")
        chans = image.shape[0]
        if chans != self.mean.shape[0]:
            raise InputError(
                f"the image has {chans} channels but mean/std have {self.mean.shape[0]}: give one mean/std value per "
                "channel (or select bands / set in_chans to match)"
            )
        image = image.float()
        g, n, p = self.global_size, self.local_size, self.params
        out_g = torch.empty(2, chans, g, g)  # [2, C, g, g]
        out_l = torch.empty(self.n_local, chans, n, n)  # [n_local, C, l, l]
        geoms = []
        for k in range(2):
            geoms.append(sample_geometry(image.shape[1], image.shape[2], self.global_scale, self.ratio, p, generator))
            x = apply_geometry(image, geoms[k], g)  # [C, g, g]
            x = self._photometric(x, p.blur_p[k], p.solarize_p if k == 1 else 0.0, generator)
            torch.sub(x, self.mean, out=out_g[k]).div_(self.std)
        for k in range(self.n_local):
            geom = sample_geometry(image.shape[1], image.shape[2], self.local_scale, self.ratio, p, generator)
            x = self._photometric(apply_geometry(image, geom, n), p.blur_p[2], 0.0, generator)  # [C, l, l]
            torch.sub(x, self.mean, out=out_l[k]).div_(self.std)
        out = {"global": out_g, "local": out_l}
        if self.gram_size is not None:  # spec section 3: same geometry, no photometry, no random draw
            s = self.gram_size
            out["gram"] = torch.empty(2, chans, s, s)  # [2, C, G, G]
            for k in range(2):
                torch.sub(apply_geometry(image, geoms[k], s), self.mean, out=out["gram"][k]).div_(self.std)
        return out

    def _photometric(self, x: torch.Tensor, blur_p: float, solarize_p: float, g: torch.Generator) -> torch.Tensor:
        """Colour jitter, grayscale, intensity jitter, blur, solarize on one crop [C, s, s]."""
        p = self.params
        if p.jitter_p and _rand(g) < p.jitter_p:
            x = self._color_jitter(x, g)
        if p.grayscale_p and _rand(g) < p.grayscale_p:
            if x.shape[0] == 3:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            else:
                x = x.mean(0, keepdim=True).expand_as(x)
        if p.intensity_p and _rand(g) < p.intensity_p:
            c = _uniform(g, 1 - p.intensity_contrast, 1 + p.intensity_contrast)
            b = _uniform(g, -p.intensity_brightness, p.intensity_brightness)
            lg = math.log1p(p.intensity_gamma)
            gamma = math.exp(_uniform(g, -lg, lg))
            x = ((x - 0.5) * c + (0.5 + b)).clamp_(0.0, 1.0).pow_(gamma)
        if blur_p and _rand(g) < blur_p:
            sigma = _uniform(g, *p.blur_sigma)
            x = TF.gaussian_blur(x, [p.blur_kernel, p.blur_kernel], [sigma, sigma])
        if solarize_p and _rand(g) < solarize_p:
            x = TF.solarize(x, SOLARIZE_THRESHOLD)
        return x

    def _color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision ColorJitter with the generator: a random order of the enabled ops, factors drawn up front."""
        p = self.params
        order = torch.randperm(4, generator=g).tolist()
        b = _uniform(g, 1 - p.brightness, 1 + p.brightness) if p.brightness else None
        c = _uniform(g, 1 - p.contrast, 1 + p.contrast) if p.contrast else None
        s = _uniform(g, 1 - p.saturation, 1 + p.saturation) if p.saturation else None
        h = _uniform(g, -p.hue, p.hue) if p.hue else None
        rgb = x.shape[0] == 3
        for op in order:
            if op == 0 and b is not None:
                x = TF.adjust_brightness(x, b) if rgb else (x * b).clamp_(0.0, 1.0)
            elif op == 1 and c is not None:
                x = TF.adjust_contrast(x, c) if rgb else _band_contrast(x, c)
            elif op == 2 and s is not None and rgb:
                x = TF.adjust_saturation(x, s)
            elif op == 3 and h is not None and rgb:
                x = TF.adjust_hue(x, h)
        return x


def _band_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Contrast for any number of bands: blend each band with its own mean, clamp to [0, 1]."""
    mean = x.mean(dim=(-2, -1), keepdim=True)  # [C, 1, 1]
    return (x * factor + mean * (1 - factor)).clamp_(0.0, 1.0)
