"""Running one task through a real Worker on a bus, as the benchmarks do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from forseti.adapters.bus import Bus, MemoryBroker, Message, create_bus
from forseti.adapters.registry import SqliteStore
from forseti.schemas.catalog import jobs_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.jobs import JobCompleted, JobEvent, JobFailed, JobProgress, JobResult
from forseti.schemas.tasks import TASK_MODELS, TaskBase, task_channel
from forseti.worker.engine.context import Handler
from forseti.worker.engine.runtime import Worker
from forseti.worker.engine.settings import WorkerSettings


async def run_job(
    url: str,
    task: TaskBase,
    handler: Handler,
    data_dir: Path,
    on_progress: Callable[[JobProgress], None] | None = None,
    *,
    data_root: Path | None = None,
) -> JobResult:
    """Run one task through a Worker with `handler` on `url`; its result, or RuntimeError when it fails."""
    job_id = task.request_id or ""
    kind = next(kind for kind, model in TASK_MODELS.items() if isinstance(task, model))
    broker = MemoryBroker()  # memory:// clients meet only on a shared broker; ignored by other transports
    client = create_bus(url, broker=broker)
    await client.connect()
    done: asyncio.Future[JobEvent] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Message) -> None:
        event = decode(msg.data, expect=JobEvent).data
        if isinstance(event, JobProgress) and on_progress is not None:
            on_progress(event)
        elif isinstance(event, JobCompleted | JobFailed) and not done.done():
            done.set_result(event)

    await client.subscribe(jobs_channel(job_id), on_event)
    settings = WorkerSettings(
        bus_url=url,
        data_dir=data_dir,
        data_root=data_root,
        concurrency=1,
        poll_interval=0.2,
        group=f"bench-{kind.value}",
        heartbeat_interval=5,
    )
    worker = Worker(
        bus=create_bus(url, broker=broker), store=SqliteStore(data_dir / "r.db"), handlers=[handler], settings=settings
    )
    running = asyncio.create_task(worker.run())
    await worker.ready.wait()
    await client.publish(task_channel(kind), encode(task))
    end = await done
    worker.request_stop()
    await running
    await client.close()
    if isinstance(end, JobFailed):
        raise RuntimeError(f"benchmark job failed: {end.code}: {end.message}")
    assert isinstance(end, JobCompleted)
    return end.result


async def request_latencies(client: Bus, channel: str, data: bytes, count: int, *, warmup: int = 200) -> list[float]:
    """Seconds of `count` sequential requests on `channel` after `warmup` unmeasured ones, sorted."""
    for _ in range(warmup):
        await client.request(channel, data, timeout=10)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await client.request(channel, data, timeout=10)
        latencies.append(time.perf_counter() - started)
    return sorted(latencies)
