"""Gram anchoring (DINOv3 spec, section 3): the Gram loss, the patch-grid resize and the Gram phase schedules.

In long training the global (CLS) features keep improving while the dense (patch) features
degrade. A frozen *Gram teacher* from an earlier, healthier point of training anchors the
*structure* of the student's patch features: the loss compares the two patch-similarity (Gram)
matrices of every image, not the features themselves, so the student stays free to move its
features as long as their pairwise cosine similarities stay put.

- :func:`gram_loss` / :class:`GramLoss`: ``mean((Xs Xs^T - Xt Xt^T)^2)`` of L2-normalised patch features;
  :func:`gram_matrix`: the ``X X^T`` itself (patch-to-patch cosine similarities), to look at.
- :func:`resize_patch_grid`: the high-resolution trick; the Gram teacher sees the same crop at 2x
  size and its patch grid is resized (bicubic, align_corners False) to the student's grid.
- :func:`gram_copy_steps` / :func:`gram_copy_due`: when the EMA teacher is copied into the Gram teacher
  (7B recipe: at the start of the Gram phase, then every 10k steps, at most 3 refreshes).
- :func:`gram_weight`: 0 before the Gram phase, then a cosine ramp to the target weight (2.0 in the 7B recipe).
- :func:`dino_local_scale`: a multiplier of the local-crop DINO loss, linear from the start of the Gram phase
  to the end of training (1.0 = off).

Schedules are pure functions of the step, like :mod:`dinoapp.ssl.schedules`, so a resumed run
recomputes them from the step alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .schedules import cosine, linear_warmup

# ---------------------------------------------------------------------------------------------- loss


def _check_features(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            raise InputError(f"gram_loss: the {name} patch features must be a float tensor [B, N, D], got {got}")
    if student.shape[:2] != teacher.shape[:2]:
        raise InputError(
            f"gram_loss: student patch features {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have "
            "the same images B and patches N ([B, N, D]); resize the teacher's patch grid to the student's with "
            "resize_patch_grid (high-resolution Gram teacher) and feed both the same crops"
        )
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise InputError(f"gram_loss: no patches to compare (shape {tuple(student.shape)})")


def _no_autocast(device: torch.device):
    """Autocast off on ``device`` (a bf16 autocast region would run the bmm in bf16)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _gram(x: torch.Tensor, remove_negatives: bool) -> torch.Tensor:
    """Cosine similarities of every pair of patches of each image: [B, N, D] -> [B, N, N] (float32).

    The one implementation behind :func:`gram_loss` and :func:`gram_matrix`."""
    z = F.normalize(x.float(), dim=-1)  # [B, N, D], unit patch vectors
    g = torch.bmm(z, z.transpose(1, 2))  # [B, N, N]
    if remove_negatives:
        g = g.clamp(min=0.0)  # negative similarities -> 0 (gradient 0 there, as with masked_fill)
    return g


