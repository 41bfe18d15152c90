"""The inference handler: `forseti.task.inference.v1` runs a registered supervised model on rows (inline
or a CSV / JSONL / Parquet file under the data root) through onnxruntime, with a session cache per
model, and returns one prediction per row."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from forseti.adapters.inference import ModelCache, OnnxModel
from forseti.adapters.registry.base import RegistryStore
from forseti.schemas.capabilities import Capability
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.jobs import InferenceResult
from forseti.schemas.tasks import DataSource, InferenceTask, TaskKind
from forseti.worker.engine.context import JobContext

from .training_data import read_rows


async def registered_model(store: RegistryStore, cache: ModelCache, model_id: str) -> tuple[OnnxModel, int]:
    """The loaded ONNX model of a registry id and its version; invalid_model when there is none to serve."""
    record = await store.get_model(model_id)
    if record is None:
        raise ForsetiError(f"no model {model_id!r} in the registry", code=ErrorCode.INVALID_MODEL)
    if record.export_format != "onnx":
        raise ForsetiError(
            f"model {model_id!r} is a {record.model_type} exported as {record.export_format}, not ONNX",
            code=ErrorCode.INVALID_MODEL,
        )
    return await asyncio.to_thread(cache.get, model_id, Path(record.export_path)), record.version


class InferenceHandler:
    """Batch inference through onnxruntime; sessions are kept across jobs."""

    kind = TaskKind.INFERENCE

    def __init__(self, cache: ModelCache | None = None) -> None:
        self.cache = cache or ModelCache()
        """Loaded sessions by model id, shared by every job of this worker."""

    def capabilities(self) -> list[Capability]:
        """Batch inference of ONNX exports."""
        return [Capability(area="inference", name="onnx")]

    async def run(self, task: InferenceTask, ctx: JobContext) -> InferenceResult:
        """Load (or reuse) the model, read the rows, predict in batches of `config.batch_size`."""
        model, _ = await registered_model(ctx.store, self.cache, task.model_id)
        if task.inputs is not None:
            rows = [dict(row) for row in task.inputs]
        else:
            rows = await ctx.run(read_rows, DataSource(uri=task.uri), ctx.inputs)
        started = time.perf_counter()
        outputs = await ctx.run(model.predict, rows, batch_size=task.config.batch_size)
        elapsed_ms = int((time.perf_counter() - started) * 1000)
        ctx.progress(1.0, step=len(rows), total=len(rows), message=f"{len(rows)} rows predicted in {elapsed_ms} ms")
        return InferenceResult(outputs=outputs, inference_time_ms=elapsed_ms, batch_size=task.config.batch_size)
