"""The preprocessing of tabular models as an ONNX graph, so an exported model takes raw rows.

A supervised model's encoding (`worker/handlers/training_data.Encoding`: means and scales of the
numeric columns, categories of the text columns) becomes an ONNX graph with two inputs, `numeric`
(float32, N x numeric columns, NaN for a missing value) and `categorical` (string, N x text
columns), and one output, `features` (float32, N x width), equal to `Encoding.features` on the same
rows. The trained network's graph is then composed after it (`onnx.compose.merge_models`), so an
edge device needs nothing but onnxruntime and the raw values. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURES = "features"
"""The output of the preprocessing graph, and the input the network's graph must take."""
OPSET = 17
ML_OPSET = 3


def preprocessing_graph(
    numeric: list[str], means: list[float], scales: list[float], categorical: dict[str, list[str]]
) -> Any:
    """An ONNX model from raw columns to the encoded feature matrix (see the module docstring).
    A missing number becomes the column mean (0 after scaling); an unseen or missing text value
    becomes all zeros, as in `Encoding.features`."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inputs: list[Any] = []
    initializers: list[Any] = []
    parts: list[str] = []

    def const(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    if numeric:
        inputs.append(helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", len(numeric)]))
        mean = const("mean", np.array(means, dtype=np.float32))
        scale = const("scale", np.array(scales, dtype=np.float32))
        nodes += [
            helper.make_node("IsNaN", ["numeric"], ["numeric_missing"]),
            helper.make_node("Where", ["numeric_missing", mean, "numeric"], ["numeric_filled"]),
            helper.make_node("Sub", ["numeric_filled", mean], ["numeric_centred"]),
            helper.make_node("Div", ["numeric_centred", scale], ["numeric_scaled"]),
        ]
        parts.append("numeric_scaled")
    if categorical:
        inputs.append(helper.make_tensor_value_info("categorical", TensorProto.STRING, ["N", len(categorical)]))
        for j, (name, categories) in enumerate(categorical.items()):
            column, index, hot = f"cat{j}_column", f"cat{j}_index", f"cat{j}_hot"
            nodes += [
                helper.make_node(
                    "Gather", ["categorical", const(f"cat{j}_at", np.array([j], dtype=np.int64))], [column], axis=1
                ),
                helper.make_node(
                    "LabelEncoder",
                    [column],
                    [index],
                    domain="ai.onnx.ml",
                    keys_strings=list(categories),
                    values_int64s=list(range(len(categories))),
                    default_int64=-1,
                    name=f"encode_{name}",
                ),
                # one-hot by comparison with 0..m-1, so that -1 (unseen) matches nothing
                helper.make_node(
                    "Equal", [index, const(f"cat{j}_range", np.arange(len(categories), dtype=np.int64))], [hot]
                ),
                helper.make_node("Cast", [hot], [f"cat{j}_float"], to=TensorProto.FLOAT),
            ]
            parts.append(f"cat{j}_float")
    nodes.append(helper.make_node("Concat", parts, [FEATURES], axis=1))
    width = len(numeric) + sum(len(c) for c in categorical.values())
    graph = helper.make_graph(
        nodes,
        "forseti_preprocessing",
        inputs,
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", width])],
        initializer=initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="forseti",
    )


def raw_inputs(rows: list[dict[str, Any]], numeric: list[str], categorical: list[str]) -> dict[str, np.ndarray]:
    """The graph's inputs for rows: numbers (NaN where missing or not a number) and text values."""
    feeds: dict[str, np.ndarray] = {}
    if numeric:
        feeds["numeric"] = np.stack([_numbers([row.get(name) for row in rows]) for name in numeric], axis=1).reshape(
            len(rows), len(numeric)
        )
    if categorical:
        feeds["categorical"] = np.array(
            [[str(row.get(name)) for name in categorical] for row in rows],
            dtype=object,
        ).reshape(len(rows), len(categorical))
    return feeds


def _numbers(values: list[Any]) -> np.ndarray:
    """A column as the graph's float32: NaN (imputed in the graph) wherever a cell is not a finite number."""
    column = np.asarray(values)
    if column.dtype.kind in "fiub":  # only numbers (and booleans): at numpy's speed
        column = column.astype(np.float64)
    else:  # text or None among them: cell by cell, as `Encoding.features` reads them
        column = np.array([_number(v) for v in values], dtype=np.float64)
    column[~np.isfinite(column)] = np.nan
    return column.astype(np.float32)


def _number(value: Any) -> float:
    """A cell as the graph's float: NaN (imputed in the graph) unless it is a finite number."""
    if isinstance(value, int | float) and np.isfinite(value):
        return float(value)
    return float("nan")
