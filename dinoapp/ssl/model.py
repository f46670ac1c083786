"""Student, EMA teacher and the DINO + iBOT + KoLeo objective of one training step (DINOv3 spec, section 2).

:class:`SSLNetworks` holds one backbone with its DINO and iBOT heads; the student is trained (and is
what DDP/FSDP wraps, its ``forward`` computes everything that needs gradients), the teacher is a copy
updated by :func:`ema_update` and run in eval mode on the clean global crops only.
:func:`teacher_targets` turns teacher outputs into Sinkhorn-Knopp targets and :func:`ssl_loss`
combines the terms into ``{"loss": total, **parts}``.

Crop layout everywhere: crop-major, ``global_crops [G, B, C, g, g]`` flattened to ``[G*B, ...]``
so rows ``i*B:(i+1)*B`` are global crop ``i`` of every image (G = 2 in DINOv3).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ..backbone import DinoBackbone
from .dist import local_tensor
from .heads import DINOHead
from .losses import dino_loss, dino_term_weights, ibot_loss, koleo_loss, sinkhorn_knopp


class SSLNetworks(nn.Module):
    """A backbone with its DINO head (on the CLS token) and iBOT head (on masked patch tokens)."""

    def __init__(self, backbone: DinoBackbone, dino_head: DINOHead, ibot_head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.backbone_frozen = False  # stage 1 of continued pretraining: no backbone graph at all
        self.keep_patches = False  # also return the global crops' patch tokens (Gram anchoring)

    def forward(
        self,
        global_crops: torch.Tensor,  # [G*B, C, g, g]
        local_crops: torch.Tensor | None,  # [L*B, C, l, l]
        masks: torch.Tensor | None,  # [G*B, h*w] bool
    ) -> dict[str, torch.Tensor]:
        """Student pass: CLS tokens of the global crops, DINO logits of every crop, iBOT logits of the
        masked patches (in ``masks.nonzero()`` order)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            g = self.backbone.forward_features(global_crops, masks)
            cls_l = self.backbone.forward_features(local_crops)["x_norm_clstoken"] if local_crops is not None else None
        cls_g = g["x_norm_clstoken"].contiguous()  # [G*B, D] (no views out of an FSDP2 module)
        out = {"cls_global": cls_g, "dino_global": self.dino_head(cls_g)}  # [G*B, K]
        if cls_l is not None:
            out["dino_local"] = self.dino_head(cls_l)  # [L*B, K]
        if self.keep_patches:
            out["patches_global"] = g["x_norm_patchtokens"].contiguous()  # [G*B, h*w, D] (masked crops, spec s. 3)
        if masks is not None:
            out["ibot"] = self.ibot_head(g["x_norm_patchtokens"][masks])  # [M, K']
        return out


def make_teacher(student: SSLNetworks) -> SSLNetworks:
    """A frozen copy of the student (eval mode: no drop path, no RoPE rescale)."""
    teacher = copy.deepcopy(student)
    teacher.backbone.set_rope_rescale(None)
    teacher.backbone_frozen = False
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_targets(
    teacher: SSLNetworks,
    global_crops: torch.Tensor,  # [G*B, C, g, g]
    masks: torch.Tensor | None,  # [G*B, h*w] bool
    *,
    n_global: int,
    temp: float,
    sk_iters: int = 3,
) -> dict[str, torch.Tensor]:
    """Teacher pass on the clean global crops -> Sinkhorn-Knopp targets: ``dino [G, B, K]`` and
    ``ibot [M, K']`` (masked patches only; all processes share the normalisation)."""
    f = teacher.backbone.forward_features(global_crops)
    cls = f["x_norm_clstoken"]  # [G*B, D]
    dino = sinkhorn_knopp(teacher.dino_head(cls).float(), temp, sk_iters)  # [G*B, K]
    out = {"dino": dino.reshape(n_global, -1, dino.shape[-1])}
    if masks is not None:
        patches = f["x_norm_patchtokens"][masks]  # [M, D]
        out["ibot"] = sinkhorn_knopp(teacher.ibot_head(patches).float(), temp, sk_iters)  # [M, K']
    return out


def ssl_loss(
    student: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    masks: torch.Tensor | None,
    *,
    n_global: int,
    n_local: int,
    student_temp: float = 0.1,
    dino_weight: float = 1.0,
    ibot_weight: float = 1.0,
    koleo_weight: float = 0.1,
    koleo_gather: bool = True,
    dino_local_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """DINO (local 16/18, global 2/18 of the pair count) + iBOT + KoLeo (spec section 2) ->
    ``{"loss": total, "dino_local", "dino_global", "ibot", "koleo"}`` (parts unweighted).
    ``dino_local_scale`` multiplies the local DINO weight (optionally decayed in a Gram phase)."""
    t = targets["dino"]  # [G, B, K]
    B, K = t.shape[1], t.shape[2]
    w_local, w_global = dino_term_weights(n_global, n_local)
    s_global = student["dino_global"].reshape(n_global, B, K)
    parts: dict[str, torch.Tensor] = {}
    zero = s_global.sum() * 0.0
    parts["dino_global"] = dino_loss(s_global, t, student_temp, ignore_diagonal=True) if n_global > 1 else zero
    if n_local > 0:
        parts["dino_local"] = dino_loss(student["dino_local"].reshape(n_local, B, K), t, student_temp)
    else:
        parts["dino_local"] = zero
    total = dino_weight * (dino_local_scale * w_local * parts["dino_local"] + w_global * parts["dino_global"])
    if masks is not None and "ibot" in student:
        parts["ibot"] = ibot_loss(student["ibot"], targets["ibot"], masks, student_temp)
        total = total + ibot_weight * parts["ibot"]
    if koleo_weight > 0:
        cls = student["cls_global"].float().reshape(n_global, B, -1)  # [G, B, D]
        parts["koleo"] = sum(koleo_loss(cls[i], gather=koleo_gather) for i in range(n_global))
        total = total + koleo_weight * parts["koleo"]
    return {"loss": total, **parts}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (also for
    FSDP2-sharded parameters: each process updates its own shard)."""
    t = [local_tensor(p) for p in teacher.parameters()]
    s = [local_tensor(p).detach().to(q.dtype) for p, q in zip(student.parameters(), t, strict=True)]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def collapse_stats(targets: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cheap collapse signals: ``target_entropy`` = mean entropy of the teacher's DINO targets / log K
    (near 1: uniform targets, nothing is learnt); ``cls_spread`` = std over the batch of the
    normalised student CLS tokens times sqrt(D) (about 1 for spread-out embeddings, near 0 when every
    image maps to the same point)."""
    p = targets["dino"].flatten(0, -2).float()  # [G*B, K]
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1])
    z = nn.functional.normalize(student["cls_global"].float(), dim=-1)  # [G*B, D]
    spread = z.std(dim=0).mean() * math.sqrt(z.shape[-1]) if z.shape[0] > 1 else z.new_tensor(float("nan"))
    return {"target_entropy": float(ent), "cls_spread": float(spread)}
