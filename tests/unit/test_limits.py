"""A job whose network or buffer cannot fit the worker is refused before anything is allocated
(issue 13: `net_arch [65536, 65536]` tried to allocate 17 GB, and `hidden: [65536] x 16` had the
kernel OOM-kill the worker at 23.8 GB, losing every job on it)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.schemas.tasks import RLTask
from forseti.worker.engine.limits import mlp_parameters, module_parameters
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.handlers.training_models import mlp

from ..helpers import breast_cancer_training, run_task, running_worker


def test_parameters_are_counted_without_allocating_them() -> None:
    assert mlp_parameters([30, 64, 2]) == module_parameters(lambda: mlp(30, [64], 2)) == 31 * 64 + 65 * 2
    assert module_parameters(lambda: mlp(65_536, [65_536] * 16, 2)) > 6 * 10**10  # made on the meta device


@pytest.mark.parametrize(
    ("algorithm", "environment"), [("ppo", "CartPole-v1"), ("dqn", "CartPole-v1"), ("sac", "Pendulum-v1")]
)
async def test_an_rl_policy_too_large_for_the_worker_is_refused(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, algorithm: str, environment: str
) -> None:
    task = RLTask.model_validate(
        {
            "request_id": f"big-{uuid.uuid4().hex[:8]}",
            "algorithm": algorithm,
            "environment": environment,
            "config": {"total_timesteps": 1_000},
            "policy": {"net_arch": [65_536, 65_536]},
        }
    )
    failed, _ = await run_task_on(broker, client, tmp_path, RLHandler(), task, expect="failed")
    assert failed.code == "resource_exhausted"
    assert f"{algorithm} with net_arch [65536, 65536]" in failed.message and "GiB" in failed.message


async def test_a_supervised_network_too_large_for_the_worker_is_refused(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    task = breast_cancer_training(f"big-{uuid.uuid4().hex[:8]}", hidden=[65_536] * 16, epochs=1)
    failed, _ = await run_task_on(broker, client, tmp_path, TrainingHandler(), task, expect="failed")
    assert failed.code == "resource_exhausted"
    assert "parameters needs about" in failed.message


async def test_the_operator_sets_what_a_job_may_take(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    task = breast_cancer_training(f"small-{uuid.uuid4().hex[:8]}", hidden=[256, 256], epochs=1)
    failed, _ = await run_task_on(
        broker, client, tmp_path, TrainingHandler(), task, expect="failed", max_job_memory_mb=1
    )
    assert failed.code == "resource_exhausted"
    assert "more than the 1.0 MiB a job may take on this worker (max_job_memory_mb)" in failed.message


async def run_task_on(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, handler: Any, task: Any, expect: str, **settings: Any
) -> tuple[Any, Any]:
    async with running_worker(MemoryBus(broker), [handler], tmp_path, **settings):
        return await run_task(client, task, expect=expect, timeout=60)
