"""One supervised training run of an MLP classifier or regressor, in the handler's thread: the loop
with optimizers, losses, schedulers, clipping, early stopping, checkpoints and resume; then the
export of the model with its preprocessing as one ONNX graph, checked against torch."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forseti.adapters.exporters.tabular import FEATURES, preprocessing_graph, raw_inputs
from forseti.adapters.exporters.torch_onnx import torch_to_onnx
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import TrainingTask
from forseti.worker.context import JobContext, JobStopped

from .training_data import Encoding, Row
from .training_metrics import CLASSIFICATION, REGRESSION, classification_metrics, regression_metrics

LATEST, BEST = "latest.pt", "best.pt"
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "l1", "huber")}
PARITY = 1e-5
"""Largest difference allowed between onnxruntime on raw rows and torch on encoded rows: absolute for
probabilities, relative to the value for a regressor (float32 carries about seven digits, so a
prediction of 150 cannot agree to 1e-5 absolute)."""


class Mlp(nn.Module):
    """Encoded features in; class logits (classifier) or one value (regressor) out."""

    def __init__(self, width: int, hidden: list[int], outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits or values."""
        return self.net(x)  # type: ignore[no-any-return]


class Predictor(nn.Module):
    """What is exported: probabilities for a classifier, the value for a regressor."""

    def __init__(self, mlp: Mlp, classifier: bool, mean: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.mlp, self.classifier, self.mean, self.scale = mlp, classifier, mean, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions (a regressor's in the target's own units)."""
        out = self.mlp(x)
        return torch.softmax(out, dim=1) if self.classifier else out[:, 0] * self.scale + self.mean


@dataclass
class Split:
    """Encoded arrays of one part of the data."""

    x: np.ndarray
    y: np.ndarray
    rows: list[Row] = field(default_factory=list)


@dataclass
class Trained:
    """What a finished run hands to the handler."""

    predictor: Predictor
    epochs: int
    resumed_from: int
    best_epoch: int
    final_loss: float
    test_metrics: dict[str, float]
    training_time_ms: int
    samples_per_second: float


def loss_function(task: str, name: str | None) -> nn.Module:
    """The loss by name, defaulting to the task's usual one; invalid_task for one that does not fit."""
    chosen = name or LOSSES[task][0]
    if chosen not in LOSSES[task]:
        raise ForsetiError(
            f"loss_function {chosen!r} does not fit a {task} model; use one of {', '.join(LOSSES[task])}",
            code=ErrorCode.INVALID_TASK,
        )
    return {"cross_entropy": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "l1": nn.L1Loss(), "huber": nn.HuberLoss()}[
        chosen
    ]


def requested_metrics(task: str, names: list[str]) -> list[str]:
    """The metrics to report each epoch (all of the task's when none are named)."""
    known = CLASSIFICATION if task == "classification" else REGRESSION
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ForsetiError(
            f"unknown metrics {unknown} for a {task} model; known: {', '.join(known)}", code=ErrorCode.INVALID_TASK
        )
    return list(names) or list(known)


def evaluate(predictor: Predictor, part: Split, task: str) -> dict[str, float]:
    """The task's metrics of the predictor on one part of the data."""
    with torch.no_grad():
        out = predictor(torch.from_numpy(part.x)).numpy()
    return classification_metrics(part.y, out) if task == "classification" else regression_metrics(part.y, out)


def _resource_metrics() -> dict[str, float]:
    import psutil

    process = psutil.Process(os.getpid())
    figures = {"cpu_percent": process.cpu_percent(None), "rss_mb": process.memory_info().rss / 2**20}
    if torch.cuda.is_available():
        figures["gpu_memory_mb"] = torch.cuda.memory_allocated() / 2**20
    return figures


def make_scheduler(name: str | None, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
    """The learning-rate schedule by name, or None."""
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=2)
    return None


def one_epoch(
    mlp: Mlp,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    order: torch.Tensor,
    *,
    batch_size: int,
    clip: float | None,
) -> float:
    """One pass over the training data in `order`; the mean training loss."""
    x, y = data
    mlp.train()
    total = 0.0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        optimizer.zero_grad()
        loss = criterion(mlp(x[batch]), y[batch])
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(mlp.parameters(), clip)
        optimizer.step()
        total += float(loss.detach()) * len(batch)
    return total / len(order)


def train(
    task: TrainingTask, ctx: JobContext, encoding: Encoding, train_part: Split, val: Split, test: Split
) -> Trained:
    """Train (or resume), keep the best epoch by the early-stopping metric, evaluate on the test part."""
    config = task.config
    kind = encoding.task
    torch.manual_seed(config.seed)
    outputs = len(encoding.classes) if kind == "classification" else 1
    mlp = Mlp(encoding.width, list(config.hidden), outputs)
    predictor = Predictor(mlp, kind == "classification", encoding.target_mean, encoding.target_scale)
    criterion = loss_function(kind, config.loss_function)
    metric_names = requested_metrics(kind, list(config.metrics))
    optimizer = OPTIMIZERS[config.optimizer](mlp.parameters(), lr=config.learning_rate)
    scheduler = make_scheduler(config.lr_scheduler, optimizer, config.epochs)
    stopping = config.early_stopping
    watch = stopping.metric if stopping else "val_loss"
    lower_is_better = watch.endswith("loss") or watch in ("val_mse", "val_mae")

    latest, best_path = ctx.checkpoint_dir / LATEST, ctx.checkpoint_dir / BEST
    epoch, best_score, best_epoch, stale = 0, float("inf"), 0, 0
    if latest.exists():
        state = torch.load(latest, weights_only=True)
        mlp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        epoch, best_score, best_epoch, stale = state["epoch"], state["best_score"], state["best_epoch"], state["stale"]
    resumed_from = epoch

    def save(path: Path) -> None:
        partial = path.with_name("partial-" + path.name)
        torch.save(
            {
                "model": mlp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "stale": stale,
            },
            partial,
        )
        partial.replace(path)

    x_train = torch.from_numpy(train_part.x)
    y_train, y_val = (
        torch.from_numpy(part.y)
        if kind == "classification"
        else torch.from_numpy((part.y.reshape(-1, 1) - encoding.target_mean) / encoding.target_scale).float()
        for part in (train_part, val)
    )
    x_val = torch.from_numpy(val.x)
    generator = torch.Generator().manual_seed(config.seed)
    started, samples, train_loss = time.monotonic(), 0, float("nan")
    try:
        while epoch < config.epochs:
            ctx.check()
            order = torch.randperm(len(x_train), generator=generator)
            train_loss = one_epoch(
                mlp,
                optimizer,
                criterion,
                (x_train, y_train),
                order,
                batch_size=config.batch_size,
                clip=config.grad_clip,
            )
            samples += len(order)
            mlp.eval()
            with torch.no_grad():
                val_loss = float(criterion(mlp(x_val), y_val))
            figures = {f"val_{k}": v for k, v in evaluate(predictor, val, kind).items() if k in metric_names}
            figures.update({"train_loss": train_loss, "val_loss": val_loss})
            if scheduler is not None:
                scheduler.step(val_loss) if config.lr_scheduler == "plateau" else scheduler.step()
            epoch += 1
            score = figures.get(watch, val_loss)
            signed = score if lower_is_better else -score
            if signed < best_score - (stopping.min_delta if stopping else 0.0):
                best_score, best_epoch, stale = signed, epoch, 0
                save(best_path)
            else:
                stale += 1
            if epoch % config.checkpoint_interval == 0 or epoch == config.epochs:
                save(latest)
            ctx.progress(
                epoch / config.epochs,
                step=epoch,
                total=config.epochs,
                message=f"epoch {epoch} / {config.epochs}: val_loss {val_loss:.4f}",
                metrics={**figures, "learning_rate": optimizer.param_groups[0]["lr"], **_resource_metrics()},
            )
            if stopping is not None and stale >= stopping.patience:
                break
    except JobStopped:
        save(latest)
        raise
    elapsed = time.monotonic() - started
    if best_path.exists():
        mlp.load_state_dict(torch.load(best_path, weights_only=True)["model"])
    mlp.eval()
    return Trained(
        predictor=predictor,
        epochs=epoch,
        resumed_from=resumed_from,
        best_epoch=best_epoch,
        final_loss=train_loss,
        test_metrics=evaluate(predictor, test, kind),
        training_time_ms=int(elapsed * 1000),
        samples_per_second=samples / max(elapsed, 1e-9),
    )


@dataclass(frozen=True)
class TabularExport:
    """The files of an exported tabular model and how closely ONNX matches torch."""

    onnx_path: Path
    safetensors_path: Path
    encoding_path: Path
    max_abs_diff: float
    parity: float
    """The checked figure: max abs diff for probabilities, max relative diff for a regressor."""


def export(predictor: Predictor, encoding: Encoding, test: Split, out: Path) -> TabularExport:
    """One ONNX graph from raw columns to predictions (preprocessing then network), the weights as
    SafeTensors and the encoding as JSON; export_mismatch when onnxruntime on the raw test rows and
    torch on their encoding differ by `PARITY` or more."""
    import onnx
    import onnxruntime as ort
    from onnx import compose
    from safetensors.torch import save_file

    network = torch_to_onnx(predictor, torch.zeros((1, encoding.width)), out / "network.onnx", FEATURES, "prediction")
    pre = preprocessing_graph(encoding.numeric, encoding.means, encoding.scales, encoding.categorical)
    net = onnx.load(str(network))
    net.ir_version = pre.ir_version
    merged = compose.merge_models(pre, net, io_map=[(FEATURES, FEATURES)])
    path = out / "model.onnx"
    onnx.save(merged, str(path))
    network.unlink()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, raw_inputs(test.rows, encoding.numeric, list(encoding.categorical)))
    with torch.no_grad():
        expected = predictor(torch.from_numpy(test.x)).numpy()
    diff = float(np.abs(got - expected).max())
    scale = 1.0 if encoding.task == "classification" else np.maximum(np.abs(expected), 1.0)
    parity = float((np.abs(got - expected) / scale).max())
    if not parity < PARITY:
        raise ForsetiError(
            f"ONNX export differs from torch by {parity:.3g} on the test rows (bound {PARITY:g})",
            code=ErrorCode.EXPORT_MISMATCH,
        )
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, weights)
    encoding_path = out / "encoding.json"
    encoding_path.write_text(encoding.to_json())
    return TabularExport(path, weights, encoding_path, diff, parity)
