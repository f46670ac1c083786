"""Teacher pass, students and the distillation objectives of one step (DINOv3 spec, section 4).

The **teacher** is any backbone ``load_backbone`` reads, frozen, in eval mode, never wrapped in DDP,
run once per batch under ``no_grad``; every student learns from that one pass. Two families of
terms, selectable and combinable (``loss.mode``):

- **heads** (Meta's recipe, when the teacher file holds its DINO/iBOT heads): each student has
  fresh heads with the teacher's prototype count and is trained with DINO (every student crop vs
  the teacher's global crops), iBOT on patch positions drawn like iBOT masks but **not** masked
  in the student's input (patch distillation at random positions), and KoLeo on its CLS tokens,
  all against the teacher's Sinkhorn-Knopp targets; no Gram term.
- **features** (released, head-less teachers): CLS and patch tokens through small projectors onto
  the teacher's width, cosine or MSE against the teacher's tokens (patch grids aligned:
  area-averaged when the student grid is coarser, bicubic otherwise), plus a Gram term on the
  student's own patch tokens so it inherits the teacher's patch-similarity structure.

Crop layout as in pretraining: crop-major ``[G*B, ...]`` (rows ``i*B:(i+1)*B`` are crop ``i``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ssl.heads import DINOHead
from ..ssl.losses import dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from .losses import Projector, align_patch_grid, distill_gram_loss, feature_loss


def grid_of(backbone, size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid of ``backbone`` for an input of ``size`` (H, W), both multiples of its patch size."""
    return size[0] // backbone.patch_size, size[1] // backbone.patch_size


def resize_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised crops ``[N, C, s, s]`` -> ``[N, C, size, size]`` (bicubic, antialiased; identity when equal).
    The normalisation is affine per channel, so resizing after it equals resizing before it."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


class StudentNet(nn.Module):
    """One student: its backbone plus what maps it onto the teacher (projectors and/or DINO/iBOT
    heads). DDP wraps this module; ``forward`` computes everything that needs gradients."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        teacher_dim: int,
        cls_features: bool,
        patch_features: bool,
        projector: str = "auto",
        heads: tuple[DINOHead, DINOHead | None] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.embed_dim
        # only the modules whose terms are on: DDP needs every parameter to receive a gradient
        self.cls_proj = Projector(d, teacher_dim, projector) if cls_features else None
        self.patch_proj = Projector(d, teacher_dim, projector) if patch_features else None
        self.dino_head = heads[0] if heads is not None else None
        self.ibot_head = heads[1] if heads is not None else None

    def forward(
        self,
        global_crops: torch.Tensor,  # [G*B, C, g, g]
        local_crops: torch.Tensor | None,  # [L*B, C, l, l]
        positions: torch.Tensor | None,  # [G*B, h*w] bool: iBOT patch positions (not masked in the input)
    ) -> dict[str, torch.Tensor]:
        g = self.backbone.forward_features(global_crops)
        cls, patches = g["x_norm_clstoken"], g["x_norm_patchtokens"]  # [G*B, D], [G*B, h*w, D]
        out = {"cls_global": cls, "patches_global": patches}
        loc = self.backbone.forward_features(local_crops) if local_crops is not None else None
        if loc is not None:
            out["cls_local"], out["patches_local"] = loc["x_norm_clstoken"], loc["x_norm_patchtokens"]
        if self.cls_proj is not None:
            out["cls_proj"] = self.cls_proj(cls)  # [G*B, D_t]
            if loc is not None:
                out["cls_proj_local"] = self.cls_proj(out["cls_local"])  # [L*B, D_t]
        if self.patch_proj is not None:
            out["patch_proj"] = self.patch_proj(patches)  # [G*B, h*w, D_t]
            if loc is not None:
                out["patch_proj_local"] = self.patch_proj(out["patches_local"])  # [L*B, h_l*w_l, D_t]
        if self.dino_head is not None:
            out["dino_global"] = self.dino_head(cls)  # [G*B, K]
            if loc is not None:
                out["dino_local"] = self.dino_head(out["cls_local"])  # [L*B, K]
        if self.ibot_head is not None and positions is not None:
            out["ibot"] = self.ibot_head(patches[positions])  # [M, K']
        return out


class Teacher:
    """The frozen teacher: backbone (eval, no grad) and, for the head-based recipe, its DINO/iBOT heads."""

    def __init__(self, backbone: nn.Module, dino_head: DINOHead | None = None, ibot_head: DINOHead | None = None):
        self.backbone = backbone.requires_grad_(False).eval()
        self.dino_head = dino_head.requires_grad_(False).eval() if dino_head is not None else None
        self.ibot_head = ibot_head.requires_grad_(False).eval() if ibot_head is not None else None

    @property
    def has_heads(self) -> bool:
        return self.dino_head is not None

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> dict:
        """One teacher pass: normed CLS ``[G*B, D_t]`` and patch tokens ``[G*B, h*w, D_t]`` of the
        global crops (and of the local crops when given), with their patch grids."""
        g = self.backbone.forward_features(global_crops)
        p = self.backbone.patch_size
        out = {"cls": g["x_norm_clstoken"], "patches": g["x_norm_patchtokens"],
               "grid": (global_crops.shape[-2] // p, global_crops.shape[-1] // p)}  # fmt: skip
        if local_crops is not None:
            loc = self.backbone.forward_features(local_crops)
            out.update(cls_local=loc["x_norm_clstoken"], patches_local=loc["x_norm_patchtokens"],
                       grid_local=(local_crops.shape[-2] // p, local_crops.shape[-1] // p))  # fmt: skip
        return out


@torch.no_grad()
def dino_targets(teacher: Teacher, cls: torch.Tensor, n_global: int, temp: float, sk_iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp targets of the teacher's DINO head on its global CLS tokens -> ``[G, B, K]``."""
    q = sinkhorn_knopp(teacher.dino_head(cls).float(), temp, sk_iters)  # [G*B, K]
    return q.reshape(n_global, -1, q.shape[-1])


