"""The backbone contract: one ``nn.Module`` for every DINOv3 ViT dinoapp serves.

:class:`DinoBackbone` wraps timm's DINOv3 ``Eva`` (blocks, attention, RoPE) and adds what the
contract needs and timm lacks: Meta's ``forward_features`` / ``get_intermediate_layers`` outputs,
the iBOT ``mask_token``, RoPE periods taken from the checkpoint, the training-only RoPE rescale
augmentation, input normalisation constants and provenance. Code written against Meta's
``torch.hub`` DINOv3 models runs unchanged on it (DINOv3 spec, section 1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .arch import ArchSpec, build_timm_vit
from .errors import CheckpointMismatchError, ConfigError, InputError
from .layouts import meta_to_timm, timm_module_to_meta

LVD_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, used by the LVD-1689M (web) weights
LVD_STD = (0.229, 0.224, 0.225)
SAT_MEAN = (0.430, 0.411, 0.296)  # SAT-493M (satellite) weights
SAT_STD = (0.213, 0.156, 0.143)


def pack_layers(patches, cls_tokens, extra, return_class_token: bool, return_extra_tokens: bool) -> tuple:
    """``get_intermediate_layers``' return value in Meta's shape: per layer the patches, paired with
    the class token and/or the extra (register) tokens when asked."""
    if return_class_token and return_extra_tokens:
        return tuple(zip(patches, cls_tokens, extra, strict=True))
    if return_class_token:
        return tuple(zip(patches, cls_tokens, strict=True))
    if return_extra_tokens:
        return tuple(zip(patches, extra, strict=True))
    return tuple(patches)


class MetaForward:
    """``bb(x)``: the image embedding (normed CLS token, [B, D]); ``bb(x, is_training=True)`` returns
    the ``forward_features`` dict(s), as Meta's models do. Shared by every backbone of the contract."""

    def forward(self, x, masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return out["x_norm_clstoken"]


class DinoBackbone(MetaForward, nn.Module):
    """A DINOv3 ViT with Meta's interface.

    Attributes: ``patch_size``, ``embed_dim``, ``n_blocks``, ``num_heads``, ``n_registers``
    (alias ``n_storage_tokens``), ``in_chans``, ``mean``, ``std`` (per input channel, for inputs
    scaled to [0, 1]), ``arch`` (:class:`ArchSpec`), ``provenance`` (dict: source, sha256, layout,
    ...), ``pretrained_heads`` (DINO / iBOT head state dicts when the file had them).
    """

    def __init__(
        self,
        arch: ArchSpec,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        provenance: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.vit = build_timm_vit(arch, drop_path_rate=drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, arch.embed_dim))  # [1, D], Meta's init
        self.patch_size = arch.patch_size
        self.embed_dim = arch.embed_dim
        self.n_blocks = arch.depth
        self.num_heads = arch.num_heads
        self.n_registers = arch.n_registers
        self.in_chans = arch.in_chans
        self.mean, self.std = check_norm(mean, std, arch.in_chans)
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.pretrained_heads: dict[str, dict[str, torch.Tensor]] = {}
        self.grad_checkpointing = False

    # --- Meta attribute names -------------------------------------------------------------------
    @property
    def n_storage_tokens(self) -> int:
        return self.n_registers

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        return self.vit.norm

    @property
    def sha256(self) -> str | None:
        return self.provenance.get("sha256")

    # --- training hooks -------------------------------------------------------------------------
    def set_rope_rescale(self, max_factor: float | None = 2.0) -> None:
        """Training-only RoPE augmentation: in ``train()`` mode each forward multiplies both patch
        coordinates by one factor exp(U(-ln R, ln R)), R = ``max_factor`` (DINOv3 uses 2, i.e. a
        factor in [0.5, 2]). ``eval()`` never rescales. ``None`` switches it off."""
        rope = self.vit.rope
        if max_factor is None:
            rope.rescale_coords = None
        else:
            if not (isinstance(max_factor, (int, float)) and math.isfinite(max_factor) and max_factor >= 1.0):
                raise ConfigError(f"RoPE rescale factor must be a finite number >= 1, got {max_factor!r}")
            rope.rescale_coords = float(max_factor)
        rope.aug_active = any(
            getattr(rope, a, None) is not None for a in ("shift_coords", "jitter_coords", "rescale_coords")
        )

    @property
    def rope_rescale(self) -> float | None:
        return self.vit.rope.rescale_coords

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (less memory, ~30% more compute)."""
        self.grad_checkpointing = enable

    # --- forward --------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputError(
                f"expected a batch [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}"
                + (" (use dinoapp.preprocess for raw images)" if x.ndim != 4 else "")
            )
        if x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise InputError(f"image {tuple(x.shape[-2:])} is smaller than one {self.patch_size}px patch")
        B, p = x.shape[0], self.patch_size
        H, W = x.shape[-2] - x.shape[-2] % p, x.shape[-1] - x.shape[-1] % p
        if tuple(x.shape[-2:]) != (H, W):
            x = x[..., :H, :W]  # the stride-p patch conv ignores pixels past a multiple of p
        t = self.vit.patch_embed(x)  # [B, h, w, D]
        h, w = t.shape[1], t.shape[2]
        t = t.flatten(1, 2)  # [B, h*w, D]
        if masks is not None:
            masks = torch.as_tensor(masks, device=t.device)
            if masks.numel() != B * h * w:
                raise InputError(f"masks have {masks.numel()} entries, need {B} x {h * w} (the {h}x{w} patch grid)")
            masks = masks.reshape(B, -1)
            t = torch.where(masks.unsqueeze(-1).bool(), self.mask_token.to(t.dtype).unsqueeze(0), t)
        prefix = [self.vit.cls_token.expand(B, -1, -1)]
        if self.vit.reg_token is not None:
            prefix.append(self.vit.reg_token.expand(B, -1, -1))
        t = torch.cat([*prefix, t], dim=1)  # [B, 1+R+h*w, D]
        rope = self.vit.rope.get_embed(shape=[h, w])  # [h*w, 2*head_dim]; rescaled in train mode only
        return t, rope, h, w

    def _run_blocks(self, t: torch.Tensor, rope: torch.Tensor, take: set[int] | None = None):
        outs = []
        for i, blk in enumerate(self.vit.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = checkpoint(blk, t, rope=rope, use_reentrant=False)
            else:
                t = blk(t, rope=rope)
            if take is not None and i in take:
                outs.append(t)
        return t, outs

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.n_registers
        return t[:, 0], t[:, 1 : 1 + r], t[:, 1 + r :]

    def forward_features(self, x, masks=None):
        """Meta's output dict: ``x_norm_clstoken`` [B, D], ``x_storage_tokens`` [B, R, D],
        ``x_norm_patchtokens`` [B, h*w, D], ``x_prenorm`` [B, 1+R+h*w, D], ``masks``.
        ``masks`` is a bool [B, h*w] (True = replaced by the mask token). Lists of tensors (and of
        masks) give a list of dicts, as in Meta's multi-crop training code."""
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks, strict=True)]
        t, rope, _, _ = self._tokens(x, masks)
        t, _ = self._run_blocks(t, rope)
        t_norm = self.vit.norm(t)
        cls, regs, patches = self._split(t_norm)
        return {
            "x_norm_clstoken": cls,
            "x_storage_tokens": regs,
            "x_norm_patchtokens": patches,
            "x_prenorm": t,
            "masks": masks,
        }

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Meta's semantics: ``n`` int = the last n blocks, a sequence = those block indices.
        Each output is patches [B, h*w, D] ([B, D, h, w] with ``reshape``), paired with the CLS
        token [B, D] and/or the register tokens [B, R, D] when asked."""
        if isinstance(n, torch.Tensor) and n.ndim == 0:
            n = int(n)
        if isinstance(n, numbers.Integral):
            n = int(n)
            if not 1 <= n <= self.n_blocks:
                raise InputError(f"n={n}: the model has {self.n_blocks} blocks")
            take = list(range(self.n_blocks - n, self.n_blocks))
        else:
            take = [int(i) for i in n]
            bad = [i for i in take if not -self.n_blocks <= i < self.n_blocks]
            if bad:
                raise InputError(f"block indices {bad} out of range for {self.n_blocks} blocks")
            take = [i % self.n_blocks for i in take]
        t, rope, h, w = self._tokens(x, None)
        _, outs = self._run_blocks(t, rope, set(take))
        by_index = dict(zip(sorted(set(take)), outs, strict=True))
        outputs = [by_index[i] for i in take]
        if norm:
            outputs = [self.vit.norm(o) for o in outputs]
        cls_tokens = [o[:, 0] for o in outputs]
        extra = [o[:, 1 : 1 + self.n_registers] for o in outputs]
        patches = [o[:, 1 + self.n_registers :] for o in outputs]
        if reshape:
            B = x.shape[0]
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        return pack_layers(patches, cls_tokens, extra, return_class_token, return_extra_tokens)

    # --- weights --------------------------------------------------------------------------------
    def load_meta_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a Meta-layout state dict, checking every key and shape; errors name the keys."""
        timm_sd = meta_to_timm(sd, self.arch)
        own = self.vit.state_dict()
        missing = sorted(set(own) - set(timm_sd))
        unexpected = sorted(set(timm_sd) - set(own))
        if "mask_token" not in sd:
            missing.append("mask_token")
        mismatched = [
            f"{k}: file {tuple(timm_sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(timm_sd))
            if timm_sd[k].shape != own[k].shape
        ]
        periods = sd.get("rope_embed.periods")
        if periods is not None and periods.numel() != self.arch.head_dim // 4:
            mismatched.append(
                f"rope_embed.periods: file has {periods.numel()} periods, {self.num_heads} heads of "
                f"{self.arch.head_dim} need {self.arch.head_dim // 4} (wrong num_heads?)"
            )
        if "mask_token" in sd and sd["mask_token"].numel() != self.embed_dim:
            mismatched.append(f"mask_token: file {tuple(sd['mask_token'].shape)} vs model (1, {self.embed_dim})")
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(
                _mismatch_message(missing, unexpected, mismatched, self.arch),
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
            )
        self.vit.load_state_dict(timm_sd, strict=True)
        with torch.no_grad():
            self.mask_token.copy_(sd["mask_token"].reshape(1, -1))
            periods = sd.get("rope_embed.periods")
            if periods is not None:
                # Meta's files may store the periods rounded to bf16; Meta's model computes with those.
                self.vit.rope.periods.copy_(periods.float())

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in Meta's release layout (loadable by Meta's own code), RoPE periods included."""
        timm_sd = {k: v.detach() for k, v in self.vit.state_dict().items()}
        if self.provenance.get("zero_qkv_bias"):  # Meta's S/B/L/H models expect the (all-zero) bias keys
            for i in range(self.n_blocks):
                for b in ("q_bias", "v_bias"):
                    timm_sd[f"blocks.{i}.attn.{b}"] = torch.zeros(self.embed_dim)
        sd = timm_module_to_meta(timm_sd)
        sd["mask_token"] = self.mask_token.detach().clone()
        sd["rope_embed.periods"] = self.vit.rope.periods.detach().clone()
        return sd

    def extra_repr(self) -> str:
        src = self.provenance.get("source")
        return f"arch={self.arch}, source={src!r}"


def _mismatch_message(missing, unexpected, mismatched, arch: ArchSpec) -> str:
    parts = [f"the checkpoint does not match the architecture read from it ({arch.embed_dim}-dim, {arch.depth} "
             f"blocks, {arch.ffn})"]  # fmt: skip
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
        if keys:
            more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            parts.append(f"{title}: {', '.join(keys[:8])}{more}")
    return "; ".join(parts)


def check_norm(mean, std, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(m) for m in (mean if mean is not None else LVD_MEAN))
    std = tuple(float(s) for s in (std if std is not None else LVD_STD))
    if len(mean) == 3 and in_chans != 3:
        mean = _extend(mean, in_chans)
    if len(std) == 3 and in_chans != 3:
        std = _extend(std, in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"mean/std need {in_chans} values (one per input channel), got {len(mean)}/{len(std)}")
    if any(s <= 0 or not math.isfinite(s) for s in std):
        raise ConfigError(f"std values must be positive, got {std}")
    return mean, std


def _extend(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """RGB statistics for n channels: channels past RGB get the mean of the RGB values."""
    avg = sum(values) / 3
    return (avg,) * n if n < 3 else values + (avg,) * (n - 3)


def expand_input_channels(
    backbone: DinoBackbone,
    in_chans: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DinoBackbone:
    """Give an RGB backbone ``in_chans`` inputs (in place; returns it).

    DINOv3 spec, section 2 (continued pretraining): new channels get the mean of the RGB filters
    and the whole patch-embedding weight is scaled by 3/C, so an image whose C channels all hold
    the same grey values gives exactly the features of that grey image in RGB. Extra bands still
    need continued pretraining to be useful. Channel statistics default to the RGB ones for the
    first three channels and their average for the rest.
    """
    old = backbone.vit.patch_embed.proj
    if old.in_channels != 3:
        raise ConfigError(f"can only expand an RGB patch embedding, this one has {old.in_channels} channels")
    if in_chans < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    if in_chans == 3:
        return backbone
    w = old.weight.detach()  # [D, 3, p, p]
    avg = w.mean(dim=1, keepdim=True)  # [D, 1, p, p]
    if in_chans > 3:
        new_w = torch.cat([w, avg.expand(-1, in_chans - 3, -1, -1)], dim=1)
    else:
        new_w = avg.expand(-1, in_chans, -1, -1)
    new_w = new_w * (3.0 / in_chans)  # [D, C, p, p]
    conv = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, bias=old.bias is not None)
    conv = conv.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(new_w)
        if old.bias is not None:
            conv.bias.copy_(old.bias)
    backbone.vit.patch_embed.proj = conv
    if hasattr(backbone.vit.patch_embed, "in_chans"):
        backbone.vit.patch_embed.in_chans = in_chans
    backbone.vit.in_chans = in_chans
    backbone.arch = backbone.arch.replace(in_chans=in_chans)
    backbone.in_chans = in_chans
    base_mean = backbone.mean if mean is None else mean
    base_std = backbone.std if std is None else std
    backbone.mean, backbone.std = check_norm(base_mean, base_std, in_chans)
    backbone.provenance["expanded_channels"] = f"3 -> {in_chans} (mean RGB filter, x3/{in_chans})"
    return backbone