def gram_matrix(features, *, batched: bool | None = None, remove_negatives: bool = False) -> torch.Tensor:
    """The patch Gram matrix as :func:`gram_loss` defines it: every patch vector L2-normalised, ``G = X X^T``.

    Entry ``(i, j)`` is the cosine similarity of patches ``i`` and ``j`` (row-major patch order,
    ``i = row * w + col``), so row ``i`` reshaped to ``[h, w]`` is patch ``i``'s similarity map
    (:func:`dinoapp.viz.similarity_map`). Shapes: ``[N, D] -> [N, N]``; ``[B, h, w, D] -> [B, h*w, h*w]``
    (``extract(...).patches``); 3-D input is ambiguous, so say which it is: ``batched=False`` for one
    image's patch grid ``[h, w, D] -> [h*w, h*w]`` (``dense_features(...).patches``), ``batched=True``
    for ``[B, N, D] -> [B, N, N]`` (what :func:`gram_loss` takes). ``remove_negatives``: similarities
    below 0 set to 0, as in the loss with ``gram.remove_negatives``.

    A float tensor or a numpy array; returns float32 on the input's device (autocast off), with the
    graph kept for tensors that require grad. A zero vector has similarity 0 with everything, itself
    included. Memory: ``B * N^2`` floats (N = 4096 patches, a 1024 px image: 64 MB).
    """
    x = torch.as_tensor(features) if not isinstance(features, torch.Tensor) else features
    if not x.is_floating_point() or x.ndim not in (2, 3, 4):
        raise InputError(
            f"gram_matrix: features must be a float array [N, D], [h, w, D], [B, N, D] or [B, h, w, D], got "
            f"{x.dtype} of shape {tuple(x.shape)}"
        )
    if x.ndim == 3 and batched is None:
        raise InputError(
            f"gram_matrix: 3-D features {tuple(x.shape)} are either one image's patch grid [h, w, D] (pass "
            "batched=False) or a batch of patch lists [B, N, D] as gram_loss takes them (pass batched=True)"
        )
    if (x.ndim == 2 and batched) or (x.ndim == 4 and batched is False):
        raise InputError(f"gram_matrix: batched={batched} does not fit features of shape {tuple(x.shape)}")
    single = x.ndim == 2 or (x.ndim == 3 and not batched)
    b = x.reshape(1, -1, x.shape[-1]) if single else x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, D]
    if b.shape[1] == 0:
        raise InputError(f"gram_matrix: no patches (shape {tuple(x.shape)})")
    with _no_autocast(b.device):
        g = _gram(b, remove_negatives)  # [B, N, N] float32
    return g[0] if single else g


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, *, remove_negatives: bool = False) -> torch.Tensor:
    """Gram loss of spec section 3: ``mean((Gs - Gt)^2)`` over all images and patch pairs, a float32 scalar.

    ``student`` [B, N, D]: the student's last-layer normed patch tokens (of the masked global crops);
    ``teacher`` [B, N, D']: the Gram teacher's patch tokens of the same crops, on the same N-patch grid
    (see :func:`resize_patch_grid`). ``B`` counts every global crop of every image (2 per image).
    Each patch vector is L2-normalised, ``G = X X^T`` per image ([B, N, N]), and the squared
    differences are averaged over all ``B * N * N`` entries. ``remove_negatives`` sets similarities
    below 0 to 0 on both sides (DINOv3 keeps them: off by default).

    The teacher side is detached: the gradient reaches the student only. Only B and N must agree;
    the feature widths D and D' may differ (a Gram matrix is N x N whatever the width), so a teacher
    of another size can anchor a student. Computed in float32 whatever the input dtype, with
    autocast off.

    Memory: two float32 Gram matrices of ``B * N^2`` entries (plus as many for the backward), e.g.
    B = 64 crops of 224 px with 16-px patches (N = 196): 2 x 9.8 MB; N = 1024 (512 px): 2 x 268 MB.
    """
    _check_features(student, teacher)
    with _no_autocast(student.device):
        gs = _gram(student, remove_negatives)  # [B, N, N]
        with torch.no_grad():
            gt = _gram(teacher.detach(), remove_negatives)  # [B, N, N]
        return (gs - gt).square().mean()  # [] float32


class GramLoss(nn.Module):
    """:func:`gram_loss` as a module: ``forward(student [B, N, D], teacher [B, N, D']) -> scalar`` (float32).

    ``remove_negatives``: zero negative patch similarities on both sides (off in DINOv3, spec section 3).
    """

    def __init__(self, remove_negatives: bool = False) -> None:
        super().__init__()
        self.remove_negatives = bool(remove_negatives)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return gram_loss(student, teacher, remove_negatives=self.remove_negatives)

    def extra_repr(self) -> str:
        return f"remove_negatives={self.remove_negatives}"


# ---------------------------------------------------------------------------------------------- resize


