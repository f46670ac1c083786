"""Checkpoint layouts: recognise a state dict, convert it to Meta's layout, read the architecture.

Meta's release layout (``cls_token``, ``storage_tokens``, ``blocks.{i}.attn.qkv.bias`` ...) is the
canonical one inside dinoapp: every file is converted to it first, the architecture is read off
its tensors, and only then is it mapped onto timm's module names. Layouts (DINOv3 spec, section 1):

- ``meta``: Meta release file, a flat state dict.
- ``teacher``: Meta training dump ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``.
- ``timm``: timm's DINOv3 ``Eva`` names (``reg_token``, ``gamma_1``, ``q_bias``/``v_bias``, ``fc1_g``...).
- ``hf``: Hugging Face transformers ``DINOv3ViTModel`` (``embeddings.*``, ``layer.{i}.attention.q_proj``...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .arch import ArchSpec, default_num_heads
from .errors import CheckpointMismatchError, UnsupportedFormatError

StateDict = dict[str, torch.Tensor]

# Keys that may sit in a Meta-layout file and are not used at inference.
_IGNORED_META = re.compile(r"^(local_cls_norm\.(weight|bias)|rope_embed\.periods|blocks\.\d+\.attn\.qkv\.bias_mask)$")


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop DDP / torch.compile wrappers (``module.``, ``_orig_mod.``) from every key."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", k).replace("._orig_mod.", ".")
        out[k] = v
    return out


def detect_layout(obj: Mapping) -> str:
    """Name the layout of a loaded checkpoint object (see module docstring)."""
    if "dinoapp_format" in obj:
        return "dinoapp"
    if "teacher" in obj and isinstance(obj["teacher"], Mapping):
        return "teacher"
    keys = set(obj)
    if not all(isinstance(k, str) for k in keys):
        raise UnsupportedFormatError("the file's dict has non-text keys: it is not a state dict")
    if not keys or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        hint = f" It holds the entries {nested[:6]}." if nested else ""
        raise UnsupportedFormatError(
            "the file is not a flat state dict of tensors nor a known training dump"
            f" ('teacher' / dinoapp checkpoint).{hint}"
        )
    keys = set(_strip_wrappers(obj))
    if "embeddings.patch_embeddings.weight" in keys:
        return "hf"
    if keys & {"reg_token", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.mlp.fc1_g.weight"}:
        return "timm"
    if "patch_embed.proj.weight" in keys:
        return "meta"
    raise UnsupportedFormatError(
        "the state dict is not a DINOv3 backbone in any known layout (Meta, Meta teacher dump, timm, "
        f"Hugging Face, dinoapp): found keys like {sorted(keys)[:8]}"
    )


# ---------------------------------------------------------------------------------------------
# Any layout -> Meta layout


def split_teacher(obj: Mapping) -> tuple[StateDict, dict[str, StateDict]]:
    """Meta training dump -> (backbone state dict, {"dino_head": ..., "ibot_head": ...})."""
    teacher = _strip_wrappers(obj["teacher"])
    backbone = _strip(teacher, "backbone.")
    if not backbone:
        raise UnsupportedFormatError(
            "the 'teacher' entry holds no 'backbone.*' keys; found " + ", ".join(sorted(teacher)[:6])
        )
    heads = {}
    for name in ("dino_head", "ibot_head"):
        part = _strip(teacher, name + ".")
        if part:
            heads[name] = part
    others = sorted(k for k in teacher if not k.startswith(("backbone.", "dino_head.", "ibot_head.")))
    if others:
        raise CheckpointMismatchError(f"unexpected keys in the teacher dump: {others[:10]}", unexpected=others)
    return backbone, heads


def timm_to_meta(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """timm DINOv3 ``Eva`` names -> Meta names. The k bias is re-inserted as zeros."""
    sd = _strip_wrappers(sd)
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("rope.") or (k.startswith("head.") and v.numel() == 0):
            continue  # RoPE buffers are recomputed; an empty classifier is no weight
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            p = f"blocks.{i}."
            if rest == "attn.q_bias" and p + "attn.v_bias" not in sd:
                raise CheckpointMismatchError(f"{p}attn.q_bias present without v_bias", missing=[p + "attn.v_bias"])
            if rest in ("attn.q_bias", "attn.k_bias"):
                continue  # handled with v_bias
            if rest == "attn.v_bias":
                q = sd.get(p + "attn.q_bias")
                if q is None:
                    raise CheckpointMismatchError(f"{p}attn.v_bias present without q_bias", missing=[p + "attn.q_bias"])
                out[p + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
                continue
            rest = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}.get(rest, rest)
            rest = re.sub(r"^mlp\.fc1_g\.", "mlp.w1.", rest)
            rest = re.sub(r"^mlp\.fc1_x\.", "mlp.w2.", rest)
            if p + "mlp.fc1_g.weight" in sd:
                rest = re.sub(r"^mlp\.fc2\.", "mlp.w3.", rest)
            out[p + rest] = v
        elif k == "reg_token":
            out["storage_tokens"] = v
        else:
            out[k] = v
    return out


def hf_to_meta(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face ``DINOv3ViTModel`` names -> Meta names (q/k/v projections are fused)."""
    sd = _strip_wrappers(sd)
    sd = {re.sub(r"^(dinov3\.|model\.)(?=layer\.|embeddings\.|norm\.)", "", k): v for k, v in sd.items()}
    sd = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in sd.items()}
    out: StateDict = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "storage_tokens",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            if k == "embeddings.register_tokens" and v.shape[1] == 0:
                continue
            out[simple[k]] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)  # HF [1, 1, D] -> Meta [1, D]
        elif m := re.match(r"^layer\.(\d+)\.(.+)$", k):
            blocks.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v  # left for the unexpected-key check
    for i, b in blocks.items():
        p = f"blocks.{i}."
        gated = "mlp.gate_proj.weight" in b
        names = {
            "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
            "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
            "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
            "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        }  # fmt: skip
        if gated:
            names |= {f"mlp.{a}_proj.{t}": f"mlp.{w}.{t}" for a, w in (("gate", "w1"), ("up", "w2"), ("down", "w3"))
                      for t in ("weight", "bias")}  # fmt: skip
        else:
            names |= {f"mlp.{a}_proj.{t}": f"mlp.{f}.{t}" for a, f in (("up", "fc1"), ("down", "fc2"))
                      for t in ("weight", "bias")}  # fmt: skip
        qkv = [b.pop(f"attention.{x}_proj.weight", None) for x in "qkv"]
        if all(t is not None for t in qkv):
            out[p + "attn.qkv.weight"] = torch.cat(qkv)
        bq, bk, bv = (b.pop(f"attention.{x}_proj.bias", None) for x in "qkv")
        if bk is not None and bool(bk.any()):
            raise CheckpointMismatchError(
                f"{p}: the Hugging Face file has a non-zero key bias; DINOv3 has none (its k bias is masked "
                "to zero), so this is not a DINOv3 backbone",
                unexpected=[f"layer.{i}.attention.k_proj.bias"],
            )
        if bq is not None or bv is not None:
            if bq is None or bv is None:
                raise CheckpointMismatchError(
                    f"layer {i}: q and v biases must come together", missing=[f"layer.{i}.attention.q/v_proj.bias"]
                )
            out[p + "attn.qkv.bias"] = torch.cat([bq, torch.zeros_like(bq), bv])
        for k, v in b.items():
            out[p + names.get(k, "hf:" + k)] = v
    return out


def to_meta(obj: Mapping) -> tuple[StateDict, dict[str, StateDict], str]:
    """Any supported checkpoint object -> (Meta-layout backbone state dict, SSL heads, layout name)."""
    layout = detect_layout(obj)
    heads: dict[str, StateDict] = {}
    if layout == "teacher":
        sd, heads = split_teacher(obj)
        inner = detect_layout(sd)
        sd = {"timm": timm_to_meta, "hf": hf_to_meta}.get(inner, _strip_wrappers)(sd)
        layout = "teacher" if inner == "meta" else f"teacher ({inner})"
    elif layout == "timm":
        sd = timm_to_meta(obj)
    elif layout == "hf":
        sd = hf_to_meta(obj)
    elif layout == "meta":
        sd = _strip_wrappers(obj)
    else:
        raise UnsupportedFormatError(f"layout {layout!r} is read by dinoapp.checkpoint, not here")
    return sd, heads, layout


# ---------------------------------------------------------------------------------------------
# Architecture from the tensors


def block_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})


