"""Workers sharing a registry: one runs a job at a time, a dead worker's job is taken over, its URL stays secret."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import JobRecord, create_store
from forseti.schemas.catalog import STATUS
from forseti.schemas.envelope import decode, encode
from forseti.schemas.jobs import JobState, JobStatus, JobStatusQuery
from forseti.schemas.tasks import TaskKind, dump_task

from ..helpers import StepHandler, running_worker, submit, training, watch

LEASES: dict[str, Any] = {"heartbeat_interval": 0.2, "lease_ttl": 1.0}
"""Short leases, so a deferred duplicate comes back within a second or two."""


async def test_a_task_published_twice_while_it_runs_is_run_once(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, registry_url: str
) -> None:
    handler = StepHandler(delay=0.15)
    shared: dict[str, Any] = {"registry_url": registry_url, **LEASES}
    async with (
        running_worker(MemoryBus(broker), [handler], tmp_path / "a", **shared) as a,
        running_worker(MemoryBus(broker), [StepHandler(delay=0.15)], tmp_path / "b", **shared) as b,
    ):
        task = training(steps=12)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("accepted")
        await submit(client, task)  # a client retrying its publish while the job runs
        await watcher.wait_for("completed", timeout=20)
        replayed = await watcher.wait_for("completed", count=2, timeout=20)
        assert watcher.types.count("accepted") == 1, f"ran beside itself: {watcher.types}"
        ends = [e.data.replayed for e in watcher.events if e.type.endswith("completed.v1")]
        assert ends == [False, True], "the duplicate came back after the job ended and replayed its outcome"
        assert replayed.data.result.metrics["started_from"] == 0
        deferred = sum(
            w.metrics.registry.get_sample_value("forseti_jobs_total", {"kind": "training", "outcome": "deferred"}) or 0
            for w in (a, b)
        )
        assert deferred >= 1
        job = await a.store.get_job(task.request_id or "")
        assert job is not None
        assert (job.state, job.attempt, job.lease_owner) == (JobState.COMPLETED, 1, None)


async def test_a_job_whose_worker_died_shows_as_orphaned_then_is_taken_over(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, registry_url: str
) -> None:
    task = training(steps=3)
    job_id = task.request_id or ""
    store = create_store(registry_url)
    await store.open()
    try:  # a worker on another host took the job and died: its lease lapses, nobody renews it
        record = JobRecord(job_id=job_id, kind=TaskKind.TRAINING, task=dump_task(task))
        assert (await store.claim_job(record, owner="host-1-dead", ttl=0.1)).won
    finally:
        await store.close()
    await asyncio.sleep(0.2)  # time for the lease to lapse
    async with running_worker(MemoryBus(broker), [StepHandler()], tmp_path, registry_url=registry_url, **LEASES):
        reply = await client.request(STATUS, encode(JobStatusQuery(job_id=job_id)), timeout=5)
        status = decode(reply, expect=JobStatus).data
        assert (status.state, status.orphaned, status.worker) == (JobState.RUNNING, True, "host-1-dead")
        watcher = await watch(client, job_id)
        await submit(client, task)  # the bus delivers the dead worker's task again
        accepted = await watcher.wait_for("accepted")
        assert (accepted.data.resumed, accepted.data.attempt) == (True, 2)
        await watcher.wait_for("completed")
        reply = await client.request(STATUS, encode(JobStatusQuery(job_id=job_id)), timeout=5)
        status = decode(reply, expect=JobStatus).data
        assert (status.state, status.orphaned, status.attempt) == (JobState.COMPLETED, False, 2)


async def test_the_registry_password_is_neither_logged_nor_shown_in_health(
    broker: MemoryBroker, tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = postgres_url.split(":")[2].split("@")[0]
    caplog.set_level(logging.DEBUG)
    async with running_worker(MemoryBus(broker), [StepHandler()], tmp_path, registry_url=postgres_url) as worker:
        _, health = worker.health()
    assert str(health["registry"]).startswith("postgresql://forseti:***@127.0.0.1:")
    assert password not in orjson.dumps(health).decode()
    assert "registry postgresql://forseti:***@" in caplog.text
    assert password not in caplog.text
