"""What the RL benchmarks share: one RL task through a worker, with an optional executor beside it."""

from __future__ import annotations

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

from jobs import run_job

from forseti.adapters.bus import Bus, create_bus
from forseti.envs.executor import EnvServer, gym_factory
from forseti.schemas.jobs import JobProgress, RLResult
from forseti.schemas.tasks import RLTask
from forseti.worker.handlers.rl import RLHandler


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
    curve: list[tuple[int, float]] = []
    last: dict[str, float] = {}

    def on_progress(event: JobProgress) -> None:
        last.update(event.metrics)
        if "mean_reward_100" in event.metrics:
            curve.append((event.step, event.metrics["mean_reward_100"]))

    with tempfile.TemporaryDirectory() as tmp:
        result = await run_job(url, rl_task, RLHandler(progress_every=progress_every), Path(tmp), on_progress)
    if server is not None and executor_bus is not None:
        await server.stop()
        await executor_bus.close()
    assert isinstance(result, RLResult)
    return Run(result, curve, last)
