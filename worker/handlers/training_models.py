"""The four supervised model types, each as data prepared once and a network built per trial.

- classifier / regressor: an MLP on the encoded tabular features (stratified split for classes);
- autoencoder: an MLP that reconstructs the encoded features; a row's score is its reconstruction
  error, and rows scoring above the `anomaly_quantile` of the validation scores are flagged. The
  optional `target` is a 0/1 anomaly label: labelled anomalies are kept out of training and
  validation and only used to score the test part (AUROC, precision, recall, F1);
- forecaster: an LSTM over sliding windows of one series (the `target` column, in row order),
  predicting `horizon` values from `window` past ones, split chronologically, judged by MASE
  against the seasonal naive forecast.

Each exported predictor takes what a caller has (raw rows, or a raw history) and returns what it
wants (probabilities, a value, a score and a flag, a forecast), so the ONNX graph needs nothing else.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from forseti.adapters.exporters.tabular import FEATURES, preprocessing_graph, raw_inputs
from forseti.adapters.inference import ModelCard
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import TrainingConfig, TrainingTask

from .training_data import Row, fit_encoding, split
from .training_metrics import (
    CLASSIFICATION,
    REGRESSION,
    auroc_binary,
    classification_metrics,
    mase,
    precision_recall_f1,
    regression_metrics,
)

LOSSES = {
    "classification": ("cross_entropy",),
    "regression": ("mse", "l1", "huber"),
    "anomaly": ("mse",),
    "forecast": ("mse", "l1", "huber"),
}
"""Losses each task accepts; the first is the default."""
ANOMALY_METRICS = ("mse", "auroc", "precision", "recall", "f1", "anomaly_rate")
FORECAST_METRICS = ("mse", "mae", "r2", "mase")
TASKS = {"classifier": "classification", "regressor": "regression", "autoencoder": "anomaly", "forecaster": "forecast"}
"""The task each model type is."""


def _bad(message: str) -> ForsetiError:
    return ForsetiError(message, code=ErrorCode.INVALID_DATA)


@dataclass
class Split:
    """One part of the data: the network's input and loss target, the raw ONNX feeds, the truth."""

    x: np.ndarray
    """What the network (and the predictor) takes."""
    y: np.ndarray
    """What the loss compares the network's output with."""
    feeds: dict[str, np.ndarray]
    """The same rows as the exported graph takes them."""
    truth: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """What metrics compare predictions with (labels, values, anomaly flags, future values)."""


