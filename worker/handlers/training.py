"""The supervised training handler: MLP classifiers and regressors on tabular data, exported as one
ONNX graph that takes raw rows (with SafeTensors and the encoding beside it), registered and
announced. Autoencoders and forecasters are refused with invalid_task until they are built."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from forseti.adapters.registry import ModelRecord, TrainingRun
from forseti.adapters.registry.base import utcnow
from forseti.schemas.capabilities import Capability
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.jobs import JobState, TrainingMetrics, TrainingResult
from forseti.schemas.tasks import TaskKind, TrainingTask
from forseti.worker.context import JobContext, JobStopped, StopReason

SUPPORTED = {"classifier": "classification", "regressor": "regression"}
"""Model types this handler trains, and the task each is."""


class TrainingHandler:
    """Runs `forseti.task.training.v1` for classifiers and regressors."""

    kind = TaskKind.TRAINING

    def capabilities(self) -> list[Capability]:
        """The model types, and the export format."""
        return [
            *(Capability(area="supervised-training", name=name) for name in SUPPORTED),
            Capability(area="model-export", name="onnx"),
        ]

    async def run(self, task: TrainingTask, ctx: JobContext) -> TrainingResult:
        """Read and encode the data, train in a thread, export and check, register and announce."""
        if task.model_type not in SUPPORTED:
            raise ForsetiError(
                f"model_type {task.model_type!r} is not trained by this worker yet; supported: {', '.join(SUPPORTED)}",
                code=ErrorCode.INVALID_TASK,
            )
        run = TrainingRun(id=ctx.job_id, config=task.config.model_dump(mode="json"), user_id=task.user_id)
        await ctx.store.put_training_run(run)
        try:
            trained, exported, test_rows = await ctx.run(self._train, task, ctx)
        except JobStopped as stopped:
            # a shutdown hands the job back (it resumes); a cancel ends it
            status = JobState.PENDING if stopped.reason is StopReason.SHUTDOWN else JobState.CANCELLED
            await ctx.store.put_training_run(run.model_copy(update={"status": status}))
            raise
        except Exception:
            await ctx.store.put_training_run(
                run.model_copy(update={"status": JobState.FAILED, "completed_at": utcnow()})
            )
            raise
        name = task.name or f"{task.model_type}-{ctx.job_id}"
        metrics = {f"test_{k}": v for k, v in trained.test_metrics.items()}
        metrics["onnx_max_abs_diff"] = exported.max_abs_diff
        metrics["onnx_parity"] = exported.parity
        model = await ctx.store.get_model(ctx.job_id) or await ctx.store.add_model(
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
                job_id=ctx.job_id,
            )
        )
        files: list[tuple[str, str | None, Path]] = [
            ("onnx", None, exported.onnx_path),
            ("safetensors", None, exported.safetensors_path),
        ]
        await ctx.publish_files(model, files, announce={"onnx"})
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
        return TrainingResult(
            model_id=model.id,
            export_path=str(exported.onnx_path),
            metrics=TrainingMetrics(
                final_loss=trained.final_loss,
                final_accuracy=trained.test_metrics.get("accuracy"),
                total_epochs=trained.epochs,
                training_time_ms=trained.training_time_ms,
                custom_metrics={
                    **metrics,
                    "best_epoch": float(trained.best_epoch),
                    "resumed_from_epoch": float(trained.resumed_from),
                    "samples_per_second": trained.samples_per_second,
                    "test_rows": float(test_rows),
                    "version": float(model.version),
                },
            ),
        )

    def _train(self, task: TrainingTask, ctx: JobContext) -> tuple[Any, Any, int]:
        from .training_data import fit_encoding, read_rows, split
        from .training_loop import Split, export, train

        sources = task.data_sources
        target = next((s.target for s in sources if s.target), None)
        if target is None:
            raise ForsetiError("name the target column in a data source's `target`", code=ErrorCode.INVALID_TASK)
        rows = [row for source in sources for row in read_rows(source, ctx.inputs_root)]
        kind = SUPPORTED[task.model_type]
        encoding = fit_encoding(rows, target, kind)
        labels = encoding.labels(rows)
        parts = split(labels if kind == "classification" else None, len(rows), seed=task.config.seed, shuffle=True)
        train_part, val, test = (
            Split(encoding.features([rows[i] for i in idx]), labels[idx], [rows[i] for i in idx]) for idx in parts
        )
        trained = train(task, ctx, encoding, train_part, val, test)
        ctx.check()
        exported = export(trained.predictor, encoding, test, ctx.artifacts_dir)
        return trained, exported, len(test.rows)
