"""JobContext: the safe points a handler calls, from a thread or from the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from forseti.adapters.registry import SqliteStore
from forseti.schemas.jobs import JobProgress
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import TaskKind
from forseti.worker.engine.context import JobContext, JobStopped, StopReason
from forseti.worker.engine.inputs import Inputs


class Collect:
    def __init__(self) -> None:
        self.progress_events: list[JobProgress] = []

    def progress(self, event: JobProgress) -> None:
        self.progress_events.append(event)

    async def announce_model(self, event: ModelAvailable, job_id: str) -> None:
        raise AssertionError("not used here")

    async def fence(self) -> None:
        return None


def context(tmp_path: Path) -> tuple[JobContext, Collect]:
    announcer = Collect()
    ctx = JobContext(
        job_id="j",
        kind=TaskKind.TRAINING,
        attempt=1,
        resumed=False,
        work_dir=tmp_path / "j",
        inputs=Inputs(tmp_path),
        store=SqliteStore(tmp_path / "r.db"),
        announcer=announcer,
        loop=asyncio.get_running_loop(),
    )
    return ctx, announcer


async def test_acheck_waits_while_paused_and_raises_once_cancelled(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path)
    await ctx.acheck()  # running: returns at once
    ctx.pause()
    waiting = asyncio.create_task(ctx.acheck())
    await asyncio.sleep(0.05)  # not waiting for anything: the check must still be blocked after this
    assert not waiting.done()
    ctx.resume()
    await asyncio.wait_for(waiting, 5)
    ctx.request_stop(StopReason.CANCEL, "enough")
    with pytest.raises(JobStopped, match="enough"):
        await ctx.acheck()


async def test_a_cancel_outranks_a_shutdown_and_wakes_a_paused_thread(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path)
    ctx.pause()
    blocked = asyncio.create_task(ctx.run(ctx.check))
    ctx.request_stop(StopReason.SHUTDOWN)
    ctx.request_stop(StopReason.CANCEL, "user")
    with pytest.raises(JobStopped) as stopped:
        await asyncio.wait_for(blocked, 5)
    assert stopped.value.reason is StopReason.CANCEL


async def test_progress_from_a_thread_arrives_on_the_loop_in_order(tmp_path: Path) -> None:
    ctx, announcer = context(tmp_path)

    def work() -> None:
        for step in range(1, 6):
            ctx.progress(step / 5, step=step, total=5, metrics={"loss": 1.0 / step})

    await ctx.run(work)
    await asyncio.sleep(0)  # the thread's call_soon_threadsafe callbacks run on the next loop pass
    assert [e.step for e in announcer.progress_events] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "j").exists(), "folders are made only when a handler asks for them"
    assert ctx.checkpoint_dir.is_dir()
