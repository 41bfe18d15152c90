"""Handlers and helpers the worker tests share: small real handlers, a job watcher, a worker runner."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from forseti.adapters.bus import Bus, Message
from forseti.adapters.exporters import sha256_of
from forseti.adapters.inference import CARD_KEY, ModelCard
from forseti.adapters.registry import JobRecord, SqliteStore, create_store
from forseti.schemas.capabilities import Capability
from forseti.schemas.catalog import jobs_channel
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import ForsetiError
from forseti.schemas.jobs import GenericResult
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import (
    TASK_MODELS,
    DataSource,
    InferenceTask,
    RLTask,
    TaskBase,
    TaskKind,
    TrainingConfig,
    TrainingTask,
    task_channel,
)
from forseti.worker.engine.context import Handler, JobContext
from forseti.worker.engine.metrics import Metrics
from forseti.worker.engine.runtime import Worker
from forseti.worker.engine.settings import WorkerSettings


class EchoHandler:
    """Inference: answers with the number of rows, at once."""

    kind = TaskKind.INFERENCE

    def __init__(self) -> None:
        self.runs = 0

    def capabilities(self) -> list[Capability]:
        return [Capability(area="inference", name="echo")]

    async def run(self, task: InferenceTask, ctx: JobContext) -> GenericResult:
        self.runs += 1
        rows = len(task.inputs or [])
        return GenericResult(summary=f"{rows} rows", metrics={"rows": rows})


class StepHandler:
    """Training: `config.epochs` steps of `delay` seconds each in a thread, a checkpoint after each,
    resuming from the checkpoint when the job is delivered again."""

    kind = TaskKind.TRAINING

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.started = asyncio.Event()

    def capabilities(self) -> list[Capability]:
        return [Capability(area="training", name="steps")]

    async def run(self, task: TrainingTask, ctx: JobContext) -> GenericResult:
        total = task.config.epochs
        checkpoint = ctx.checkpoint_dir / "step"

        def work() -> int:
            start = int(checkpoint.read_text()) if checkpoint.exists() else 0
            for step in range(start, total):
                ctx.check()
                time.sleep(self.delay)
                checkpoint.write_text(str(step + 1))
                ctx.checkpointed(step + 1)
                ctx.progress((step + 1) / total, step=step + 1, total=total, metrics={"loss": 1 / (step + 1)})
            return start

        self.started.set()
        start = await ctx.run(work)
        return GenericResult(summary=f"{total} steps", metrics={"started_from": start, "steps": total})


class FailingHandler:
    """RL: fails the way `environment` says: `retriable`, `fatal` (a ForsetiError) or `bug` (a ValueError)."""

    kind = TaskKind.RL

    def __init__(self) -> None:
        self.runs = 0

    def capabilities(self) -> list[Capability]:
        return [Capability(area="reinforcement-learning", name="failing")]

    async def run(self, task: RLTask, ctx: JobContext) -> GenericResult:
        self.runs += 1
        if task.environment == "retriable":
            raise ForsetiError("the executor is busy", retriable=True)
        if task.environment == "fatal":
            raise ForsetiError("the environment does not exist")
        raise ValueError("a bug in the handler")


def training(job_id: str | None = None, steps: int = 5) -> TrainingTask:
    """A training task for StepHandler."""
    return TrainingTask(
        request_id=job_id or uuid.uuid4().hex,
        model_type="classifier",
        config=TrainingConfig(epochs=steps),
        data_sources=[DataSource(rows=[{"x": 1.0}])],
    )


def breast_cancer_training(request_id: str, **config: Any) -> TrainingTask:
    """A classifier task on scikit-learn's breast-cancer rows (a real dataset of 569 rows, 30 columns)."""
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer()
    rows = [
        {**{f"f{i}": float(v) for i, v in enumerate(row)}, "label": int(label)}
        for row, label in zip(cancer.data, cancer.target, strict=True)
    ]
    return TrainingTask.model_validate(
        {
            "request_id": request_id,
            "model_type": "classifier",
            "config": config,
            "data_sources": [{"rows": rows, "target": "label"}],
        }
    )


def inference(job_id: str | None = None, rows: int = 2) -> InferenceTask:
    """An inference task for EchoHandler."""
    return InferenceTask(request_id=job_id or uuid.uuid4().hex, model_id="m1", inputs=[{"x": i} for i in range(rows)])


async def submit(bus: Bus, task: TaskBase) -> None:
    """Publish a task on its channel."""
    kind = next(kind for kind, model in TASK_MODELS.items() if isinstance(task, model))
    await bus.publish(task_channel(kind), encode(task))


async def run_task(bus: Bus, task: TaskBase, expect: str = "completed", timeout: float = 180) -> tuple[Any, Watcher]:
    """Submit `task`, wait for its job to end as `expect`; the end event's data and the job's events."""
    events = await watch(bus, task.request_id or "")
    await submit(bus, task)
    return (await events.wait_end(expect, timeout=timeout)).data, events


