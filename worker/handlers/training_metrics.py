"""Metrics of supervised models, in numpy: what a training job reports each epoch and at the end.

Classification: accuracy, precision, recall and F1 (of the positive class for two classes, macro
averages otherwise, as scikit-learn's `average="binary"` / `"macro"`), AUROC (rank-based; one-vs-rest
macro for more classes). Regression: MSE, MAE, R^2. Forecasts: MASE against the seasonal naive
forecast of the training series.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "auroc")
REGRESSION = ("mse", "mae", "r2")


def _safe_divide(num: float, den: float) -> float:
    return num / den if den else 0.0


def precision_recall_f1(y: np.ndarray, pred: np.ndarray, positive: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of one class, from true and predicted class indices."""
    tp = float(np.sum((pred == positive) & (y == positive)))
    precision = _safe_divide(tp, float(np.sum(pred == positive)))
    recall = _safe_divide(tp, float(np.sum(y == positive)))
    return precision, recall, _safe_divide(2 * precision * recall, precision + recall)


def auroc_binary(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half)."""
    positives, negatives = int(np.sum(y == 1)), int(np.sum(y == 0))
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    # tied scores share the average of their ranks
    first = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(score)] - 1
    ranks = np.empty(len(score), dtype=np.float64)
    ranks[order] = ((starts + ends) / 2 + 1)[np.cumsum(first) - 1]
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def classification_metrics(y: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Every classification metric from true class indices and predicted class probabilities (N x C)."""
    pred = probabilities.argmax(axis=1)
    classes = probabilities.shape[1]
    metrics = {"accuracy": float(np.mean(pred == y))}
    if classes == 2:
        precision, recall, f1 = precision_recall_f1(y, pred, 1)
        auroc = auroc_binary((y == 1).astype(int), probabilities[:, 1])
    else:
        per_class = [precision_recall_f1(y, pred, c) for c in range(classes)]
        precision, recall, f1 = (float(np.mean([p[k] for p in per_class])) for k in range(3))
        scores = [auroc_binary((y == c).astype(int), probabilities[:, c]) for c in range(classes)]
        auroc = float(np.nanmean(scores)) if not all(np.isnan(scores)) else float("nan")
    metrics.update({"precision": precision, "recall": recall, "f1": f1, "auroc": auroc})
    return metrics


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MSE, MAE and R^2 (1 - residual / total sum of squares; 0 for a constant target)."""
    y, pred = y.astype(np.float64).ravel(), pred.astype(np.float64).ravel()
    residual = float(np.sum((y - pred) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "mse": residual / len(y),
        "mae": float(np.mean(np.abs(y - pred))),
        "r2": 1 - residual / total if total else 0.0,
    }


def mase(y: np.ndarray, pred: np.ndarray, history: np.ndarray, season: int = 1) -> float:
    """Mean absolute scaled error: the forecast's MAE over the in-sample MAE of the seasonal naive
    forecast (each value predicted by the one `season` steps before) on the training series."""
    if len(history) <= season:
        raise ValueError(f"MASE needs more than {season} training values")
    naive = float(np.mean(np.abs(history[season:] - history[:-season])))
    return float(np.mean(np.abs(y - pred))) / naive if naive else float("inf")


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "classification": classification_metrics,
    "regression": regression_metrics,
}
"""The metric family of each task."""
