"""Tabular data for supervised training: reading CSV / JSONL / Parquet / inline rows under the data
root, the encoding that travels with a model, the splits, and every bad input's error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forseti.schemas.errors import ForsetiError
from forseti.schemas.tasks import DataSource
from forseti.worker.engine.inputs import Inputs
from forseti.worker.handlers.training_data import Encoding, fit_encoding, read_rows, split

ROWS: list[dict[str, Any]] = [
    {"size": float(i), "colour": ["red", "green", "blue"][i % 3], "label": "big" if i > 5 else "small"}
    for i in range(12)
]


def write(root: Path, name: str) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".csv"):
        path.write_text("size,colour,label\n" + "".join(f"{r['size']},{r['colour']},{r['label']}\n" for r in ROWS))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return f"file://{name}"


@pytest.mark.parametrize("name", ["d/rows.csv", "d/rows.jsonl", "d/rows.parquet"])
def test_every_format_reads_to_the_same_rows(tmp_path: Path, name: str) -> None:
    rows = read_rows(DataSource(uri=write(tmp_path, name), target="label"), Inputs(tmp_path))
    assert rows == ROWS


def test_the_encoding_standardises_numbers_one_hots_text_and_survives_json() -> None:
    encoding = fit_encoding(ROWS, "label", "classification")
    assert (encoding.numeric, list(encoding.categorical), encoding.classes) == (["size"], ["colour"], ["big", "small"])
    features = encoding.features(ROWS)
    assert features.shape == (12, 4)
    assert abs(features[:, 0].mean()) < 1e-6
    assert abs(features[:, 0].std() - 1) < 1e-6
    assert features[:, 1:].sum(axis=1).tolist() == [1.0] * 12
    unseen = encoding.features([{"size": None, "colour": "purple"}])
    assert unseen.tolist() == [[0.0, 0.0, 0.0, 0.0]], "missing number at the mean, unseen category all zeros"
    assert encoding.labels(ROWS).tolist() == [1] * 6 + [0] * 6
    again = Encoding.from_json(encoding.to_json())
    assert np.array_equal(again.features(ROWS), features)


@pytest.mark.parametrize(
    ("source", "target", "task", "words"),
    [
        ({"uri": "file:///etc/passwd"}, "label", "classification", "outside the data root"),
        ({"uri": "file://absent.csv"}, "label", "classification", "nothing at"),
        ({"uri": "file://empty.csv"}, "label", "classification", "no rows"),
        ({"uri": "file://notes.txt"}, "label", "classification", "unknown format"),
        ({"rows": ROWS}, "price", "regression", "target column 'price' is not in the data"),
        ({"rows": ROWS}, "label", "regression", "must be numeric for a regressor"),
        ({"rows": [{"x": 1, "label": "a"}, {"x": 2, "label": "a"}]}, "label", "classification", "one class"),
        ({"rows": [{"id": f"u{i}", "y": i} for i in range(300)]}, "y", "regression", "300 distinct text values"),
        ({"rows": [{"x": 1, "y": None}]}, "y", "regression", "empty or non-finite"),
    ],
)
def test_bad_data_fails_with_a_specific_code(
    tmp_path: Path, source: dict[str, Any], target: str, task: str, words: str
) -> None:
    (tmp_path / "empty.csv").write_text("size,colour,label\n")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ForsetiError) as caught:
        fit_encoding(read_rows(DataSource(**source, target=target), Inputs(tmp_path)), target, task)
    assert words in caught.value.message
    expected = "invalid_path" if "root" in words or "nothing" in words else "invalid_data"
    assert caught.value.code == expected


def test_stratified_split_keeps_class_shares_and_chronological_split_keeps_order() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    train, val, test = split(labels, 100, seed=3)
    assert sorted(train + val + test) == list(range(100))
    for part in (train, val, test):
        share = labels[part].mean()
        assert 0.15 <= share <= 0.25, "each part keeps about the 20% minority share"
    train, val, test = split(None, 100)
    assert (train[-1], val[0], val[-1], test[0], test[-1]) == (69, 70, 84, 85, 99)
    with pytest.raises(ForsetiError, match="too few"):
        split(None, 2)


def test_the_onnx_preprocessing_graph_computes_what_the_encoding_does() -> None:
    import onnx
    import onnxruntime as ort

    from forseti.adapters.exporters.tabular import preprocessing_graph, raw_inputs

    rows = [*ROWS, {"size": None, "colour": "purple"}, {"size": float("inf"), "colour": None}, {"size": True}]
    encoding = fit_encoding(ROWS, "label", "classification")
    graph = preprocessing_graph(encoding.numeric, encoding.means, encoding.scales, encoding.categorical)
    onnx.checker.check_model(graph, full_check=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, raw_inputs(rows, encoding.numeric, list(encoding.categorical)))
    assert got.shape == (15, 4)
    assert np.abs(got - encoding.features(rows)).max() < 1e-6
