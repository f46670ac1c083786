"""DINOv3 ViT architectures: the named table of released models and how to build one with timm.

Numbers from the DINOv3 paper (arXiv 2508.10104), table of released backbones: patch 16,
1 CLS + 4 register tokens, pre-norm blocks, LayerScale (init 1e-5), LayerNorm eps 1e-5, 2-D RoPE
with base 100 and no absolute position embedding.

An :class:`ArchSpec` is plain data (it round-trips through a dict of JSON types), so our own
checkpoints can store it next to the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from .errors import ConfigError, UnknownSourceError


def swiglu_hidden(dim: int, ratio: float, align: int = 8) -> int:
    """Hidden width of a DINOv3 SwiGLU FFN: h = int(dim*ratio), d = int(2h/3) rounded up to ``align``."""
    h = int(dim * ratio)
    d = int(2 * h / 3)
    return d + (-d % align)


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a DINOv3 ViT; all of it is read from a checkpoint's tensors."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str = "mlp"  # "mlp" (GELU, fc1/fc2) or "swiglu" (w3(silu(w1 x) * w2 x))
    ffn_hidden: int = 0  # 0 means 4 * embed_dim
    qkv_bias: bool = True  # q and v biases (the k bias of DINOv3 is always zero)
    n_registers: int = 4
    patch_size: int = 16
    in_chans: int = 3
    layerscale: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 100.0
    local_cls_norm: bool = False  # present in ViT-L SAT / 7B files; training-only, ignored at inference

    def __post_init__(self) -> None:
        if self.ffn not in ("mlp", "swiglu"):
            raise ConfigError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.n_registers < 0:
            raise ConfigError(f"n_registers must be >= 0, got {self.n_registers}")
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 4 * self.embed_dim)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown architecture fields {unknown}; known: {sorted(fields)}")
        out = {}
        for k, v in d.items():
            want = {"int": int, "float": float, "bool": bool, "str": str}[fields[k].type]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ConfigError(f"architecture field {k!r} must be {want.__name__}, got {v!r}")
            out[k] = v
        return cls(**out)

    def replace(self, **changes: Any) -> ArchSpec:
        return ArchSpec.from_dict({**self.to_dict(), **changes})


# Released DINOv3 ViTs (Meta hub name without the "dinov3_" prefix) and small test models.
ARCHS: dict[str, ArchSpec] = {
    "vits16": ArchSpec(384, 12, 6),
    "vits16plus": ArchSpec(384, 12, 6, ffn="swiglu", ffn_hidden=swiglu_hidden(384, 6)),
    "vitb16": ArchSpec(768, 12, 12),
    "vitl16": ArchSpec(1024, 24, 16),
    "vith16plus": ArchSpec(1280, 32, 20, ffn="swiglu", ffn_hidden=swiglu_hidden(1280, 6)),
    "vit7b16": ArchSpec(4096, 40, 32, ffn="swiglu", ffn_hidden=8192, qkv_bias=False),
    # Small models for tests, CPU experiments and students: same design, fewer/narrower blocks.
    "vit_tiny": ArchSpec(192, 4, 3),
    "vit_tiny_swiglu": ArchSpec(192, 4, 3, ffn="swiglu", ffn_hidden=swiglu_hidden(192, 6)),
}

# timm model names (without tag) of the released architectures.
TIMM_NAMES: dict[str, str] = {
    "vit_small_patch16_dinov3": "vits16",
    "vit_small_plus_patch16_dinov3": "vits16plus",
    "vit_base_patch16_dinov3": "vitb16",
    "vit_large_patch16_dinov3": "vitl16",
    "vit_huge_plus_patch16_dinov3": "vith16plus",
    "vit_7b_patch16_dinov3": "vit7b16",
}

# Released head widths for checkpoints that do not say (timm / HF files store no RoPE periods).
_HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}


def default_num_heads(embed_dim: int) -> int:
    """Heads of a released model of this width; otherwise head dim 64 (as in every released ViT but 7B)."""
    if embed_dim in _HEADS_BY_DIM:
        return _HEADS_BY_DIM[embed_dim]
    if embed_dim % 64 == 0:
        return embed_dim // 64
    raise ConfigError(
        f"cannot guess the number of attention heads for embed_dim {embed_dim}: pass num_heads=... to load_backbone"
    )


def arch_from_name(name: str) -> ArchSpec:
    """Look up ``vits16`` / ``dinov3_vits16`` / ``vit_tiny`` ..."""
    key = name.removeprefix("dinov3_")
    if key not in ARCHS:
        raise UnknownSourceError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))} "
            "(or a timm name such as 'vit_small_patch16_dinov3.lvd1689m', or a checkpoint path)"
        )
    return ARCHS[key]


def build_timm_vit(arch: ArchSpec, *, drop_path_rate: float = 0.0):
    """Build timm's DINOv3 ``Eva`` for ``arch`` (random init, classifier removed).

    ``dynamic_img_size`` lets any H, W through; the stride-16 patch conv drops pixels beyond a
    multiple of the patch size, as in DINOv3.
    """
    import torch.nn as nn
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    # timm computes hidden = int(dim * mlp_ratio): pick a ratio that lands exactly on ffn_hidden.
    mlp_ratio = (arch.ffn_hidden + 0.5) / arch.embed_dim
    assert int(arch.embed_dim * mlp_ratio) == arch.ffn_hidden
    vit = Eva(
        img_size=224,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=0,
        global_pool="token",
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        qkv_bias=arch.qkv_bias,
        mlp_ratio=mlp_ratio,
        swiglu_mlp=arch.ffn == "swiglu",
        swiglu_align_to=1 if arch.ffn == "swiglu" else 0,  # split fc1_g / fc1_x weights, no rounding
        drop_path_rate=drop_path_rate,
        norm_layer=partial(LayerNorm, eps=arch.norm_eps),
        init_values=1e-5 if arch.layerscale else None,
        num_reg_tokens=arch.n_registers,
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=arch.rope_base,
        rope_rotate_half=True,
        use_fc_norm=False,
        dynamic_img_size=True,
    )
    if not isinstance(vit.head, nn.Identity):  # pragma: no cover - num_classes=0 guarantees this
        vit.head = nn.Identity()
    return vit


def count_params(arch: ArchSpec) -> int:
    """Parameter count of ``arch`` (built on the meta device: no memory is used)."""
    import torch

    with torch.device("meta"):
        vit = build_timm_vit(arch)
    # + mask token, which timm does not hold
    return sum(p.numel() for p in vit.parameters()) + arch.embed_dim


def describe(arch: ArchSpec) -> str:
    n = count_params(arch)
    return (
        f"ViT dim {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, "
        f"{arch.ffn.upper()} hidden {arch.ffn_hidden}, registers {arch.n_registers}, "
        f"patch {arch.patch_size}, in_chans {arch.in_chans}, qkv bias {arch.qkv_bias}, "
        f"{n / 1e6:.1f}M params"
    )
