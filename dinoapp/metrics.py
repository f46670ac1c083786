"""Evaluation metrics for heads: classification and segmentation, numpy in, plain floats and dicts out.

Argument order is scikit-learn's everywhere: ``(y_true, y_pred)`` (or ``(y_true, scores)``).
Arrays may be numpy arrays, CPU torch tensors or nested lists of any shape; they are flattened.

Segmentation metrics follow the usual semantic-segmentation convention (the one DINOv3's linear
ADE20k evaluation reports): pixels whose *true* label is ``ignore_index`` (255 = unlabelled) are
left out, IoU_k = TP / (TP + FP + FN) from a confusion matrix summed over the whole dataset (not
averaged per image), and a class that appears neither in the truth nor in the prediction has an
undefined IoU (NaN) and is left out of the mean. scikit-learn computes what it already does well
(balanced accuracy, average precision, precision/recall/F1); it is imported lazily and lives in
the ``ml`` extra.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .errors import InputError

IGNORE_INDEX = 255


def require_sklearn(module: str = "sklearn") -> ModuleType:
    """Import a scikit-learn module or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed for classic-ML heads and metrics but is not installed; "
            'install scikit-learn (with scipy) with: pip install "dinoapp[ml]"'
        ) from err


def _flat(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except ValueError:  # nested lists of different lengths
        raise InputError(f"{name} must be a numeric array, got ragged nested lists") from None
    if arr.dtype == object:
        raise InputError(f"{name} must be a numeric array, got ragged or object data")
    return arr.reshape(-1)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _flat(y_true, "y_true"), _flat(y_pred, "y_pred")
    if t.shape != p.shape:
        raise InputError(f"y_true and y_pred must have the same number of elements, got {t.size} and {p.size}")
    if t.size == 0:
        raise InputError("y_true and y_pred are empty")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of elements where the prediction equals the truth."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    t, p = _pair(y_true, y_pred)
    return float(require_sklearn("sklearn.metrics").balanced_accuracy_score(t, p))


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """[K, K] int64 counts, rows = true class, columns = predicted class.

    Elements whose true label is ``ignore_index`` are skipped (pass ``None`` to skip nothing).
    Any other label outside [0, K) is an error: in the truth it is a mislabelled mask, in the
    prediction usually swapped arguments (the order is ``(y_true, y_pred)``).
    """
    if int(n_classes) < 1:
        raise InputError(f"n_classes must be >= 1, got {n_classes}")
    K = int(n_classes)
    t, p = _pair(y_true, y_pred)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    for arr, name in ((t, "y_true"), (p, "y_pred")):
        if arr.size and (not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0)):
            raise InputError(f"{name} must hold integer class indices, got {arr.dtype} values like {arr[:3]}")
        bad = (arr < 0) | (arr >= K)
        if bad.any():
            vals = np.unique(arr[bad])[:5].tolist()
            hint = " (did you swap y_true and y_pred? the order is (y_true, y_pred))" if name == "y_pred" else ""
            raise InputError(f"{name} has labels {vals} outside [0, {K}){hint}")
    t, p = t.astype(np.int64), p.astype(np.int64)
    return np.bincount(t * K + p, minlength=K * K).reshape(K, K)


