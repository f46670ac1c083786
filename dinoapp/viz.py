"""Pictures from frozen dense patch features: PCA maps, similarity maps, matches, parts, overlays.

The recipes are those of the DINOv3 evaluation notebooks (spec section 5, "Using frozen features"):

- **PCA map**: PCA(3, whiten) fitted on the (foreground) patches, colours ``sigmoid(2 * projection)``,
  background dark. Several images share one basis (:func:`joint_pca_rgb`) so colours match.
- **Patch similarity**: cosine similarity between one patch's feature and every patch of the same or
  another image (:func:`similarity_map`).
- **Dense matching**: argmax of cosine similarity over the other image's grid, kept where both
  patches are foreground (:func:`dense_matches`), optionally mutual nearest neighbours only.
- **Parts / co-segmentation**: one k-means over the (foreground) patches of all images
  (:func:`kmeans_parts`).

Conventions. Features are one image's patch grid ``[h, w, D]`` (``extract(...).patches[i]``; a
``[1, h, w, D]`` batch of one is accepted too); functions over several images take a list of them or
a ``[B, h, w, D]`` batch. numpy in, numpy out; torch tensors are accepted and converted. Masks are
boolean ``[h, w]`` at patch resolution (True = foreground). Patch ``(r, c)`` of a grid ``(h, w)``
that came from an ``H x W`` image resized to ``(16h, 16w)`` (``preprocess(policy="resize")``)
covers original rows ``[r H/h, (r+1) H/h)`` and columns ``[c W/w, (c+1) W/w)``; its centre is pixel
``((r + 0.5) H/h - 0.5, (c + 0.5) W/w - 0.5)`` (pixel ``i`` spans ``[i, i+1)``, centre ``i + 0.5``).
For ``policy="pad"`` pass the padded shape ``(16h, 16w)`` as the image shape and crop afterwards.

scikit-learn (PCA, k-means) and matplotlib (colour maps; no pyplot, no global state) come with the
``ml`` extra and are imported only when needed.
"""

from __future__ import annotations

import colorsys
import functools
import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

BACKGROUNDS = ("dim", "black", "keep")
_EPS = 1e-12


# ----------------------------------------------------------------------------------------- helpers


def _require(module: str) -> ModuleType:
    """Import an optional package of the ``ml`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(
            f"dinoapp.viz needs the Python package '{package}' for this, which is not installed; "
            f'install it with: pip install "dinoapp[ml]"'
        ) from err


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _features(x: Any, name: str = "features") -> np.ndarray:
    """One image's patch features -> float32 [h, w, D] (a [1, h, w, D] batch of one is squeezed)."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        hint = ": pass one image's features, e.g. feats.patches[i]" if a.ndim == 4 else ""
        raise InputError(f"{name} must be one image's patch features [h, w, D], got shape {a.shape}{hint}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if a.size and not np.isfinite(a).all():
        raise InputError(f"{name} contain NaN or infinite values")
    return a  # [h, w, D]


def _feature_list(x: Any, name: str = "features") -> list[np.ndarray]:
    """One [h, w, D] array, a [B, h, w, D] batch or a list of [h, w, D] arrays -> list of float32 [h, w, D]."""
    if isinstance(x, (list, tuple)):
        out = [_features(f, f"{name}[{i}]") for i, f in enumerate(x)]
    else:
        a = _to_numpy(x)
        out = [_features(f, f"{name}[{i}]") for i, f in enumerate(a)] if a.ndim == 4 else [_features(a, name)]
    if not out:
        raise InputError(f"{name} is empty: pass at least one image's patch features")
    dims = {f.shape[-1] for f in out}
    if len(dims) > 1:
        raise InputError(f"{name} have different feature widths {sorted(dims)}: use one backbone and layer")
    return out


def _mask(m: Any, grid: tuple[int, int], name: str = "mask") -> np.ndarray | None:
    """Patch-level foreground mask -> bool [h, w], or None."""
    if m is None:
        return None
    a = _to_numpy(m)
    if a.shape != tuple(grid):
        raise InputError(
            f"{name} has shape {a.shape} but the patch grid is {tuple(grid)}: pass a patch-level mask "
            "(e.g. average a pixel mask over each patch and threshold it, or resize it to the grid)"
        )
    return a.astype(bool)


def _mask_list(masks: Any, feats: list[np.ndarray]) -> list[np.ndarray | None]:
    if masks is None:
        return [None] * len(feats)
    if not isinstance(masks, (list, tuple)):
        a = _to_numpy(masks)
        masks = list(a) if a.ndim == 3 else [a]
    if len(masks) != len(feats):
        raise InputError(f"got {len(masks)} masks for {len(feats)} images: pass one mask (or None) per image")
    return [_mask(m, f.shape[:2], f"masks[{i}]") for i, (m, f) in enumerate(zip(masks, feats))]


def _foreground_rows(feats: list[np.ndarray], masks: list[np.ndarray | None]) -> np.ndarray:
    """Stack the foreground patches of every image -> [N, D]."""
    rows = [f[m] if m is not None else f.reshape(-1, f.shape[-1]) for f, m in zip(feats, masks)]
    return np.concatenate(rows, axis=0)  # [N, D]


def _subsample(x: np.ndarray, max_samples: int | None, seed: int) -> np.ndarray:
    if max_samples is None or len(x) <= max_samples:
        return x
    if max_samples < 1:
        raise InputError(f"max_samples must be a positive integer or None, got {max_samples}")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=max_samples, replace=False))
    return x[idx]


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (zero vectors stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, _EPS)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _patch_index(rc: Any, grid: tuple[int, int], name: str = "patch") -> tuple[int, int]:
    try:
        r, c = (int(v) for v in rc)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be a (row, col) pair of integers, got {rc!r}") from err
    h, w = grid
    if not (0 <= r < h and 0 <= c < w):
        raise InputError(
            f"{name} (row={r}, col={c}) is outside the {h}x{w} patch grid (rows 0..{h - 1}, cols 0..{w - 1})"
        )
    return r, c


