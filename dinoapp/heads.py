"""Small heads trained on FROZEN backbone features: k-NN, logistic regression, linear segmentation, foreground.

The recipes are DINOv3's own evaluation protocols (spec section 5, from Meta's evaluation code and
notebooks):

- image classification: k-NN on L2-normalised CLS embeddings (cosine similarity, k in {10, 20},
  votes weighted by exp(sim / 0.07)), or logistic regression on CLS (or CLS + mean patch) with C
  swept on a log grid;
- semantic segmentation: BatchNorm + Dropout2d(0.1) + 1x1 conv on the last block's patch features
  (or four evenly spaced blocks concatenated), logits upsampled bilinearly to pixels;
- foreground: logistic regression on patch features with patch labels from a mask averaged over
  each 16x16 patch (only patches < 0.01 or > 0.99 foreground are kept), 3x3 median filter on the
  score map.

Every head remembers the backbone it was trained with (``identity``, see :mod:`dinoapp.identity`)
and the preprocessing (``{"size", "policy"}`` as given to :func:`dinoapp.extract`); a saved head
refuses to load against another backbone. Files are ``.safetensors``: tensors (module weights,
sklearn coefficients, the k-NN bank) plus JSON metadata, no pickle.

Pixel geometry: patch (r, c) of a grid (h, w) covers pixels [p*r, p*r+p) x [p*c, p*c+p) of the
*preprocessed* image (p = 16). Masks at another size are mapped onto that h*p x w*p canvas the way
the image was: ``policy="resize"`` (and ``"short_side"``) resizes them with nearest-neighbour
(pixel centres, torch's ``nearest-exact``), ``policy="pad"`` pads them bottom/right with
``ignore_index`` (unlabelled). Predictions go back the same way (:func:`upsample_logits`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import (
    CheckpointCorruptError,
    ConfigError,
    HeadBackboneMismatchError,
    InputError,
    SourceNotFoundError,
    UnsupportedFormatError,
)
from .extract import block_indices
from .identity import backbone_identity
from .metrics import IGNORE_INDEX, require_sklearn

HEAD_FORMAT = "dinoapp.head"
HEAD_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Inputs


def _tensor(x: Any, name: str) -> torch.Tensor:
    """numpy / torch / nested lists -> float32 tensor (kept on its device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be a numeric array or tensor, got {type(x).__name__} ({e})") from None


def _matrix(x: Any, name: str = "X") -> torch.Tensor:
    t = _tensor(x, name)
    if t.ndim != 2 or t.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty [N, D] matrix of embeddings, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return t


def _labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any hashable-by-numpy kind -> (classes_ sorted, indices [N])."""
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = y.reshape(-1)
    if y.size != n:
        raise InputError(f"got {y.size} labels for {n} embeddings")
    classes, idx = np.unique(y, return_inverse=True)
    return classes, idx.astype(np.int64)


def image_embedding(features: Any, mode: str = "cls") -> torch.Tensor:
    """Image-level embedding from :class:`dinoapp.Features`: ``"cls"`` [B, D] or ``"cls+mean"`` [B, 2D].

    ``"cls+mean"`` concatenates the CLS token and the mean of the patch tokens, the input of
    DINOv3's linear classification protocol. With ``policy="pad"`` the mean includes padding patches.
    """
    if mode not in ("cls", "cls+mean"):
        raise ConfigError(f"mode must be 'cls' or 'cls+mean', got {mode!r}")
    if not hasattr(features, "cls") or not hasattr(features, "patches"):
        raise InputError(f"expected dinoapp.Features (from dinoapp.extract), got {type(features).__name__}")
    cls = features.cls.float()  # [B, D]
    if mode == "cls":
        return cls
    return torch.cat([cls, features.patches.float().mean(dim=(1, 2))], dim=1)  # [B, 2D]


def evenly_spaced_layers(n_blocks: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last block, for multi-layer heads.

    12 blocks -> [2, 5, 8, 11], 40 -> [9, 19, 29, 39]; for 24 blocks (ViT-L) Meta's choice
    [4, 11, 17, 23] (spec section 5).
    """
    if n_blocks < 1 or n < 1:
        raise ConfigError(f"need n_blocks >= 1 and n >= 1, got {n_blocks}, {n}")
    if n_blocks == 24 and n == 4:
        return [4, 11, 17, 23]
    step = n_blocks / n
    return sorted({max(0, math.floor(n_blocks - 1 - j * step + 0.5)) for j in range(n)})


def select_features(features: Any, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Patch features for a head, channels last [B, h, w, D*L] (float32).

    ``features``: :class:`dinoapp.Features` (``layers`` picks blocks from ``features.layers`` in
    that order; ``None`` = the last block, ``features.patches``), one tensor/array [B, h, w, C]
    or [h, w, C], or a list of per-layer [B, h, w, D] tensors (concatenated along channels).
    """
    if hasattr(features, "patches") and hasattr(features, "layers"):
        if not layers:
            return features.patches.float()
        missing = [i for i in layers if i not in features.layers]
        if missing:
            fix = (
                "give non-negative block indices (-1 is block n_blocks - 1), or pass backbone= to fit_seg_head"
                if any(i < 0 for i in missing)
                else f"extract with dinoapp.extract(..., layers={list(layers)})"
            )
            raise InputError(
                f"the features hold blocks {sorted(features.layers)} but the head needs {list(layers)} "
                f"(missing {missing}; indices are the non-negative keys of Features.layers): {fix}"
            )
        return torch.cat([features.layers[i].float() for i in layers], dim=-1)
    if isinstance(features, (list, tuple)):
        if not features:
            raise InputError("an empty list of feature maps was given")
        maps = [_tensor(f, "features") for f in features]
        shapes = {tuple(m.shape[:-1]) for m in maps}
        if len(shapes) > 1 or maps[0].ndim not in (3, 4):
            raise InputError(f"per-layer feature maps must share [B, h, w], got {[tuple(m.shape) for m in maps]}")
        return torch.cat(maps, dim=-1)
    t = _tensor(features, "features")
    if t.ndim not in (3, 4):
        raise InputError(f"patch features must be [B, h, w, C] or [h, w, C], got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------
# Image classification: k-NN and logistic regression


class KNNClassifier:
    """Weighted k-NN on cosine similarity (the DINO k-NN protocol).

    Embeddings are L2-normalised; a query's k nearest training embeddings vote for their class with
    weight exp(sim / temperature); probabilities are the normalised votes. Similarities are computed
    in query chunks of at most ``max_elements`` entries (64 MB of float32 by default), so a 50k x 50k
    search needs the bank plus that, never an N x N matrix. ``embedding`` records which
    :func:`image_embedding` mode the embeddings came from (saved with the head, not used by it).
    """

    kind: ClassVar[str] = "knn"

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        *,
        embedding: str = "cls",
        device: str | torch.device | None = None,
        max_elements: int = 1 << 24,
    ) -> None:
        if int(k) < 1 or not temperature > 0:
            raise ConfigError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        self.k, self.temperature = int(k), float(temperature)
        self.embedding = embedding
        self.device = device
        self.max_elements = int(max_elements)
        self.identity: dict | None = None
        self.preprocessing: dict = {}

    def fit(self, X: Any, y: Any) -> KNNClassifier:
        """Store the normalised embeddings ``X`` [N, D] and their labels ``y`` [N] (any label values)."""
        X = _matrix(X)
        self.classes_, idx = _labels(y, X.shape[0])
        dev = self.device or X.device
        self.bank_ = F.normalize(X, dim=1).to(dev)  # [N, D]
        self.labels_ = torch.as_tensor(idx, device=dev)  # [N] indices into classes_
        return self

    def _check(self, X: Any) -> torch.Tensor:
        if not hasattr(self, "bank_"):
            raise InputError("this KNNClassifier is not fitted: call fit(X, y) first")
        X = _matrix(X)
        if X.shape[1] != self.bank_.shape[1]:
            raise InputError(
                f"embeddings have {X.shape[1]} dims but the classifier was fitted on {self.bank_.shape[1]}"
            )
        return X

    @torch.no_grad()
    def predict_proba(self, X: Any) -> np.ndarray:
        """[M, n_classes] normalised weighted votes (columns in the order of ``classes_``)."""
        X = self._check(X)
        bank, labels = self.bank_, self.labels_
        N, C = bank.shape[0], len(self.classes_)
        k = min(self.k, N)
        chunk = max(1, self.max_elements // N)
        out = []
        for i in range(0, X.shape[0], chunk):
            q = F.normalize(X[i : i + chunk].to(bank.device), dim=1)  # [b, D]
            sim = q @ bank.T  # [b, N]
            top, at = sim.topk(k, dim=1)  # [b, k]
            # exp(sim / T) up to a per-row factor (cancels in the normalisation; avoids overflow for small T)
            w = torch.exp((top - top[:, :1]) / self.temperature)  # [b, k]
            votes = torch.zeros(q.shape[0], C, device=bank.device).scatter_add_(1, labels[at], w)  # [b, C]
            out.append((votes / votes.sum(1, keepdim=True)).cpu())
        return torch.cat(out).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """[M] class with the largest weighted vote."""
        return self.classes_[self.predict_proba(X).argmax(1)]

    def _export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"bank": self.bank_.cpu(), "labels": self.labels_.cpu()}
        return tensors, {"k": self.k, "temperature": self.temperature, "classes": _json_list(self.classes_),
                         "embedding": self.embedding}  # fmt: skip

    @classmethod
    def _import(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> KNNClassifier:
        head = cls(k=info["k"], temperature=info["temperature"], embedding=info.get("embedding", "cls"))
        head.bank_, head.labels_ = tensors["bank"].float(), tensors["labels"].long()
        head.classes_ = np.asarray(info["classes"])
        if head.bank_.ndim != 2 or head.labels_.shape != (head.bank_.shape[0],):
            raise ValueError("bank and labels shapes disagree")
        if head.labels_.numel() and int(head.labels_.max()) >= len(head.classes_):
            raise ValueError("labels index past the class list")
        return head


class LogisticClassifier:
    """Multinomial logistic regression on standardised embeddings, C chosen by cross-validation.

    scikit-learn's ``LogisticRegression`` (lbfgs, L2) after a ``StandardScaler``; every C of
    ``Cs`` (a log grid, DINOv3's linear protocol sweeps one) is scored by accuracy over ``cv``
    stratified folds, ties (common with a few images per class, where every C classifies the
    held-out images right) broken by the lower held-out log-loss, and the best refitted on everything.
    Classes with fewer samples than folds are handled: the fold count drops to the smallest class size
    (>= 2), and classes with a single sample are always in the training part. ``C_`` and ``cv_scores_``
    say what was chosen.
    Predictions are computed from the stored arrays, so a saved and loaded head gives the same numbers.
    """

    kind: ClassVar[str] = "logistic"

    def __init__(
        self,
        Cs: Sequence[float] | None = None,
        cv: int = 3,
        *,
        max_iter: int = 2000,
        seed: int = 0,
        embedding: str = "cls",
    ) -> None:
        self.Cs = [float(c) for c in (np.logspace(-4, 2, 7) if Cs is None else Cs)]
        if not self.Cs or any(not c > 0 for c in self.Cs):
            raise ConfigError(f"Cs must be a non-empty list of positive numbers, got {Cs!r}")
        if int(cv) < 2:
            raise ConfigError(f"cv must be >= 2 folds, got {cv}")
        self.cv, self.max_iter, self.seed = int(cv), int(max_iter), int(seed)
        self.embedding = embedding
        self.identity: dict | None = None
        self.preprocessing: dict = {}

    def _model(self, C: float, warm: bool = False):
        lm = require_sklearn("sklearn.linear_model")
        return lm.LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed, warm_start=warm)

    def fit(self, X: Any, y: Any) -> LogisticClassifier:
        """Fit on embeddings ``X`` [N, D] and labels ``y`` [N] (at least two distinct labels)."""
        X = _matrix(X).cpu().numpy().astype(np.float64)
        self.classes_, yi = _labels(y, X.shape[0])
        if len(self.classes_) < 2:
            raise InputError(f"logistic regression needs at least 2 classes, got only {self.classes_.tolist()}")
        scaler = require_sklearn("sklearn.preprocessing").StandardScaler().fit(X)
        Xs = scaler.transform(X)  # [N, D]
        self.C_, self.cv_scores_ = self._choose_C(Xs, yi)
        model = self._model(self.C_).fit(Xs, yi)
        self.model_ = model
        self.coef_ = model.coef_.astype(np.float64)  # [1 or K, D]
        self.intercept_ = model.intercept_.astype(np.float64)  # [1 or K]
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)  # [D]
        return self

    def _choose_C(self, Xs: np.ndarray, yi: np.ndarray) -> tuple[float, dict[float, float]]:
        if len(self.Cs) == 1:
            return self.Cs[0], {}
        ms = require_sklearn("sklearn.model_selection")
        counts = np.bincount(yi)
        splittable = counts[yi] >= 2  # samples of classes that can appear on both sides of a split
        idx_s, always = np.flatnonzero(splittable), np.flatnonzero(~splittable)
        sizes = counts[counts >= 2]
        if len(sizes) < 2 and not (len(sizes) == 1 and len(always)):
            warnings.warn("too few samples per class to cross-validate C; using C=1.0", stacklevel=3)
            return 1.0, {}
        folds = ms.StratifiedKFold(n_splits=min(self.cv, int(sizes.min())), shuffle=True, random_state=self.seed)
        scores: dict[float, list[float]] = {c: [] for c in self.Cs}
        losses: dict[float, list[float]] = {c: [] for c in self.Cs}
        for tr, va in folds.split(idx_s, yi[idx_s]):
            tr_idx, va_idx = np.concatenate([idx_s[tr], always]), idx_s[va]
            if len(np.unique(yi[tr_idx])) < 2:
                continue
            model = self._model(self.Cs[0], warm=True)
            for c in sorted(self.Cs):  # warm start along the regularisation path
                model.set_params(C=c)
                model.fit(Xs[tr_idx], yi[tr_idx])
                scores[c].append(float(np.mean(model.predict(Xs[va_idx]) == yi[va_idx])))
                proba = model.predict_proba(Xs[va_idx])  # [n_va, classes seen in training]
                col = {k: j for j, k in enumerate(model.classes_)}
                p_true = np.array([proba[i, col[k]] if k in col else 0.0 for i, k in enumerate(yi[va_idx])])
                losses[c].append(float(-np.mean(np.log(np.clip(p_true, 1e-15, 1.0)))))
        mean = {c: float(np.mean(s)) for c, s in scores.items() if s}
        if not mean:
            return 1.0, {}
        loss = {c: float(np.mean(losses[c])) for c in mean}
        # accuracy first; ties (a few images per class: every C is right) by the held-out log-loss, which
        # the over-regularised smallest C (near-uniform probabilities) loses; then the smaller C
        best = max(sorted(mean), key=lambda c: (mean[c], -round(loss[c], 9)))
        return best, mean

    def decision_function(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise InputError("this LogisticClassifier is not fitted: call fit(X, y) first")
        X = _matrix(X).cpu().numpy().astype(np.float64)
        if X.shape[1] != self.coef_.shape[1]:
            raise InputError(
                f"embeddings have {X.shape[1]} dims but the classifier was fitted on {self.coef_.shape[1]}"
            )
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_  # [M, 1 or K]

    def predict_proba(self, X: Any) -> np.ndarray:
        """[M, n_classes] probabilities (scikit-learn's: sigmoid for 2 classes, softmax otherwise)."""
        z = self.decision_function(X)
        if z.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def _export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n + "_"))) for n in
                   ("coef", "intercept", "mean", "scale")}  # fmt: skip
        info = {"classes": _json_list(self.classes_), "C": self.C_, "Cs": self.Cs, "cv": self.cv,
                "cv_scores": [[c, s] for c, s in self.cv_scores_.items()], "embedding": self.embedding}  # fmt: skip
        return tensors, info

    @classmethod
    def _import(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> LogisticClassifier:
        head = cls(Cs=info["Cs"], cv=info["cv"], embedding=info.get("embedding", "cls"))
        for n in ("coef", "intercept", "mean", "scale"):
            setattr(head, n + "_", tensors[n].numpy().astype(np.float64))
        head.classes_ = np.asarray(info["classes"])
        head.C_ = float(info["C"])
        head.cv_scores_ = {float(c): float(s) for c, s in info.get("cv_scores", [])}
        D = head.coef_.shape[1]
        if head.mean_.shape != (D,) or head.scale_.shape != (D,) or head.intercept_.shape != head.coef_.shape[:1]:
            raise ValueError("coefficient shapes disagree")
        if head.coef_.shape[0] != (1 if len(head.classes_) == 2 else len(head.classes_)):
            raise ValueError("coefficient rows do not match the class list")
        return head


# ----------------------------------------------------------------------------------------------
# Semantic segmentation


class LinearSegHead(nn.Module):
    """BatchNorm2d + Dropout2d + 1x1 conv: DINOv3's linear segmentation head (spec section 5).

    ``in_channels`` = D * L for L concatenated blocks. ``forward`` takes patch features
    [B, h, w, C] (what :func:`dinoapp.extract` returns) or [B, C, h, w] and returns logits [B, K, h, w].
    """

    def __init__(self, in_channels: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 2:
            raise ConfigError(f"need in_channels >= 1 and n_classes >= 2, got {in_channels}, {n_classes}")
        self.in_channels, self.n_classes = int(in_channels), int(n_classes)
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_channels, n_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # as Meta's linear heads
        nn.init.zeros_(self.conv.bias)

    def channels_first(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, h, w, C] or [B, C, h, w] -> [B, C, h, w]; the channel axis is the one of size C."""
        if feats.ndim != 4:
            raise InputError(f"patch features must be 4-D [B, h, w, C] or [B, C, h, w], got {tuple(feats.shape)}")
        if feats.shape[-1] == self.in_channels:
            return feats.permute(0, 3, 1, 2)
        if feats.shape[1] == self.in_channels:
            return feats
        raise InputError(
            f"the head expects {self.in_channels} channels per patch, got features of shape {tuple(feats.shape)}: "
            "same backbone and the same blocks (layers) as at training?"
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.channels_first(feats.float())  # [B, C, h, w]
        return self.conv(self.dropout(self.bn(x)))  # [B, K, h, w]

    @torch.no_grad()
    def predict(
        self,
        feats: torch.Tensor,
        size: Sequence[int] | None = None,
        *,
        policy: str = "resize",
        patch_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits upsampled to pixels [B, K, H, W] and the class map [B, H, W] (eval mode, no grad).

        ``size`` (H, W) = the original image size (default: the preprocessed size h*p x w*p); see
        :func:`upsample_logits` for ``policy``.
        """
        was = self.training
        self.eval()
        try:
            p = next(self.parameters())
            logits = self(feats.to(device=p.device))  # [B, K, h, w]
        finally:
            self.train(was)
        up = upsample_logits(logits, size, policy=policy, patch_size=patch_size)  # [B, K, H, W]
        return up, up.argmax(1)


def upsample_logits(
    logits: torch.Tensor, size: Sequence[int] | None = None, *, policy: str = "resize", patch_size: int = 16
) -> torch.Tensor:
    """Patch logits [B, K, h, w] -> pixel logits [B, K, H, W], bilinear (pixel centres).

    ``policy="resize"``/``"short_side"``: the grid covered the whole (resized) image, so it is
    stretched to ``size``. ``policy="pad"``: the image was padded bottom/right, so the grid is
    upsampled to h*p x w*p and cropped to ``size``.
    """
    h, w = logits.shape[-2:]
    full = (h * patch_size, w * patch_size)
    out_h, out_w = (int(size[0]), int(size[1])) if size is not None else full
    if policy == "pad":
        if out_h > full[0] or out_w > full[1]:
            raise InputError(f"size {out_h}x{out_w} is larger than the padded canvas {full[0]}x{full[1]} of a "
                             f"{h}x{w} grid")  # fmt: skip
        return F.interpolate(logits, size=full, mode="bilinear", align_corners=False)[..., :out_h, :out_w]
    if policy not in ("resize", "short_side"):
        raise ConfigError(f"policy must be 'resize', 'pad' or 'short_side', got {policy!r}")
    return F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing (pixel centres, = torch 'nearest-exact')."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _mask_list(masks: Any, name: str) -> tuple[list[np.ndarray], bool]:
    """[B, H, W] / [H, W] array or tensor, or a list of [H, W] -> (list of 2-D arrays, was_single)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, (list, tuple)):
        arrs = [np.asarray(m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m) for m in masks]
        single = False
    else:
        a = np.asarray(masks)
        if a.ndim == 2:
            arrs, single = [a], True
        elif a.ndim == 3:
            arrs, single = list(a), False
        else:
            raise InputError(f"{name} must be [B, H, W], [H, W] or a list of [H, W], got shape {a.shape}")
    if not arrs or any(m.ndim != 2 or m.size == 0 for m in arrs):
        raise InputError(f"{name} must be non-empty 2-D masks, got shapes {[m.shape for m in arrs]}")
    return arrs, single


def _to_canvas(m: np.ndarray, canvas: tuple[int, int], policy: str, fill: float | int) -> np.ndarray:
    """Map one mask onto the h*p x w*p canvas of the preprocessed image (see module docstring)."""
    mh, mw = m.shape
    if m.shape == canvas:
        return m
    if policy == "pad":
        if mh > canvas[0] or mw > canvas[1]:
            raise InputError(f"mask {mh}x{mw} does not fit the padded canvas {canvas[0]}x{canvas[1]}")
        out = np.full(canvas, fill, dtype=np.result_type(m.dtype, np.asarray(fill).dtype))
        out[:mh, :mw] = m
        return out
    if policy not in ("resize", "short_side"):
        raise ConfigError(f"policy must be 'resize', 'pad' or 'short_side', got {policy!r}")
    return m[np.ix_(_nearest_index(canvas[0], mh), _nearest_index(canvas[1], mw))]


def patch_targets(
    masks: Any,
    grid: Sequence[int],
    n_classes: int,
    patch: int = 16,
    *,
    ignore_index: int = IGNORE_INDEX,
    policy: str = "resize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch soft targets [B, h, w, K] and weights [B, h, w] from pixel masks [B, H, W].

    Target of a patch = the class distribution over its *labelled* pixels (``ignore_index`` =
    unlabelled); weight = the fraction of its pixels that are labelled. Dense masks give weight 1
    and soft targets at boundaries; sparse scribbles give partial weights; unlabelled patches give
    weight 0 and an all-zero target. Masks whose size is not h*p x w*p are first mapped onto that
    canvas like the image: resized with nearest neighbour (``policy="resize"``) or padded with
    ``ignore_index`` (``policy="pad"``). A [H, W] mask gives [h, w, K] and [h, w].
    """
    K = int(n_classes)
    if K < 1:
        raise InputError(f"n_classes must be >= 1, got {n_classes}")
    h, w = int(grid[0]), int(grid[1])
    canvas = (h * patch, w * patch)
    arrs, single = _mask_list(masks, "masks")
    B = len(arrs)
    idx_all, n_lab = [], np.zeros((B, h, w), dtype=np.float64)
    rr = np.repeat(np.arange(h), patch)[:, None]  # [h*p, 1] patch row of each pixel row
    cc = np.repeat(np.arange(w), patch)[None, :]  # [1, w*p]
    for b, m in enumerate(arrs):
        if m.dtype == bool:
            m = m.astype(np.int64)
        if not np.issubdtype(m.dtype, np.integer):
            if not np.all(np.isfinite(m)) or not np.all(np.mod(m, 1) == 0):
                raise InputError(f"mask {b} must hold integer class indices (or {ignore_index}), got {m.dtype} values")
            m = m.astype(np.int64)
        m = _to_canvas(m.astype(np.int64), canvas, policy, ignore_index)  # [h*p, w*p]
        lab = m != ignore_index
        bad = lab & ((m < 0) | (m >= K))
        if bad.any():
            raise InputError(f"mask {b} has labels {np.unique(m[bad])[:5].tolist()} outside [0, {K}) "
                             f"that are not ignore_index={ignore_index}")  # fmt: skip
        cell = (b * h + rr) * w + cc  # [h*p, w*p] global patch id
        idx_all.append(cell[lab] * K + m[lab])
    counts = np.bincount(np.concatenate(idx_all), minlength=B * h * w * K).reshape(B, h, w, K).astype(np.float64)
    n_lab = counts.sum(-1)  # [B, h, w]
    targets = counts / np.maximum(n_lab, 1)[..., None]  # [B, h, w, K]
    weights = n_lab / (patch * patch)  # [B, h, w]
    t, wt = torch.from_numpy(targets).float(), torch.from_numpy(weights).float()
    return (t[0], wt[0]) if single else (t, wt)


@dataclass
class SegHead:
    """A trained :class:`LinearSegHead` with what it needs to be used correctly.

    ``layers``: block indices whose features were concatenated (``None`` = last block only);
    ``identity``: the backbone's :func:`~dinoapp.identity.backbone_identity`;
    ``preprocessing``: ``{"size", "policy", "patch_size"}`` the features were extracted with.
    """

    module: LinearSegHead
    n_classes: int
    class_names: list[str]
    layers: list[int] | None = None
    identity: dict | None = None
    preprocessing: dict = field(default_factory=lambda: {"size": None, "policy": "resize", "patch_size": 16})
    history: dict = field(default_factory=dict)
    kind: ClassVar[str] = "seg"

    def _feats(self, features: Any) -> tuple[torch.Tensor, bool]:
        x = select_features(features, self.layers)  # [B, h, w, C] or [h, w, C]
        single = x.ndim == 3
        return (x[None] if single else x), single

    @torch.no_grad()
    def logits(self, features: Any) -> torch.Tensor:
        """Patch logits [B, K, h, w] (eval mode)."""
        x, _ = self._feats(features)
        was = self.module.training
        self.module.eval()
        try:
            return self.module(x.to(next(self.module.parameters()).device))  # [B, K, h, w]
        finally:
            self.module.train(was)

    @torch.no_grad()
    def predict_proba(self, features: Any, size: Sequence[int] | None = None) -> torch.Tensor:
        """Class probabilities at pixels [B, K, H, W] (``size`` = original (H, W); [K, H, W] for one image)."""
        x, single = self._feats(features)
        logits, _ = self.module.predict(x, size, policy=self.preprocessing.get("policy", "resize"),
                                        patch_size=self.preprocessing.get("patch_size", 16))  # fmt: skip
        p = logits.softmax(1)
        return p[0] if single else p

    @torch.no_grad()
    def predict(self, features: Any, size: Sequence[int] | None = None) -> torch.Tensor:
        """Class map at pixels [B, H, W] int64 ([H, W] for one image's features)."""
        x, single = self._feats(features)
        _, cls = self.module.predict(x, size, policy=self.preprocessing.get("policy", "resize"),
                                     patch_size=self.preprocessing.get("patch_size", 16))  # fmt: skip
        return cls[0] if single else cls

    def segment(self, backbone, images: Any, *, batch_size: int = 16, device=None) -> torch.Tensor | list[torch.Tensor]:
        """Images -> class maps at their own size, extracting features as at training time.

        ``images``: a [B, C, H, W] tensor or a list of images (see :func:`dinoapp.extract`). Returns
        [B, H, W], or a list of [H_i, W_i] maps when the images' sizes differ.
        """
        from .extract import extract
        from .preprocess import to_tensor

        check_backbone(self, backbone)
        pre = self.preprocessing
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            sizes = [tuple(images.shape[-2:])] * images.shape[0]
        else:
            seq = images if isinstance(images, (list, tuple)) else [images]
            sizes = [tuple(to_tensor(im).shape[-2:]) for im in seq]
        size = pre.get("size")
        size = tuple(size) if isinstance(size, list) else size
        policy = pre.get("policy", "resize")
        if size is None and len(set(sizes)) > 1 and not isinstance(images, torch.Tensor):
            # trained at native sizes: each image at its own size (one batch cannot mix grids)
            return [self.segment(backbone, [im], batch_size=batch_size, device=device)[0] for im in seq]
        f = extract(backbone, images, layers=self.layers, size=size, policy=policy, batch_size=batch_size,
                    device=device)  # fmt: skip
        x = select_features(f, self.layers)
        maps = [self.predict(x[i], sizes[i]) for i in range(x.shape[0])]
        return torch.stack(maps) if len(set(sizes)) == 1 else maps

    def segment_large(
        self,
        backbone,
        image: Any,
        *,
        resolution: int | Sequence[int] | None = None,
        policy: str = "pad",
        tile: int = 512,
        overlap: int = 128,
        max_tokens: int = 4096,
        batch_size: int = 4,
        channels_first: bool | None = None,
        device=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One large image -> (class map [H, W], probabilities [K, H, W]) at the image's own size.

        Features come from :func:`dinoapp.dense.dense_features` (native resolution by default, padded
        to a multiple of 16; overlapping ``tile``-pixel windows beyond ``max_tokens`` patches), so any
        image size works with bounded memory; the patch logits are upsampled bilinearly to pixels.
        """
        from .dense import dense_features

        check_backbone(self, backbone)
        df = dense_features(backbone, image, resolution=resolution, policy=policy, layers=self.layers or None,
                            max_tokens=max_tokens, tile=tile, overlap=overlap, batch_size=batch_size,
                            channels_first=channels_first, device=device)  # fmt: skip
        n = backbone.n_blocks
        x = torch.cat([df.layers[i % n] for i in self.layers], dim=-1) if self.layers else df.patches  # [h, w, C]
        logits, _ = self.module.predict(x[None], None, patch_size=backbone.patch_size)  # [1, K, h*p, w*p]
        if policy == "pad":
            logits = logits[..., : df.image_size[0], : df.image_size[1]]
        else:
            logits = F.interpolate(logits, size=df.image_size, mode="bilinear", align_corners=False)
        probs = logits[0].softmax(0)  # [K, H, W]
        return probs.argmax(0), probs

    def _export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"module.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()}
        info = {"in_channels": self.module.in_channels, "n_classes": self.n_classes, "class_names": self.class_names,
                "layers": self.layers, "dropout": self.module.dropout.p, "history": self.history}  # fmt: skip
        return tensors, info

    @classmethod
    def _import(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> SegHead:
        module = LinearSegHead(int(info["in_channels"]), int(info["n_classes"]), float(info.get("dropout", 0.1)))
        sd = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
        module.load_state_dict(sd, strict=True)
        layers = info.get("layers")
        return cls(module.eval(), int(info["n_classes"]), [str(c) for c in info["class_names"]],
                   layers=[int(i) for i in layers] if layers is not None else None,
                   history=info.get("history") or {})  # fmt: skip


def _class_weights(targets: torch.Tensor, weights: torch.Tensor, mode: Any, K: int) -> torch.Tensor:
    """[K] per-class loss weights: "balanced" = total labelled mass / (K_present * class mass), 0 if absent."""
    if mode is None:
        return torch.ones(K)
    if isinstance(mode, str):
        if mode != "balanced":
            raise ConfigError(f"class_weights must be 'balanced', None or {K} numbers, got {mode!r}")
        mass = (targets * weights[..., None]).sum(dim=(0, 1, 2)).double()  # [K]
        present = mass > 0
        cw = torch.where(present, mass.sum() / (present.sum() * mass.clamp_min(1e-12)), torch.zeros_like(mass))
        return cw.float()
    cw = torch.as_tensor(list(mode), dtype=torch.float32)
    if cw.shape != (K,) or (cw < 0).any():
        raise ConfigError(f"class_weights must be {K} non-negative numbers, got {list(mode)}")
    return cw


def fit_seg_head(
    features: Any,
    masks: Any,
    n_classes: int,
    *,
    layers: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    class_weights: Any = "balanced",
    dropout: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    size: int | Sequence[int] | None = None,
    policy: str = "resize",
    patch_size: int | None = None,
    backbone=None,
) -> SegHead:
    """Train a linear segmentation head on frozen patch features with weighted soft cross-entropy.

    Args:
        features: :class:`dinoapp.Features` (with ``layers`` picking blocks, e.g.
            :func:`evenly_spaced_layers`), a [B, h, w, D] tensor/array, or a list of per-layer ones.
        masks: [B, H, W] class indices (``ignore_index`` = unlabelled) or a list of [H, W]; see
            :func:`patch_targets` for how they become per-patch soft targets and weights.
        epochs, lr, weight_decay, batch_size: AdamW with a cosine schedule (per step) to 0;
            batches are whole images (BatchNorm statistics and Dropout2d are per image).
        class_weights: ``"balanced"`` (inverse labelled-pixel frequency), ``None`` or K numbers.
        size, policy: the preprocessing the features were extracted with (recorded; ``policy`` also
            decides how masks of another size are mapped onto the patch grid).
        backbone: the backbone the features came from, recorded as the head's ``identity``.
        seed: initialisation, dropout and batch order (the global RNG is left untouched).

    The loss over a batch is sum_patches w * sum_k cw_k t_k (-log p_k) / sum_patches w sum_k cw_k t_k.
    Returns a :class:`SegHead` on CPU in eval mode, with the per-epoch loss in ``history["loss"]``.
    """
    K = int(n_classes)
    if K < 2:
        raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
    ints = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (epochs, batch_size))
    if not ints or epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"need integers epochs >= 1 and batch_size >= 1, and lr > 0; got {epochs!r}, "
                          f"{batch_size!r}, {lr!r}")  # fmt: skip
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(K)]
    if len(names) != K:
        raise ConfigError(f"{len(names)} class names given for {K} classes")
    p = int(patch_size or getattr(backbone, "patch_size", 16))
    layer_list = [int(i) for i in layers] if layers else None
    if layer_list and backbone is not None:  # -1 = the last block: Features.layers holds non-negative keys
        layer_list = block_indices(layer_list, backbone.n_blocks)
    if layer_list and isinstance(features, (list, tuple)) and len(features) != len(layer_list):
        raise InputError(f"{len(features)} per-layer feature maps given for layers {layer_list}")
    X = select_features(features, layer_list)  # [N, h, w, C]
    if X.ndim != 4:
        raise InputError(f"training features must be a batch [N, h, w, C], got shape {tuple(X.shape)}")
    N, h, w, C = X.shape
    T, Wt = patch_targets(masks, (h, w), K, p, ignore_index=ignore_index, policy=policy)  # [N,h,w,K], [N,h,w]
    if T.shape[0] != N:
        raise InputError(f"{T.shape[0]} masks for {N} feature maps")
    if float(Wt.sum()) == 0:
        raise InputError(f"the masks hold no labelled pixels (every pixel is ignore_index={ignore_index})")
    if min(batch_size, N) * h * w < 2:  # BatchNorm needs 2 values per channel: no step could ever be taken
        raise InputError(
            f"a batch of {min(batch_size, N)} image(s) with a {h}x{w} patch grid has fewer than 2 "
            "patches, too few to train on (BatchNorm): use more images per batch or larger inputs"
        )
    cw = _class_weights(T, Wt, class_weights, K)  # [K]
    dev = torch.device(device) if device is not None else X.device
    # [N, C, h, w] as a channels-last view: BatchNorm and the 1x1 conv run 2-3x faster on CPU than on NCHW
    X = X.contiguous().to(dev).permute(0, 3, 1, 2)
    T = (T * cw).permute(0, 3, 1, 2).contiguous().to(dev)  # [N, K, h, w], class-weighted targets
    Wt = Wt.to(dev)  # [N, h, w]

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        module = LinearSegHead(C, K, dropout).to(dev)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(N / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        g = torch.Generator().manual_seed(seed)
        history: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc="seg head", unit="epoch")
        module.train()
        try:
            for _ in range(epochs):
                total, norm_total = 0.0, 0.0
                for idx in torch.randperm(N, generator=g).split(batch_size):
                    idx = idx.to(dev)
                    t, wgt = T[idx], Wt[idx]  # [b, K, h, w], [b, h, w]
                    norm = (wgt * t.sum(1)).sum()
                    if idx.numel() * h * w < 2 or float(norm) == 0:  # BatchNorm needs 2 values; no labels
                        sched.step()
                        continue
                    logp = F.log_softmax(module(X[idx]), dim=1)  # [b, K, h, w]
                    loss_sum = (wgt * -(t * logp).sum(1)).sum()
                    loss = loss_sum / norm
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss_sum.detach())
                    norm_total += float(norm.detach())
                history.append(total / max(norm_total, 1e-12))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.4f}")
        finally:
            if bar is not None:
                bar.close()
    identity = backbone_identity(backbone) if backbone is not None else None
    size_rec = list(size) if isinstance(size, (list, tuple)) else size
    return SegHead(module.cpu().eval(), K, names, layers=layer_list, identity=identity,
                   preprocessing={"size": size_rec, "policy": policy, "patch_size": p},
                   history={"loss": history})  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Foreground / background


def patch_fractions(masks: Any, grid: Sequence[int], patch: int = 16, *, policy: str = "resize") -> np.ndarray:
    """Foreground fraction of each patch [B, h, w] from masks in [0, 1] (bool or float), NaN where unknown.

    Masks are mapped onto the h*p x w*p canvas as in :func:`patch_targets` (padding is unknown, NaN).
    """
    h, w = int(grid[0]), int(grid[1])
    arrs, _ = _mask_list(masks, "fg_masks")
    out = []
    for b, m in enumerate(arrs):
        m = m.astype(np.float64)
        fin = m[np.isfinite(m)]
        if fin.size and (fin.min() < 0 or fin.max() > 1):
            raise InputError(
                f"foreground mask {b} must hold values in [0, 1] (or bool), got [{fin.min()}, {fin.max()}]"
            )
        m = _to_canvas(m, (h * patch, w * patch), policy, np.nan)  # [h*p, w*p]
        cells = m.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h, w, patch * patch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (padding-only) patches -> NaN
            out.append(np.nanmean(cells, axis=-1))
    return np.stack(out)  # [B, h, w]


class ForegroundClassifier:
    """Logistic regression on patch features separating foreground from background (the PCA recipe).

    Training patches: mask averaged per patch, kept where the fraction is < ``low`` (background) or
    > ``high`` (foreground); mixed patches are left out. Scores are smoothed by a ``median`` x
    ``median`` median filter (scipy.ndimage.median_filter) and thresholded at ``threshold``.
    ``C=0.1`` on unscaled features, as in Meta's foreground notebook.
    """

    kind: ClassVar[str] = "foreground"

    def __init__(
        self,
        C: float = 0.1,
        threshold: float = 0.5,
        *,
        low: float = 0.01,
        high: float = 0.99,
        median: int = 3,
        max_iter: int = 2000,
        seed: int = 0,
    ) -> None:
        if not C > 0 or not 0 <= low < high <= 1 or median < 1:
            raise ConfigError(f"need C > 0, 0 <= low < high <= 1, median >= 1; got {C}, {low}, {high}, {median}")
        self.C, self.threshold, self.low, self.high = float(C), float(threshold), float(low), float(high)
        self.median, self.max_iter, self.seed = int(median), int(max_iter), int(seed)
        self.identity: dict | None = None
        self.preprocessing: dict = {"size": None, "policy": "resize", "patch_size": 16}

    def fit(
        self, features: Any, fg_masks: Any, *, patch_size: int = 16, policy: str = "resize"
    ) -> ForegroundClassifier:
        X = select_features(features)  # [B, h, w, D]
        if X.ndim == 3:
            X = X[None]
        B, h, w, D = X.shape
        frac = patch_fractions(fg_masks, (h, w), patch_size, policy=policy)  # [B, h, w]
        if frac.shape[0] != B:
            raise InputError(f"{frac.shape[0]} masks for {B} feature maps")
        keep = (frac < self.low) | (frac > self.high)  # NaN compares False: unknown patches dropped
        y = frac[keep] > 0.5
        if y.all() or not y.any():
            raise InputError(f"need clean foreground (> {self.high}) and background (< {self.low}) patches; "
                             f"got {int(y.sum())} foreground and {int((~y).sum())} background")  # fmt: skip
        lm = require_sklearn("sklearn.linear_model")
        model = lm.LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        model.fit(X.cpu().numpy()[keep].astype(np.float64), y)
        self.model_ = model
        self.coef_ = model.coef_[0].astype(np.float64)  # [D]
        self.intercept_ = float(model.intercept_[0])
        self.n_train_ = {"foreground": int(y.sum()), "background": int((~y).sum())}
        self.preprocessing = {**self.preprocessing, "policy": policy, "patch_size": patch_size}
        return self

    def score_map(self, features: Any) -> np.ndarray:
        """Foreground probability per patch, median-filtered: [B, h, w] (or [h, w] for one image)."""
        if not hasattr(self, "coef_"):
            raise InputError("this ForegroundClassifier is not fitted: call fit(features, fg_masks) first")
        X = select_features(features)
        single = X.ndim == 3
        X = X[None] if single else X  # [B, h, w, D]
        if X.shape[-1] != self.coef_.shape[0]:
            raise InputError(
                f"features have {X.shape[-1]} channels but the classifier was fitted on {self.coef_.shape[0]}"
            )
        z = X.cpu().numpy().astype(np.float64) @ self.coef_ + self.intercept_  # [B, h, w]
        s = 1.0 / (1.0 + np.exp(-z))
        if self.median > 1:
            s = require_sklearn("scipy.ndimage").median_filter(s, size=(1, self.median, self.median), mode="nearest")
        return s[0] if single else s

    def predict(self, features: Any, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(smoothed score map, bool foreground mask) per patch, [B, h, w] or [h, w]."""
        s = self.score_map(features)
        return s, s > (self.threshold if threshold is None else threshold)

    def _export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            "coef": torch.from_numpy(self.coef_.copy()),
            "intercept": torch.tensor([self.intercept_], dtype=torch.float64),
        }
        info = {"C": self.C, "threshold": self.threshold, "low": self.low, "high": self.high, "median": self.median,
                "n_train": self.n_train_}  # fmt: skip
        return tensors, info

    @classmethod
    def _import(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> ForegroundClassifier:
        head = cls(C=info["C"], threshold=info["threshold"], low=info["low"], high=info["high"], median=info["median"])
        head.coef_ = tensors["coef"].numpy().astype(np.float64)
        head.intercept_ = float(tensors["intercept"].reshape(-1)[0])
        head.n_train_ = dict(info.get("n_train") or {})
        if head.coef_.ndim != 1:
            raise ValueError("coef must be a vector")
        return head


def fit_foreground(features: Any, fg_masks: Any, **kwargs: Any) -> ForegroundClassifier:
    """Fit a :class:`ForegroundClassifier` (``patch_size``/``policy`` go to ``fit``, the rest to the class)."""
    fit_kw = {k: kwargs.pop(k) for k in ("patch_size", "policy") if k in kwargs}
    return ForegroundClassifier(**kwargs).fit(features, fg_masks, **fit_kw)


def predict_foreground(
    head: ForegroundClassifier, features: Any, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(score map [h, w] / [B, h, w] smoothed by a 3x3 median filter, bool mask at ``threshold``)."""
    return head.predict(features, threshold)


# ----------------------------------------------------------------------------------------------
# Saving and loading

_KINDS: dict[str, Any] = {
    "seg": SegHead,
    "knn": KNNClassifier,
    "logistic": LogisticClassifier,
    "foreground": ForegroundClassifier,
}


def _json_list(values: np.ndarray) -> list:
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(values).tolist()]


def _describe(identity: dict) -> str:
    arch = identity.get("arch") or {}
    if arch.get("family") == "timm":
        what = f"timm {arch.get('model_name')}, stage {arch.get('out_index')}"
    else:
        what = f"ViT embed_dim={arch.get('embed_dim')}, depth={arch.get('depth')}, patch={arch.get('patch_size')}"
    return f"{identity.get('source') or 'unnamed backbone'} ({what}, fingerprint {identity.get('fingerprint')})"


def check_backbone(head: Any, backbone, where: str = "this head") -> None:
    """Raise :class:`HeadBackboneMismatchError` if ``backbone`` is not the one ``head`` was trained with."""
    expected = getattr(head, "identity", None)
    if not expected or backbone is None:
        return
    got = backbone_identity(backbone)
    if got["fingerprint"] == expected.get("fingerprint"):
        return
    same_name = got.get("source") == expected.get("source") and got.get("arch") == expected.get("arch")
    why = (" They share a name and architecture but not their weights or normalisation (another seed, a "
           "fine-tuned or continued-pretraining checkpoint, other mean/std)." if same_name else "")  # fmt: skip
    raise HeadBackboneMismatchError(
        f"{where} was trained on features of {_describe(expected)}, but the given backbone is {_describe(got)}.{why} "
        "A head only works on the features of its own backbone: load that backbone "
        f"(dinoapp.load_backbone({expected.get('source')!r})) or retrain the head on this backbone's features.",
        expected=expected,
        got=got,
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_head(head: Any, path: str | os.PathLike, backbone=None) -> Path:
    """Write ``head`` to ``path`` (``.safetensors``): tensors + JSON metadata, atomically (tmp + rename).

    The metadata records the head kind and settings, class names, layers, preprocessing and the
    backbone's identity. ``backbone`` is required unless the head already knows its backbone (from
    ``fit_seg_head(..., backbone=)`` or :func:`load_head`); a head that knows another backbone is
    refused with :class:`HeadBackboneMismatchError`. The identity is recorded on ``head`` too.
    """
    if getattr(head, "kind", None) not in _KINDS:
        raise InputError(f"cannot save a {type(head).__name__}: expected a SegHead, KNNClassifier, "
                         "LogisticClassifier or ForegroundClassifier")  # fmt: skip
    if backbone is not None:
        check_backbone(head, backbone, f"this {type(head).__name__}")
        identity = backbone_identity(backbone)
    elif getattr(head, "identity", None):
        identity = head.identity
    else:
        raise InputError("save_head needs the backbone whose features the head was trained on: "
                         "save_head(head, path, backbone)")  # fmt: skip
    try:
        tensors, info = head._export()
    except AttributeError:
        raise InputError(f"this {type(head).__name__} is not fitted; fit it before saving") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    pre = dict(getattr(head, "preprocessing", {}) or {})
    if isinstance(pre.get("size"), tuple):
        pre["size"] = list(pre["size"])
    meta = {"kind": head.kind, "version": HEAD_VERSION, "backbone": identity, "preprocessing": pre,
            "settings": info, "tensors_sha256": _digest(tensors)}  # fmt: skip
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"dinoapp_format": HEAD_FORMAT, "dinoapp": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    head.identity = identity
    return path


def load_head(path: str | os.PathLike, backbone=None) -> Any:
    """Read a head written by :func:`save_head`; with ``backbone``, check it is the head's own.

    Raises :class:`SourceNotFoundError` (no file), :class:`CheckpointCorruptError` (truncated,
    damaged, failed checksum), :class:`UnsupportedFormatError` (a valid file that is not a dinoapp
    head, e.g. a backbone checkpoint) and :class:`HeadBackboneMismatchError`.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceNotFoundError(f"no such head file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    except Exception as e:  # the reader fails on damaged bytes with several exception types
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointCorruptError(
            f"{path} is truncated or not a safetensors file ({type(e).__name__}: {first})"
        ) from None
    fmt = header.get("dinoapp_format")
    if fmt != HEAD_FORMAT:
        hint = " it is a backbone checkpoint: load it with dinoapp.load_backbone" if fmt == "dinoapp.backbone" else ""
        raise UnsupportedFormatError(f"{path} is a safetensors file but not a dinoapp head (format {fmt!r});{hint} "
                                     "heads are written by dinoapp.heads.save_head")  # fmt: skip
    try:
        meta = json.loads(header["dinoapp"])
        kind, version = meta["kind"], int(meta["version"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"{path}: the head's metadata is damaged ({type(e).__name__}: {e})") from None
    if version > HEAD_VERSION:
        raise UnsupportedFormatError(f"{path} is a version {version} head; this dinoapp reads up to version "
                                     f"{HEAD_VERSION}: upgrade dinoapp")  # fmt: skip
    if kind not in _KINDS:
        raise UnsupportedFormatError(f"{path} holds an unknown head kind {kind!r} (known: {sorted(_KINDS)})")
    if meta.get("tensors_sha256") != _digest(tensors):
        raise CheckpointCorruptError(f"{path}: the stored tensors do not match their checksum; the file was damaged "
                                     "after it was written: save the head again")  # fmt: skip
    try:
        head = _KINDS[kind]._import(tensors, meta["settings"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointCorruptError(f"{path}: the {kind} head's contents are inconsistent ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from None  # fmt: skip
    head.identity = meta.get("backbone")
    pre = dict(meta.get("preprocessing") or {})
    if isinstance(pre.get("size"), list):
        pre["size"] = tuple(pre["size"])
    head.preprocessing = pre
    check_backbone(head, backbone, f"the head in {path}")
    return head