@torch.no_grad()
def ibot_targets(teacher: Teacher, patches: torch.Tensor, positions: torch.Tensor, temp: float,
                 sk_iters: int) -> torch.Tensor:  # fmt: skip
    """Sinkhorn-Knopp targets of the teacher's iBOT head on its (grid-aligned) patch tokens
    ``[G*B, N, D_t]`` at ``positions`` ``[G*B, N]`` -> ``[M, K']`` in ``positions.nonzero()`` order."""
    head = teacher.ibot_head if teacher.ibot_head is not None else teacher.dino_head
    return sinkhorn_knopp(head(patches[positions]).float(), temp, sk_iters)


def head_losses(
    out: dict[str, torch.Tensor],
    dino_t: torch.Tensor,  # [G, B, K]
    ibot_t: torch.Tensor | None,  # [M, K']
    positions: torch.Tensor | None,  # [G*B, N] bool
    *,
    student_temp: float,
    dino_weight: float,
    ibot_weight: float,
    koleo_weight: float,
    same_crop: bool = True,
    koleo_gather: bool = True,
) -> dict[str, torch.Tensor]:
    """Meta's distillation terms (spec section 4): DINO over (student crop, teacher global crop)
    pairs, weighted by each term's share of the pairs (``same_crop``: the student's own global crop
    counts as a pair; a frozen teacher makes it a valid target), iBOT at ``positions``, KoLeo on the
    student's global CLS tokens (per global crop). Parts unweighted; ``loss`` is the weighted sum."""
    G, B, K = dino_t.shape
    s_g = out["dino_global"].reshape(G, B, K)
    L = out["dino_local"].shape[0] // B if "dino_local" in out else 0
    pairs_g = G * G if same_crop else G * (G - 1)
    pairs_l = L * G
    if pairs_g + pairs_l == 0:
        raise ConfigError("the DINO term needs 2 global crops, same-crop pairs or at least 1 local crop")
    zero = s_g.sum() * 0.0
    parts: dict[str, torch.Tensor] = {}
    parts["dino_global"] = dino_loss(s_g, dino_t, student_temp, ignore_diagonal=not same_crop) if pairs_g else zero
    parts["dino_local"] = dino_loss(out["dino_local"].reshape(L, B, K), dino_t, student_temp) if L else zero
    total = dino_weight * (pairs_g * parts["dino_global"] + pairs_l * parts["dino_local"]) / (pairs_g + pairs_l)
    if ibot_t is not None and positions is not None and "ibot" in out:
        parts["ibot"] = ibot_loss(out["ibot"], ibot_t, positions, student_temp)
        total = total + ibot_weight * parts["ibot"]
    if koleo_weight > 0:
        cls = out["cls_global"].float().reshape(G, B, -1)  # [G, B, D]
        parts["koleo"] = sum(koleo_loss(cls[i], gather=koleo_gather) for i in range(G))
        total = total + koleo_weight * parts["koleo"]
    return {"loss": total, **parts}