def _pair(value: Sequence[int], name: str, form: str) -> tuple[int, int]:
    """Two positive ints from ``value``, or an :class:`InputError` saying ``name`` must be ``form``."""
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be {form}, got {value!r}") from err
    if h < 1 or w < 1:
        raise InputError(f"{name} must be positive, got {value!r}")
    return h, w


def _grid(grid_shape: Sequence[int]) -> tuple[int, int]:
    return _pair(grid_shape, "grid_shape", "(rows, cols) of the patch grid")


# ------------------------------------------------------------------------------------------- PCA


@dataclass
class PCABasis:
    """A fitted PCA of patch features that turns any features of the same width into colours.

    ``project(x) = ((x - mean) @ components.T) / std`` (the division only when ``whiten``), and
    ``rgb(x) = sigmoid(scale * project(x)[..., :3] + offset)``. With whitening every projection has
    unit variance over the fitting patches, so the recipe's ``sigmoid(2 * projection)``
    (``scale=2, offset=0``) maps ~95% of them into (0.12, 0.88): saturated but not clipped.
    Without whitening the projections keep the features' own scale; lower ``scale`` to match.
    """

    mean: np.ndarray  # [D]
    components: np.ndarray  # [K, D], unit rows, sign-fixed (largest-magnitude loading positive)
    std: np.ndarray  # [K] sqrt(explained variance) = singular value / sqrt(n - 1)
    explained_variance_ratio: np.ndarray  # [K]
    whiten: bool = True
    scale: float = 2.0
    offset: float = 0.0

    def project(self, features: Any) -> np.ndarray:
        """Features [..., D] -> float32 projections [..., K] (unit variance on the fitting data when whitened)."""
        x = _to_numpy(features).astype(np.float32, copy=False)
        if x.shape[-1:] != self.mean.shape:
            raise InputError(f"features of width {x.shape[-1:]} do not match this basis of width {self.mean.shape[0]}")
        p = (x - self.mean) @ self.components.T  # [..., K]
        if self.whiten:
            p = p / self.std
        return p.astype(np.float32, copy=False)

    def rgb(self, features: Any) -> np.ndarray:
        """Features [..., D] -> float32 colours [..., 3] in (0, 1): ``sigmoid(scale * projection + offset)``."""
        if self.components.shape[0] < 3:
            raise InputError(
                f"colours need 3 components, this basis has {self.components.shape[0]}: fit n_components>=3"
            )
        p = self.project(features)[..., :3]  # [..., 3]
        return _sigmoid(self.scale * p + self.offset).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists of floats) that :meth:`from_dict` turns back into the same basis."""
        return {
            "mean": self.mean.astype(float).tolist(),
            "components": self.components.astype(float).tolist(),
            "std": self.std.astype(float).tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.astype(float).tolist(),
            "whiten": bool(self.whiten),
            "scale": float(self.scale),
            "offset": float(self.offset),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PCABasis:
        """Inverse of :meth:`to_dict`."""
        missing = {"mean", "components", "std"} - set(d)
        if missing:
            raise InputError(f"not a saved PCABasis: missing keys {sorted(missing)}")
        mean = np.asarray(d["mean"], dtype=np.float32)
        comps = np.asarray(d["components"], dtype=np.float32)
        std = np.asarray(d["std"], dtype=np.float32)
        evr = np.asarray(d.get("explained_variance_ratio", [np.nan] * len(std)), dtype=np.float32)
        if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0] or std.shape != (comps.shape[0],):
            raise InputError(
                f"inconsistent PCABasis shapes: mean {mean.shape}, components {comps.shape}, std {std.shape}"
            )
        whiten, scale, offset = bool(d.get("whiten", True)), float(d.get("scale", 2.0)), float(d.get("offset", 0.0))
        return cls(mean, comps, std, evr, whiten, scale, offset)


def fit_pca(
    features: Any,
    *,
    n_components: int = 3,
    whiten: bool = True,
    masks: Any = None,
    max_samples: int | None = 100_000,
    seed: int = 0,
) -> PCABasis:
    """Fit one PCA basis on the (foreground) patches of one image or of several (spec section 5, PCA map).

    Args:
        features: one image's [h, w, D], a list of them or a [B, h, w, D] batch; one basis is fitted
            on all their patches together, so colours match across the images.
        masks: optional bool [h, w] per image; only foreground (True) patches are fitted.
        max_samples: fit on a random subset (seeded by ``seed``) of at most this many patches.

    Each component's sign is fixed so that its largest-magnitude loading is positive: the same data
    always gives the same colours, whatever the SVD routine returns.
    """
    decomposition = _require("sklearn.decomposition")
    feats = _feature_list(features)
    x = _subsample(_foreground_rows(feats, _mask_list(masks, feats)), max_samples, seed)  # [N, D]
    n, d = x.shape
    if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= d:
        raise InputError(f"n_components must be an integer in 1..{d} (the feature width), got {n_components!r}")
    if n < max(2, n_components):
        raise InputError(
            f"PCA needs at least {max(2, n_components)} patches to fit, got {n}"
            + (" foreground patches: check the masks (True = foreground)" if masks is not None else "")
        )
    pca = decomposition.PCA(n_components=int(n_components), random_state=seed)
    with warnings.catch_warnings():  # constant features (a blank region): 0/0 variance ratios, handled below
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        pca.fit(x)
    comps = pca.components_.astype(np.float32)  # [K, D]
    sign = np.sign(comps[np.arange(n_components), np.abs(comps).argmax(axis=1)])  # [K]
    comps *= np.where(sign == 0, 1.0, sign)[:, None].astype(np.float32)
    std = np.sqrt(np.maximum(pca.explained_variance_, 0.0)).astype(np.float32)  # [K]
    std = np.where(std > 1e-12, std, 1.0).astype(np.float32)  # constant directions project to 0, not NaN
    return PCABasis(
        mean=pca.mean_.astype(np.float32),
        components=comps,
        std=std,
        explained_variance_ratio=np.nan_to_num(pca.explained_variance_ratio_).astype(np.float32),
        whiten=bool(whiten),
    )


def _apply_background(rgb: np.ndarray, mask: np.ndarray | None, background: str, dim: float) -> np.ndarray:
    if background not in BACKGROUNDS:
        raise InputError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if not 0.0 <= dim <= 1.0:
        raise InputError(f"dim must be in [0, 1], got {dim}")
    if mask is None or background == "keep":
        return rgb
    rgb = rgb.copy()
    rgb[~mask] *= 0.0 if background == "black" else dim
    return rgb


def pca_rgb(
    features: Any,
    *,
    basis: PCABasis | None = None,
    mask: Any = None,
    background: str = "dim",
    dim: float = 0.2,
    fit_on_mask: bool = True,
) -> np.ndarray:
    """One image's patch features [h, w, D] -> float32 colours [h, w, 3] in [0, 1] (spec section 5, PCA map).

    Without ``basis`` one is fitted on this image (on its foreground patches when ``mask`` is given
    and ``fit_on_mask``). ``background`` says what happens to patches outside ``mask``: ``"dim"``
    multiplies them by ``dim``, ``"black"`` zeroes them (the recipe), ``"keep"`` leaves them.
    """
    f = _features(features)  # [h, w, D]
    m = _mask(mask, f.shape[:2])
    if basis is None:
        basis = fit_pca(f, masks=[m] if (m is not None and fit_on_mask) else None)
    return _apply_background(basis.rgb(f), m, background, dim)  # [h, w, 3]


def joint_pca_rgb(
    features: Any,
    masks: Any = None,
    *,
    background: str = "dim",
    dim: float = 0.2,
    whiten: bool = True,
    max_samples: int | None = 100_000,
    seed: int = 0,
) -> tuple[list[np.ndarray], PCABasis]:
    """Several images' features -> (one float32 [h_i, w_i, 3] map per image, the shared basis).

    One PCA is fitted on the foreground patches of all images (spec section 5: "several images share
    one basis so colours match across images"); see :func:`pca_rgb` for ``background``.
    """
    feats = _feature_list(features)
    ms = _mask_list(masks, feats)
    basis = fit_pca(feats, masks=ms if masks is not None else None, whiten=whiten, max_samples=max_samples, seed=seed)
    return [_apply_background(basis.rgb(f), m, background, dim) for f, m in zip(feats, ms)], basis


# ------------------------------------------------------------------------------------ similarity


def similarity_map(features: Any, query: Any, *, other: Any = None) -> np.ndarray:
    """Cosine similarity of one query feature with every patch -> float32 [h, w] (or [h2, w2]) in [-1, 1].

    Spec section 5, patch similarity. ``query`` is a patch ``(row, col)`` of ``features`` (a tuple
    or list of two integers) or a feature vector [D] (numpy array or tensor). With ``other`` (another
    image's [h2, w2, D]) the query is compared with that image's patches: cross-image similarity.
    Invariant to any positive scaling of the features; a patch against itself gives exactly 1.
    """
    f = _features(features)  # [h, w, D]
    target = f if other is None else _features(other, "other")  # [h2, w2, D]
    if target.shape[-1] != f.shape[-1]:
        raise InputError(f"other has feature width {target.shape[-1]}, features {f.shape[-1]}: use the same backbone")
    rc = None
    if isinstance(query, (tuple, list)):
        r, c = _patch_index(query, f.shape[:2], "query patch")
        q, rc = f[r, c], (r, c)  # [D]
    else:
        q = _to_numpy(query).astype(np.float32, copy=False)
        if q.shape != (f.shape[-1],):
            raise InputError(
                f"query must be a patch (row, col) tuple or a feature vector [{f.shape[-1]}], got shape {q.shape}"
            )
        if not np.isfinite(q).all():
            raise InputError("the query feature vector contains NaN or infinite values")
    # float32 (a megapixel image's 4096 patches in ~1 ms); the query patch itself is set to exactly 1
    t32 = target.astype(np.float32, copy=False)
    norms = np.sqrt(np.einsum("hwd,hwd->hw", t32, t32))  # [h2, w2]
    qn = q.astype(np.float32) / max(float(np.linalg.norm(q)), 1e-12)
    sim = (t32 @ qn) / np.maximum(norms, np.float32(1e-12))  # [h2, w2]
    if rc is not None and other is None:
        sim[rc] = 1.0
    return np.clip(sim, -1.0, 1.0, out=sim).astype(np.float32, copy=False)


def pixel_to_patch(
    point: Sequence[float],
    image_shape: Sequence[int],
    grid_shape: Sequence[int],
    *,
    xy: bool = False,
) -> tuple[int, int]:
    """A click on the original ``image_shape = (H, W)`` image -> the patch ``(r, c)`` of ``grid_shape`` under it.

    ``point`` is ``(row, col)`` in pixels, or ``(x, y)`` with ``xy=True`` (what GUI click events
    such as Gradio's ``evt.index`` give). Pixel ``i`` spans ``[i, i+1)``; the patch holding its
    centre is returned (the image was resized to ``(16h, 16w)``, see the module docstring).
    """
    try:
        a, b = (float(v) for v in point)
    except (TypeError, ValueError) as err:
        raise InputError(f"point must be two numbers ({'x, y' if xy else 'row, col'}), got {point!r}") from err
    row, col = (b, a) if xy else (a, b)
    try:
        H, W = (int(v) for v in image_shape)
    except (TypeError, ValueError) as err:
        raise InputError(f"image_shape must be (height, width), got {image_shape!r}") from err
    h, w = _grid(grid_shape)
    if H < 1 or W < 1:
        raise InputError(f"image_shape must be positive, got {image_shape!r}")
    if not (0 <= row < H and 0 <= col < W):
        where = f"x={col:g}, y={row:g}" if xy else f"row={row:g}, col={col:g}"
        raise InputError(f"point ({where}) is outside the {H}x{W} image (rows 0..{H - 1}, cols 0..{W - 1})")
    r = min(int(np.floor((row + 0.5) * h / H)), h - 1)
    c = min(int(np.floor((col + 0.5) * w / W)), w - 1)
    return r, c


def top_k_patches(sim_map: Any, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` highest-scoring patches of a map [h, w] as ``(row, col, score)``, best first (ties: raster order)."""
    s = _to_numpy(sim_map)
    if s.ndim != 2 or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise InputError(f"sim_map must be a numeric 2-D map [h, w], got shape {s.shape} and dtype {s.dtype}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    flat = np.where(np.isnan(s), -np.inf, s.astype(np.float64)).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i // s.shape[1]), int(i % s.shape[1]), float(s.flat[i])) for i in order]


def dense_matches(
    fa: Any,
    fb: Any,
    *,
    mask_a: Any = None,
    mask_b: Any = None,
    mutual: bool = True,
    min_score: float | None = None,
    chunk: int = 4096,
) -> np.ndarray:
    """Patch correspondences between two images -> float32 [M, 5] rows ``(ra, ca, rb, cb, score)``.

    Spec section 5, dense matching: each patch of A is matched to the argmax of cosine similarity
    over B's whole grid; a match is kept where both patches are foreground (``mask_a``, ``mask_b``),
    where it is a mutual nearest neighbour (B's argmax over A's grid points back) when ``mutual``,
    and where ``score >= min_score`` when given. Rows are in A's raster order. Similarities are
    computed ``chunk`` rows of A at a time, so memory stays O(chunk * h_b * w_b).
    """
    a, b = _features(fa, "fa"), _features(fb, "fb")  # [ha, wa, D], [hb, wb, D]
    if a.shape[-1] != b.shape[-1]:
        raise InputError(f"fa and fb have different feature widths {a.shape[-1]} and {b.shape[-1]}")
    ma, mb = _mask(mask_a, a.shape[:2], "mask_a"), _mask(mask_b, b.shape[:2], "mask_b")
    wa, wb = a.shape[1], b.shape[1]
    A = _l2_normalize(a.reshape(-1, a.shape[-1]))  # [Na, D]
    B = _l2_normalize(b.reshape(-1, b.shape[-1]))  # [Nb, D]
    best_b = np.empty(len(A), dtype=np.int64)  # A -> B argmax
    score = np.empty(len(A), dtype=np.float32)
    best_a = np.zeros(len(B), dtype=np.int64)  # B -> A argmax
    best_a_score = np.full(len(B), -np.inf, dtype=np.float32)
    chunk = max(1, int(chunk))
    for s in range(0, len(A), chunk):
        S = A[s : s + chunk] @ B.T  # [n, Nb]
        best_b[s : s + len(S)] = S.argmax(axis=1)
        score[s : s + len(S)] = S.max(axis=1)
        col_best = S.argmax(axis=0)  # [Nb]
        col_score = S[col_best, np.arange(len(B))]
        better = col_score > best_a_score  # strict: the first (raster-order) maximum wins, as argmax
        best_a[better] = col_best[better] + s
        best_a_score[better] = col_score[better]
    ia = np.arange(len(A))
    keep = np.ones(len(A), dtype=bool)
    if ma is not None:
        keep &= ma.ravel()
    if mb is not None:
        keep &= mb.ravel()[best_b]
    if mutual:
        keep &= best_a[best_b] == ia
    if min_score is not None:
        keep &= score >= min_score
    ia, ib = ia[keep], best_b[keep]
    out = np.stack([ia // wa, ia % wa, ib // wb, ib % wb, np.clip(score[keep], -1.0, 1.0)], axis=1)
    return out.astype(np.float32).reshape(-1, 5)  # [M, 5]


# ------------------------------------------------------------------------------------------ parts


def kmeans_parts(
    features: Any,
    k: int,
    *,
    masks: Any = None,
    seed: int = 0,
    normalize: bool = True,
    max_samples: int | None = 100_000,
) -> list[np.ndarray]:
    """One k-means over the (foreground) patches of all images -> one int32 label map [h, w] per image.

    Co-segmentation / part discovery: the same label means the same cluster in every image.
    Patches outside ``masks`` get label -1. With ``normalize`` the features are L2-normalised first,
    so clusters follow cosine similarity (the similarity DINO features are compared with). k-means
    is fitted on at most ``max_samples`` patches and then assigns every patch. Labels are renumbered
    by cluster size over all images (0 = largest), so they do not depend on k-means' own numbering.
    Always returns a list, also for a single [h, w, D] input.
    """
    cluster = _require("sklearn.cluster")
    feats = _feature_list(features)
    ms = _mask_list(masks, feats)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    prep = [_l2_normalize(f) if normalize else f for f in feats]  # [h, w, D] each
    x = _foreground_rows(prep, ms)  # [N, D]
    if len(x) < k:
        raise InputError(f"k-means with k={k} needs at least {k} (foreground) patches, got {len(x)}")
    if max_samples is not None and max_samples < k:
        raise InputError(f"max_samples={max_samples} is below k={k}: k-means needs at least k patches to fit")
    km = cluster.KMeans(n_clusters=int(k), n_init=4, random_state=seed)
    km.fit(_subsample(x, max_samples, seed))
    raw = km.predict(x)  # [N]
    counts = np.bincount(raw, minlength=k)
    first = np.array([np.argmax(raw == j) if counts[j] else len(raw) for j in range(k)])
    order = np.lexsort((first, -counts))  # biggest first, ties by first appearance
    relabel = np.empty(k, dtype=np.int32)
    relabel[order] = np.arange(k, dtype=np.int32)
    labels = relabel[raw]
    out, start = [], 0
    for f, m in zip(feats, ms):
        lab = np.full(f.shape[:2], -1, dtype=np.int32)  # [h, w]
        n = int(m.sum()) if m is not None else lab.size
        if m is None:
            lab[:] = labels[start : start + n].reshape(lab.shape)
        else:
            lab[m] = labels[start : start + n]
        out.append(lab)
        start += n
    return out


# --------------------------------------------------------------------------------------- pictures


def upsample(map_: Any, size: Sequence[int], *, mode: str = "bilinear") -> np.ndarray:
    """A patch-level map [h, w] or [h, w, C] -> [H, W] or [H, W, C] at the original image's ``size = (H, W)``.

    Patch ``r``'s value sits at its centre, pixel ``(r + 0.5) H/h - 0.5`` (``F.interpolate`` with
    ``align_corners=False``). ``"bilinear"`` interpolates between patch centres (constant beyond the
    outer ones) and returns float32; ``"nearest"`` gives each pixel the value of the patch holding
    its centre (blocks; the same rule as :func:`pixel_to_patch`) and keeps the dtype (labels, masks).
    """
    a = _to_numpy(map_)
    if a.ndim not in (2, 3):
        raise InputError(f"map must be [h, w] or [h, w, C], got shape {a.shape}")
    H, W = _pair(size, "size", "(height, width)")
    h, w = a.shape[:2]
    if mode == "nearest":
        rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
        return a[rows[:, None], cols[None, :]]
    if mode != "bilinear":
        raise InputError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]  # [1, C, h, w]
    up = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0]  # [C, H, W]
    return (up[0] if a.ndim == 2 else up.permute(1, 2, 0)).numpy()


def _colormap(cmap: str):
    matplotlib = _require("matplotlib")
    try:
        return matplotlib.colormaps[cmap]
    except KeyError as err:
        raise InputError(
            f"unknown colour map {cmap!r}: try 'inferno', 'viridis', 'magma', 'coolwarm' or 'gray'"
        ) from err


@functools.lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """The colour map sampled at 256 levels, uint8 [256, 3]: ``np.take`` on it colours a megapixel map in
    ~3 ms, 4x faster than calling the matplotlib map or fancy-indexing."""
    return np.ascontiguousarray(_colormap(cmap)(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3], dtype=np.uint8)


def colorize(values: Any, *, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A scalar map [h, w] -> uint8 RGB [h, w, 3] through a matplotlib colour map (no global state).

    Values are scaled from ``[vmin, vmax]`` (default: the map's finite min and max) to [0, 1] and
    clipped, so values outside the range take the end colours; NaNs are black.
    """
    v = _to_numpy(values).astype(np.float32)
    if v.ndim != 2:
        raise InputError(f"values must be a 2-D map [h, w], got shape {v.shape}")
    finite = np.isfinite(v)
    lo = float(vmin) if vmin is not None else (float(v[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(v[finite].max()) if finite.any() else 1.0)
    if hi > lo:
        t = (v - lo) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)  # 256 levels, like matplotlib's N=256 maps
        np.clip(t, 0.0, 255.0, out=t)
    else:
        t = np.zeros_like(v)
    idx = (t if finite.all() else np.where(finite, t, 0.0)).astype(np.uint8)
    rgb = np.take(_lut(cmap), idx, axis=0)  # [h, w, 3] uint8
    if not finite.all():
        rgb[~finite] = 0
    return rgb


def _image_rgb_uint8(image: Any) -> np.ndarray:
    """An image (HxW, HxWxC with C in 1/3/4, or CxHxW with C in 1/3 from dinoapp/domains readers;
    uint8, other integers or float) -> uint8 RGB [H, W, 3].

    Floats in [0, 1] are taken as they are; floats and signed integers outside it (reflectance, HU as
    stored in CT int16 pixels) are stretched per channel between their 2nd and 98th percentiles.
    Unsigned integer types are divided by their maximum.
    RGBA drops alpha; grey is repeated to RGB.
    """
    a = _to_numpy(image)
    if a.ndim == 2:
        a = a[..., None]
    elif a.ndim == 3:
        if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
        elif a.shape[-1] not in (1, 3, 4):
            raise InputError(
                f"image of shape {a.shape}: expected grey, RGB or RGBA (HxWxC) or a 1/3-band CxHxW array; "
                "for other band counts pick three bands for display, e.g. image[[3, 2, 1]]"
            )
    else:
        raise InputError(f"image must be 2-D or 3-D, got shape {a.shape}")
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == bool:
        out = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.unsignedinteger):
        out = np.round(a.astype(np.float64) / np.iinfo(a.dtype).max * 255).clip(0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.signedinteger):
        f = np.nan_to_num(a.astype(np.float32))  # signed integers (CT HU, SAR dB): stretched like floats
        if f.size and (f.min() < 0.0 or f.max() > 1.0):
            lo = np.percentile(f, 2, axis=(0, 1), keepdims=True)
            hi = np.percentile(f, 98, axis=(0, 1), keepdims=True)
            f = (f - lo) / np.maximum(hi - lo, 1e-12)
        f = f * np.float32(255.0) + np.float32(0.5)
        out = np.clip(f, 0.0, 255.0, out=f).astype(np.uint8)
    else:
        raise InputError(f"unsupported image dtype {a.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)  # [H, W, 3]


def overlay(
    image: Any,
    heat: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    mode: str = "bilinear",
) -> np.ndarray:
    """Blend a map onto an image -> uint8 RGB [H, W, 3]: ``(1 - alpha) * image + alpha * colours``.

    ``image``: HxW, HxWx{1,3,4} or CxHxW with C in {1, 3} (the domain readers' layout); uint8, other
    unsigned integers (divided by their maximum), float or signed integers (floats in [0, 1] as they are;
    values outside it, e.g. reflectance or HU, are stretched per channel between their 2nd and 98th
    percentiles).
    ``heat``: a scalar map [h, w] (coloured with ``cmap`` between ``vmin``/``vmax``) or colours
    [h, w, 3] (float in [0, 1], e.g. :func:`pca_rgb`, or uint8, e.g. :func:`labels_to_rgb`), at patch
    or pixel resolution: it is resized to the image with :func:`upsample` (``mode``; use
    ``"nearest"`` for label colours). ``alpha=0`` returns the image itself (as uint8 RGB).
    """
    img = _image_rgb_uint8(image)  # [H, W, 3]
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    hm = _to_numpy(heat)
    H, W = img.shape[:2]
    if hm.ndim == 2:
        hv = hm.astype(np.float32)
        finite = np.isfinite(hv)
        lo = vmin if vmin is not None else (float(hv[finite].min()) if finite.any() else 0.0)
        hi = vmax if vmax is not None else (float(hv[finite].max()) if finite.any() else 1.0)
        col = colorize(upsample(hv, (H, W), mode=mode), cmap=cmap, vmin=lo, vmax=hi)  # uint8 [H, W, 3]
    elif hm.ndim == 3 and hm.shape[-1] == 3:
        rgb = hm.astype(np.float32) if hm.dtype == np.uint8 else np.clip(hm.astype(np.float32), 0.0, 1.0) * 255.0
        col = upsample(rgb, (H, W), mode=mode)  # [H, W, 3] in [0, 255]
    else:
        raise InputError(f"heat must be a map [h, w] or colours [h, w, 3], got shape {hm.shape}")
    if alpha == 0.0:
        return img.copy()
    a = np.float32(alpha)
    out = img * (np.float32(1.0) - a)  # float32 [H, W, 3]
    out += a * col
    out += np.float32(0.5)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def mark_patch(
    image: Any,
    patch: Sequence[int],
    grid_shape: Sequence[int],
    *,
    color: Sequence[int] = (255, 0, 0),
    width: int = 2,
) -> np.ndarray:
    """A copy of ``image`` (as uint8 RGB [H, W, 3]) with a ``width``-pixel rectangle drawn just inside
    the pixels covered by ``patch = (r, c)`` of ``grid_shape`` (rows ``round(r H/h)`` to
    ``round((r+1) H/h)``, likewise columns)."""
    img = _image_rgb_uint8(image).copy()  # [H, W, 3]
    h, w = _grid(grid_shape)
    r, c = _patch_index(patch, (h, w))
    H, W = img.shape[:2]
    y0, y1 = int(round(r * H / h)), max(int(round((r + 1) * H / h)), int(round(r * H / h)) + 1)
    x0, x1 = int(round(c * W / w)), max(int(round((c + 1) * W / w)), int(round(c * W / w)) + 1)
    t = max(1, int(width))
    col = np.asarray(color, dtype=np.uint8)
    if col.shape != (3,):
        raise InputError(f"color must be an (R, G, B) triple, got {color!r}")
    img[y0 : min(y0 + t, y1), x0:x1] = col
    img[max(y1 - t, y0) : y1, x0:x1] = col
    img[y0:y1, x0 : min(x0 + t, x1)] = col
    img[y0:y1, max(x1 - t, x0) : x1] = col
    return img


def label_colors(n: int) -> np.ndarray:
    """``n`` distinct colours -> uint8 [n, 3]: hues stepped by the golden ratio (neighbouring labels
    far apart on the colour wheel), saturation/value alternating so that long lists stay distinguishable."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n!r}")
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.05 + i * 0.618033988749895) % 1.0
        sat, val = (0.85, 0.95) if (i // 7) % 2 == 0 else (0.55, 0.75)
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return out


def labels_to_rgb(labels: Any, colors: Any = None) -> np.ndarray:
    """A label map [h, w] (e.g. :func:`kmeans_parts`) -> uint8 RGB [h, w, 3]; negative labels (background) black.

    ``colors``: uint8 [n, 3] for labels 0..n-1 (default :func:`label_colors`).
    """
    lab = _to_numpy(labels)
    if lab.ndim != 2 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise InputError(f"labels must be an integer map [h, w], got shape {lab.shape} and dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    n = int(lab.max()) + 1 if lab.size else 0
    cols = label_colors(max(n, 0)) if colors is None else np.asarray(_to_numpy(colors), dtype=np.uint8)
    if cols.ndim != 2 or cols.shape[1] != 3 or len(cols) < n:
        raise InputError(f"colors must be [n, 3] with n >= {n} (the largest label + 1), got shape {cols.shape}")
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    fg = lab >= 0
    out[fg] = cols[lab[fg]]
    return out
