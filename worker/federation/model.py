"""A federation's model: a multilayer perceptron, built the same way on the coordinator and on agents.

The coordinator draws the initial weights (torch's default initialisation under the federation's seed),
and exports each consolidated version to ONNX from the weights alone: the preprocessing graph of a
tabular model (`adapters/exporters/tabular.py`: NaN to the mean, then scaled) followed by the network
and a softmax, with the model card inside the file, so `forseti edge` and `infer-serve` load it as
they load a supervised model. Agents build the torch module from the same description to train it
(`LocalTrainer`); that part needs torch (`forseti[federated]`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forseti.adapters.exporters.tabular import FEATURES, preprocessing_graph, raw_inputs
from forseti.adapters.inference import CARD_KEY, ModelCard
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.federation import FederatedModel, LocalTraining

from ..handlers.training_data import class_name
from .tensors import Layout, Params

PROBABILITIES = "probabilities"


def network(model: FederatedModel) -> Any:
    """The torch module of `model`: Linear and ReLU layers, logits out."""
    from torch import nn

    widths = [len(model.columns), *model.hidden]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], len(model.classes)))
    return nn.Sequential(*layers)


def initial(model: FederatedModel) -> tuple[Layout, Params]:
    """The layout and the initial weights of `model` (torch's initialisation, seeded by `model.seed`)."""
    import torch

    torch.manual_seed(model.seed)
    module = network(model)
    state = module.state_dict()
    params = [t.detach().numpy().astype(np.float64) for t in state.values()]
    return Layout.of(list(state), params), params


def features(model: FederatedModel, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (NaN to the mean, then scaled, as the exported graph does) and class indices of labelled
    rows; invalid_data for a row whose label is not one of the model's classes."""
    x = raw_inputs(rows, model.columns, [])["numeric"].astype(np.float64)
    means = np.zeros(len(model.columns)) if model.means is None else np.asarray(model.means)
    scales = np.ones(len(model.columns)) if model.scales is None else np.asarray(model.scales)
    x = (np.where(np.isnan(x), means, x) - means) / scales
    index = {class_name(c): i for i, c in enumerate(model.classes)}
    try:  # as a supervised job names classes: a label read as 1.0 from a CSV is class 1
        y = np.array([index[class_name(row[model.target])] for row in rows], dtype=np.int64)
    except KeyError as exc:
        raise ForsetiError(
            f"a row has no {model.target!r} among the classes {model.classes[:10]}: {exc}", code=ErrorCode.INVALID_DATA
        ) from exc
    return x.astype(np.float32), y


@dataclass
class LocalTrainer:
    """Trains the global model on one agent's rows and returns the change (the agent's side of a round)."""

    model: FederatedModel
    """The federation's model."""
    x: np.ndarray
    """The agent's inputs."""
    y: np.ndarray
    """Their class indices."""
    seed: int = 0
    """Seed of the agent's batch order."""

    def train(self, layout: Layout, weights: Params, local: LocalTraining) -> tuple[Params, dict[str, float]]:
        """Train from `weights` for `local.epochs` (SGD; FedProx's proximal term when `proximal_mu`);
        the change in the weights and the mean training loss of the last epoch."""
        import torch
        from torch import nn

        module = network(self.model)
        start = [torch.tensor(w, dtype=torch.float32) for w in weights]
        module.load_state_dict(dict(zip(layout.names, start, strict=True)))
        optimizer = torch.optim.SGD(module.parameters(), lr=local.learning_rate)
        x, y = torch.from_numpy(self.x), torch.from_numpy(self.y)
        generator = torch.Generator().manual_seed(self.seed)
        loss_fn = nn.CrossEntropyLoss()
        losses: list[float] = []
        for _ in range(local.epochs):
            losses = []
            order = torch.randperm(len(x), generator=generator)
            for at in range(0, len(x), local.batch_size):
                batch = order[at : at + local.batch_size]
                optimizer.zero_grad()
                loss = loss_fn(module(x[batch]), y[batch])
                if local.proximal_mu > 0:
                    proximal = sum(((p - s) ** 2).sum() for p, s in zip(module.parameters(), start, strict=True))
                    loss = loss + local.proximal_mu / 2 * proximal
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        trained = [t.detach().numpy().astype(np.float64) for t in module.state_dict().values()]
        delta = [t - w for t, w in zip(trained, weights, strict=True)]
        return delta, {"loss": float(np.mean(losses)) if losses else 0.0, "examples": float(len(x))}


def predict(model: FederatedModel, layout: Layout, weights: Params, x: np.ndarray) -> np.ndarray:
    """Class probabilities for prepared inputs, in numpy (what the exported graph computes)."""
    by_name = dict(zip(layout.names, weights, strict=True))
    h = x.astype(np.float64)
    depth = len(model.hidden) + 1
    for i in range(depth):
        h = h @ by_name[f"{2 * i}.weight"].T + by_name[f"{2 * i}.bias"]
        if i < depth - 1:
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    e = np.exp(h)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def accuracy(model: FederatedModel, layout: Layout, weights: Params, x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose most probable class is their label."""
    return float(np.mean(predict(model, layout, weights, x).argmax(axis=1) == y)) if len(y) else 0.0


def export_onnx(model: FederatedModel, layout: Layout, weights: Params, path: Path) -> Path:
    """The model as an ONNX file that takes raw rows (`numeric`) and gives class probabilities, with
    its card inside (see the module docstring)."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    means = [0.0] * len(model.columns) if model.means is None else list(model.means)
    scales = [1.0] * len(model.columns) if model.scales is None else list(model.scales)
    prep = preprocessing_graph(list(model.columns), means, scales, {})
    by_name = dict(zip(layout.names, weights, strict=True))
    nodes, inits, h = [], [], FEATURES
    depth = len(model.hidden) + 1
    for i in range(depth):
        w, b = f"w{i}", f"b{i}"
        inits += [
            numpy_helper.from_array(by_name[f"{2 * i}.weight"].T.astype(np.float32), w),
            numpy_helper.from_array(by_name[f"{2 * i}.bias"].astype(np.float32), b),
        ]
        nodes += [helper.make_node("MatMul", [h, w], [f"mm{i}"]), helper.make_node("Add", [f"mm{i}", b], [f"z{i}"])]
        h = f"z{i}"
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [h], [f"a{i}"]))
            h = f"a{i}"
    nodes.append(helper.make_node("Softmax", [h], [PROBABILITIES], axis=1))
    net = helper.make_model(
        helper.make_graph(
            nodes,
            "forseti_federated_mlp",
            [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", len(model.columns)])],
            [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["N", len(model.classes)])],
            initializer=inits,
        ),
        opset_imports=list(prep.opset_import),
        producer_name="forseti",
    )
    net.ir_version = prep.ir_version
    merged = compose.merge_models(prep, net, io_map=[(FEATURES, FEATURES)])
    card = ModelCard(
        model_type="classifier", numeric=list(model.columns), classes=list(model.classes), target=model.target
    )
    helper.set_model_props(merged, {CARD_KEY: card.to_json()})
    onnx.checker.check_model(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, path)
    path.with_name("model.json").write_text(card.to_json())
    return path
