"""The backbone contract for any timm model with a dense feature map (ConvNeXt, ResNet, EfficientNet ...).

:class:`TimmBackbone` is the second implementation of the contract of
:class:`~dinoapp.backbone.DinoBackbone`, for distillation students that are not ViTs (DINOv3
spec, section 4: "any timm model with a dense feature map"). It wraps a timm model that supports
``forward_intermediates`` and ``feature_info`` and treats the map of one feature stage (``out_index``)
as the patch grid:

- ``patch_size`` is that stage's stride, ``embed_dim`` its channels, and an input of H x W pixels
  (multiples of the stride) gives exactly an (H/p) x (W/p) grid of "patch tokens";
- the "CLS token" is the global average of that map (as a CNN's classifier sees it);
- a trainable ``norm`` (LayerNorm over channels, initialised to the identity affine) plays the part
  of a ViT's final norm, so features are normed like a ViT's;
- stages after ``out_index`` are pruned from the model (timm's ``prune_intermediate_layers``), so
  they cost nothing and hold no unused parameters (which DDP would reject); the few models without
  it skip them with ``stop_early`` but keep their parameters (``pruned`` is False: train such a
  student in one process);
- there are no register tokens and no mask token: CNN students take unmasked crops only.

``get_intermediate_layers`` follows Meta's semantics over the feature *stages* ``0 .. out_index``
(``n_blocks = out_index + 1``): see its docstring for how stages of other strides and widths are
brought to the patch grid. Checkpoints store timm's own state dict (see :mod:`dinoapp.checkpoint`);
:meth:`TimmBackbone.meta_state_dict` does not exist in any meaningful sense and raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import LVD_MEAN, LVD_STD, MetaForward, check_norm, pack_layers
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    HubUnavailableError,
    InputError,
    UnknownSourceError,
)

TIMM_PREFIX = "timm:"  # load_backbone("timm:convnext_tiny") / ("timm:convnext_tiny.fb_in22k")
NORM_EPS = 1e-6  # eps of the trainable norm and of the parameter-free norm of other stages
# create_model arguments TimmBackbone sets itself: passing them in model_kwargs is an error
# (and those that would make timm read files or fetch weights: a checkpoint record must not name them)
_RESERVED = {"pretrained", "num_classes", "in_chans", "drop_path_rate", "features_only", "pretrained_cfg_overlay",
             "cache_dir", "out_indices", "checkpoint_path", "pretrained_cfg", "pretrained_strict",
             "checkpoint_filter_fn", "feature_cfg"}  # fmt: skip


@dataclass(frozen=True)
class TimmArch:
    """What builds a :class:`TimmBackbone` (plain data, stored in checkpoints as ``arch``).

    ``model_name`` is the timm name (a pretrained tag, if any, kept: it selects timm's config);
    ``out_index`` the absolute index of the feature stage used as the patch map; ``model_kwargs``
    extra ``timm.create_model`` arguments (JSON types only). Training-only settings
    (``drop_path_rate``) are not part of the architecture.
    """

    model_name: str
    out_index: int
    in_chans: int = 3
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "timm"

    def __post_init__(self) -> None:
        if self.family != "timm":
            raise ConfigError(f"TimmArch family must be 'timm', got {self.family!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"model_name must be a timm model name, got {self.model_name!r}")
        for name in ("out_index", "in_chans"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        if self.in_chans < 1:
            raise ConfigError(f"in_chans must be >= 1, got {self.in_chans}")
        object.__setattr__(self, "model_kwargs", _plain_kwargs(self.model_kwargs))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_kwargs"] = json.loads(json.dumps(self.model_kwargs))  # a deep copy of plain JSON types
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimmArch:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown timm architecture fields {unknown}; known: {sorted(known)}")
        if "model_name" not in d or "out_index" not in d:
            raise ConfigError(f"a timm architecture needs 'model_name' and 'out_index', got {sorted(d)}")
        return cls(**{k: v for k, v in d.items()})

    def replace(self, **changes: Any) -> TimmArch:
        return TimmArch.from_dict({**self.to_dict(), **changes})


def _plain_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model_kwargs`` as JSON types (tuples become lists), so checkpoints and fingerprints can hold them."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model_kwargs must be a dict of timm.create_model arguments, got {type(kwargs).__name__}")
    reserved = sorted(set(kwargs) & _RESERVED)
    if reserved:
        raise ConfigError(
            f"model_kwargs {reserved} are set by TimmBackbone itself: use its own arguments (pretrained=, "
            "in_chans=, drop_path_rate=, out_index=) instead"
        )
    try:
        return json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model_kwargs must hold plain JSON values (numbers, strings, lists, dicts) so a checkpoint can record "
            f"them, got {kwargs!r} ({e})"
        ) from None


class TimmBackbone(MetaForward, nn.Module):
    """Any timm model with ``forward_intermediates``, behind dinoapp's backbone contract.

    Attributes (as :class:`~dinoapp.backbone.DinoBackbone`): ``patch_size`` (stride of stage
    ``out_index``), ``embed_dim`` (its channels), ``n_blocks`` (stages 0..out_index), ``num_heads``
    (None), ``n_registers`` / ``n_storage_tokens`` (0), ``in_chans``, ``mean``, ``std``, ``arch``
    (:class:`TimmArch`), ``provenance``, ``pretrained_heads``, ``grad_checkpointing``; plus
    ``model`` (the timm module), ``norm`` (trainable LayerNorm), ``stage_dims`` / ``stage_strides``
    (channels and stride of each stage 0..out_index).

    Args:
        model_name: a timm name (``convnext_atto``, ``resnet18``; a tag such as ``.fb_in22k`` picks
            the pretrained weights when ``pretrained=True``).
        out_index: the feature stage whose map is the patch grid (index into ``model.feature_info``,
            negatives from the end): e.g. ConvNeXt 2 = stride 16, -1 = stride 32.
        in_chans: input channels (timm adapts pretrained RGB stems).
        mean, std: input normalisation (default: timm's for pretrained weights, ImageNet otherwise).
        drop_path_rate: stochastic depth for training (models that lack it refuse rates > 0).
        pretrained: load timm's pretrained weights (from the Hugging Face cache; downloading needs
            internet once); ``cache_dir`` is that cache.
        model_kwargs: more ``timm.create_model`` arguments (recorded in checkpoints).
    """

    def __init__(
        self,
        model_name: str,
        *,
        out_index: int = -1,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        provenance: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        import timm

        kwargs = _plain_kwargs(model_kwargs)
        check_timm_name(model_name)
        if not isinstance(drop_path_rate, numbers.Real) or not 0.0 <= float(drop_path_rate) < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if not isinstance(in_chans, numbers.Integral) or isinstance(in_chans, bool) or in_chans < 1:
            raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
        prov: dict[str, Any] = {"source": TIMM_PREFIX + model_name, "weights": "random init", "sha256": None}
        weights_file: Path | None = None
        create: dict[str, Any] = {"num_classes": 0, "in_chans": int(in_chans), **kwargs}
        if drop_path_rate > 0:  # only then: several timm models (VGG, DenseNet, GhostNet) lack the argument
            create["drop_path_rate"] = float(drop_path_rate)
        if pretrained:
            weights_file = _pretrained_weights(model_name, cache_dir)
            if weights_file is not None:
                create["pretrained_cfg_overlay"] = {"file": str(weights_file)}  # no network: load the cached file
            elif cache_dir is not None:
                create["cache_dir"] = str(cache_dir)
        model = _create(timm, model_name, bool(pretrained), create, weights_file)

        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise ConfigError(
                f"timm model {model_name!r} has no forward_intermediates/feature_info, so it gives no dense feature "
                "map dinoapp can use: pick a model that does (ConvNeXt, ResNet, EfficientNet, RegNet, MobileNet ...)"
            )
        info = model.feature_info.get_dicts() if hasattr(model.feature_info, "get_dicts") else model.feature_info
        info = [dict(d) for d in info]
        n_stages = len(info)
        if not isinstance(out_index, numbers.Integral) or isinstance(out_index, bool):
            raise ConfigError(f"out_index must be an integer stage index, got {out_index!r}")
        if not -n_stages <= out_index < n_stages:
            stages = ", ".join(f"{i}: stride {d['reduction']}, {d['num_chs']} ch" for i, d in enumerate(info))
            raise ConfigError(f"out_index={out_index} is out of range for {model_name}'s {n_stages} stages ({stages})")
        out_index = int(out_index) % n_stages
        self.pruned = hasattr(model, "prune_intermediate_layers")
        if self.pruned:
            # stages after out_index, the final norm and the classifier head would never run: drop them
            model.prune_intermediate_layers([out_index], prune_norm=True, prune_head=True)

        self.model = model
        self.arch = TimmArch(model_name, out_index, int(in_chans), kwargs)
        self.out_index = out_index
        self.stage_dims = [int(d["num_chs"]) for d in info[: out_index + 1]]
        self.stage_strides = [int(d["reduction"]) for d in info[: out_index + 1]]
        self.patch_size = self.stage_strides[-1]
        self.embed_dim = self.stage_dims[-1]
        self.n_blocks = out_index + 1
        self.num_heads = None
        self.n_registers = 0
        self.in_chans = int(in_chans)
        self.norm = nn.LayerNorm(self.embed_dim, eps=NORM_EPS)  # weight 1, bias 0: the identity affine
        if pretrained:
            prov["weights"] = getattr(model, "pretrained_cfg", {}).get("tag") or "timm pretrained"
            found = weights_file or _pretrained_weights(model_name, cache_dir, quiet=True)
            if found is not None:
                from .checkpoint import sha256_file

                prov["sha256"] = sha256_file(found)
        if mean is None and std is None and pretrained:
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            mean, std = cfg.get("mean", LVD_MEAN), cfg.get("std", LVD_STD)
            prov["normalisation"] = "timm pretrained_cfg"
        elif mean is not None or std is not None:
            prov["normalisation"] = "user"
        else:
            prov["normalisation"] = "LVD-1689M (ImageNet)"
        self.mean, self.std = check_norm(mean, std, self.in_chans)
        prov.update(provenance or {})
        self.provenance: dict[str, Any] = prov
        self.pretrained_heads: dict[str, dict[str, torch.Tensor]] = {}
        self.grad_checkpointing = False
        self._gc_active = False

    @classmethod
    def from_arch(cls, arch: TimmArch, **kwargs: Any) -> TimmBackbone:
        """A randomly initialised backbone of ``arch`` (``kwargs``: mean, std, provenance, drop_path_rate)."""
        return cls(arch.model_name, out_index=arch.out_index, in_chans=arch.in_chans, model_kwargs=arch.model_kwargs,
                   **kwargs)  # fmt: skip

    # --- contract attribute names ---------------------------------------------------------------
    @property
    def n_storage_tokens(self) -> int:
        return self.n_registers

    @property
    def sha256(self) -> str | None:
        return self.provenance.get("sha256")

    # --- training hooks -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in backward (timm's own checkpointing; train mode with grads only)."""
        if enable and not hasattr(self.model, "set_grad_checkpointing"):
            raise ConfigError(f"timm model {self.arch.model_name} does not support gradient checkpointing")
        self.grad_checkpointing = bool(enable)

    def _sync_grad_checkpointing(self) -> None:
        want = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if want != self._gc_active:
            try:
                self.model.set_grad_checkpointing(want)
            except (AssertionError, NotImplementedError) as e:
                self.grad_checkpointing = False
                raise ConfigError(
                    f"timm model {self.arch.model_name} does not support gradient checkpointing ({e}): turn it off"
                ) from None
            self._gc_active = want

    # --- forward --------------------------------------------------------------------------------
    def _check_input(self, x: Any) -> tuple[int, int]:
        """Validate a batch [B, in_chans, H, W]; returns the patch grid (H/p, W/p)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"expected a batch [B, {self.in_chans}, H, W], got {shape}"
                + (" (use dinoapp.preprocess for raw images)" if not isinstance(x, torch.Tensor) or x.ndim != 4 else "")
            )
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            fix = f"{max(p, H - H % p)}x{max(p, W - W % p)} or {H + (-H % p)}x{W + (-W % p)}"
            raise InputError(
                f"image {H}x{W} is not a multiple of the {p}px stride of {self.arch.model_name} stage {self.out_index}:"
                f" resize or pad it to e.g. {fix} (dinoapp.preprocess does this for you)"
            )
        return H // p, W // p

    def _stage_maps(self, x: torch.Tensor, take: list[int]) -> tuple[dict[int, torch.Tensor], int, int]:
        """Pre-norm maps {stage: [B, C_i, H_i, W_i]} of the stages in ``take`` (sorted, non-negative), and the
        patch grid (h, w). Stages after max(take) are not run."""
        h, w = self._check_input(x)
        self._sync_grad_checkpointing()
        try:
            maps = self.model.forward_intermediates(x, indices=take, intermediates_only=True, stop_early=True)
        except AssertionError as e:  # timm asserts on inputs a model cannot take (fixed sizes ...)
            raise InputError(f"timm model {self.arch.model_name} cannot run on a {tuple(x.shape)} input: {e}") from None
        if len(maps) != len(take):
            raise InputError(f"{self.arch.model_name} returned {len(maps)} feature maps for stages {take}")
        by_stage = dict(zip(take, maps, strict=True))
        m = by_stage.get(self.out_index)
        if m is not None and (m.shape[1] != self.embed_dim or tuple(m.shape[-2:]) != (h, w)):
            raise InputError(
                f"{self.arch.model_name} stage {self.out_index} gave a map {tuple(m.shape[1:])} for a "
                f"{x.shape[-2]}x{x.shape[-1]} input; expected ({self.embed_dim}, {h}, {w}) (stride {self.patch_size}). "
                "This model's padding does not give an exact stride-p grid at this size: try another input size"
            )
        return by_stage, h, w

    @staticmethod
    def _tokens(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A map [B, C, h, w] -> (pooled [B, C], row-major patch tokens [B, h*w, C]), both pre-norm."""
        tokens = m.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return tokens.mean(dim=1), tokens  # [B, C], [B, h*w, C]

    def forward_features(self, x, masks=None):
        """Meta's output dict: ``x_norm_clstoken`` [B, D] (norm of the global average of the map),
        ``x_storage_tokens`` [B, 0, D], ``x_norm_patchtokens`` [B, h*w, D] (row-major),
        ``x_prenorm`` [B, 1+h*w, D] (pooled token, then patch tokens, before the norm), ``masks``
        (None). Lists of tensors give a list of dicts. ``masks`` must be None: mask tokens are ViT-only."""
        if isinstance(x, (list, tuple)):
            if masks is not None and any(m is not None for m in masks):
                raise InputError(self._masks_message())
            return [self.forward_features(xi) for xi in x]
        if masks is not None:
            raise InputError(self._masks_message())
        maps, _, _ = self._stage_maps(x, [self.out_index])
        pooled, tokens = self._tokens(maps[self.out_index])  # [B, D], [B, h*w, D]
        t = torch.cat([pooled.unsqueeze(1), tokens], dim=1)  # [B, 1+h*w, D]
        t_norm = self.norm(t)  # [B, 1+h*w, D]
        return {
            "x_norm_clstoken": t_norm[:, 0],
            "x_storage_tokens": t_norm[:, 1:1],  # [B, 0, D]
            "x_norm_patchtokens": t_norm[:, 1:],
            "x_prenorm": t,
            "masks": None,
        }

    def _masks_message(self) -> str:
        return (
            f"{self.arch.model_name} (a CNN student) takes unmasked crops only: mask tokens (iBOT masked image "
            "modelling) exist only in ViTs. Pass masks=None (switch the masking/iBOT loss off for this student)"
        )

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Meta's semantics over the feature *stages* 0..out_index: ``n`` int = the last n stages, a
        sequence = those stage indices (negatives from ``out_index``). Each output is patches
        [B, h*w, C_i] ([B, C_i, h, w] with ``reshape``) on the ``out_index`` grid, paired with the
        pooled "class" token [B, C_i] and/or the (empty) extra tokens [B, 0, C_i] when asked.

        Stages before ``out_index`` have a finer stride and fewer channels: their maps are average-pooled
        to the patch grid (``adaptive_avg_pool2d``: each patch is the mean of the stage's cells inside it;
        bilinear resampling in the unusual case of a coarser map) and their class token is the global
        average of the stage's own map. ``norm=True`` applies the trainable ``norm`` to stage ``out_index``
        and a parameter-free layer norm (no affine) to the other stages, whose width differs. Widths
        differ per stage (``stage_dims``), so code that blends several stages into one ``embed_dim``-wide
        buffer (sliding windows in :func:`dinoapp.dense.dense_features`) supports the last stage only.
        """
        if isinstance(n, torch.Tensor) and n.ndim == 0:
            n = int(n)
        if isinstance(n, numbers.Integral):
            n = int(n)
            if not 1 <= n <= self.n_blocks:
                raise InputError(
                    f"n={n}: {self.arch.model_name} up to stage {self.out_index} has {self.n_blocks} stages"
                )
            take = list(range(self.n_blocks - n, self.n_blocks))
        else:
            take = [int(i) for i in n]
            bad = [i for i in take if not -self.n_blocks <= i < self.n_blocks]
            if bad:
                raise InputError(f"stage indices {bad} out of range for {self.n_blocks} stages (0..{self.out_index})")
            take = [i % self.n_blocks for i in take]
        maps, h, w = self._stage_maps(x, sorted(set(take)))
        patches, cls_tokens, extra = [], [], []
        for i in take:
            m = maps[i]  # [B, C_i, H_i, W_i]
            pooled = m.mean(dim=(-2, -1)) if i != self.out_index else None  # [B, C_i], of the stage's own map
            if tuple(m.shape[-2:]) != (h, w):
                m = _to_grid(m, h, w)  # [B, C_i, h, w]
            own_pooled, tokens = self._tokens(m)  # [B, C_i], [B, h*w, C_i]
            pooled = own_pooled if pooled is None else pooled
            if norm:
                if i == self.out_index:
                    pooled, tokens = self.norm(pooled), self.norm(tokens)
                else:
                    C = tokens.shape[-1]
                    pooled = F.layer_norm(pooled, (C,), eps=NORM_EPS)
                    tokens = F.layer_norm(tokens, (C,), eps=NORM_EPS)
            cls_tokens.append(pooled)
            extra.append(tokens[:, :0])  # [B, 0, C_i]
            if reshape:
                B = tokens.shape[0]
                tokens = tokens.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [B, C_i, h, w]
            patches.append(tokens)
        return pack_layers(patches, cls_tokens, extra, return_class_token, return_extra_tokens)

    # --- weights --------------------------------------------------------------------------------
    def load_state_dict_checked(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load this module's own state dict (``model.*``: timm's, ``norm.*``), checking every key and
        shape first; a mismatch raises :class:`CheckpointMismatchError` naming the keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]  # fmt: skip
        if missing or unexpected or mismatched:
            a = self.arch
            parts = [
                f"the checkpoint does not match timm model {a.model_name} up to stage {self.out_index} "
                f"(stride {self.patch_size}, {self.embed_dim} channels, model_kwargs {a.model_kwargs})"
            ]
            for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("wrong shapes", mismatched)):  # fmt: skip
                if keys:
                    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                    parts.append(f"{title}: {', '.join(keys[:8])}{more}")
            raise CheckpointMismatchError("; ".join(parts), missing=missing, unexpected=unexpected,
                                          mismatched=mismatched)  # fmt: skip
        self.load_state_dict(dict(sd), strict=True)

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Not available: Meta's release layout exists for DINOv3 ViTs only."""
        raise ConfigError(
            f"meta_state_dict(): Meta's release layout is ViT-only; {self.arch.model_name} is a timm "
            "model: save it with dinoapp.save_backbone (timm's own state dict) or use state_dict()"
        )

    def load_meta_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Not available: Meta's release layout exists for DINOv3 ViTs only."""
        raise ConfigError(
            f"load_meta_state_dict(): Meta's release layout is ViT-only; {self.arch.model_name} is a timm "
            "model: load a dinoapp checkpoint of it with dinoapp.load_backbone, or use load_state_dict_checked()"
        )

    def extra_repr(self) -> str:
        return (f"model={self.arch.model_name!r}, out_index={self.out_index} (stride {self.patch_size}, "
                f"{self.embed_dim} channels), source={self.provenance.get('source')!r}")  # fmt: skip


def _to_grid(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A stage map [B, C, H_i, W_i] on the (h, w) patch grid: mean of the cells in each patch when finer,
    bilinear resampling otherwise."""
    if m.shape[-2] >= h and m.shape[-1] >= w:
        return F.adaptive_avg_pool2d(m, (h, w))  # [B, C, h, w]
    return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)  # [B, C, h, w]


# --- names and pretrained weights ---------------------------------------------------------------


def split_timm_source(source: str) -> str | None:
    """``'timm:convnext_tiny.fb_in22k'`` -> ``'convnext_tiny.fb_in22k'``; None for other sources."""
    if not isinstance(source, str) or not source.startswith(TIMM_PREFIX):
        return None
    return source[len(TIMM_PREFIX) :]


def check_timm_name(model_name: str) -> None:
    """Raise :class:`UnknownSourceError` (with close names) unless timm knows ``model_name`` (tag included)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not isinstance(model_name, str) or not model_name:
        raise UnknownSourceError(f"expected a timm model name such as 'convnext_atto', got {model_name!r}")
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models('pattern*') for names."
        raise UnknownSourceError(f"timm has no model {arch!r}.{hint}")
    if tag:
        try:
            get_pretrained_cfg(model_name, allow_unregistered=False)
        except RuntimeError:
            known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise UnknownSourceError(f"timm has no pretrained weights {model_name!r}; available: {known}") from None


def _pretrained_weights(model_name: str, cache_dir: str | os.PathLike | None, quiet: bool = False) -> Path | None:
    """The local file of timm's pretrained weights for ``model_name`` (Hugging Face or torch hub cache),
    or None when it is not cached and may be downloaded. Raises :class:`HubUnavailableError` when it is
    not cached and cannot be downloaded (``HF_HUB_OFFLINE`` or no route to the hub), unless ``quiet``."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, allow_unregistered=True)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        if quiet:
            return None
        raise UnknownSourceError(f"timm has no pretrained weights for {model_name!r}: use 'timm:{model_name}' "
                                 "(random init) or a checkpoint file")  # fmt: skip
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    cache = str(cache_dir) if cache_dir is not None else None
    if cfg.hf_hub_id:
        from timm.models._hub import _get_safe_alternatives, hf_split

        repo, revision = hf_split(cfg.hf_hub_id)
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        for fn in [*_get_safe_alternatives(filename), filename]:
            got = try_to_load_from_cache(repo, fn, cache_dir=cache, revision=revision)
            if isinstance(got, str) and Path(got).is_file():
                return Path(got)
        where = f"the Hugging Face cache ({cache or constants.HF_HUB_CACHE}), hub repo {repo}"
    else:
        from urllib.parse import urlparse

        hub_dir = Path(cache) if cache else Path(torch.hub.get_dir()) / "checkpoints"
        local = hub_dir / Path(urlparse(cfg.url).path).name
        if local.is_file():
            return local
        where = f"the torch hub cache ({hub_dir}), URL {cfg.url}"
    if quiet:
        return None
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    advice = (
        f"The weights must be downloaded once with internet: run `load_backbone('timm:{model_name}')` on a machine "
        f"that has it (they land in {where}), or save the backbone with dinoapp.save_backbone and pass that file."
    )
    if offline:
        raise HubUnavailableError(f"timm weights {model_name} are not in the local cache and HF_HUB_OFFLINE is set. "
                                  f"{advice}")  # fmt: skip
    from .hub import _hub_reachable

    if not _hub_reachable():
        raise HubUnavailableError(f"timm weights {model_name} are not in the local cache and the hub cannot be "
                                  f"reached. {advice}")  # fmt: skip
    return None


def _create(timm, model_name: str, pretrained: bool, create: dict[str, Any], weights_file: Path | None) -> nn.Module:
    """``timm.create_model`` with the library's errors."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **create)
    except TypeError as e:
        msg = str(e)
        if "drop_path_rate" in msg:
            raise ConfigError(f"timm model {model_name} has no stochastic depth (drop_path_rate): train it with "
                              "drop_path_rate=0") from None  # fmt: skip
        if "unexpected keyword" in msg:
            extra = sorted(set(create) - {"num_classes", "in_chans", "drop_path_rate", "pretrained_cfg_overlay",
                                          "cache_dir"})  # fmt: skip
            raise ConfigError(
                f"timm model {model_name} refuses an argument among model_kwargs {extra}: {msg}"
            ) from None
        raise
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained:
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        if weights_file is not None:
            raise CheckpointError(f"timm could not load its pretrained weights {weights_file} into {model_name} "
                                  f"({type(e).__name__}: {first})") from None  # fmt: skip
        raise HubUnavailableError(f"fetching timm weights {model_name} failed ({type(e).__name__}: {first}); "
                                  "the weights must be downloaded once with internet, or pass a local checkpoint "
                                  "file") from None  # fmt: skip


__all__ = ["TIMM_PREFIX", "TimmArch", "TimmBackbone", "check_timm_name", "split_timm_source"]
