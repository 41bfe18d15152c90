"""What the RL benchmarks share: a worker, an optional executor and a client on one bus, running one task."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forseti.adapters.bus import Bus, Message, create_bus
from forseti.adapters.registry import SqliteStore
from forseti.envs.executor import EnvServer, gym_factory
from forseti.schemas.catalog import jobs_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.jobs import JobCompleted, JobEvent, JobFailed, JobProgress, RLResult
from forseti.schemas.tasks import RLTask, TaskKind, task_channel
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.runtime import Worker
from forseti.worker.settings import WorkerSettings


@contextlib.contextmanager
def executor_process(url: str, env_id: str, executor_id: str, num_envs: int) -> Iterator[None]:
    """`forseti executor` in its own process, as an action system would run it; ready when it says so."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forseti.worker",
            "executor",
            "--env",
            env_id,
            "--id",
            executor_id,
            "--num-envs",
            str(num_envs),
            "--bus",
            url,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving" in line:
            break
    else:
        raise RuntimeError(f"executor did not start: {proc.wait()}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc.stderr.close()


@dataclass
class Run:
    """One finished RL job: its result and the progress curve."""

    result: RLResult
    curve: list[tuple[int, float]] = field(default_factory=list)
    last_progress: dict[str, float] = field(default_factory=dict)


async def run_rl(
    url: str,
    task: dict[str, Any],
    *,
    executor_env: str | None = None,
    num_envs: int = 1,
    env_kwargs: dict[str, Any] | None = None,
    progress_every: int = 5_000,
) -> Run:
    """Run one RL task through a Worker (and an executor when `executor_env` is set) on `url`."""
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    executor_id = f"bench-{uuid.uuid4().hex[:6]}"
    executor_bus: Bus | None = None
    server = None
    if executor_env is not None:
        executor_bus = create_bus(url)
        await executor_bus.connect()
        server = EnvServer(
            executor_bus,
            executor_id,
            gym_factory(executor_env, **(env_kwargs or {})),
            num_envs=num_envs,
            environment=executor_env,
        )
        await server.start()
        task = {**task, "executor": executor_id}
    rl_task = RLTask.model_validate({**task, "request_id": job_id})
    client = create_bus(url)
    await client.connect()
    done: asyncio.Future[JobEvent] = asyncio.get_running_loop().create_future()
    curve: list[tuple[int, float]] = []
    last: dict[str, float] = {}

    async def on_event(msg: Message) -> None:
        event = decode(msg.data, expect=JobEvent).data
        if isinstance(event, JobProgress):
            last.update(event.metrics)
            if "mean_reward_100" in event.metrics:
                curve.append((event.step, event.metrics["mean_reward_100"]))
        elif isinstance(event, JobCompleted | JobFailed) and not done.done():
            done.set_result(event)

    await client.subscribe(jobs_channel(job_id), on_event)
    with tempfile.TemporaryDirectory() as tmp:
        settings = WorkerSettings(
            bus_url=url, data_dir=Path(tmp), concurrency=1, poll_interval=0.2, group="bench-rl", heartbeat_interval=5
        )
        worker = Worker(
            bus=create_bus(url),
            store=SqliteStore(Path(tmp) / "r.db"),
            handlers=[RLHandler(progress_every=progress_every)],
            settings=settings,
        )
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        await client.publish(task_channel(TaskKind.RL), encode(rl_task))
        end = await done
        worker.request_stop()
        await running
    await client.close()
    if server is not None and executor_bus is not None:
        await server.stop()
        await executor_bus.close()
    if isinstance(end, JobFailed):
        raise RuntimeError(f"benchmark job failed: {end.code}: {end.message}")
    assert isinstance(end, JobCompleted)
    assert isinstance(end.result, RLResult)
    return Run(end.result, curve, last)
