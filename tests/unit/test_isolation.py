"""Jobs' work in child processes: a crash, an out-of-memory failure or a job that never reaches a
safe point ends that job alone; progress, checkpoints, pause and cancel cross the boundary."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.schemas.capabilities import Capability
from forseti.schemas.catalog import CONTROL
from forseti.schemas.control import CancelJob, PauseJob, ResumeJob
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import GenericResult
from forseti.schemas.tasks import DataSource, TaskKind, TrainingConfig, TrainingTask
from forseti.worker.engine.context import Handler, JobContext, Work
from forseti.worker.handlers.finetune import FinetuneHandler
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.handlers.training import TrainingHandler
from tests.helpers import breast_cancer_training, run_task, running_worker, submit, watch
from tests.llm import finetune
from tests.unit.test_rl import rl_task


def work(task: TrainingTask, ctx: Work) -> dict[str, float]:
    """The work of the job `task.name` names; module-level so that a child process can import it."""
    match task.name:
        case "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        case "sigkill":  # what the kernel's out-of-memory killer sends
            os.kill(os.getpid(), signal.SIGKILL)
        case "exit":
            os._exit(3)
        case "hog":  # past the job's address-space limit, which a thread of the worker would not have
            hoard = bytearray(ctx.memory_limit * 2)
            return {"bytes": float(len(hoard))}
        case "spin":  # no safe point at all: only killing its process stops it
            while True:
                time.sleep(0.05)
    total = task.config.epochs
    checkpoint = ctx.checkpoint_dir / "step"
    start = int(checkpoint.read_text()) if checkpoint.exists() else 0
    for step in range(start, total):
        ctx.check()
        time.sleep(0.05)
        checkpoint.write_text(str(step + 1))
        ctx.checkpointed(step + 1)
        ctx.progress((step + 1) / total, step=step + 1, total=total, metrics={"pid": float(os.getpid())})
    return {"started_from": float(start), "pid": float(os.getpid())}


class ChildHandler:
    """Training whose whole work runs through `ctx.work`, as the real handlers' does."""

    kind = TaskKind.TRAINING

    def capabilities(self) -> list[Capability]:
        return [Capability(area="training", name="child")]

    async def run(self, task: TrainingTask, ctx: JobContext) -> GenericResult:
        return GenericResult(summary=task.name or "", metrics=await ctx.work(work, task))


def task(name: str, steps: int = 3, **fields: object) -> TrainingTask:
    return TrainingTask.model_validate(
        {
            "request_id": f"{name}-{uuid.uuid4().hex[:8]}",
            "name": name,
            "model_type": "classifier",
            "config": TrainingConfig(epochs=steps).model_dump(),
            "data_sources": [DataSource(rows=[{"x": 1.0}]).model_dump()],
            **fields,
        }
    )


async def test_a_crashed_job_fails_alone_and_the_worker_goes_on(tmp_path: Path) -> None:
    bus = MemoryBus()
    async with running_worker(bus, [ChildHandler()], tmp_path, isolation="process", concurrency=2) as worker:
        steady = task("steady", steps=40)
        steady_events = await watch(bus, steady.request_id or "")
        await submit(bus, steady)
        await steady_events.wait_for("progress")
        crashed, _ = await run_task(bus, task("segfault"), expect="failed")
        assert crashed.code == "handler_crashed"
        assert "SIGSEGV" in crashed.message
        done = await steady_events.wait_end("completed", timeout=60)
        assert done.data.result.metrics["pid"] != os.getpid()  # it ran in a child, beside the crash
        exited, _ = await run_task(bus, task("exit"), expect="failed")
        assert exited.code == "handler_crashed" and "status 3" in exited.message
        after, _ = await run_task(bus, task("after"))
        assert after.result.metrics["started_from"] == 0
        assert worker.health()[0]


async def test_a_job_out_of_memory_fails_as_resource_exhausted(tmp_path: Path) -> None:
    bus = MemoryBus()
    async with running_worker(bus, [ChildHandler()], tmp_path, isolation="process", max_job_memory_mb=256):
        hog, _ = await run_task(bus, task("hog"), expect="failed")
        assert hog.code == "resource_exhausted"
        assert "256 MiB" in hog.message
        killed, _ = await run_task(bus, task("sigkill"), expect="failed")
        assert killed.code == "resource_exhausted" and "SIGKILL" in killed.message
        small, _ = await run_task(bus, task("small", max_memory_mb=128), expect="completed")
        assert small.result.summary == "small"


