"""Workers sharing a registry: one runs a job at a time, a dead worker's job is taken over, its URL stays secret."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import JobRecord, create_store
from forseti.schemas.capabilities import Capability
from forseti.schemas.catalog import DEADLETTER, MODELS, STATUS
from forseti.schemas.envelope import decode, encode
from forseti.schemas.jobs import GenericResult, JobState, JobStatus, JobStatusQuery
from forseti.schemas.tasks import TaskKind, TrainingTask, dump_task
from forseti.worker.engine.context import JobContext

from ..helpers import StepHandler, Watcher, running_worker, submit, tiny_announcement, training, watch

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


async def _die_holding(registry_url: str, task: TrainingTask, times: int, *, hand_back: bool = False) -> None:
    """`times` workers on other hosts claim the job; each dies holding it (its lease lapses), or with
    `hand_back` gives it back as a worker shutting down does."""
    store = create_store(registry_url)
    await store.open()
    try:
        for n in range(times):
            record = JobRecord(job_id=task.request_id or "", kind=TaskKind.TRAINING, task=dump_task(task))
            claim = await store.claim_job(record, owner=f"host-{n}", ttl=0.05)
            assert claim.won
            if hand_back:
                pending = claim.job.model_copy(update={"state": JobState.PENDING})
                assert await store.update_held_job(pending, owner=f"host-{n}", release=True)
            await asyncio.sleep(0.1)  # the lease lapses
    finally:
        await store.close()


async def test_a_task_that_killed_every_worker_it_reached_is_dead_lettered_and_failed(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, registry_url: str
) -> None:
    """A poison task vanished after the bus's max_deliver, its job `running` for ever (issue 13)."""
    task = training(steps=3)
    job_id = task.request_id or ""
    await _die_holding(registry_url, task, 3)
    letters = Watcher()
    await client.subscribe(DEADLETTER, letters.on_message)
    handler = StepHandler()
    async with running_worker(MemoryBus(broker), [handler], tmp_path, registry_url=registry_url, **LEASES):
        watcher = await watch(client, job_id)
        await submit(client, task)
        failed = (await watcher.wait_end("failed")).data
        assert failed.code == "retries_exhausted"
        assert "3 attempts ended with their worker gone" in failed.message
        letter = (await letters.wait_for("deadletter")).data
        assert (letter.reason, letter.job_id) == ("retries_exhausted", job_id)
        assert orjson.loads(base64.b64decode(letter.original_b64))["data"]["request_id"] == job_id
        reply = await client.request(STATUS, encode(JobStatusQuery(job_id=job_id)), timeout=5)
        status = decode(reply, expect=JobStatus).data
        assert (status.state, status.attempt) == (JobState.FAILED, 4)
    assert not handler.started.is_set(), "the poison task was not run again"


async def test_tasks_handed_back_at_shutdown_are_not_taken_for_poison(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, registry_url: str
) -> None:
    task = training(steps=2)
    await _die_holding(registry_url, task, 4, hand_back=True)
    async with running_worker(MemoryBus(broker), [StepHandler()], tmp_path, registry_url=registry_url, **LEASES):
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        assert (await watcher.wait_for("accepted")).data.attempt == 5
        await watcher.wait_end("completed")


class _AnnouncesAfterAGap:
    """Training: waits (as a worker under SIGSTOP would, its heartbeat silent) until `resume` is set,
    then announces a model."""

    kind = TaskKind.TRAINING

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.waiting, self.resume = asyncio.Event(), asyncio.Event()

    def capabilities(self) -> list[Capability]:
        return [Capability(area="training", name="gap")]

    async def run(self, task: TrainingTask, ctx: JobContext) -> GenericResult:
        self.waiting.set()
        await self.resume.wait()
        await ctx.announce_model(tiny_announcement(self.folder, task.request_id or "", device_id="d"))
        return GenericResult(summary="announced")


async def test_a_worker_whose_job_was_taken_over_while_it_was_away_announces_nothing(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, registry_url: str
) -> None:
    """A worker stopped past its lease went on, once continued, to announce the models of a job that
    another worker had taken over and announced: every model twice (issue 13, bench/faults.py pause)."""
    handler = _AnnouncesAfterAGap(tmp_path / "model")
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    async with running_worker(MemoryBus(broker), [handler], tmp_path / "a", registry_url=registry_url, **LEASES) as a:
        task = training(steps=1)
        job_id = task.request_id or ""
        await submit(client, task)
        await asyncio.wait_for(handler.waiting.wait(), 10)
        renew = a.store.renew_lease

        async def frozen(job_id: str, *, owner: str, ttl: float) -> bool:
            return True  # the heartbeat beats but renews nothing, as for a worker under SIGSTOP

        a.store.renew_lease = frozen  # type: ignore[method-assign]
        await asyncio.sleep(LEASES["lease_ttl"] + 0.3)
        record = await a.store.get_job(job_id)
        assert record is not None
        assert (await a.store.claim_job(record, owner="host-b", ttl=60)).won, "the other worker takes the job"
        a.store.renew_lease = renew  # type: ignore[method-assign]
        handler.resume.set()
        await asyncio.sleep(0.5)
        lost = a.metrics.registry.get_sample_value("forseti_jobs_total", {"kind": "training", "outcome": "lost"})
        assert lost == 1, "the job ends here as lost, its outcome left to host-b"
        job = await a.store.get_job(job_id)
        assert job is not None and job.lease_owner == "host-b"
    assert not [e for e in models.events if e.type.endswith("available.v1")], "host-b announces, not this worker"
