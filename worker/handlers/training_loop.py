"""The supervised training loop, in the handler's thread, for any model type (`training_models`):
optimizers, losses, schedulers, clipping, early stopping, best and latest checkpoints, resume, CUDA
mixed precision; hyperparameter search over trials; then the export of the predictor (with the
preprocessing in front for tabular data) as one ONNX graph, checked against torch."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forseti.adapters.exporters.torch_onnx import torch_to_onnx
from forseti.adapters.inference import CARD, CARD_KEY
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import TrainingConfig
from forseti.worker.engine.context import JobStopped, Steps, Work
from forseti.worker.engine.limits import TRAINED_BYTES_PER_PARAMETER, check_fits, module_parameters

from .training_ddp import Group, Rank, Recruit, launch, meet
from .training_models import Prepared, loss_function, predict

LATEST, BEST, TRIAL = "latest.pt", "best.pt", "trial.json"
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
LOWER_IS_BETTER = ("mse", "mae", "mase", "anomaly_rate")
PARITY = 1e-5
"""Largest difference allowed between onnxruntime on the raw test data and torch: absolute for
probabilities, relative to the value for values (float32 carries about seven digits, so a
prediction of 150 cannot agree to 1e-5 absolute)."""


@dataclass
class Stats:
    """How one run (or trial) went; stored with a finished trial, so a resumed search skips it."""

    epochs: int
    resumed_from: int
    best_epoch: int
    best_score: float
    """The watched validation metric at the best epoch."""
    final_loss: float
    training_time_ms: int
    samples_per_second: float


def requested_metrics(prepared: Prepared, names: list[str]) -> list[str]:
    """The validation metrics to report each epoch (all of the model type's when none are named)."""
    unknown = [n for n in names if n not in prepared.known_metrics]
    if unknown:
        raise ForsetiError(
            f"unknown metrics {unknown} for a {prepared.task} model; known: {', '.join(prepared.known_metrics)}",
            code=ErrorCode.INVALID_TASK,
        )
    return list(names) or list(prepared.known_metrics)


def watched(config: TrainingConfig) -> tuple[str, bool]:
    """The validation metric that picks the best epoch (and trial), and whether lower is better."""
    name = config.early_stopping.metric if config.early_stopping else "val_loss"
    return name, name.endswith("loss") or name.removeprefix("val_") in LOWER_IS_BETTER


def device_for(config: TrainingConfig, local_rank: int = 0) -> torch.device:
    """CUDA when the task asks for GPUs (invalid_task when there is none; the rank's own GPU in a
    distributed run), else the CPU."""
    if config.num_gpus == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ForsetiError(
            f"num_gpus is {config.num_gpus} but this worker has no CUDA device; use 0 to train on the CPU",
            code=ErrorCode.INVALID_TASK,
        )
    return torch.device("cuda", local_rank) if config.distributed else torch.device("cuda")


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


class Precision:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); fp32 elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dtype = None
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's precision context."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterator[Any], clip: float | None
    ) -> None:
        """Backward, clip and step, scaling the loss for fp16."""
        if self.scaler is None:
            loss.backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()


def one_epoch(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    order: torch.Tensor,
    *,
    batch_size: int,
    clip: float | None,
    precision: Precision,
    rank: Rank | None = None,
) -> float:
    """One pass over the training data in `order`; the mean training loss. In a distributed run each
    rank takes its share of every batch, and its loss is weighted by that share so that the averaged
    gradient is the whole batch's: the steps are single-process training's on the same batches. A
    batch with fewer rows than ranks (the last one) cannot be shared: every rank computes all of it,
    without synchronising (their gradients are equal already), and rank 0 alone counts its loss."""
    rank = rank or Rank()
    me, ranks = rank.shard
    x, y = data
    network.train()
    total = torch.zeros((), device=x.device)
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        whole = len(batch) < ranks
        share = batch if whole else batch.tensor_split(ranks)[me]
        optimizer.zero_grad(set_to_none=True)
        with rank.unsynchronised(network) if whole else contextlib.nullcontext():
            with precision.autocast():
                loss = criterion(network(x[share]), y[share])
            weight = 1.0 if whole else len(share) * ranks / len(batch)
            precision.step(loss * weight, optimizer, network.parameters(), clip)
        if not whole or rank.lead:
            total += loss.detach() * len(share)  # summed on the device: no sync per batch
    return float(rank.total(total)) / len(order)