def feature_losses(
    out: dict[str, torch.Tensor],
    teacher_cls: torch.Tensor,  # [G*B (+ L*B), D_t]: global rows then local rows
    teacher_patches: list[torch.Tensor],  # aligned to the student grids: [[G*B, N, D_t], ([L*B, N_l, D_t])]
    *,
    kind: str,
    cls_weight: float,
    patch_weight: float,
    gram_weight: float,
) -> dict[str, torch.Tensor]:
    """Feature-level terms: ``cls`` and ``patch`` (``kind``: cosine or MSE through the projectors;
    every crop, global and local, counts once) and ``gram`` (the student's own normed patch tokens of
    the global crops vs the teacher's aligned ones; widths may differ). Parts unweighted."""
    parts: dict[str, torch.Tensor] = {}
    total = out["cls_global"].sum() * 0.0
    if cls_weight > 0:
        s = out["cls_proj"] if "cls_proj_local" not in out else torch.cat([out["cls_proj"], out["cls_proj_local"]])
        parts["cls"] = feature_loss(s, teacher_cls, kind)
        total = total + cls_weight * parts["cls"]
    if patch_weight > 0:
        terms = [(out["patch_proj"], teacher_patches[0])]
        if "patch_proj_local" in out:
            terms.append((out["patch_proj_local"], teacher_patches[1]))
        n = sum(s.shape[0] for s, _ in terms)
        parts["patch"] = sum(feature_loss(s, t, kind) * (s.shape[0] / n) for s, t in terms)
        total = total + patch_weight * parts["patch"]
    if gram_weight > 0:
        parts["gram"] = distill_gram_loss(out["patches_global"], teacher_patches[0])
        total = total + gram_weight * parts["gram"]
    return {"loss": total, **parts}


@torch.no_grad()
def agreement(
    teacher: Teacher,
    student: StudentNet,
    teacher_images: torch.Tensor,  # [P, C, S_t, S_t]
    student_size: int,
) -> dict[str, float]:
    """How closely ``student`` reproduces the teacher on held-out images: ``cls_cos`` / ``patch_cos``
    (mean cosine similarity through the projectors, feature recipe), ``gram_dist`` (mean squared
    difference of the patch-similarity matrices: projector-free), ``proto_match`` (share of images
    whose DINO prototype argmax agrees, head recipe)."""
    was = student.training
    student.eval()
    try:
        t = teacher.forward(teacher_images)
        x = resize_crops(teacher_images, student_size)
        s = student.backbone.forward_features(x)
        grid = grid_of(student.backbone, tuple(x.shape[-2:]))
        tp = align_patch_grid(t["patches"].float(), t["grid"], grid)  # [P, N, D_t]
        res = {"gram_dist": float(distill_gram_loss(s["x_norm_patchtokens"].float(), tp))}
        if student.cls_proj is not None:
            res["cls_cos"] = float(F.cosine_similarity(student.cls_proj(s["x_norm_clstoken"]).float(),
                                                       t["cls"].float(), dim=-1).mean())  # fmt: skip
        if student.patch_proj is not None:
            sp = student.patch_proj(s["x_norm_patchtokens"]).float()
            res["patch_cos"] = float(F.cosine_similarity(sp, tp, dim=-1).mean())
        if student.dino_head is not None and teacher.has_heads:
            ts = teacher.dino_head(t["cls"]).argmax(-1)
            res["proto_match"] = float((student.dino_head(s["x_norm_clstoken"]).argmax(-1) == ts).float().mean())
        return res
    finally:
        student.train(was)
