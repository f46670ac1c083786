"""Feature-level distillation from a head-less teacher (DINOv3 spec, section 4).

DINOv3's released ViT-S/B/L were distilled from the 7B teacher *through the teacher's heads*
(DINO + iBOT + KoLeo against Sinkhorn-Knopp targets). Released checkpoints carry no heads, so a
user distilling a released backbone compares features instead: the student's CLS and patch
tokens go through a small :class:`Projector` onto the teacher's width and are pulled towards the
teacher's tokens (:func:`feature_loss`), and a relational term keeps the student's patch
similarity structure close to the teacher's (:func:`distill_gram_loss`, the Gram loss of spec
section 3, which works across widths). A teacher the user pretrained with dinoapp keeps its heads;
:func:`head_from_state_dict` rebuilds them so the head-based recipe can run instead.

- :func:`align_patch_grid`: the teacher's patch grid onto the student's (area averaging when
  shrinking, bicubic otherwise), e.g. a teacher with patch 14 or a larger input crop.
- :func:`feature_loss`: ``"cosine"`` (1 - cosine similarity) or ``"mse"`` (against the teacher
  standardised per vector) between projected student and teacher tokens, a float32 scalar.
- :func:`distill_gram_loss`: :func:`dinoapp.ssl.gram.gram_loss` between student and teacher patch tokens.
- :class:`Projector`: student width -> teacher width (identity, linear or a 2-layer MLP).
- :func:`head_from_state_dict`: a :class:`~dinoapp.ssl.heads.DINOHead` from a stored head state dict.

Every loss detaches the teacher (the gradient reaches the student, and the projector, only) and
computes in float32 with autocast off, whatever the input dtype.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointMismatchError, ConfigError, InputError
from ..ssl.gram import _no_autocast, gram_loss, resize_patch_grid
from ..ssl.heads import DINOHead

FEATURE_LOSS_KINDS = ("cosine", "mse")
PROJECTOR_KINDS = ("auto", "identity", "linear", "mlp")

# ---------------------------------------------------------------------------------------------- grid


def align_patch_grid(x: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """The teacher's patch tokens ``x`` [B, h_t*w_t, D] on grid ``src_hw = (h_t, w_t)`` onto the
    student's grid ``dst_hw = (h_s, w_s)``: [B, h_s*w_s, D].

    - equal grids: ``x`` itself is returned (no copy, same dtype);
    - a student grid no larger in either dimension (``h_s <= h_t`` and ``w_s <= w_t``): area
      averaging (``F.interpolate(mode="area")``, i.e. adaptive average pooling), so each student
      patch gets the mean of the teacher patches it covers; exact block means for integer factors
      (e.g. a 2x-resolution teacher, or patch 8 vs 16 on the same crop), overlapping windows of
      ``adaptive_avg_pool2d`` otherwise. Unlike bicubic resizing this does not alias when shrinking;
    - otherwise (growing in a dimension): bicubic, ``align_corners=False``, as the high-resolution
      Gram trick of spec section 3 (:func:`dinoapp.ssl.gram.resize_patch_grid`).

    Tokens are row-major (``index = row * w + col``): drop the CLS and register tokens first.
    Computed in float32 with autocast off, returned in ``x``'s dtype; differentiable in ``x``.
    """
    h, w = int(src_hw[0]), int(src_hw[1])
    h2, w2 = int(dst_hw[0]), int(dst_hw[1])
    if min(h, w, h2, w2) < 1:
        raise InputError(
            f"align_patch_grid: grid sizes must be >= 1, got src_hw={tuple(src_hw)}, dst_hw={tuple(dst_hw)}"
        )
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != h * w or not x.is_floating_point():
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        raise InputError(
            f"align_patch_grid: expected float patch tokens [B, {h}*{w}={h * w}, D] for src_hw={(h, w)}, got {got}; "
            "drop the CLS/register tokens and check the teacher's grid size"
        )
    if (h, w) == (h2, w2):
        return x
    if h2 > h or w2 > w:
        with _no_autocast(x.device):
            return resize_patch_grid(x, (h, w), (h2, w2))  # [B, h2*w2, D]
    b, _, d = x.shape
    with _no_autocast(x.device):
        grid = x.float().reshape(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, h, w]
        grid = F.interpolate(grid, size=(h2, w2), mode="area")  # [B, D, h2, w2]
        return grid.permute(0, 2, 3, 1).reshape(b, h2 * w2, d).to(x.dtype)  # [B, h2*w2, D]


# ---------------------------------------------------------------------------------------------- losses


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Distance between student and teacher feature vectors, a float32 scalar (spec section 4).

    ``student`` [..., D]: the student's tokens already projected to the teacher's width
    (:class:`Projector`); ``teacher`` [..., D]: the teacher's tokens, same shape. Works for CLS
    tokens ([B, D]) and patch tokens ([B, N, D]) alike; every leading index is one vector.

    - ``"cosine"``: mean over vectors of ``1 - cos(s, t)``. Insensitive to each vector's norm
      (positive rescaling of either side); in [0, 2], 0 when every student vector points along
      its teacher vector.
    - ``"mse"``: mean over vectors and dims of ``(s - LN(t))^2``, where ``LN`` standardises each
      teacher vector over its D dims (parameter-free layer norm, eps 1e-6) and the student is raw.
      Standardised targets, as in feature distillation (Wei et al. 2022, "FD") and MaskFeat/MAE,
      put teachers of any scale on a unit scale, so the weight of this term does not depend on
      the teacher's feature norms (large in DINOv3's high-norm dimensions).

    The teacher is detached: the gradient reaches ``student`` only. Computed in float32 with
    autocast off. ``kind`` outside :data:`FEATURE_LOSS_KINDS` raises :class:`ConfigError`.
    """
    if kind not in FEATURE_LOSS_KINDS:
        raise ConfigError(f"feature_loss: unknown kind {kind!r}; choose one of {', '.join(FEATURE_LOSS_KINDS)}")
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            raise InputError(f"feature_loss: the {name} features must be a float tensor [..., D], got {got}")
    if student.shape != teacher.shape:
        raise InputError(
            f"feature_loss: student features {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
            "same shape; project the student to the teacher's width (Projector) and align the patch grids "
            "(align_patch_grid)"
        )
    if student.numel() == 0:
        raise InputError(f"feature_loss: no feature vectors to compare (shape {tuple(student.shape)})")
    d = student.shape[-1]
    with _no_autocast(student.device):
        s = student.float().reshape(-1, d)  # [V, D], V = every leading index
        with torch.no_grad():
            t = teacher.detach().float().reshape(-1, d)  # [V, D]
            if kind == "mse":
                t = F.layer_norm(t, (d,), eps=1e-6)  # [V, D], per-vector zero mean, unit variance
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()  # [] float32
        return (s - t).square().mean()  # [] float32