def resume(
    saved: bytes, network: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device
) -> tuple[int, float, int, int, float]:
    """Load a `latest` checkpoint's bytes into the network, optimizer and scheduler; the loop's state
    (epoch, best score, best epoch, stale epochs, the last training loss)."""
    state = torch.load(io.BytesIO(saved), weights_only=True, map_location=device)
    network.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    # a job redelivered after its last checkpoint trains no epoch: it reports the loss that one saved
    train_loss = float(state.get("train_loss", float("nan")))
    return state["epoch"], state["best_score"], state["best_epoch"], state["stale"], train_loss


def train(
    config: TrainingConfig,
    ctx: Steps,
    prepared: Prepared,
    folder: Path,
    *,
    span: tuple[float, float] = (0.0, 1.0),
    label: str = "",
    recruit: Recruit | None = None,
) -> Stats:
    """Train one network (or resume it from `folder`), keeping its best epoch by the watched metric
    in `folder`; progress fills `span` of the job. A distributed config trains over its ranks
    (`training_ddp`); `recruit` finds the other workers when they are spread over several."""
    work = functools.partial(fit, config, prepared=prepared, folder=folder, span=span, label=label)
    if config.ranks == 1:
        return work(ctx)
    group = Group.of(config, cuda=bool(config.num_gpus))
    meeting = meet(group, {"config": config.model_dump(mode="json", by_alias=True)}, recruit)
    stats: Stats = launch(group, ctx, work, folder, meeting=meeting)
    return stats


def fit(
    config: TrainingConfig,
    ctx: Steps,
    prepared: Prepared,
    folder: Path,
    *,
    span: tuple[float, float] = (0.0, 1.0),
    label: str = "",
) -> Stats:
    """Train in this process: alone, or as one rank of a distributed run (rank 0 reports, keeps the
    checkpoints and decides when the run ends; the others train their share)."""
    rank = Rank.current()
    folder.mkdir(parents=True, exist_ok=True)
    device = device_for(config, rank.local_rank)
    precision = Precision(device)
    torch.manual_seed(config.seed)
    parameters = module_parameters(lambda: prepared.build(config)[0])
    check_fits(f"a network of {parameters:,} parameters", parameters * TRAINED_BYTES_PER_PARAMETER, ctx.memory_limit)
    network, predictor = prepared.build(config)
    network.to(device)
    criterion = loss_function(prepared.task, config.loss_function)
    metric_names = requested_metrics(prepared, list(config.metrics))
    optimizer = OPTIMIZERS[config.optimizer](network.parameters(), lr=config.learning_rate)
    scheduler = make_scheduler(config.lr_scheduler, optimizer, config.epochs)
    stopping = config.early_stopping
    watch, lower_is_better = watched(config)

    latest, best_path = folder / LATEST, folder / BEST
    epoch, best_score, best_epoch, stale, train_loss = 0, float("inf"), 0, 0, float("nan")
    saved = rank.read(latest)  # rank 0's: the others may be on hosts without the checkpoint
    if saved is not None:
        epoch, best_score, best_epoch, stale, train_loss = resume(saved, network, optimizer, scheduler, device)
    resumed_from = epoch
    stopped_early = stopping is not None and stale >= stopping.patience

    def save(path: Path) -> None:
        partial = path.with_name("partial-" + path.name)
        torch.save(
            {
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "stale": stale,
                "train_loss": train_loss,
            },
            partial,
        )
        partial.replace(path)

    def checkpoint() -> None:
        if rank.lead:  # the ranks hold the same weights: one copy, rank 0's
            save(latest)
            ctx.checkpointed(epoch)

    x_train, y_train, x_val, y_val = (
        torch.from_numpy(a).to(device) for a in (prepared.train.x, prepared.train.y, prepared.val.x, prepared.val.y)
    )
    model = rank.wrap(network, device)
    started, samples = time.monotonic(), 0
    try:
        while rank.go_on(ctx, more=epoch < config.epochs and not stopped_early):
            # seeded by the epoch itself: a run resumed from a checkpoint shuffles as it would have
            shuffle = torch.Generator().manual_seed(config.seed + epoch)
            order = torch.randperm(len(x_train), generator=shuffle).to(device)
            train_loss = one_epoch(
                model,
                optimizer,
                criterion,
                (x_train, y_train),
                order,
                batch_size=config.batch_size,
                clip=config.grad_clip,
                precision=precision,
                rank=rank,
            )
            samples += len(order)
            network.eval()
            with torch.no_grad(), precision.autocast():
                val_loss = float(criterion(network(x_val), y_val))
            if scheduler is not None:  # every rank steps it alike: their weights, and val_loss, are equal
                scheduler.step(val_loss) if config.lr_scheduler == "plateau" else scheduler.step()
            epoch += 1
            if not rank.lead:
                continue
            evaluated = prepared.evaluate(predictor, prepared.val)
            figures = {f"val_{k}": v for k, v in evaluated.items() if k in metric_names}
            figures.update({"train_loss": train_loss, "val_loss": val_loss})
            score = figures.get(watch, val_loss)
            signed = score if lower_is_better else -score
            if signed < best_score - (stopping.min_delta if stopping else 0.0):
                best_score, best_epoch, stale = signed, epoch, 0
                save(best_path)
            else:
                stale += 1
            if epoch % config.checkpoint_interval == 0 or epoch == config.epochs:
                checkpoint()
            low, high = span
            ctx.progress(
                low + (high - low) * epoch / config.epochs,
                step=epoch,
                total=config.epochs,
                message=f"{label}epoch {epoch} / {config.epochs}: val_loss {val_loss:.4f}",
                metrics={**figures, "learning_rate": optimizer.param_groups[0]["lr"], **_resource_metrics()},
            )
            if stopping is not None and stale >= stopping.patience:
                checkpoint()
                stopped_early = True  # the loop's next turn tells the other ranks
    except JobStopped:
        checkpoint()
        raise
    elapsed = time.monotonic() - started
    return Stats(
        epochs=epoch,
        resumed_from=resumed_from,
        best_epoch=best_epoch,
        best_score=best_score if lower_is_better else -best_score,
        final_loss=train_loss,
        training_time_ms=int(elapsed * 1000),
        samples_per_second=samples / max(elapsed, 1e-9),
    )


