"""Exported supervised models at inference time, with nothing but numpy and onnxruntime.

A training job writes `model.onnx` with the card in its metadata (`forseti.card`: model type, input
columns, classes, threshold, window) and, beside it, the same card as `model.json`. `OnnxModel`
reads the card (from the file itself when it is there) and turns raw rows into predictions;
`ModelCache` keeps sessions per model so that a batch job, the streaming service and an edge device
pay the load once. `OnnxPolicy` does the same for an exported RL policy (observations in, actions
out). Torch-free on purpose: this is what runs where PyTorch is absent.

Predictions, one per row:
- classifier: `{"label": <class>, "probabilities": {<class>: p, ...}}`;
- regressor: the value;
- autoencoder: `{"score": <reconstruction error>, "anomaly": <score above the threshold>}`;
- forecaster: the rows are the series in time order; row i gets the `horizon` values that follow it,
  forecast from the `window` values ending at it (None while fewer than `window` values are known).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forseti.schemas.errors import ErrorCode, ForsetiError

from .exporters.tabular import raw_inputs

CARD = "model.json"
"""The card's file name, beside the ONNX file."""
POLICY_KEY = "forseti.policy"
"""The ONNX metadata key that carries an RL policy's description (spaces, algorithm) inside its file."""
CARD_KEY = "forseti.card"
"""The ONNX metadata key that carries the card inside the model file, for consumers that get the file alone."""
MODEL_TYPES = ("classifier", "regressor", "autoencoder", "forecaster")


@dataclass(frozen=True)
class ModelCard:
    """What a consumer must know to feed an exported model and read its outputs."""

    model_type: str
    """classifier, regressor, autoencoder or forecaster."""
    numeric: list[str] = field(default_factory=list)
    """Numeric input columns, in the graph's order."""
    categorical: list[str] = field(default_factory=list)
    """Text input columns, in the graph's order."""
    classes: list[str | int] = field(default_factory=list)
    """A classifier's classes, in the order of its probabilities: integers when the training target
    was whole numbers, else text."""
    target: str | None = None
    """The column the model predicts (a forecaster's series)."""
    threshold: float | None = None
    """An autoencoder's reconstruction error above which a row is an anomaly."""
    window: int = 0
    """A forecaster's input length."""
    horizon: int = 0
    """A forecaster's output length."""

    def to_json(self) -> str:
        """The card as JSON."""
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def parse(cls, text: str, where: str) -> ModelCard:
        """A card from its JSON; invalid_model when it does not describe a model."""
        try:
            card = cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ForsetiError(f"model card of {where} cannot be read: {exc}", code=ErrorCode.INVALID_MODEL) from exc
        if card.model_type not in MODEL_TYPES:
            raise ForsetiError(
                f"model card of {where}: unknown model_type {card.model_type!r}", code=ErrorCode.INVALID_MODEL
            )
        return card

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """The card stored at `path`; invalid_model when it is missing or unreadable."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ForsetiError(f"model card {path} cannot be read: {exc}", code=ErrorCode.INVALID_MODEL) from exc
        return cls.parse(text, str(path))


def _session(onnx_path: Path, threads: int) -> Any:
    """An onnxruntime CPU session on `threads` cores; invalid_model when the file is missing or does not load."""
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise ForsetiError(f"{onnx_path} does not exist", code=ErrorCode.INVALID_MODEL)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise ForsetiError(f"{onnx_path} does not load: {exc}", code=ErrorCode.INVALID_MODEL) from exc


class OnnxModel:
    """One exported model in an onnxruntime session."""

    def __init__(self, onnx_path: Path, *, threads: int = 1) -> None:
        self.path = onnx_path
        self.session = _session(onnx_path, threads)
        embedded = self.session.get_modelmeta().custom_metadata_map.get(CARD_KEY)
        self.card = ModelCard.parse(embedded, str(onnx_path)) if embedded else ModelCard.read(onnx_path.with_name(CARD))
        self._columns = [*self.card.numeric, *self.card.categorical]
        self._known = frozenset(self._columns)
        # onnxruntime sessions are safe to run from several threads; the lock only keeps one batch at a
        # time, so `threads` bounds the cores a model takes
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for prepared inputs."""
        with self._lock:
            return list(self.session.run(None, feeds))

    def predict(self, rows: list[dict[str, Any]], *, batch_size: int = 65_536) -> list[Any]:
        """One prediction per row (see the module docstring for their shapes)."""
        if self.card.model_type == "forecaster":
            return self._forecast(rows)
        self._check_columns(rows)
        outputs: list[Any] = []
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            produced = self.run(raw_inputs(part, self.card.numeric, self.card.categorical))
            outputs += self._shape(produced)
        return outputs

    def _check_columns(self, rows: list[dict[str, Any]]) -> None:
        """invalid_data for a row that gives none of the model's columns: every value would be imputed,
        and the answer would be the model's guess for an average row, not for this one."""
        columns = self._columns
        for i, row in enumerate(rows):
            if self._known.isdisjoint(row):
                shown = ", ".join(columns[:5]) + (f", ... ({len(columns)} in all)" if len(columns) > 5 else "")
                given = ", ".join(map(str, list(row)[:5])) or "nothing"
                raise ForsetiError(
                    f"row {i} gives none of the model's columns ({shown}); it gives {given}",
                    code=ErrorCode.INVALID_DATA,
                )

    def predict_many(self, requests: list[list[dict[str, Any]]]) -> list[list[Any]]:
        """Predictions for several independent requests from one onnxruntime call (a forecaster's
        requests are separate series: their windows are stacked, never their rows)."""
        if self.card.model_type != "forecaster":
            flat = self.predict([row for rows in requests for row in rows], batch_size=max(1, sum(map(len, requests))))
            return _cut(flat, [len(rows) for rows in requests])
        windows = [self._windows(rows) for rows in requests]
        stacked = [w for w in windows if len(w)]
        forecast = self.run({"history": np.concatenate(stacked)})[0] if stacked else np.zeros((0, self.card.horizon))
        per_request = _cut(list(forecast), [len(w) for w in windows])
        lead = self.card.window - 1
        return [
            [None] * min(len(rows), lead) + [[float(v) for v in step] for step in steps]
            for rows, steps in zip(requests, per_request, strict=True)
        ]

    def _shape(self, produced: list[np.ndarray]) -> list[Any]:
        kind = self.card.model_type
        if kind == "classifier":
            (probabilities,) = produced
            classes = self.card.classes
            return [
                {
                    "label": classes[int(p.argmax())],
                    "probabilities": {str(c): float(v) for c, v in zip(classes, p, strict=True)},
                }
                for p in probabilities
            ]
        if kind == "regressor":
            return [float(v) for v in produced[0]]
        score, anomaly = produced
        return [{"score": float(s), "anomaly": bool(a)} for s, a in zip(score, anomaly, strict=True)]

    def _forecast(self, rows: list[dict[str, Any]]) -> list[Any]:
        return self.predict_many([rows])[0]

    def _windows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """The series of `rows` as its sliding windows (N - window + 1 of them, or none)."""
        target, window = self.card.target or "", self.card.window
        values = []
        for i, row in enumerate(rows):
            value = row.get(target)
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise ForsetiError(
                    f"row {i}: {target!r} must be a finite number, got {value!r}", code=ErrorCode.INVALID_DATA
                )
            values.append(float(value))
        series = np.asarray(values, dtype=np.float32)
        if len(series) < window:
            return np.zeros((0, window), dtype=np.float32)
        return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(series, window))


