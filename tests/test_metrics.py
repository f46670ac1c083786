"""Metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dinoapp.errors import InputError
from dinoapp.metrics import (
    accuracy,
    average_precision,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    segmentation_report,
)


def test_accuracy_and_balanced_accuracy_by_hand():
    y_true = [0, 0, 0, 1]
    y_pred = [0, 0, 1, 1]
    assert accuracy(y_true, y_pred) == pytest.approx(0.75)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1) / 2)  # mean recall
    assert balanced_accuracy(torch.tensor(y_true), np.array(y_pred)) == pytest.approx(5 / 6)


def test_confusion_matrix_skips_ignored_truth():
    y_true = np.array([[0, 0, 1], [1, 255, 2]])
    y_pred = np.array([[0, 1, 1], [1, 0, 0]])
    cm = confusion_matrix(y_true, y_pred, 3)
    want = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])  # rows truth, columns prediction
    np.testing.assert_array_equal(cm, want)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true[y_true != 255], y_pred[y_true != 255]))


def test_iou_with_ignore_and_absent_classes_by_hand():
    y_true = [0, 0, 1, 1, 255]
    y_pred = [0, 1, 1, 1, 2]  # the 2 sits on an ignored pixel: class 2 never counts
    iou = iou_per_class(y_true, y_pred, 4)
    assert iou[0] == pytest.approx(1 / 2)  # TP 1, FN 1
    assert iou[1] == pytest.approx(2 / 3)  # TP 2, FP 1
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # absent from truth and prediction
    assert mean_iou(y_true, y_pred, 4) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_predicted_but_absent_from_truth_scores_zero():
    iou = iou_per_class([0, 0, 0, 0], [0, 0, 3, 3], 4)
    assert iou[0] == pytest.approx(0.5) and iou[3] == 0.0
    assert mean_iou([0, 0, 0, 0], [0, 0, 3, 3], 4) == pytest.approx(0.25)


def test_mean_iou_matches_sklearn_jaccard_on_random_maps():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, (3, 40, 50))
    p = np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 5, t.shape))
    t[rng.random(t.shape) < 0.1] = 255
    keep = t != 255
    want = skm.jaccard_score(t[keep], p[keep], average=None, labels=range(5))
    np.testing.assert_allclose(iou_per_class(t, p, 5), want)
    assert mean_iou(t, p, 5) == pytest.approx(want.mean())


def test_all_ignored_gives_nan():
    assert math.isnan(mean_iou([255, 255], [0, 1], 2))


def test_swapped_arguments_and_bad_labels_are_named():
    with pytest.raises(InputError, match="swap"):
        confusion_matrix([0, 1, 1], [0, 1, 255], 2)  # predictions passed as truth
    with pytest.raises(InputError, match="y_true has labels \\[7\\]"):
        confusion_matrix([0, 7], [0, 1], 2)
    with pytest.raises(InputError, match="same number"):
        accuracy([0, 1], [0])


def test_average_precision_binary_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 0.8, 200)
    want = skm.average_precision_score(y, s)
    assert average_precision(y, s) == pytest.approx(want)
    assert average_precision(y.astype(bool), np.stack([-s, s], 1)) == pytest.approx(want)  # [N, 2] scores
    assert math.isnan(average_precision(np.zeros(5), np.arange(5.0)))  # no positives: undefined


def test_average_precision_multiclass_is_macro_one_vs_rest():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    y[y == 3] = 0  # class 3 has no positives: left out of the macro mean
    scores = rng.random((300, 4)) + 0.8 * np.eye(4)[y]
    want = np.mean([skm.average_precision_score(y == k, scores[:, k]) for k in range(3)])
    assert average_precision(y, scores) == pytest.approx(want)
    names = np.array(["a", "b", "c", "d"])
    assert average_precision(names[y], scores, classes=names) == pytest.approx(want)


def test_segmentation_report_is_strict_json_and_consistent():
    y_true = np.array([0, 0, 1, 1, 255])
    y_pred = np.array([0, 1, 1, 1, 2])
    r = segmentation_report(y_true, y_pred, 3, class_names=["bg", "field", "water"])
    assert r["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)
    assert r["n_pixels"] == 4
    assert r["per_class"]["water"]["iou"] is None  # absent: undefined, not 0
    assert r["per_class"]["field"] == {"iou": pytest.approx(2 / 3), "precision": pytest.approx(2 / 3),
                                       "recall": 1.0, "true_pixels": 2, "predicted_pixels": 3}  # fmt: skip
    json.dumps(r, allow_nan=False)
    with pytest.raises(InputError, match="class names"):
        segmentation_report(y_true, y_pred, 3, class_names=["a"])


def test_classification_report_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    proba = rng.dirichlet(np.ones(3), 120) + np.eye(3)[y]
    pred = proba.argmax(1)
    r = classification_report(y, pred, 3, class_names=["a", "b", "c"], scores=proba)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    p, rc, f1, sup = skm.precision_recall_fscore_support(y, pred)
    assert r["per_class"]["b"]["precision"] == pytest.approx(p[1])
    assert r["per_class"]["c"]["f1"] == pytest.approx(f1[2])
    assert r["per_class"]["a"]["support"] == sup[0]
    assert r["average_precision"] == pytest.approx(average_precision(y, proba))
    np.testing.assert_array_equal(r["confusion_matrix"], skm.confusion_matrix(y, pred))
    json.dumps(r, allow_nan=False)