class Inbox:
    """Raw messages from a subscription; wait for a count without polling."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self._changed = asyncio.Condition()

    async def on_message(self, msg: Message) -> None:
        async with self._changed:
            self.items.append(msg.data)
            self._changed.notify_all()

    async def wait_count(self, count: int, timeout: float = 20.0) -> list[bytes]:
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self.items) >= count), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{len(self.items)} of {count} messages arrived in {timeout:g}s: {self.items[:5]}...{self.items[-5:]}"
            ) from None
        return list(self.items)


class Watcher:
    """Collects the decoded events of one job (or any channel) and waits for one of a type."""

    def __init__(self) -> None:
        self.events: list[Event[Any]] = []
        self._changed = asyncio.Event()

    async def on_message(self, msg: Message) -> None:
        self.events.append(decode(msg.data))
        self._changed.set()

    @staticmethod
    def short(event_type: str) -> str:
        """`forseti.job.completed.v1` -> `completed`, `forseti.deadletter.v1` -> `deadletter`."""
        return event_type.removeprefix("forseti.").rsplit(".", 1)[0].split(".")[-1]

    @property
    def types(self) -> list[str]:
        return [self.short(e.type) for e in self.events]

    async def wait_for(self, short_type: str, timeout: float = 15.0, count: int = 1) -> Event[Any]:
        """The count-th event of a type, once it has arrived."""
        matches = await self.wait_until(
            lambda events: [e for e in events if self.short(e.type) == short_type], count, timeout
        )
        return matches[count - 1]

    async def wait_end(self, expect: str = "completed", timeout: float = 120.0) -> Event[Any]:
        """The job's terminal event, which must be of type `expect` (the failure text shows otherwise)."""
        ends = await self.wait_until(
            lambda events: [e for e in events if self.short(e.type) in ("completed", "failed", "cancelled")], 1, timeout
        )
        end = ends[0]
        assert self.short(end.type) == expect, f"job ended {self.short(end.type)}: {end.data}"
        return end

    async def wait_until(
        self, select: Callable[[list[Event[Any]]], list[Event[Any]]], count: int = 1, timeout: float = 15.0
    ) -> list[Event[Any]]:
        """Wait until `select(events)` holds at least `count` events; return them."""

        async def seen() -> list[Event[Any]]:
            while len(found := select(self.events)) < count:
                self._changed.clear()
                await self._changed.wait()
            return found

        return await asyncio.wait_for(seen(), timeout)


async def watch(bus: Bus, job_id: str) -> Watcher:
    """Subscribe a Watcher to a job's channel."""
    watcher = Watcher()
    await bus.subscribe(jobs_channel(job_id), watcher.on_message)
    return watcher


async def stored_job(tmp: Path, job_id: str) -> JobRecord:
    """A job as the registry under `tmp` holds it (for checks after its worker stopped)."""
    store = SqliteStore(tmp / "registry.db")
    await store.open()
    job = await store.get_job(job_id)
    await store.close()
    assert job is not None, f"no job {job_id} in the registry"
    return job


def settings(tmp: Path, **overrides: Any) -> WorkerSettings:
    """Worker settings for tests: data under tmp, fast polls and retries."""
    values: dict[str, Any] = {
        "data_dir": tmp,
        "bus_url": "memory://",
        "poll_interval": 0.1,
        "heartbeat_interval": 0.5,
        "retry_delay": 0.0,
        "shutdown_grace": 5.0,
        # handlers' tests run their work in threads: a child process costs seconds of torch import per
        # worker, and monkeypatched handler internals would not reach it; test_isolation runs the
        # real handlers in child processes, as workers do by default
        "isolation": "thread",
        "worker_id": f"w-{uuid.uuid4().hex[:6]}",
    }
    return WorkerSettings(**{**values, **overrides})


@asynccontextmanager
async def running_worker(
    bus: Bus, handlers: list[Handler], tmp: Path, metrics: Metrics | None = None, **overrides: Any
) -> AsyncIterator[Worker]:
    """A worker running in the background until the block ends."""
    configured = settings(tmp, **overrides)  # registry_url=... shares one registry between workers
    worker = Worker(
        bus=bus, store=create_store(configured.registry), handlers=handlers, settings=configured, metrics=metrics
    )
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if task.done():
        task.result()  # surfaces the start-up error
    try:
        yield worker
    finally:
        ready.cancel()
        worker.request_stop()
        await asyncio.wait_for(task, 30)


def tiny_classifier(path: Path, columns: tuple[str, str] = ("a", "b")) -> Path:
    """A two-column, two-class 'classifier' (softmax of the raw columns) with its card inside."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["numeric"], ["prediction"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    card = ModelCard("classifier", numeric=list(columns), classes=["left", "right"])
    helper.set_model_props(model, {CARD_KEY: card.to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_announcement(folder: Path, model_id: str, *, device_id: str, version: str = "1") -> ModelAvailable:
    """A `tiny_classifier` written under `folder`, announced as version `version` of the name tiny."""
    path = tiny_classifier(folder / "model.onnx")
    return ModelAvailable(
        model_id=model_id,
        name="tiny",
        version=version,
        format="onnx",
        uri=path.as_uri(),
        sha256=sha256_of(path),
        size_bytes=path.stat().st_size,
        kind="classifier",
        created_at="2026-11-22T00:00:00Z",
        device_id=device_id,
    )