def _cut(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """`items` in consecutive pieces of `sizes`."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


class OnnxPolicy:
    """An exported RL policy in an onnxruntime session: observations in, the deterministic actions out,
    exactly as `model.predict(obs, deterministic=True)` gave them when it was trained."""

    def __init__(self, onnx_path: Path, *, threads: int = 1) -> None:
        self.path = onnx_path
        self.session = _session(onnx_path, threads)
        text = self.session.get_modelmeta().custom_metadata_map.get(POLICY_KEY)
        sidecar = onnx_path.with_name("policy.json")
        if text is None and sidecar.is_file():
            text = sidecar.read_text()
        if text is None:
            raise ForsetiError(f"{onnx_path} carries no policy description", code=ErrorCode.INVALID_MODEL)
        self.description: dict[str, Any] = json.loads(text)
        """Algorithm, environment, observation and action spaces (the export's policy.json)."""
        self.observation_shape = tuple(self.description["observation_space"]["shape"])
        self.dtype = np.dtype(self.description["observation_space"].get("dtype", "float32"))

    def act(self, observations: Any) -> np.ndarray:
        """Actions for a batch of observations (each of the observation space's shape, or flattened)."""
        batch = np.asarray(observations, dtype=self.dtype)
        size = int(np.prod(self.observation_shape))
        if batch.size % max(size, 1) or not np.all(np.isfinite(batch)):
            raise ForsetiError(
                f"observations must be finite, {size} values each (shape {list(self.observation_shape)})",
                code=ErrorCode.INVALID_DATA,
            )
        batch = batch.reshape((-1, *self.observation_shape))
        (actions,) = self.session.run(None, {"observation": batch})
        return np.asarray(actions)


class ModelCache:
    """Loaded models by key (a registry id), least recently used dropped beyond `size`."""

    def __init__(self, size: int = 16, *, threads: int = 1) -> None:
        self.size, self.threads = size, threads
        self._models: OrderedDict[str, OnnxModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        """Sessions created so far (a cache hit creates none)."""

    def get(self, key: str, onnx_path: Path) -> OnnxModel:
        """The model under `key`, loading `onnx_path` when it is not held (or the path changed)."""
        with self._lock:
            model = self._models.get(key)
            if model is not None and model.path == onnx_path:
                self._models.move_to_end(key)
                return model
        loaded = OnnxModel(onnx_path, threads=self.threads)
        with self._lock:
            self.loads += 1
            self._models[key] = loaded
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return loaded
