"""AdamW parameter groups for SSL training (DINOv3 spec, section 2, "Optimisation").

- Layer-wise lr decay 0.9 per block from the top: tokens and patch embedding are layer 0,
  block i is layer i + 1, the final norm is layer depth + 1; lr_mult = decay ** (depth + 1 -
  layer), and the patch embedding gets an extra x0.2.
- No weight decay on biases, norms, LayerScale (timm's ``gamma_1`` / ``gamma_2``) or any 1-D
  parameter.
- The heads' ``last_layer`` gets groups of its own so it can be frozen (lr 0) during the first
  epoch.

:func:`param_groups` builds the groups once (every parameter, trainable or not, so the optimizer
state layout stays the same when a training stage freezes or unfreezes the backbone);
:func:`set_lr_wd` writes each step's lr and weight decay into them. The groups hold the
parameter objects, so they work after FSDP2 ``fully_shard`` (parameters become DTensors, names
are unchanged) as long as they are built after sharding.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import ConfigError

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_LAYER0 = ("mask_token", "vit.cls_token", "vit.reg_token", "vit.patch_embed.")


def _backbone_layer(name: str, depth: int) -> int:
    """Layer id of a DinoBackbone parameter: tokens / patch embed 0, block i -> i + 1, rest depth + 1."""
    if name.startswith(_LAYER0):
        return 0
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def _wd_mult(name: str, p: torch.Tensor) -> float:
    no_decay = p.ndim <= 1 or name.endswith("bias") or "norm" in name or re.search(r"(?:^|\.)gamma(_\d)?$", name)
    return 0.0 if no_decay else 1.0


def param_groups(
    parts: dict[str, nn.Module],
    *,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    head_lr_mult: float = 1.0,
) -> list[dict]:
    """AdamW groups for ``parts`` = {"backbone": DinoBackbone, "dino_head": DINOHead, "ibot_head": DINOHead}.

    Each group: ``params``, ``names`` ("part.param_name"), ``lr_mult``, ``wd_mult`` (0.0 or 1.0),
    ``is_backbone``, ``is_last_layer`` (a head's ``last_layer.*``). Parameters with equal (backbone
    or head, lr_mult, wd_mult, is_last_layer) share a group; groups are ordered by their first
    parameter in ``parts`` order. Every parameter is included, also those with requires_grad=False.
    A part named "backbone" must have ``n_blocks`` (its depth); other parts count as heads.
    """
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for part, module in parts.items():
        is_backbone = part == "backbone"
        depth = int(getattr(module, "n_blocks", 0)) if is_backbone else 0
        if is_backbone and depth < 1:
            raise ConfigError("the 'backbone' part must be a DinoBackbone (it has no n_blocks attribute)")
        for name, p in module.named_parameters():
            if id(p) in seen:  # shared (tied) parameters are optimised once
                continue
            seen.add(id(p))
            is_last = not is_backbone and name.startswith("last_layer.")
            if is_backbone:
                lr_mult = layer_decay ** (depth + 1 - _backbone_layer(name, depth))
                if name.startswith("vit.patch_embed."):
                    lr_mult *= patch_embed_lr_mult
            else:
                lr_mult = head_lr_mult
            wd_mult = _wd_mult(name, p)
            key = (is_backbone, lr_mult, wd_mult, is_last)
            if key not in groups:
                groups[key] = {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                               "is_backbone": is_backbone, "is_last_layer": is_last}  # fmt: skip
            groups[key]["params"].append(p)
            groups[key]["names"].append(f"{part}.{name}")
    return list(groups.values())


def set_lr_wd(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    weight_decay: float,
    head_lr: float | None = None,
    backbone_scale: float = 1.0,
    freeze_last_layer: bool = False,
) -> None:
    """Write this step's lr and weight decay into every group built by :func:`param_groups`.

    lr = (lr * backbone_scale for the backbone, else head_lr (lr when None)) * lr_mult, and 0 for
    the heads' last layer while ``freeze_last_layer`` (the first epoch); weight decay =
    ``weight_decay`` * wd_mult. ``backbone_scale`` is the continued-pretraining unfreeze ramp
    (0 keeps a stage-1 backbone still).
    """
    for group in optimizer.param_groups:
        head = lr if head_lr is None else head_lr
        base = lr * backbone_scale if group["is_backbone"] else head
        group["lr"] = 0.0 if (freeze_last_layer and group["is_last_layer"]) else base * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]


def build_optimizer(
    groups: list[dict], *, betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups`` with lr 0 (call :func:`set_lr_wd` before every step).

    ``fused=None`` uses the fused CUDA kernel when every parameter is on a GPU, else torch's
    default (foreach) implementation.
    """
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ConfigError("no parameters to optimise")
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    groups = [{**g, "lr": 0.0, "weight_decay": 0.0} for g in groups]
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, fused=fused or None)
