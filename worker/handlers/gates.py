"""Evaluation gates: a new version (the challenger) takes its alias only when it beats the version that
holds it (the champion) on the same data, by the task's margin.

A supervised model is scored with its champion on the same held-out rows, both through their
exported ONNX with the runtime that serves them (`OnnxModel`); a policy by its mean return over the
job's evaluation episodes, the champion's ONNX policy acting on the same seeded episodes
(`rl_training.py`). The verdict is stored in the registry (`evaluations`) whether or not the alias
moved, and shown by `forseti models compare`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from forseti.adapters.artifacts import fetch
from forseti.adapters.inference import OnnxModel
from forseti.adapters.registry import EvaluationRecord, ModelRecord
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import Gate
from forseti.worker.engine.context import JobContext

from .training_data import Row, class_name, read_rows

HIGHER_WINS = {"accuracy": True, "mae": False, "rmse": False, "mean_reward": True}
"""Which way each gate metric improves."""


def score(onnx_path: Path, rows: list[Row], target: str, metric: str) -> float:
    """A model's score on held-out rows (the target column taken out of what it sees)."""
    model = OnnxModel(onnx_path)
    predictions = model.predict([{k: v for k, v in row.items() if k != target} for row in rows])
    truth = [row[target] for row in rows]
    if metric == "accuracy":
        labels = [class_name(p["label"]) if isinstance(p, dict) else None for p in predictions]
        if None in labels:
            raise ForsetiError("the accuracy gate needs a classifier", code=ErrorCode.INVALID_TASK)
        return sum(label == class_name(t) for label, t in zip(labels, truth, strict=True)) / len(rows)
    errors = [float(p) - float(t) for p, t in zip(predictions, truth, strict=True)]  # type: ignore[arg-type]
    if metric == "mae":
        return sum(abs(e) for e in errors) / len(errors)
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def wins(metric: str, margin: float, challenger: float, champion: float) -> bool:
    """Whether the challenger beats the champion by `margin` on `metric` (ties win only with margin 0)."""
    if HIGHER_WINS[metric]:
        return challenger > champion + margin or (margin == 0 and challenger == champion)
    return challenger < champion - margin or (margin == 0 and challenger == champion)


async def champion_onnx(ctx: JobContext, champion: ModelRecord) -> Path:
    """The champion's ONNX on this host: its export where this worker made it, else fetched from
    where its announcement put it (the bus's object store, or a file this host reaches)."""
    local = Path(champion.export_path)
    if await ctx.run(local.is_file):
        return local
    onnx = next(
        (a for a in await ctx.store.list_artifacts(champion.id) if a.format == "onnx" and not a.quantization), None
    )
    if onnx is None:
        raise ForsetiError(f"the champion {champion.id} has no ONNX artifact to compare against")
    transport: Any = getattr(ctx.bus, "inner", ctx.bus)  # the metering wrapper holds no objects
    cache = ctx.work_dir / "champion"
    cache.mkdir(exist_ok=True)
    return await fetch(transport, onnx.uri, sha256=onnx.sha256, size=onnx.size_bytes, cache=cache)


async def judge(ctx: JobContext, gate: Gate, challenger: ModelRecord, onnx_path: Path) -> EvaluationRecord:
    """Score the challenger and the alias's champion on the gate's rows; the verdict, stored."""
    target = gate.dataset.target
    if target is None:
        raise ForsetiError("the gate's dataset names no target column", code=ErrorCode.INVALID_TASK)
    rows = await ctx.run(read_rows, gate.dataset, ctx.inputs)
    value = await ctx.run(score, onnx_path, rows, target, gate.metric)
    champion = await ctx.store.get_alias(challenger.name, gate.alias)
    against: float | ForsetiError | None = None
    if champion is not None and champion.id != challenger.id:
        try:
            against = await ctx.run(score, await champion_onnx(ctx, champion), rows, target, gate.metric)
        except ForsetiError as exc:  # not comparable: the alias stays where it is
            against = exc
    return await settle(
        ctx, challenger, gate.alias, gate.metric, gate.margin, value, champion, against, f"{len(rows)} held-out rows",
        rows=len(rows),
    )  # fmt: skip


async def settle(
    ctx: JobContext,
    challenger: ModelRecord,
    alias: str,
    metric: str,
    margin: float,
    value: float,
    champion: ModelRecord | None,
    against: float | ForsetiError | None,
    on: str,
    *,
    rows: int = 0,
) -> EvaluationRecord:
    """The verdict of a challenger scoring `value` against a champion scoring `against` (None: the
    alias was free; an error: the champion could not be scored) `on` some data; stored, and the alias
    moved when the challenger won."""
    verdict = EvaluationRecord(
        model_id=challenger.id, name=challenger.name, alias=alias, metric=metric, value=value, margin=margin,
        promoted=True, reason=f"{alias} was free", rows=rows,
    )  # fmt: skip
    if champion is not None and champion.id != challenger.id:
        if isinstance(against, ForsetiError) or against is None:
            why = against.message if isinstance(against, ForsetiError) else "no score"
            verdict = verdict.model_copy(
                update={"against_id": champion.id, "promoted": False, "reason": f"not compared: {why}"}
            )
        else:
            won = wins(metric, margin, value, against)
            how = "beats" if won else "does not beat"
            reason = (
                f"{metric} {value:.4f} {how} {champion.name} v{champion.version}'s {against:.4f} "
                f"by the margin {margin:g} on {on}"
            )
            verdict = verdict.model_copy(
                update={"against_id": champion.id, "against_value": against, "promoted": won, "reason": reason}
            )
    await ctx.store.add_evaluation(verdict)
    if verdict.promoted:
        await ctx.store.set_alias(challenger.name, alias, challenger.id)
    return verdict
