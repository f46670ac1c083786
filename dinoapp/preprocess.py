"""The one place where images become normalised backbone inputs.

``to_tensor`` turns an image (numpy HxWxC or CxHxW, PIL, torch, uint8/uint16/float) into float32
[C, H, W] scaled to [0, 1]; ``preprocess`` then matches the backbone's channels, resizes or pads
to a multiple of the patch size and applies the backbone's mean/std. Training, the app and the
notebooks all call these; nobody re-types normalisation constants.

Value scaling: integer images are divided by their dtype's maximum (uint8 /255, uint16 /65535)
unless ``value_range=(lo, hi)`` says otherwise (e.g. ``(0, 10000)`` for Sentinel-2 reflectance);
float images are taken as already in [0, 1] unless ``value_range`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

POLICIES = ("resize", "pad", "short_side")


def to_tensor(
    image: Any,
    *,
    channels_first: bool | None = None,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Image -> float32 tensor [C, H, W] in [0, 1] (see module docstring for scaling).

    Layout of 3-D arrays: ``channels_first`` if given; else CxHxW when the first axis is small
    (<= 16) and the last is not, HxWxC otherwise. 2-D arrays are one channel.
    """
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL image
        if image.mode in ("P", "PA", "RGBA", "RGBa", "LA", "La", "CMYK", "YCbCr", "HSV", "LAB", "1"):
            image = image.convert("L" if image.mode in ("LA", "La", "1") else "RGB")
        image = np.asarray(image)
        channels_first = False
    if isinstance(image, torch.Tensor):
        t = image.detach()
        was_int = not (t.is_floating_point() or t.is_complex())
        int_max = float(torch.iinfo(t.dtype).max) if was_int and t.dtype != torch.bool else 1.0
        t = t.cpu()
    elif isinstance(image, np.ndarray):
        arr = image
        is_bool = arr.dtype == bool
        if is_bool:
            arr = arr.astype(np.uint8)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"unsupported image dtype {arr.dtype}")
        if not arr.dtype.isnative:  # big-endian rasters (e.g. some TIFF/DICOM) -> native byte order
            arr = arr.astype(arr.dtype.newbyteorder("="))
        was_int = np.issubdtype(arr.dtype, np.integer)
        int_max = 1.0 if is_bool else float(np.iinfo(arr.dtype).max) if was_int else 1.0  # bool: True = 1, as torch
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    else:
        raise InputError(f"expected a numpy array, PIL image or torch tensor, got {type(image).__name__}")

    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        if channels_first is None:
            channels_first = _guess_channels_first(t.shape)
        if not channels_first:
            t = t.permute(2, 0, 1)
    else:
        raise InputError(f"expected a 2-D or 3-D image, got shape {tuple(t.shape)}")
    if t.shape[0] > 64:
        raise InputError(f"image has {t.shape[0]} channels: is the layout right? (pass channels_first=...)")
    if t.shape[-2] == 0 or t.shape[-1] == 0:
        raise InputError(f"the image is empty: {t.shape[-2]} x {t.shape[-1]} pixels")
    t = t.to(torch.float32)
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ConfigError(f"value_range must be (low, high) with high > low, got {value_range}")
        t = (t - lo) / (hi - lo)
    elif was_int:
        t = t / int_max
    if not torch.isfinite(t).all():
        raise InputError("image contains NaN or infinite values (mask or fill them first)")
    return t.contiguous()  # [C, H, W]


