"""Tabular training data: rows from CSV, JSONL, Parquet or inline, encoded into a float matrix.

The first piece of the supervised training handler (issue 5): it reads and checks the data and
learns the encoding whose statistics travel with the model (means and scales of numeric columns,
the categories of text columns, the classes of a classifier's target). Every problem a user can
cause fails with a specific code before any training: invalid_path for a file outside the data root
or missing, invalid_data for an empty file, a missing target column, a target that does not fit the
model type, or a text column with too many distinct values to encode.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import DataSource
from forseti.worker.engine.inputs import Inputs, jsonl_objects

Cell = str | float | int | bool | None
Row = dict[str, Cell]
MAX_CATEGORIES = 256
"""Distinct values a text column may have to be one-hot encoded."""
SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


def _bad(message: str) -> ForsetiError:
    return ForsetiError(message, code=ErrorCode.INVALID_DATA)


def _csv_cell(text: str) -> Cell:
    """A CSV field as a number when it reads as one, None when empty, else the text."""
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_rows(source: DataSource, inputs: Inputs) -> list[Row]:
    """The rows of one source: inline, or a CSV / JSONL / Parquet file under the inputs' root."""
    if source.rows is not None:
        rows: list[Row] = [dict(row) for row in source.rows]
        where = "inline rows"
    else:
        path = inputs.resolve(source.uri or "", what="data source")
        if path.suffix not in SUFFIXES:
            raise _bad(f"{path.name}: unknown format; use {', '.join(SUFFIXES)}")
        rows = list(read_file(path))
        where = path.name
    if not rows:
        raise _bad(f"{where}: no rows")
    return rows


def read_file(path: Path) -> Iterable[Row]:
    """The rows of a CSV, Parquet or JSON Lines file (by its suffix)."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                yield {key: _csv_cell(value or "") for key, value in row.items() if key is not None}
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        for _, row in jsonl_objects(path):
            yield row


def _is_number(value: Cell) -> bool:
    """A finite number (booleans count as 0 / 1)."""
    return isinstance(value, int | float) and math.isfinite(value)


def _is_whole(value: Cell) -> bool:
    """A whole number, not a boolean (1, 1.0, -3; not 1.5, not True)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and _is_number(value) and value % 1 == 0


def class_name(value: Cell) -> str:
    """A target value as the name of its class: a whole number without its '.0', anything else as text."""
    return str(int(value)) if isinstance(value, int | float) and _is_whole(value) else str(value)