def restore(config: TrainingConfig, prepared: Prepared, folder: Path) -> nn.Module:
    """The predictor with the best epoch's weights from `folder`, on the CPU, in evaluation mode."""
    network, predictor = prepared.build(config)
    path = folder / BEST if (folder / BEST).exists() else folder / LATEST
    network.load_state_dict(torch.load(path, weights_only=True, map_location="cpu")["model"])
    return predictor.eval()


def trial_configs(config: TrainingConfig) -> list[TrainingConfig]:
    """The configurations a search tries: the grid in order, or a random draw of distinct points."""
    space = config.search
    if space is None:
        return [config]
    points = list(
        itertools.product(
            space.learning_rate or [config.learning_rate],
            space.batch_size or [config.batch_size],
            space.hidden or [list(config.hidden)],
        )
    )
    if space.method == "random":
        points = random.Random(space.seed).sample(points, min(space.max_trials, len(points)))
    else:
        points = points[: space.max_trials]
    return [
        config.model_copy(update={"learning_rate": lr, "batch_size": size, "hidden": hidden, "search": None})
        for lr, size, hidden in points
    ]


def search(
    config: TrainingConfig, ctx: Work, prepared: Prepared, *, recruit: Recruit | None = None
) -> tuple[nn.Module, Stats, list[dict[str, Any]]]:
    """Train each trial (one when there is no search), report each, pick the best on the watched
    validation metric; its predictor, its figures and every trial's record, the best one first.
    `recruit` finds the workers a run spread over several shares its ranks with."""
    configs = trial_configs(config)
    if config.search is None:
        stats = train(config, ctx, prepared, ctx.checkpoint_dir, recruit=recruit)
        return restore(config, prepared, ctx.checkpoint_dir), stats, []
    watch, lower_is_better = watched(config)
    records: list[dict[str, Any]] = []
    for k, trial in enumerate(configs):
        folder = ctx.checkpoint_dir / f"trial-{k + 1}"
        done = folder / TRIAL
        if done.exists():  # finished before the worker went down
            record = json.loads(done.read_text())
        else:
            n = len(configs)
            span, label = (k / n, (k + 1) / n), f"trial {k + 1}/{n}: "
            stats = train(trial, ctx, prepared, folder, span=span, label=label, recruit=recruit)
            record = {
                "trial": k + 1,
                "learning_rate": trial.learning_rate,
                "batch_size": trial.batch_size,
                "hidden": list(trial.hidden),
                "stats": asdict(stats),
            }
            done.write_text(json.dumps(record))
            ctx.checkpointed(k + 1)  # the finished trial is skipped by whichever worker resumes the search
        records.append(record)
        score = record["stats"]["best_score"]
        ctx.progress(
            (k + 1) / len(configs),
            step=k + 1,
            total=len(configs),
            message=(
                f"trial {k + 1}/{len(configs)}: {watch} {score:.4g} (learning_rate {trial.learning_rate:g}, "
                f"batch_size {trial.batch_size}, hidden {list(trial.hidden)})"
            ),
            metrics={
                "trial": float(k + 1),
                "trial_score": score,
                "trial_learning_rate": trial.learning_rate,
                "trial_batch_size": float(trial.batch_size),
            },
        )
    best = (min if lower_is_better else max)(records, key=lambda r: float(r["stats"]["best_score"]))
    index = best["trial"] - 1
    predictor = restore(configs[index], prepared, ctx.checkpoint_dir / f"trial-{index + 1}")
    return predictor, Stats(**best["stats"]), [best, *(r for r in records if r is not best)]