def mlp(width: int, hidden: list[int], outputs: int) -> nn.Sequential:
    """Linear layers through `hidden` with ReLU between them."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class Predictor(nn.Module):
    """Encoded features to probabilities (classifier) or the value in the target's units (regressor)."""

    def __init__(self, network: nn.Module, classifier: bool, mean: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.network, self.classifier, self.mean, self.scale = network, classifier, mean, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions."""
        out = self.network(x)
        return torch.softmax(out, dim=1) if self.classifier else out[:, 0] * self.scale + self.mean


class AnomalyScorer(nn.Module):
    """Encoded features to (reconstruction error, error above the threshold)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row mean squared reconstruction error, and whether it is an anomaly."""
        score = ((self.autoencoder(x) - x) ** 2).mean(dim=1)
        return score, score > self.threshold


class LstmNet(nn.Module):
    """A raw history (N x window) to the `horizon` future values' differences from the last one,
    in units of the series' spread: LSTM layers of the `hidden` sizes over the history relative to
    its last value, then a linear head on the last state. Working relative to the last value keeps
    the network's inputs in range when the series drifts past the levels seen in training."""

    def __init__(self, hidden: list[int], horizon: int, scale: float) -> None:
        super().__init__()
        sizes = [1, *hidden]
        self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(sizes[-1], horizon)
        self.scale = scale

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Standardised forecasts."""
        out = ((history - history[:, -1:]) / self.scale).unsqueeze(-1)
        for layer in self.layers:
            out, _ = layer(out)
        return self.head(out[:, -1, :])  # type: ignore[no-any-return]


class Forecaster(nn.Module):
    """A raw history to forecasts in the series' own units."""

    def __init__(self, network: LstmNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Forecasts."""
        out: torch.Tensor = self.network(history)
        return out * self.network.scale + history[:, -1:]


def predict(predictor: nn.Module, x: np.ndarray) -> Any:
    """The predictor's output(s) on `x` as numpy, in evaluation mode."""
    predictor.eval()
    device = next(predictor.parameters()).device
    with torch.no_grad():
        out = predictor(torch.from_numpy(x).to(device))
    return tuple(o.cpu().numpy() for o in out) if isinstance(out, tuple) else out.cpu().numpy()


class Prepared:
    """Data read, checked, encoded and split once for a model type; networks are built per trial."""

    task: str
    """classification, regression, anomaly or forecast."""
    known_metrics: tuple[str, ...]
    """What `evaluate` reports, and so what `config.metrics` may name."""
    input_name = FEATURES
    """The exported network's input."""
    output_names: tuple[str, ...] = ("prediction",)
    """The exported graph's outputs."""
    train: Split
    val: Split
    test: Split

    def build(self, config: TrainingConfig) -> tuple[nn.Module, nn.Module]:
        """A fresh (network trained on x -> y, predictor exported) pair."""
        raise NotImplementedError

    def evaluate(self, predictor: nn.Module, part: Split) -> dict[str, float]:
        """The model type's metrics of the predictor on one part."""
        raise NotImplementedError

    def calibrate(self, predictor: nn.Module) -> dict[str, float]:
        """Settle what depends on the trained weights (an autoencoder's threshold); figures to report."""
        return {}

    def preprocessing(self) -> Any | None:
        """The ONNX graph that runs before the network's, or None."""
        return None

    def card(self, predictor: nn.Module) -> ModelCard:
        """What a consumer needs to feed the exported model."""
        raise NotImplementedError

    def sidecar(self) -> str | None:
        """The encoding statistics as JSON, stored beside the model, or None."""
        return None


class Tabular(Prepared):
    """Classifier and regressor: an MLP on encoded rows."""

    def __init__(self, model_type: str, rows: list[Row], target: str, seed: int) -> None:
        self.model_type, self.task = model_type, TASKS[model_type]
        classifier = self.task == "classification"
        self.known_metrics = CLASSIFICATION if classifier else REGRESSION
        self.encoding = encoding = fit_encoding(rows, target, self.task)
        labels = encoding.labels(rows)
        parts = split(labels if classifier else None, len(rows), seed=seed, shuffle=True)
        self.train, self.val, self.test = (self._part([rows[i] for i in idx], labels[idx]) for idx in parts)

    def _part(self, rows: list[Row], labels: np.ndarray) -> Split:
        enc = self.encoding
        y = labels if self.task == "classification" else ((labels - enc.target_mean) / enc.target_scale)[:, None]
        feeds = raw_inputs(rows, enc.numeric, list(enc.categorical))
        return Split(enc.features(rows), y.astype(labels.dtype), feeds, labels)

    def build(self, config: TrainingConfig) -> tuple[nn.Module, nn.Module]:
        """An MLP and its predictor."""
        enc = self.encoding
        network = mlp(enc.width, list(config.hidden), len(enc.classes) if enc.classes else 1)
        return network, Predictor(network, self.task == "classification", enc.target_mean, enc.target_scale)

    def evaluate(self, predictor: nn.Module, part: Split) -> dict[str, float]:
        """Classification or regression metrics."""
        out = predict(predictor, part.x)
        if self.task == "classification":
            return classification_metrics(part.truth, out)
        return regression_metrics(part.truth, out)

    def preprocessing(self) -> Any:
        """Raw columns to encoded features."""
        enc = self.encoding
        return preprocessing_graph(enc.numeric, enc.means, enc.scales, enc.categorical)

    def card(self, predictor: nn.Module) -> ModelCard:
        """Columns and classes."""
        enc = self.encoding
        classes: list[str | int] = [int(c) for c in enc.classes] if enc.integer_classes else list(enc.classes)
        return ModelCard(self.model_type, enc.numeric, list(enc.categorical), classes, enc.target)

    def sidecar(self) -> str:
        """The encoding."""
        return self.encoding.to_json()


def _anomaly_labels(rows: list[Row], target: str) -> np.ndarray:
    labels = []
    for i, row in enumerate(rows):
        value = row.get(target)
        if value not in (0, 1):  # True / False compare equal to 1 / 0
            raise _bad(f"row {i}: anomaly label {target!r} must be 0 or 1 (or true / false), got {value!r}")
        labels.append(int(bool(value)))
    return np.array(labels, dtype=np.int64)


class Anomaly(Tabular):
    """Autoencoder: reconstruction error as the anomaly score."""

    output_names = ("score", "anomaly")
    known_metrics = ANOMALY_METRICS

    def __init__(self, rows: list[Row], target: str | None, config: TrainingConfig) -> None:
        self.model_type, self.task = "autoencoder", "anomaly"
        self.quantile = config.anomaly_quantile
        labels = _anomaly_labels(rows, target) if target else np.zeros(len(rows), dtype=np.int64)
        features = [{k: v for k, v in row.items() if k != target} for row in rows]
        self.encoding = fit_encoding(features, None, "anomaly")
        stratify = labels if 0 < labels.sum() < len(labels) else None
        train, val, test = split(stratify, len(rows), seed=config.seed, shuffle=True)
        normal = [i for i in train if labels[i] == 0], [i for i in val if labels[i] == 0]
        if not normal[0] or not normal[1]:
            raise _bad("an autoencoder needs rows labelled normal (0) in its training and validation parts")
        self.train, self.val, self.test = (
            self._part([features[i] for i in idx], labels[idx]) for idx in (*normal, test)
        )

    def _part(self, rows: list[Row], labels: np.ndarray) -> Split:
        enc = self.encoding
        x = enc.features(rows)
        return Split(x, x, raw_inputs(rows, enc.numeric, list(enc.categorical)), labels)

    def build(self, config: TrainingConfig) -> tuple[nn.Module, nn.Module]:
        """An MLP through the hidden sizes and back to the input width, and its scorer."""
        width, hidden = self.encoding.width, list(config.hidden)
        network = mlp(width, hidden + hidden[-2::-1], width)
        return network, AnomalyScorer(network)

    def evaluate(self, predictor: nn.Module, part: Split) -> dict[str, float]:
        """Mean reconstruction error and flag rate; with both labels present, AUROC and flag quality."""
        score, flags = predict(predictor, part.x)
        figures = {"mse": float(score.mean()), "anomaly_rate": float(flags.mean())}
        if 0 < part.truth.sum() < len(part.truth):
            precision, recall, f1 = precision_recall_f1(part.truth, flags.astype(np.int64), 1)
            figures.update(auroc=auroc_binary(part.truth, score), precision=precision, recall=recall, f1=f1)
        return figures

    def calibrate(self, predictor: nn.Module) -> dict[str, float]:
        """The threshold: the `anomaly_quantile` of the validation rows' scores."""
        score, _ = predict(predictor, self.val.x)
        threshold = float(np.quantile(score, self.quantile))
        predictor.get_buffer("threshold").fill_(threshold)
        return {"threshold": threshold}

    def card(self, predictor: nn.Module) -> ModelCard:
        """Columns and threshold."""
        enc = self.encoding
        threshold = float(predictor.get_buffer("threshold"))
        return ModelCard("autoencoder", enc.numeric, list(enc.categorical), threshold=threshold)


class Forecast(Prepared):
    """Forecaster: an LSTM over windows of one series."""

    task = "forecast"
    known_metrics = FORECAST_METRICS
    input_name = "history"
    output_names = ("forecast",)

    def __init__(self, rows: list[Row], target: str, config: TrainingConfig) -> None:
        self.target, self.window, self.horizon, self.season = target, config.window, config.horizon, config.season
        values = []
        for i, row in enumerate(rows):
            value = row.get(target)
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise _bad(f"row {i}: the series {target!r} must hold finite numbers, got {value!r}")
            values.append(float(value))
        series = np.asarray(values, dtype=np.float32)
        count = len(series) - self.window - self.horizon + 1
        too_few = _bad(f"{len(series)} values are too few for windows of {self.window} and a horizon of {self.horizon}")
        if count < 3:
            raise too_few
        train, val, test = split(None, count, seed=config.seed)
        # drop the windows whose targets overlap the part before, so no value is both learnt and judged
        val = [i for i in val if i >= train[-1] + self.horizon]
        test = [i for i in test if val and i >= val[-1] + self.horizon]
        if not val or not test:
            raise too_few
        seen = series[: train[-1] + self.window + self.horizon]
        self.history = seen
        self.scale = float(seen.std()) or 1.0
        windows = np.lib.stride_tricks.sliding_window_view(series, self.window + self.horizon)
        self.train, self.val, self.test = (self._part(windows[idx]) for idx in (train, val, test))

    def _part(self, windows: np.ndarray) -> Split:
        x = np.ascontiguousarray(windows[:, : self.window])
        future = np.ascontiguousarray(windows[:, self.window :])
        y = ((future - x[:, -1:]) / self.scale).astype(np.float32)
        return Split(x, y, {"history": x}, future)

    def build(self, config: TrainingConfig) -> tuple[nn.Module, nn.Module]:
        """An LSTM stack and its forecaster."""
        network = LstmNet(list(config.hidden), self.horizon, self.scale)
        return network, Forecaster(network)

    def evaluate(self, predictor: nn.Module, part: Split) -> dict[str, float]:
        """MSE, MAE, R^2 over every forecast step, and MASE against the seasonal naive forecast."""
        forecast = predict(predictor, part.x)
        figures = regression_metrics(part.truth.ravel(), forecast.ravel())
        figures["mase"] = mase(part.truth.ravel(), forecast.ravel(), self.history, self.season)
        return figures

    def card(self, predictor: nn.Module) -> ModelCard:
        """The series and the window."""
        return ModelCard("forecaster", target=self.target, window=self.window, horizon=self.horizon)


def prepare(task: TrainingTask, rows: list[Row]) -> Prepared:
    """The model type's preparation of the rows; invalid_task or invalid_data when they do not fit."""
    target = next((s.target for s in task.data_sources if s.target), None)
    if task.model_type == "autoencoder":
        return Anomaly(rows, target, task.config)
    if target is None:
        what = "the series" if task.model_type == "forecaster" else "the target column"
        raise ForsetiError(f"name {what} in a data source's `target`", code=ErrorCode.INVALID_TASK)
    if task.model_type == "forecaster":
        return Forecast(rows, target, task.config)
    return Tabular(task.model_type, rows, target, task.config.seed)


def loss_function(task: str, name: str | None) -> nn.Module:
    """The loss by name, defaulting to the task's usual one; invalid_task for one that does not fit."""
    chosen = name or LOSSES[task][0]
    if chosen not in LOSSES[task]:
        raise ForsetiError(
            f"loss_function {chosen!r} does not fit a {task} model; use one of {', '.join(LOSSES[task])}",
            code=ErrorCode.INVALID_TASK,
        )
    losses: dict[str, Callable[[], nn.Module]] = {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "l1": nn.L1Loss,
        "huber": nn.HuberLoss,
    }
    return losses[chosen]()