def _iou_from_cm(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def iou_per_class(y_true: Any, y_pred: Any, n_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """[K] float64 intersection over union per class; NaN for classes absent from truth and prediction."""
    return _iou_from_cm(confusion_matrix(y_true, y_pred, n_classes, ignore_index))


def mean_iou(y_true: Any, y_pred: Any, n_classes: int, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Mean of :func:`iou_per_class` over classes that occur (NaN if none does)."""
    iou = iou_per_class(y_true, y_pred, n_classes, ignore_index)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def average_precision(y_true: Any, scores: Any, *, classes: Sequence[Any] | None = None) -> float:
    """Average precision (area under the precision-recall curve, scikit-learn's step rule) from scores.

    Binary: ``y_true`` in {0, 1} (or bool) and ``scores`` [N] (higher = positive) or [N, 2].
    Multi-class: ``scores`` [N, K] (column k scores ``classes[k]``, default ``0..K-1``): the
    one-vs-rest AP of each class that has at least one positive, macro-averaged.
    """
    metrics = require_sklearn("sklearn.metrics")
    t = _flat(y_true, "y_true")
    s = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim not in (1, 2) or s.shape[0] != t.size:
        raise InputError(f"scores must be [N] or [N, K] with N = {t.size} labels, got shape {tuple(s.shape)}")
    if t.size == 0:
        raise InputError("y_true and scores are empty")
    if not np.isfinite(s).all():
        raise InputError("scores contain NaN or infinite values")
    if s.ndim == 1 or (s.shape[1] == 2 and classes is None and set(np.unique(t).tolist()) <= {0, 1}):
        pos = s if s.ndim == 1 else s[:, 1]
        tb = t.astype(bool) if t.dtype == bool else t == 1
        if not set(np.unique(t).tolist()) <= {0, 1}:
            raise InputError(f"binary average precision needs labels in {{0, 1}}, got {np.unique(t)[:5].tolist()}")
        if not tb.any():
            return math.nan
        return float(metrics.average_precision_score(tb, pos))
    cls = list(classes) if classes is not None else list(range(s.shape[1]))
    if len(cls) != s.shape[1]:
        raise InputError(f"{len(cls)} classes given for {s.shape[1]} score columns")
    aps = [metrics.average_precision_score(t == c, s[:, k]) for k, c in enumerate(cls) if (t == c).any()]
    return float(np.mean(aps)) if aps else math.nan


def _names(n: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n)]
    if len(class_names) != n:
        raise InputError(f"{len(class_names)} class names given for {n} classes")
    return [str(c) for c in class_names]


def _num(x: float) -> float | None:
    """NaN (undefined) -> None, so reports serialise as strict JSON."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def segmentation_report(
    y_true: Any,
    y_pred: Any,
    n_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU / precision / recall / pixel counts, as a JSON-ready dict.

    Undefined values (a class absent from truth and prediction) are ``None``.
    """
    names = _names(int(n_classes), class_names)
    cm = confusion_matrix(y_true, y_pred, n_classes, ignore_index)
    iou = _iou_from_cm(cm)
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(cm.sum(0) > 0, tp / np.maximum(cm.sum(0), 1), np.nan)
        rec = np.where(cm.sum(1) > 0, tp / np.maximum(cm.sum(1), 1), np.nan)
    n = int(cm.sum())
    return {
        "mean_iou": _num(float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan),
        "pixel_accuracy": _num(float(tp.sum() / n) if n else math.nan),
        "mean_recall": _num(float(np.nanmean(rec)) if np.isfinite(rec).any() else math.nan),
        "n_pixels": n,
        "per_class": {
            name: {
                "iou": _num(iou[k]),
                "precision": _num(prec[k]),
                "recall": _num(rec[k]),
                "true_pixels": int(cm[k].sum()),
                "predicted_pixels": int(cm[:, k].sum()),
            }
            for k, name in enumerate(names)
        },  # fmt: skip
        "confusion_matrix": cm.tolist(),
    }


def classification_report(
    y_true: Any,
    y_pred: Any,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    scores: Any = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support (and AP from ``scores``).

    Labels are class indices 0..K-1 (``n_classes`` defaults to max label + 1), or non-numeric labels
    (e.g. the class names a classifier's ``predict`` returns): those are numbered in sorted order of the
    labels that occur, which name the classes unless ``class_names`` is given. ``scores`` [N, K]
    (e.g. ``predict_proba``) adds one-vs-rest ``average_precision`` (macro), column k = class k.
    """
    metrics = require_sklearn("sklearn.metrics")
    t, p = _pair(y_true, y_pred)
    if t.dtype.kind not in "biuf" or p.dtype.kind not in "biuf":  # labels by name: number them
        try:
            labels, idx = np.unique(np.concatenate([t, p]), return_inverse=True)
        except TypeError as err:
            raise InputError(f"y_true and y_pred hold labels that cannot be compared ({err})") from None
        t, p = idx[: t.size].astype(np.int64), idx[t.size :].astype(np.int64)
        if class_names is None:
            class_names = [str(v) for v in labels]
        n_classes = len(labels) if n_classes is None else n_classes
    K = int(n_classes) if n_classes is not None else int(max(t.max(), p.max())) + 1
    names = _names(K, class_names)
    cm = confusion_matrix(t, p, K, ignore_index=None)
    prec, rec, f1, sup = metrics.precision_recall_fscore_support(t, p, labels=list(range(K)), zero_division=np.nan)
    out: dict[str, Any] = {
        "accuracy": accuracy(t, p),
        "balanced_accuracy": balanced_accuracy(t, p),
        "n_samples": int(t.size),
        "per_class": {
            name: {"precision": _num(prec[k]), "recall": _num(rec[k]), "f1": _num(f1[k]), "support": int(sup[k])}
            for k, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
    }
    if scores is not None:
        out["average_precision"] = _num(average_precision(t, scores))
    return out
