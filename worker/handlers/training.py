"""The supervised training handler: classifiers, regressors and anomaly autoencoders on tabular data,
LSTM forecasters on a series (`training_models`); optionally a hyperparameter search; the best model
exported as one ONNX graph from raw inputs to predictions (SafeTensors, card and encoding beside it),
checked against torch, registered and announced."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forseti.adapters.registry import ModelRecord, TrainingRun
from forseti.adapters.registry.base import utcnow
from forseti.schemas.capabilities import Capability
from forseti.schemas.jobs import JobState, TrainingMetrics, TrainingResult
from forseti.schemas.tasks import Row, TaskKind, TrainingConfig, TrainingTask
from forseti.worker.engine.context import JobContext, JobStopped, Steps, StopReason, Work
from forseti.worker.engine.inputs import Inputs
from forseti.worker.engine.ranks import JoinSite

from .gates import judge

if TYPE_CHECKING:  # torch is imported in the training thread, not when the worker loads its handlers
    from .training_ddp import Group, Recruit
    from .training_loop import Exported, Stats

MODEL_TYPES = ("classifier", "regressor", "autoencoder", "forecaster")

log = logging.getLogger(__name__)


class TrainingHandler:
    """Runs `forseti.task.training.v1`."""

    kind = TaskKind.TRAINING

    def capabilities(self) -> list[Capability]:
        """The model types, data-parallel training over ranks (of one host or several), and the export format."""
        return [
            *(Capability(area="supervised-training", name=name) for name in MODEL_TYPES),
            Capability(area="supervised-training", name="distributed"),
            Capability(area="supervised-training", name="distributed-workers"),
            Capability(area="model-export", name="onnx"),
        ]

    async def run(self, task: TrainingTask, ctx: JobContext) -> TrainingResult:
        """Read and encode the data, train (in a child process), export and check, register and announce."""
        run = TrainingRun(id=ctx.job_id, config=task.config.model_dump(mode="json"), user_id=task.user_id)
        await ctx.store.put_training_run(run)
        try:
            # a distributed job's heavy work runs in its ranks' processes already; its agent stays in
            # the worker, since a job's child process is a daemon, which may not start processes
            recruit = ctx.recruiter(task) if task.config.workers > 1 else None
            with ctx.phase("training"):  # data, training, evaluation and export: in the child, one phase
                outcome = await ctx.work(self._train, task, recruit, isolate=task.config.ranks == 1)
        except JobStopped as stopped:
            # a shutdown or a takeover hands the job back (it resumes); a cancel ends it
            status = JobState.CANCELLED if stopped.reason is StopReason.CANCEL else JobState.PENDING
            await ctx.store.put_training_run(run.model_copy(update={"status": status}))
            raise
        except Exception:
            await ctx.store.put_training_run(
                run.model_copy(update={"status": JobState.FAILED, "completed_at": utcnow()})
            )
            raise
        name = task.name or f"{task.model_type}-{ctx.job_id}"
        exported, stats = outcome.exported, outcome.stats
        metrics = {f"test_{k}": v for k, v in outcome.test_metrics.items()}
        metrics.update(outcome.calibration)
        metrics["onnx_max_abs_diff"] = exported.max_abs_diff
        metrics["onnx_parity"] = exported.parity
        with ctx.phase("register"):
            model = await ctx.register_model(
                ModelRecord(
                    id=ctx.job_id,
                    name=re.sub(r"[^A-Za-z0-9._-]+", "-", name),
                    model_type=task.model_type,
                    framework="pytorch",
                    export_path=str(exported.onnx_path),
                    export_format="onnx",
                    metrics=metrics,
                    user_id=task.user_id,
                    device_id=task.device_id,
                    device_tags=list(task.device_tags),
                    job_id=ctx.job_id,
                )
            )
        files: list[tuple[str, str | None, Path]] = [
            ("onnx", None, exported.onnx_path),
            ("safetensors", None, exported.safetensors_path),
        ]
        if outcome.int8_path is not None:
            files.append(("onnx", "int8", outcome.int8_path))
        verdict = None
        if task.gate is not None:
            with ctx.phase("evaluation"):
                verdict = await judge(ctx, task.gate, model, exported.onnx_path)
            log.info("job %s: %s %s (%s)", ctx.job_id, "promoted to" if verdict.promoted else "kept out of",
                     task.gate.alias, verdict.reason)  # fmt: skip
        alias = task.gate.alias if task.gate is not None and verdict is not None and verdict.promoted else None
        with ctx.phase("announce"):
            await ctx.publish_files(model, files, announce={"onnx"}, alias=alias)
        await ctx.store.put_training_run(
            run.model_copy(
                update={
                    "model_id": model.id,
                    "status": JobState.COMPLETED,
                    "progress": 1.0,
                    "metrics": metrics,
                    "completed_at": utcnow(),
                }
            )
        )
        custom = {
            **metrics,
            "best_epoch": float(stats.best_epoch),
            "best_validation_score": stats.best_score,
            "resumed_from_epoch": float(stats.resumed_from),
            "samples_per_second": stats.samples_per_second,
            "test_rows": float(outcome.test_rows),
            "version": float(model.version),
        }
        if verdict is not None:
            custom.update(gate_score=verdict.value, gate_promoted=float(verdict.promoted))
            if verdict.against_value is not None:
                custom["gate_champion_score"] = verdict.against_value
        if outcome.trials:
            best = outcome.trials[0]
            custom.update(trials=float(len(outcome.trials)), best_trial=float(best["trial"]))
            custom.update(best_learning_rate=best["learning_rate"], best_batch_size=float(best["batch_size"]))
        return TrainingResult(
            model_id=model.id,
            export_path=str(exported.onnx_path),
            metrics=TrainingMetrics(
                final_loss=stats.final_loss if math.isfinite(stats.final_loss) else None,
                final_accuracy=outcome.test_metrics.get("accuracy"),
                total_epochs=stats.epochs,
                training_time_ms=stats.training_time_ms,
                custom_metrics=custom,
            ),
        )

    async def rank_work(
        self, task: TrainingTask, run: dict[str, Any], site: JoinSite
    ) -> tuple[Group, Callable[[Steps], Stats]]:
        """Another worker's run of `task` (`run`: its config, a search trial's): its group, and what
        this worker's ranks train, on the task's data as read here."""
        from .training_ddp import Group
        from .training_loop import fit
        from .training_models import prepare

        config = TrainingConfig.model_validate(run.get("config"))
        prepared = await asyncio.to_thread(lambda: prepare(task, read_all(task, site.inputs)))
        return Group.of(config, cuda=bool(config.num_gpus)), functools.partial(
            fit, config, prepared=prepared, folder=site.folder
        )

    def _train(self, task: TrainingTask, recruit: Recruit | None, ctx: Work) -> Outcome:
        from .training_loop import export, quantize, search
        from .training_models import prepare

        prepared = prepare(task, read_all(task, ctx.inputs))
        predictor, stats, trials = search(task.config, ctx, prepared, recruit=recruit)
        ctx.check()
        calibration = prepared.calibrate(predictor)
        test_metrics = prepared.evaluate(predictor, prepared.test)
        exported = export(prepared, predictor, ctx.artifacts_dir)
        int8_path = None
        if task.config.quantize_int8:
            int8_path, int8_figures = quantize(prepared, exported.onnx_path)
            calibration.update(int8_figures)
        return Outcome(stats, exported, test_metrics, calibration, trials, len(prepared.test.x), int8_path)


def read_all(task: TrainingTask, inputs: Inputs) -> list[Row]:
    """Every row of the task's data sources."""
    from .training_data import read_rows

    return [row for source in task.data_sources for row in read_rows(source, inputs)]


@dataclass
class Outcome:
    """What the training thread hands back to the handler."""

    stats: Stats
    exported: Exported
    test_metrics: dict[str, float]
    calibration: dict[str, float]
    """Figures settled after training (an autoencoder's threshold) and the int8 export's change."""
    trials: list[dict[str, Any]]
    """Each search trial's settings and figures, the chosen one first; empty without a search."""
    test_rows: int
    int8_path: Path | None = None
    """The int8-quantised ONNX, when asked for."""