def _missing(value: Cell) -> bool:
    """Empty, or a number that is not finite (NaN in a CSV): imputed for features, refused as a target."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


@dataclass
class Encoding:
    """How raw rows become model inputs, learned on the training data; saved beside the model."""

    target: str
    task: str
    """classification, regression or anomaly (an autoencoder's, with no target)."""
    numeric: list[str] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    """A classifier's target values, as text, in label order."""
    integer_classes: bool = False
    """True when every target value is a whole number: the classes are told as integers, in numeric
    order (a CSV reader may give 1 as 1.0; the class is 1, not '1.0')."""
    target_mean: float = 0.0
    target_scale: float = 1.0
    """A regressor's target is learnt standardised with these and predicted back in its own units."""

    @property
    def width(self) -> int:
        """Columns of the encoded feature matrix."""
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    def features(self, rows: list[Row]) -> np.ndarray:
        """Standardised numeric columns (missing values at the mean), then one-hot text columns
        (an unseen or missing value is all zeros)."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        # float32 throughout, step for step as the exported ONNX graph computes it, so the model sees
        # the same inputs in training as in deployment
        for j, (name, mean, scale) in enumerate(zip(self.numeric, self.means, self.scales, strict=True)):
            values = [row.get(name) for row in rows]
            column = np.array([v if _is_number(v) else mean for v in values], dtype=np.float32)
            out[:, j] = (column - np.float32(mean)) / np.float32(scale)
        offset = len(self.numeric)
        for name, categories in self.categorical.items():
            index = {c: i for i, c in enumerate(categories)}
            for r, row in enumerate(rows):
                i = index.get(str(row.get(name)))
                if i is not None:
                    out[r, offset + i] = 1.0
            offset += len(categories)
        return out

    def labels(self, rows: list[Row]) -> np.ndarray:
        """The target: class indices for a classifier, float32 values for a regressor."""
        values = [row.get(self.target) for row in rows]
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return np.array([index[class_name(v)] for v in values], dtype=np.int64)
        return np.array(values, dtype=np.float32)

    def to_json(self) -> str:
        """The encoding as JSON, to store beside the model."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Encoding:
        """An encoding stored with `to_json`."""
        return cls(**json.loads(text))


def fit_encoding(rows: list[Row], target: str | None, task: str) -> Encoding:
    """Learn the encoding of `rows` for predicting `target` (classification or regression), or of
    every column (an autoencoder's, with no target)."""
    # the order the data gives its columns (a CSV's header, a row's keys) is the order the exported
    # graph takes them: a consumer feeds rows as they come, as scikit-learn and skl2onnx do
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if target is None:
        encoding = Encoding(target="", task=task)
        _fit_features(encoding, rows, columns)
        return encoding
    if target not in columns:
        raise _bad(f"target column {target!r} is not in the data (columns: {', '.join(columns)})")
    targets = [row.get(target) for row in rows]
    if any(_missing(v) for v in targets):
        raise _bad(f"target column {target!r} has {sum(_missing(v) for v in targets)} empty or non-finite values")
    encoding = Encoding(target=target, task=task)
    if task == "regression":
        wrong = [v for v in targets if not _is_number(v)]
        if wrong:
            raise _bad(f"target column {target!r} must be numeric for a regressor; found {wrong[0]!r}")
        numbers = np.array(targets, dtype=np.float64)
        encoding.target_mean, encoding.target_scale = float(numbers.mean()), float(numbers.std()) or 1.0
    else:
        encoding.integer_classes = all(_is_whole(v) for v in targets)
        names = {class_name(v) for v in targets}
        encoding.classes = sorted(names, key=int) if encoding.integer_classes else sorted(names)
        if len(encoding.classes) < 2:
            raise _bad(f"target column {target!r} has one class ({encoding.classes[0]!r}); a classifier needs two")
    _fit_features(encoding, rows, columns)
    return encoding


def _fit_features(encoding: Encoding, rows: list[Row], columns: list[str]) -> None:
    target = encoding.target
    for name in columns:
        if name == target:
            continue
        values = [v for v in (row.get(name) for row in rows) if not _missing(v)]
        if not values:
            continue  # an all-empty column carries nothing
        if all(_is_number(v) for v in values):
            column = np.array(values, dtype=np.float64)
            encoding.numeric.append(name)
            encoding.means.append(float(column.mean()))
            encoding.scales.append(float(column.std()) or 1.0)
        else:
            categories = sorted(Counter(str(v) for v in values))
            if len(categories) > MAX_CATEGORIES:
                raise _bad(
                    f"column {name!r} has {len(categories)} distinct text values; at most {MAX_CATEGORIES} "
                    "can be one-hot encoded (drop it, or make it numeric)"
                )
            encoding.categorical[name] = categories
    if encoding.width == 0:
        raise _bad(f"no feature columns besides the target {target!r}" if target else "no feature columns")


def split(
    labels: np.ndarray | None,
    n: int,
    *,
    fractions: tuple[float, float] = (0.15, 0.15),
    seed: int = 0,
    shuffle: bool = False,
) -> tuple[list[int], list[int], list[int]]:
    """Train / validation / test row indices. With class `labels`, stratified: each class is split in
    the same proportions. Without, chronological: the rows keep their order (validation after
    training, test last), as time series must; or, with `shuffle`, a random split."""
    val_share, test_share = fractions
    if labels is None:
        n_test, n_val = max(1, round(n * test_share)), max(1, round(n * val_share))
        cut = n - n_val - n_test
        if cut < 1:
            raise _bad(f"{n} rows are too few to split into training, validation and test data")
        order = list(range(n))
        if shuffle:
            random.Random(seed).shuffle(order)
        return sorted(order[:cut]), sorted(order[cut : cut + n_val]), sorted(order[cut + n_val :])
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = [i for i in range(n) if labels[i] == label]
        rng.shuffle(members)
        n_test, n_val = round(len(members) * test_share), round(len(members) * val_share)
        test += members[:n_test]
        val += members[n_test : n_test + n_val]
        train += members[n_test + n_val :]
    if not train or not val or not test:
        raise _bad(f"{n} rows are too few to split into training, validation and test data")
    return sorted(train), sorted(val), sorted(test)