async def test_progress_checkpoints_and_pause_cross_the_process_boundary(tmp_path: Path) -> None:
    bus = MemoryBus()
    async with running_worker(bus, [ChildHandler()], tmp_path, isolation="process"):
        job = task("paused", steps=30)
        events = await watch(bus, job.request_id or "")
        await submit(bus, job)
        await events.wait_for("progress")
        await bus.publish(CONTROL, encode(PauseJob(job_id=job.request_id or "")))
        await asyncio.sleep(0.6)  # the pause reaches the child within a step
        before = events.types.count("progress")
        await asyncio.sleep(0.6)
        assert events.types.count("progress") == before, "a paused job in a child went on"
        await bus.publish(CONTROL, encode(ResumeJob(job_id=job.request_id or "")))
        done = await events.wait_end("completed", timeout=60)
        steps = [e.data.step for e in events.events if e.type.endswith("progress.v1") and e.data.step]
        assert steps == sorted(steps) and steps[-1] == 30
        assert (tmp_path / "jobs" / (job.request_id or "") / "checkpoints" / "step").read_text() == "30"
        assert done.data.result.metrics["started_from"] == 0


async def test_a_job_without_safe_points_is_killed_on_cancel_and_on_timeout(tmp_path: Path) -> None:
    bus = MemoryBus()
    async with running_worker(bus, [ChildHandler()], tmp_path, isolation="process", stop_grace=0.5):
        job = task("spin")
        events = await watch(bus, job.request_id or "")
        await submit(bus, job)
        await events.wait_for("accepted")
        await asyncio.sleep(0.5)
        asked = time.monotonic()
        await bus.publish(CONTROL, encode(CancelJob(job_id=job.request_id or "")))
        await events.wait_end("cancelled", timeout=10)
        assert time.monotonic() - asked < 2.0
        timed, _ = await run_task(bus, task("spin", max_duration=1.0), expect="failed", timeout=15)
        assert timed.code == "timeout"
        after, _ = await run_task(bus, task("after"))
        assert after.result.summary == "after"


async def test_the_real_handlers_train_in_child_processes(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    handlers: list[Handler] = [TrainingHandler(), RLHandler(progress_every=64), FinetuneHandler(progress_seconds=0)]
    async with running_worker(MemoryBus(broker), handlers, tmp_path, isolation="process", concurrency=3) as worker:
        tasks = [
            breast_cancer_training("bc-child", epochs=2),
            rl_task("ppo", "CartPole-v1", total_timesteps=128, n_steps=64, checkpoint_interval=64),
            finetune(export={"gguf": ["f32"]}),
        ]
        watchers = [await watch(client, t.request_id or "") for t in tasks]
        for t in tasks:
            await submit(client, t)
        ends = [(await w.wait_end("completed", timeout=240)).data for w in watchers]
        assert ends[0].result.metrics.total_epochs == 2
        assert ends[1].result.metrics.custom_metrics["timesteps"] >= 128
        assert set(ends[2].result.gguf) == {"f32"}
        assert all(w.types.count("progress") for w in watchers), "progress crossed from every child"
        assert (tmp_path / "jobs" / (tasks[1].request_id or "") / "checkpoints" / "rl-state.safetensors").is_file()
        assert worker._pool is not None and worker._pool.warm == 3, "each job's process went back to the pool"
        # a cancel reaches SB3's loop in its child process as it does in a thread
        long = rl_task("ppo", "CartPole-v1", total_timesteps=1_000_000, n_steps=256)
        events = await watch(client, long.request_id or "")
        await submit(client, long)
        await events.wait_for("progress", timeout=60)
        asked = time.monotonic()
        await client.publish(CONTROL, encode(CancelJob(job_id=long.request_id or "")))
        await events.wait_end("cancelled", timeout=10)
        assert time.monotonic() - asked < 2.0