def target_size(h: int, w: int, size: int | Sequence[int] | None, policy: str, patch: int) -> tuple[int, int]:
    """Output (H, W) for an h x w input under ``policy`` (see :func:`preprocess`)."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "short_side":
        if size is None or not isinstance(size, int):
            raise ConfigError("policy 'short_side' needs size=<int>: the short side's length")
        scale = size / min(h, w)
        return _round(h * scale, patch), _round(w * scale, patch)
    if size is None:
        if policy == "pad":
            return h + (-h % patch), w + (-w % patch)
        return _round(h, patch), _round(w, patch)
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if th % patch or tw % patch or th <= 0 or tw <= 0:
        raise ConfigError(f"size {th}x{tw} must be positive multiples of the patch size {patch}")
    if policy == "pad" and (th < h or tw < w):
        raise InputError(f"image {h}x{w} does not fit in {th}x{tw} without resizing: use policy='resize', or "
                         f"size=None to pad to the next multiple of the patch size ({patch})")
    return th, tw


def _round(x: float, patch: int) -> int:
    return max(patch, int(round(x / patch)) * patch)


def preprocess(
    image: Any,
    backbone: Any = None,
    *,
    size: int | Sequence[int] | None = None,
    policy: str = "resize",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    channels_first: bool | None = None,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Image (or batch tensor [B, C, H, W]) -> normalised float32 tensor for ``backbone``.

    Policies (output sides are always multiples of the patch size):
      - ``"resize"``: bicubic (antialiased) resize to ``size`` (int = square, or (H, W));
        ``size=None`` rounds the native size to the nearest multiple.
      - ``"pad"``: no resampling; pad bottom/right with the mean colour (0 after normalisation) to
        ``size`` or, without it, to the next multiple. Patch (r, c) then covers pixels
        [16r, 16r+16) x [16c, 16c+16) of the original.
      - ``"short_side"``: keep the aspect ratio, short side ~ ``size`` pixels.
    Grey images are repeated to the backbone's channels; otherwise channel counts must match.
    """
    patch = patch_size or getattr(backbone, "patch_size", 16)
    want_c = in_chans or getattr(backbone, "in_chans", 3)
    mean = tuple(mean if mean is not None else getattr(backbone, "mean", None) or ())
    std = tuple(std if std is not None else getattr(backbone, "std", None) or ())
    if len(mean) != want_c or len(std) != want_c:
        raise ConfigError(f"need {want_c} mean/std values (pass backbone= or mean=/std=), got {len(mean)}/{len(std)}")

    if isinstance(image, torch.Tensor) and image.ndim == 4:
        x = to_tensor_batch(image, value_range)
    else:
        x = to_tensor(image, channels_first=channels_first, value_range=value_range).unsqueeze(0)
    x = _match_channels(x, want_c, _layout(image, channels_first))  # [B, C, H, W]
    h, w = x.shape[-2:]
    th, tw = target_size(h, w, size, policy, patch)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if policy == "pad":
        x = (x - m) / s
        if (th, tw) != (h, w):
            x = F.pad(x, (0, tw - w, 0, th - h), value=0.0)
    else:
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
        x = (x - m) / s
    return x if (isinstance(image, torch.Tensor) and image.ndim == 4) else x[0]


def to_tensor_batch(batch: torch.Tensor, value_range=None) -> torch.Tensor:
    """Batch [B, C, H, W] -> float32 in [0, 1]: by ``value_range``, else integers by their dtype
    maximum and floats as they are."""
    if value_range is not None:
        lo, hi = value_range
        return (batch.to(torch.float32) - lo) / (hi - lo)
    if batch.is_floating_point() or batch.dtype == torch.bool:
        return batch.to(torch.float32)
    return batch.to(torch.float32) / float(torch.iinfo(batch.dtype).max)


def _layout(image: Any, channels_first: bool | None) -> str:
    """How ``image`` holds its channels, as :func:`to_tensor` reads it: ``"batch"`` ([B, C, H, W] tensor),
    ``"first"`` ([C, H, W], e.g. from ``domains.load``) or ``"last"`` ([H, W, C], PIL)."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return "batch"
    if hasattr(image, "mode") and hasattr(image, "convert"):
        return "last"
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3:
        return "last"
    if channels_first is None:
        channels_first = _guess_channels_first(shape)
    return "first" if channels_first else "last"


def _guess_channels_first(shape) -> bool:
    """The layout of a 3-D array given without ``channels_first``: CxHxW when the first axis is small (<= 16)
    and the last is not, HxWxC otherwise."""
    return shape[0] <= 16 and shape[-1] > 16


def _match_channels(x: torch.Tensor, want: int, layout: str = "last") -> torch.Tensor:
    c = x.shape[1]
    if c == want:
        return x
    if c == 1:
        return x.expand(-1, want, -1, -1)
    if c == 4 and want == 3:
        if layout == "last":
            pick = "image[..., :3]"
        else:
            pick = "image[:, :3]" if layout == "batch" else (
                "image[:3]; for a file read with domains.load, pass bands=[1, 2, 3] or bands=\"rgb\"")
        raise InputError(
            f"the image has 4 channels and the backbone 3: drop the alpha band, choose 3 bands "
            f"(e.g. {pick}) or load the backbone with in_chans=4"
        )
    raise InputError(
        f"the image has {c} channels and the backbone takes {want}: select bands, or load the backbone with "
        f"in_chans={c} (a small [C, H, W] array read as [H, W, C]? pass channels_first=True)"
    )
