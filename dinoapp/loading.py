"""``load_backbone``: any source -> a :class:`~dinoapp.backbone.DinoBackbone` (DINOv3 ViT) or a
:class:`~dinoapp.timm_backbone.TimmBackbone` (any timm model with a dense feature map).

Sources, tried in this order:

1. a ``DinoBackbone`` or ``TimmBackbone`` (returned as is, moved to ``device``);
2. an existing file or folder: Meta release ``.pth``, Meta ``teacher_checkpoint.pth`` dump (the
   DINO/iBOT heads are kept in ``pretrained_heads``), timm ``.pth``/``.safetensors``, a Hugging
   Face ``DINOv3ViTModel`` file or folder, or a dinoapp checkpoint (of either backbone kind);
3. an architecture name without weights (``vits16``, ``dinov3_vitl16``, ``vit_tiny`` ...), random
   init, with optional overrides (``depth=2``);
4. a timm DINOv3 name with tag (``vit_large_patch16_dinov3.sat493m``), fetched through the hub cache;
5. ``"timm:<model>"`` (``timm:convnext_atto``): any timm model as a :class:`TimmBackbone`, random
   init (``seed`` respected), with ``out_index=`` (the feature stage used as the patch map) and timm
   model arguments as keyword overrides; ``"timm:<model>.<tag>"`` (``timm:convnext_tiny.fb_in22k``)
   loads timm's pretrained weights from the Hugging Face cache (downloaded once with internet).

The architecture is always read from the weights. Normalisation follows the weights (SAT-493M
statistics for ``sat493m`` weights, timm's statistics for timm pretrained weights, ImageNet
statistics otherwise) unless ``mean``/``std`` are given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import hub
from .arch import ARCHS, ArchSpec, arch_from_name, count_params
from .backbone import LVD_MEAN, LVD_STD, SAT_MEAN, SAT_STD, DinoBackbone, check_norm, expand_input_channels
from .checkpoint import check_record, read_checkpoint, record_family
from .errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    SourceNotFoundError,
    UnknownSourceError,
)
from .layouts import detect_layout, infer_arch, to_meta
from .timm_backbone import TIMM_PREFIX, TimmArch, TimmBackbone, split_timm_source

_META_FILE = re.compile(r"dinov3_(vits16plus|vits16|vitb16|vitl16plus|vitl16|vith16plus|vit7b16)_pretrain_"
                        r"(lvd1689m|sat493m)")  # fmt: skip


def load_backbone(
    source: str | os.PathLike | DinoBackbone | TimmBackbone,
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int | None = None,
    num_heads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
    seed: int | None = None,
    **arch_overrides: Any,
) -> DinoBackbone | TimmBackbone:
    """Load a backbone from ``source`` (see module docstring); returned in ``eval()`` mode.

    Args:
        device: where to put it (default CPU).
        mean, std: override the input normalisation (one value per input channel, for [0, 1] inputs).
        in_chans: give an RGB backbone this many input channels (see ``expand_input_channels``; for a
            ``timm:`` name, the channels timm builds the model with).
        num_heads: only for files that do not say (timm/HF files of non-released widths).
        cache_dir: Hugging Face cache folder for timm names.
        drop_path_rate: stochastic depth for training (0 for inference).
        seed: random init seed for architecture names and ``timm:`` names without a tag.
        **arch_overrides: with an architecture name, fields of :class:`ArchSpec` (``depth=2``); with a
            ``timm:`` name, ``out_index=`` and ``timm.create_model`` arguments.
    """
    if isinstance(source, (DinoBackbone, TimmBackbone)):
        bb = source
    else:
        timm_name = split_timm_source(source) if isinstance(source, str) else None
        if timm_name is not None:
            if num_heads is not None:
                raise ConfigError(f"num_heads only applies to ViT files; {source} is a timm model")
            bb = _load_timm(timm_name, mean, std, in_chans, cache_dir, drop_path_rate, seed, arch_overrides)
            return bb.to(device or "cpu").eval()
        if arch_overrides and not (isinstance(source, str) and _is_arch_name(source)):
            raise ConfigError(
                f"architecture overrides {sorted(arch_overrides)} only apply to architecture names "
                f"({', '.join(sorted(ARCHS))}) and 'timm:<model>' names; a checkpoint's architecture is read "
                "from its weights"
            )
        defer = in_chans is not None  # user statistics are per *final* channel: apply after expansion
        bb = _load(source, None if defer else mean, None if defer else std, num_heads, cache_dir, drop_path_rate,
                   seed, arch_overrides)  # fmt: skip
    if isinstance(bb, TimmBackbone) and in_chans is not None and in_chans != bb.in_chans:
        raise ConfigError(
            f"{bb.arch.model_name} takes {bb.in_chans} input channels, not {in_chans}: expanding the input channels "
            "of a trained model is ViT-only (expand_input_channels); build a new student with "
            f"load_backbone('timm:{bb.arch.model_name}', in_chans={in_chans}) instead"
        )
    if in_chans is not None and in_chans != bb.in_chans:
        expand_input_channels(bb, in_chans, mean=mean, std=std)
    elif (mean is not None or std is not None) and (
        in_chans is not None or isinstance(source, (DinoBackbone, TimmBackbone))
    ):
        bb.mean, bb.std = check_norm(mean if mean is not None else bb.mean, std if std is not None else bb.std,
                                     bb.in_chans)  # fmt: skip
        bb.provenance["normalisation"] = "user"
    return bb.to(device or "cpu").eval()


def _is_arch_name(source: str) -> bool:
    return source.removeprefix("dinov3_") in ARCHS


def _load_timm(name, mean, std, in_chans, cache_dir, drop_path_rate, seed, overrides) -> TimmBackbone:
    """``timm:<model>`` (random init under ``seed``) or ``timm:<model>.<tag>`` (timm's pretrained weights)."""
    overrides = dict(overrides)
    out_index = overrides.pop("out_index", -1)
    if not name:
        raise UnknownSourceError("'timm:' needs a model name, e.g. 'timm:convnext_atto' or 'timm:resnet50.a1_in1k'")
    pretrained = "." in name
    prov: dict[str, Any] = {"source": TIMM_PREFIX + name}
    kwargs = dict(out_index=out_index, in_chans=3 if in_chans is None else in_chans, mean=mean, std=std,
                  drop_path_rate=drop_path_rate, model_kwargs=overrides)  # fmt: skip
    if pretrained:
        return TimmBackbone(name, pretrained=True, cache_dir=cache_dir, provenance=prov, **kwargs)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        prov.update(weights="random init", seed=seed)
        return TimmBackbone(name, provenance=prov, **kwargs)


def _load(source, mean, std, num_heads, cache_dir, drop_path_rate, seed, arch_overrides) -> DinoBackbone | TimmBackbone:
    path = Path(source).expanduser() if not isinstance(source, Path) else source
    if isinstance(source, Path) or path.exists():
        return from_file(path, mean=mean, std=std, num_heads=num_heads, drop_path_rate=drop_path_rate,
                         source=str(source))  # fmt: skip
    src = str(source)
    if _is_arch_name(src):
        arch = arch_from_name(src)
        if arch_overrides:
            arch = arch.replace(**arch_overrides)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            prov = {"source": src, "weights": "random init", "seed": seed, "sha256": None}
            bb = DinoBackbone(arch, mean=mean, std=std, drop_path_rate=drop_path_rate, provenance=prov)
        return bb
    if hub.split_timm_name(src) is not None:
        file, tag = hub.fetch(src, cache_dir=cache_dir)
        bb = from_file(file, mean=mean, std=std, num_heads=num_heads, drop_path_rate=drop_path_rate,
                       source=src, data_tag=tag)  # fmt: skip
        return bb
    if os.sep in src or "/" in src or Path(src).suffix in (".pth", ".pt", ".safetensors", ".bin", ".ckpt"):
        raise SourceNotFoundError(f"no such file or folder: {src}")
    raise UnknownSourceError(
        f"{src!r} is not a file, an architecture name ({', '.join(sorted(ARCHS))}), a timm DINOv3 name "
        "such as 'vit_small_patch16_dinov3.lvd1689m' nor a timm model such as 'timm:convnext_atto'"
    )


def from_file(
    path: str | os.PathLike,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_heads: int | None = None,
    drop_path_rate: float = 0.0,
    source: str | None = None,
    data_tag: str | None = None,
) -> DinoBackbone | TimmBackbone:
    """Build a backbone from a checkpoint file or folder in any supported layout (a dinoapp record of a
    timm model gives a :class:`TimmBackbone`)."""
    raw = read_checkpoint(path)
    layout = detect_layout(raw.obj)
    prov: dict[str, Any] = {"source": source or str(path), "path": str(raw.path), "sha256": raw.sha256}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if layout == "dinoapp":
        obj = raw.obj
        check_record(obj, raw.path)
        if record_family(obj, raw.path) == "timm":
            return _timm_from_record(obj, raw.path, prov, mean, std, drop_path_rate)
        arch = ArchSpec.from_dict(dict(obj["arch"]))
        sd = dict(obj["state_dict"])
        _check_record_size(count_params(arch), sd, raw.path)
        heads = {n: dict(h) for n, h in (obj.get("heads") or {}).items()}
        prov = {**dict(obj.get("provenance") or {}), **prov, "layout": "dinoapp"}
        file_mean, file_std = obj.get("mean"), obj.get("std")
        norm_from = "file"
    else:
        sd, heads, layout = to_meta(raw.obj)
        prov["layout"] = layout
        cfg = raw.config
        if num_heads is None and cfg.get("num_attention_heads"):
            num_heads = int(cfg["num_attention_heads"])
        arch = infer_arch(sd, num_heads=num_heads)
        if cfg.get("layer_norm_eps") or cfg.get("rope_theta"):
            arch = arch.replace(norm_eps=float(cfg.get("layer_norm_eps", arch.norm_eps)),
                                rope_base=float(cfg.get("rope_theta", arch.rope_base)))  # fmt: skip
        _check_meta_name(raw.path, arch)
        if not arch.qkv_bias and any(k.endswith("attn.qkv.bias") for k in sd):
            prov["zero_qkv_bias"] = True  # distilled file: all-zero biases, exported again by meta_state_dict
        if "mask_token" not in sd and layout in ("timm", "teacher (timm)"):
            sd["mask_token"] = torch.zeros(1, arch.embed_dim)
            prov["mask_token"] = "absent from the timm file: zeros (Meta's initial value)"
        tag = data_tag or _data_tag(raw.path)
        if tag:
            prov["weights"] = tag
        pre = raw.preprocessor
        if pre.get("image_mean") and pre.get("image_std"):
            file_mean, file_std, norm_from = pre["image_mean"], pre["image_std"], "preprocessor_config.json"
        elif tag and "sat493m" in tag:
            file_mean, file_std, norm_from = SAT_MEAN, SAT_STD, "SAT-493M"
        else:
            file_mean, file_std, norm_from = LVD_MEAN, LVD_STD, "LVD-1689M (ImageNet)"
    prov["normalisation"] = "user" if mean is not None or std is not None else norm_from
    bb = DinoBackbone(arch, mean=mean if mean is not None else file_mean, std=std if std is not None else file_std,
                      provenance=prov, drop_path_rate=drop_path_rate)  # fmt: skip
    bb.load_meta_state_dict(sd)
    bb.pretrained_heads = heads
    return bb


def _check_record_size(n_params: int, state_dict: dict, path: Path) -> None:
    """A dinoapp record names the architecture to build. Before building it for real, check that the file
    holds about that many values: a damaged (or crafted) record must not make us allocate a model far
    bigger than its file (a 600-byte file asking for a 160-billion-parameter ViT)."""
    stored = sum(int(t.numel()) for t in state_dict.values() if isinstance(t, torch.Tensor))
    if n_params > 4 * stored + 50_000_000:  # a modest mismatch gets the precise missing-keys error later
        raise CheckpointCorruptError(
            f"{path}: its architecture record describes {n_params / 1e6:.1f}M parameters but the file holds "
            f"only {stored / 1e6:.1f}M values: the file is damaged or was not written by dinoapp"
        )


def _timm_from_record(obj, path: Path, prov: dict[str, Any], mean, std, drop_path_rate: float) -> TimmBackbone:
    """A :class:`TimmBackbone` from a dinoapp timm record: timm's model built at random, then the file's
    weights loaded strictly (:class:`CheckpointMismatchError` names any key that does not fit)."""
    arch = TimmArch.from_dict(dict(obj["arch"]))
    with torch.device("meta"):  # its size first, allocating nothing
        n_params = sum(p.numel() for p in TimmBackbone.from_arch(arch).parameters())
    _check_record_size(n_params, dict(obj["state_dict"]), path)
    prov = {**dict(obj.get("provenance") or {}), **prov, "layout": "dinoapp"}
    prov["normalisation"] = "user" if mean is not None or std is not None else "file"
    file_mean, file_std = obj.get("mean"), obj.get("std")
    bb = TimmBackbone.from_arch(arch, mean=mean if mean is not None else file_mean,
                                std=std if std is not None else file_std, provenance=prov,
                                drop_path_rate=drop_path_rate)  # fmt: skip
    try:
        bb.load_state_dict_checked(dict(obj["state_dict"]))
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}", missing=e.missing, unexpected=e.unexpected,
                                      mismatched=e.mismatched) from None  # fmt: skip
    bb.pretrained_heads = {n: dict(h) for n, h in (obj.get("heads") or {}).items()}
    return bb


def _data_tag(path: Path) -> str | None:
    name = path.name.lower()
    for tag in ("sat493m", "lvd1689m"):
        if tag in name or tag in str(path).lower():
            return tag
    return None


def _check_meta_name(path: Path, arch: ArchSpec) -> None:
    """A Meta release file name says which model it is: catch files cut short or edited."""
    m = _META_FILE.search(path.name)
    if not m or m.group(1) not in ARCHS:
        return
    want = ARCHS[m.group(1)]
    got = (arch.embed_dim, arch.depth, arch.ffn, arch.ffn_hidden)
    exp = (want.embed_dim, want.depth, want.ffn, want.ffn_hidden)
    if got != exp:
        raise CheckpointMismatchError(
            f"{path.name} is named as {m.group(1)} (dim {want.embed_dim}, {want.depth} blocks, {want.ffn} "
            f"{want.ffn_hidden}) but holds dim {arch.embed_dim}, {arch.depth} blocks, {arch.ffn} {arch.ffn_hidden}:"
            " the file is incomplete or was modified",
            missing=[f"blocks.{i}.*" for i in range(arch.depth, want.depth)],
        )
