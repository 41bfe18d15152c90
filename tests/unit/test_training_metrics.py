"""Supervised metrics against scikit-learn's on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from forseti.worker.handlers.training_metrics import (
    auroc_binary,
    classification_metrics,
    mase,
    regression_metrics,
)


@pytest.mark.parametrize("classes", [2, 4])
def test_classification_metrics_match_scikit_learn(classes: int) -> None:
    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 400)
    logits = rng.normal(size=(400, classes)) + 1.5 * np.eye(classes)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = probabilities.argmax(axis=1)
    average = "binary" if classes == 2 else "macro"
    got = classification_metrics(y, probabilities)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert got["precision"] == pytest.approx(sk.precision_score(y, pred, average=average))
    assert got["recall"] == pytest.approx(sk.recall_score(y, pred, average=average))
    assert got["f1"] == pytest.approx(sk.f1_score(y, pred, average=average))
    expected_auroc = (
        sk.roc_auc_score(y, probabilities[:, 1])
        if classes == 2
        else sk.roc_auc_score(y, probabilities, multi_class="ovr", average="macro")
    )
    assert got["auroc"] == pytest.approx(expected_auroc)


def test_auroc_counts_ties_as_half_and_needs_both_classes() -> None:
    assert auroc_binary(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.1, 0.9])) == pytest.approx(
        sk.roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.1, 0.9])
    )
    assert np.isnan(auroc_binary(np.array([1, 1]), np.array([0.2, 0.3])))


def test_regression_metrics_match_scikit_learn_and_mase_scales_by_the_naive_forecast() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.3, size=200)
    got = regression_metrics(y, pred)
    assert got["mse"] == pytest.approx(sk.mean_squared_error(y, pred))
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(y, pred))
    assert got["r2"] == pytest.approx(sk.r2_score(y, pred))
    history = np.array([1.0, 2.0, 1.0, 2.0, 1.0])  # seasonal naive with season 2 is perfect: MAE 0
    assert mase(np.array([1.0]), np.array([1.5]), history, season=1) == pytest.approx(0.5)
    assert mase(np.array([1.0]), np.array([1.5]), history, season=2) == float("inf")
    with pytest.raises(ValueError, match="needs more than"):
        mase(np.array([1.0]), np.array([1.0]), history[:1])