def quantize(prepared: Prepared, path: Path) -> tuple[Path, dict[str, float]]:
    """A dynamically int8-quantised copy of the exported model (int8 weights, activations quantised as
    they flow), and how its test predictions differ from the float model's: agreement and the change
    in accuracy for a classifier, flag agreement for an autoencoder, the largest relative difference
    for values."""
    import onnxruntime as ort

    from forseti.adapters.exporters.quantize import int8_copy

    quantized = int8_copy(path, path.with_name("model.int8.onnx"))
    test = prepared.test
    before, after = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, test.feeds)
        for p in (path, quantized)
    )
    if prepared.task == "classification":
        was, now = before[0].argmax(axis=1), after[0].argmax(axis=1)
        change = float(np.mean(now == test.truth) - np.mean(was == test.truth))
        return quantized, {"int8_agreement": float(np.mean(was == now)), "int8_accuracy_change": change}
    if prepared.task == "anomaly":
        return quantized, {"int8_agreement": float(np.mean(before[1] == after[1]))}
    relative = np.abs(after[0] - before[0]) / np.maximum(np.abs(before[0]), 1.0)
    return quantized, {"int8_max_relative_diff": float(relative.max())}


@dataclass(frozen=True)
class Exported:
    """The files of an exported model and how closely ONNX matches torch."""

    onnx_path: Path
    safetensors_path: Path
    card_path: Path
    max_abs_diff: float
    parity: float
    """The checked figure: max abs diff for probabilities, max relative diff for values and scores."""


def export(prepared: Prepared, predictor: nn.Module, out: Path) -> Exported:
    """One ONNX graph from raw inputs to predictions (the preprocessing graph, when there is one, then
    the network's), the weights as SafeTensors, the card and encoding as JSON; export_mismatch when
    onnxruntime on the raw test data and torch differ by `PARITY` or more."""
    import onnx
    import onnxruntime as ort
    from onnx import compose
    from safetensors.torch import save_file

    test = prepared.test
    path = out / "model.onnx"
    example = torch.from_numpy(test.x[:1])
    network = torch_to_onnx(
        predictor, example, out / "network.onnx", prepared.input_name, list(prepared.output_names), quiet_tracer=True
    )
    pre = prepared.preprocessing()
    if pre is None:
        network.replace(path)
    else:
        net = onnx.load(str(network))
        net.ir_version = pre.ir_version
        merged = compose.merge_models(pre, net, io_map=[(prepared.input_name, prepared.input_name)])
        # merge_models lists the default domain once per part; tools such as the quantiser want it once
        versions: dict[str, int] = {}
        for entry in merged.opset_import:
            versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
        del merged.opset_import[:]
        merged.opset_import.extend(onnx.helper.make_opsetid(domain, v) for domain, v in versions.items())
        onnx.save(merged, str(path))
        network.unlink()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, test.feeds)
    expected = predict(predictor, test.x)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    diff = float(np.abs(got[0] - expected[0]).max())
    scale = 1.0 if prepared.task == "classification" else np.maximum(np.abs(expected[0]), 1.0)
    parity = float((np.abs(got[0] - expected[0]) / scale).max())
    if len(got) > 1:  # an anomaly flag may only differ where the score sits on the threshold
        threshold = float(predictor.get_buffer("threshold"))
        unsure = np.abs(expected[0] - threshold) <= PARITY * max(1.0, abs(threshold))
        if np.any((got[1] != expected[1]) & ~unsure):
            parity = max(parity, 1.0)
    if not parity < PARITY:
        raise ForsetiError(
            f"ONNX export differs from torch by {parity:.3g} on the test data (bound {PARITY:g})",
            code=ErrorCode.EXPORT_MISMATCH,
        )
    card_json = prepared.card(predictor).to_json()
    checked = onnx.load(str(path))
    onnx.helper.set_model_props(checked, {CARD_KEY: card_json})  # the file alone is enough to serve it
    onnx.save(checked, str(path))
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, weights)
    card = out / CARD
    card.write_text(card_json)
    sidecar = prepared.sidecar()
    if sidecar is not None:
        (out / "encoding.json").write_text(sidecar)
    return Exported(path, weights, card, diff, parity)