def infer_arch(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> ArchSpec:
    """Read the architecture off a Meta-layout state dict. Heads come from the RoPE periods buffer
    (head_dim / 4 entries) when the file has one, else ``num_heads``, else the released table."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointMismatchError(
            "no patch embedding ('patch_embed.proj.weight' [D, C, p, p]): this is not a ViT backbone",
            missing=["patch_embed.proj.weight"],
        )
    dim, in_chans, p1, p2 = w.shape
    if p1 != p2:
        raise CheckpointMismatchError(f"non-square patch size {p1}x{p2} is not supported", mismatched=["patch_embed"])
    idx = block_indices(sd)
    if not idx:
        raise CheckpointMismatchError("the state dict has no transformer blocks ('blocks.0.*')", missing=["blocks.0"])
    gaps = sorted(set(range(idx[-1] + 1)) - set(idx))
    if gaps:
        raise CheckpointMismatchError(
            f"blocks {gaps} are missing (blocks 0..{idx[-1]} expected)", missing=[f"blocks.{i}.*" for i in gaps]
        )
    depth = idx[-1] + 1
    if num_heads is None and "rope_embed.periods" in sd:
        n_periods = sd["rope_embed.periods"].numel()
        if n_periods > 0 and dim % (4 * n_periods) == 0:
            num_heads = dim // (4 * n_periods)
    if num_heads is None:
        num_heads = default_num_heads(int(dim))
    if "blocks.0.mlp.w1.weight" in sd:
        ffn, hidden = "swiglu", sd["blocks.0.mlp.w1.weight"].shape[0]
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise CheckpointMismatchError(
            "block 0 has no feed-forward weights (mlp.fc1 or mlp.w1/w2/w3)", missing=["blocks.0.mlp.*"]
        )
    bias = sd.get("blocks.0.attn.qkv.bias")
    qkv_bias = False
    if bias is not None and bias.is_meta:
        qkv_bias = True  # shapes only (meta device): values unknown, keep the biases
    elif bias is not None:
        qkv_bias = any(bool(_masked_qkv_bias(sd, i).any()) for i in idx if f"blocks.{i}.attn.qkv.bias" in sd)
    regs = sd.get("storage_tokens")
    return ArchSpec(
        embed_dim=int(dim),
        depth=depth,
        num_heads=int(num_heads),
        ffn=ffn,
        ffn_hidden=int(hidden),
        qkv_bias=qkv_bias,
        n_registers=int(regs.shape[1]) if regs is not None else 0,
        patch_size=int(p1),
        in_chans=int(in_chans),
        layerscale="blocks.0.ls1.gamma" in sd,
        local_cls_norm="local_cls_norm.weight" in sd,
    )


def _masked_qkv_bias(sd: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    """qkv bias of block i with Meta's ``bias_mask`` applied (the k third is zero either way)."""
    b = sd[f"blocks.{i}.attn.qkv.bias"].float()
    mask = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
    d = b.numel() // 3
    b = b.clone()
    b[d : 2 * d] = 0
    if mask is not None:
        b = b * mask.float()
    return b


# ---------------------------------------------------------------------------------------------
# Meta layout <-> timm module names


def meta_to_timm(sd: Mapping[str, torch.Tensor], arch: ArchSpec) -> StateDict:
    """Meta names -> the names of :func:`dinoapp.arch.build_timm_vit`'s module (mask token excluded)."""
    out: StateDict = {}
    for k, v in sd.items():
        if _IGNORED_META.match(k) or k == "mask_token":
            continue
        if k == "storage_tokens":
            out["reg_token"] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if not m:
            out[k] = v
            continue
        i, rest = m.groups()
        p = f"blocks.{i}."
        if rest == "attn.qkv.bias":
            if arch.qkv_bias:
                b = _masked_qkv_bias(sd, int(i)).to(v.dtype)
                d = b.numel() // 3
                out[p + "attn.q_bias"], out[p + "attn.v_bias"] = b[:d], b[2 * d :]
            continue
        rest = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)
        rest = re.sub(r"^mlp\.w1\.", "mlp.fc1_g.", rest)
        rest = re.sub(r"^mlp\.w2\.", "mlp.fc1_x.", rest)
        rest = re.sub(r"^mlp\.w3\.", "mlp.fc2.", rest)
        out[p + rest] = v
    return out


def timm_module_to_meta(timm_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our timm module's own state dict -> Meta names (adds ``bias_mask`` like Meta's files)."""
    out = timm_to_meta(timm_sd)
    for i in block_indices(out):
        key = f"blocks.{i}.attn.qkv.bias"
        if key in out:
            d = out[key].numel() // 3
            mask = torch.ones_like(out[key])
            mask[d : 2 * d] = 0
            out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return out