def resize_patch_grid(x: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a patch-token grid: ``x`` [B, h*w, D] on grid ``src_hw = (h, w)`` -> [B, h2*w2, D] on ``dst_hw``.

    Spec section 3, high-resolution trick: the Gram teacher sees the same geometric crop at 2x size
    and its patch grid is resized bicubically (``align_corners=False``, no antialiasing) to the
    student's grid before the loss. Computed in float32, returned in ``x``'s dtype; ``x`` itself
    is returned when the sizes are equal. Tokens are row-major (``index = row * w + col``), as a
    ViT's patch tokens after the CLS and register tokens are dropped.
    """
    h, w = int(src_hw[0]), int(src_hw[1])
    h2, w2 = int(dst_hw[0]), int(dst_hw[1])
    if min(h, w, h2, w2) < 1:
        raise InputError(f"resize_patch_grid: grid sizes must be >= 1, got src_hw={src_hw}, dst_hw={dst_hw}")
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != h * w:
        raise InputError(
            f"resize_patch_grid: expected patch tokens [B, {h}*{w}={h * w}, D] for src_hw={tuple(src_hw)}, got "
            f"shape {tuple(getattr(x, 'shape', ()))}; drop the CLS/register tokens and check the grid size"
        )
    if (h, w) == (h2, w2):
        return x
    b, _, d = x.shape
    grid = x.float().reshape(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, h, w]
    grid = F.interpolate(grid, size=(h2, w2), mode="bicubic", align_corners=False)  # [B, D, h2, w2]
    return grid.permute(0, 2, 3, 1).reshape(b, h2 * w2, d).to(x.dtype)  # [B, h2*w2, D]


# ---------------------------------------------------------------------------------------------- schedules


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


def gram_copy_steps(start: int, every: int, max_refreshes: int) -> list[int]:
    """The steps at which the EMA teacher is copied into the Gram teacher (spec section 3, 7B recipe).

    ``[start, start + every, ..., start + max_refreshes * every]``: the first copy at the start of
    the Gram phase, then at most ``max_refreshes`` refreshes, then the Gram teacher stays frozen.
    ``every <= 0`` or ``max_refreshes == 0``: one copy, ``[start]``.
    """
    _check_nonneg(start=start, max_refreshes=max_refreshes)
    if every <= 0:
        return [int(start)]
    return [int(start + k * every) for k in range(max_refreshes + 1)]


def gram_copy_due(step: int, start: int, every: int, max_refreshes: int) -> bool:
    """Whether the EMA teacher is copied into the Gram teacher at ``step`` (``step in gram_copy_steps(...)``)."""
    _check_nonneg(start=start, max_refreshes=max_refreshes)
    if step < start:
        return False
    if every <= 0:
        return step == start
    k, rest = divmod(step - start, every)
    return rest == 0 and k <= max_refreshes


def gram_weight(step: int, *, start: int, ramp_steps: int, weight: float) -> float:
    """The Gram loss weight at ``step`` (spec section 3): 0 before ``start``, then a cosine ramp
    0 -> ``weight`` over ``ramp_steps`` (``weight`` reached at ``start + ramp_steps``), then ``weight``.

    ``ramp_steps == 0`` is a step function: ``weight`` from ``start`` on. 7B recipe: weight 2.0.
    """
    _check_nonneg(start=start, ramp_steps=ramp_steps)
    if step < start:
        return 0.0
    return cosine(step - start, ramp_steps, 0.0, weight)


def dino_local_scale(step: int, *, start: int, steps_total: int, end_scale: float) -> float:
    """A multiplier of the local-crop DINO loss during the Gram phase: 1 before ``start``, then linear
    1 -> ``end_scale``, reached at step ``steps_total`` (the run's last step) and held after.

    ``end_scale == 1`` turns it off; ``steps_total <= start`` gives ``end_scale`` from ``start`` on.
    """
    _check_nonneg(start=start, steps_total=steps_total)
    if end_scale < 0:
        raise ConfigError(f"end_scale must be >= 0, got {end_scale}")
    if step < start:
        return 1.0
    return linear_warmup(step - start, max(steps_total - start, 0), 1.0, end_scale)