def distill_gram_loss(student: torch.Tensor, teacher: torch.Tensor, *, remove_negatives: bool = False) -> torch.Tensor:
    """Relational (Gram) distillation term: :func:`dinoapp.ssl.gram.gram_loss`, a float32 scalar.

    ``student`` [B, N, D_s]: the student's patch tokens (raw, no projector needed);
    ``teacher`` [B, N, D_t]: the teacher's patch tokens on the same grid (:func:`align_patch_grid`).
    The widths may differ: each side's Gram matrix of cosine similarities is N x N. The teacher is
    detached; ``mean((Gs - Gt)^2)`` over all ``B * N * N`` entries (spec section 3).
    """
    return gram_loss(student, teacher, remove_negatives=remove_negatives)


# ---------------------------------------------------------------------------------------------- projector


class Projector(nn.Module):
    """Student width -> teacher width: ``forward(x [..., in_dim]) -> [..., out_dim]``.

    ``kind``:

    - ``"auto"`` (default): ``"identity"`` when ``in_dim == out_dim``, else ``"linear"``;
    - ``"identity"``: no parameters (``in_dim`` must equal ``out_dim``, else :class:`ConfigError`);
    - ``"linear"``: ``nn.Linear(in_dim, out_dim)`` with bias;
    - ``"mlp"``: ``Linear(in_dim, hidden) - GELU - Linear(hidden, out_dim)``; ``hidden`` defaults to
      ``max(in_dim, out_dim)`` (no bottleneck narrower than either side; e.g. ViT-S 384 -> ViT-L
      1024: hidden 1024, 1.4M parameters).

    ``hidden`` is accepted only with ``"mlp"``. The projector is a training-time adapter: it is
    trained with the student and dropped afterwards. Weights: truncated normal (std 0.02), zero
    biases, as :class:`~dinoapp.ssl.heads.DINOHead`. ``kind`` holds the resolved kind.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "auto", hidden: int | None = None) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if name == "hidden" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Projector {name} must be a positive integer, got {value!r}")
        if kind not in PROJECTOR_KINDS:
            raise ConfigError(f"Projector: unknown kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
        if hidden is not None and kind != "mlp":
            raise ConfigError(f"Projector: hidden={hidden} applies only to kind='mlp', got kind={kind!r}")
        if kind == "auto":
            kind = "identity" if in_dim == out_dim else "linear"
        if kind == "identity" and in_dim != out_dim:
            raise ConfigError(
                f"Projector: kind='identity' needs in_dim == out_dim, got {in_dim} -> {out_dim}; "
                "use kind='linear', 'mlp' or 'auto'"
            )
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        self.hidden = (hidden or max(in_dim, out_dim)) if kind == "mlp" else None
        if kind == "identity":
            self.net: nn.Module = nn.Identity()
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise InputError(f"Projector: expected features [..., {self.in_dim}], got shape {tuple(x.shape)}")
        return self.net(x)  # [..., out_dim]

    def extra_repr(self) -> str:
        extra = f", hidden={self.hidden}" if self.hidden is not None else ""
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, kind={self.kind!r}{extra}"


# ---------------------------------------------------------------------------------------------- heads

_MLP_KEY = re.compile(r"^mlp\.(\d+)\.(weight|bias)$")


def _fold_weight_norm(sd: dict[str, torch.Tensor]) -> None:
    """DINO/DINOv2's weight-normed last layer -> a plain ``last_layer.weight`` (in place).

    ``nn.utils.weight_norm`` stores ``last_layer.weight_g`` [K, 1] and ``last_layer.weight_v``
    [K, bottleneck]; the parametrization API stores them as ``last_layer.parametrizations.weight.
    original0`` / ``original1``. Weight ``w = g * v / ||v||`` with the norm over each output row.
    """
    pairs = (
        ("last_layer.weight_g", "last_layer.weight_v"),
        ("last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"),
    )
    for kg, kv in pairs:
        if kg not in sd and kv not in sd:
            continue
        if kg not in sd or kv not in sd or "last_layer.weight" in sd:
            raise CheckpointMismatchError(
                f"head state dict: a weight-normed last layer needs both {kg} and {kv} and no last_layer.weight; "
                f"got {sorted(k for k in sd if k.startswith('last_layer.'))}",
                missing=[k for k in (kg, kv) if k not in sd],
            )
        g, v = sd.pop(kg), sd.pop(kv)
        if v.ndim != 2 or g.numel() != v.shape[0]:
            raise CheckpointMismatchError(
                f"head state dict: weight-norm shapes g {tuple(g.shape)}, v {tuple(v.shape)} do not fit "
                "(expected g [K, 1], v [K, bottleneck])",
                mismatched=[kg, kv],
            )
        vf = v.float()
        w = g.float().reshape(-1, 1) * vf / vf.norm(dim=1, keepdim=True)  # [K, bottleneck]
        sd["last_layer.weight"] = w.to(v.dtype)


def head_from_state_dict(sd: dict[str, torch.Tensor]) -> DINOHead:
    """Rebuild a :class:`~dinoapp.ssl.heads.DINOHead` from a stored head state dict, weights loaded strictly.

    Meta naming (``DinoBackbone.pretrained_heads[name]``, prefix already stripped): linear layers
    ``mlp.0``, ``mlp.2``, ..., ``mlp.{2(n-1)}`` (GELUs between) and ``last_layer.weight``
    [K, bottleneck]. ``in_dim``, ``hidden_dim``, ``bottleneck_dim``, ``n_layers`` and
    ``n_prototypes`` are read off the shapes. Also accepted: a 1-layer head stored as a bare
    linear (``mlp.weight``/``mlp.bias``, Meta's own ``n_layers == 1`` layout), and a DINO/DINOv2
    weight-normed last layer (``last_layer.weight_g``/``weight_v``), folded into a plain weight
    (DINOv3 has no weight norm). The head is returned in float32 on the CPU, in train mode;
    ``sd`` is not modified. Anything else (missing or unexpected keys such as batch-norm layers,
    inconsistent shapes) raises :class:`CheckpointMismatchError` naming the keys.
    """
    if not isinstance(sd, dict) or not sd:
        raise CheckpointMismatchError(
            f"head state dict: expected a non-empty dict of tensors, got {type(sd).__name__}"
            + (" (empty)" if isinstance(sd, dict) else "")
        )
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointMismatchError(f"head state dict: entries that are not named tensors: {bad[:5]}", unexpected=bad)
    sd = dict(sd)
    for part in ("weight", "bias"):  # Meta's n_layers == 1 head: mlp is a bare nn.Linear
        if f"mlp.{part}" in sd and f"mlp.0.{part}" not in sd:
            sd[f"mlp.0.{part}"] = sd.pop(f"mlp.{part}")
    _fold_weight_norm(sd)

    missing = [k for k in ("mlp.0.weight", "last_layer.weight") if k not in sd]
    if missing:
        raise CheckpointMismatchError(
            f"head state dict: missing {', '.join(missing)} (keys present: {sorted(sd)[:8]}); "
            "is this a DINO/iBOT head with its prefix (e.g. 'dino_head.') removed?",
            missing=missing,
        )
    # linear layers: 2-D ``mlp.{i}.weight`` (1-D ones, e.g. batch norm, end up as unexpected keys below)
    linear_ids = sorted(
        int(m.group(1)) for k, v in sd.items() if (m := _MLP_KEY.match(k)) and m.group(2) == "weight" and v.ndim == 2
    )
    last = sd["last_layer.weight"]
    if not linear_ids or linear_ids[0] != 0 or last.ndim != 2:
        bad = [k for k in ("mlp.0.weight", "last_layer.weight") if sd[k].ndim != 2]
        raise CheckpointMismatchError(
            "head state dict: linear weights must be 2-D [out, in], got "
            + ", ".join(f"{k} {tuple(sd[k].shape)}" for k in bad),
            mismatched=bad,
        )
    n_layers = len(linear_ids)
    weights = [sd[f"mlp.{i}.weight"] for i in linear_ids]
    in_dim = int(weights[0].shape[1])
    bottleneck_dim = int(weights[-1].shape[0])
    hidden_dim = int(weights[0].shape[0]) if n_layers > 1 else bottleneck_dim
    n_prototypes = int(last.shape[0])
    head = DINOHead(in_dim, n_prototypes, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, n_layers=n_layers)

    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if mismatched:
            parts.append(
                "wrong shape " + ", ".join(f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in mismatched)
            )
        hint = (
            " (batch-norm heads, use_bn=True, are not supported)"
            if any(_MLP_KEY.match(k) is None and k.startswith("mlp.") for k in unexpected)
            or any((m := _MLP_KEY.match(k)) and int(m.group(1)) % 2 for k in unexpected)
            else ""
        )
        raise CheckpointMismatchError(
            f"head state dict does not fit a DINOHead(in_dim={in_dim}, n_prototypes={n_prototypes}, "
            f"hidden_dim={hidden_dim}, bottleneck_dim={bottleneck_dim}, n_layers={n_layers}): "
            + "; ".join(parts)
            + hint,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    head.load_state_dict(sd, strict=True)
    return head
