"""Schedules on a real nats-server and PostgreSQL: three workers fire each slot once, also when one
of them is restarted across a slot; and the `forseti schedules` commands against a worker process."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import TansuBroker
from forseti.adapters.registry import FireRecord, create_store
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import JobState
from forseti.schemas.schedules import Overlap, ScheduleCreate, ScheduleDelete, ScheduleSpec
from forseti.schemas.tasks import TaskKind, task_channel
from forseti.worker.cli.schedules import ask_schedules
from forseti.worker.schedules.clock import slot_name, slot_time
from forseti.worker.schedules.firing import fire_job_id

from ..helpers import EchoHandler, inference, running_worker
from .test_cli import WorkerProcess, run

SECONDS = 8.0
"""How long the schedule runs: about 8 slots of 1 s."""


async def test_three_workers_fire_each_slot_once_with_one_restarted(
    nats_server: object, postgres_url: str, tmp_path: Path
) -> None:
    url = nats_server.url  # type: ignore[attr-defined]
    handlers = [EchoHandler(), EchoHandler(), EchoHandler(), EchoHandler()]
    template = inference(rows=1).model_dump(mode="json", exclude_none=True)
    template.pop("request_id")
    schedule = ScheduleSpec(kind=TaskKind.INFERENCE, task=template, every_seconds=1.0, overlap=Overlap.ALLOW_ALL)
    client = create_bus(url)
    await client.connect()
    common: dict[str, Any] = {"registry_url": postgres_url, "schedule_poll": 0.2}
    async with (
        running_worker(create_bus(url), [handlers[0]], tmp_path / "a", **common),
        running_worker(create_bus(url), [handlers[1]], tmp_path / "b", **common),
    ):
        restarted = running_worker(create_bus(url), [handlers[2]], tmp_path / "c", worker_id="c", **common)
        await restarted.__aenter__()
        await ask_schedules(client, ScheduleCreate(id="every-second", spec=schedule), None, timeout=10)
        started = datetime.now(UTC)
        await asyncio.sleep(3.0)
        await restarted.__aexit__(None, None, None)  # down across a slot or two
        await asyncio.sleep(2.2)
        async with running_worker(create_bus(url), [handlers[3]], tmp_path / "c", worker_id="c", **common):
            await asyncio.sleep(SECONDS - 5.2)
            await ask_schedules(client, ScheduleDelete(id="every-second"), None, timeout=10)
            stopped = datetime.now(UTC)
            await asyncio.sleep(1.5)  # the last jobs end
    await client.close()

    store = create_store(postgres_url)
    await store.open()
    jobs = [j for j in await store.list_jobs(limit=1000) if j.job_id.startswith("every-second-")]
    await store.close()
    slots = sorted(slot_time(j.job_id.removeprefix("every-second-")) for j in jobs)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
    assert all(abs(gap - 1.0) < 1e-6 for gap in gaps), f"a slot was left out or fired twice: {gaps}"
    assert len(slots) >= int((stopped - started).total_seconds()) - 1
    assert all(j.state is JobState.COMPLETED and j.attempt == 1 for j in jobs)
    # each slot ran once, on whichever worker took it: no duplicate reached a handler
    assert sum(h.runs for h in handlers) == len(jobs)


def test_schedules_commands_against_a_worker(nats_server: object, tmp_path: Path) -> None:
    """The commands of docs/operations.md: create from a task file, list, show, pause, resume, delete."""
    url = nats_server.url  # type: ignore[attr-defined]
    task = tmp_path / "retrain.json"
    task.write_text(json.dumps({"model_id": "m1", "inputs": [{"x": 1.0}]}))
    worker = WorkerProcess(url, tmp_path / "worker")
    try:
        created = run(url, "schedules", "create", "nightly", "--task", str(task), "--kind", "inference",
                      "--cron", "0 3 * * *", "--timezone", "Europe/Paris", "--user", "ana")  # fmt: skip
        assert created.returncode == 0, created.stderr.decode()
        assert "nightly" in created.stdout.decode() and "Europe/Paris" in created.stdout.decode()
        listed = run(url, "schedules", "list", "--user", "ana", "--json")
        [info] = json.loads(listed.stdout)["schedules"]
        assert info["next_fire"].endswith(":00:00Z") and info["spec"]["task"]["inputs"] == [{"x": 1.0}]
        assert json.loads(run(url, "schedules", "list", "--user", "bob", "--json").stdout)["schedules"] == []
        refused = run(url, "schedules", "pause", "nightly", "--user", "bob")
        assert refused.returncode == 1 and "forbidden" in refused.stderr.decode()
        paused = run(url, "schedules", "pause", "nightly", "--user", "ana", "--json")
        assert json.loads(paused.stdout)["schedules"][0]["paused"] is True
        assert run(url, "schedules", "resume", "nightly", "--user", "ana").returncode == 0
        shown = run(url, "schedules", "show", "nightly", "--user", "ana")
        assert shown.returncode == 0 and "active" in shown.stdout.decode()
        assert run(url, "schedules", "delete", "nightly", "--user", "ana").returncode == 0
        gone = run(url, "schedules", "show", "nightly", "--user", "ana")
        assert gone.returncode == 1 and "no schedule nightly" in gone.stderr.decode()
        watch = ("--when-drifts", "assistant", "--metric", "latency_ms", "--above", "250", "--window", "600")
        drift = run(url, "schedules", "create", "drift", "--task", str(task), "--kind", "inference", *watch)
        assert drift.returncode == 0, drift.stderr.decode()
        assert "latency_ms of assistant > 250 over 600s" in drift.stdout.decode()
        tail = run(url, "schedules", "create", "tail", "--task", str(task), "--kind", "inference", *watch,
                   "--latency", "p95")  # fmt: skip
        assert tail.returncode == 0, tail.stderr.decode()
        assert "latency_ms p95 of assistant > 250 over 600s" in tail.stdout.decode()
        bad = run(url, "schedules", "create", "bad", "--task", str(task), "--kind", "inference",
                  "--when-drifts", "assistant", "--metric", "accuracy")  # fmt: skip
        assert bad.returncode == 1 and "metric" in bad.stderr.decode()
    finally:
        assert worker.stop() == 0


async def test_on_kafka_a_fire_published_twice_runs_once(fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    """Kafka has no dedupe id: a fire whose worker published it but died before recording that is
    published again by another tick, and the registry's job id turns the second copy into a replay."""
    url = fresh_tansu.url + "?session_timeout_ms=6000&heartbeat_interval_ms=500&partitions=2"
    handler = EchoHandler()
    template = inference(rows=1).model_dump(mode="json", exclude_none=True)
    template.pop("request_id")
    hourly = ScheduleSpec(kind=TaskKind.INFERENCE, task=template, every_seconds=3600)
    client = create_bus(url)
    await client.connect()
    # both copies may come in one fetch: the second then finds the first's lease live and comes back
    # when that lease would have lapsed, so the lease is short here
    settings: dict[str, Any] = {"schedule_poll": 0.2, "bus_url": url, "lease_ttl": 3.0}
    async with running_worker(create_bus(url), [handler], tmp_path, **settings) as worker:
        await ask_schedules(client, ScheduleCreate(id="hourly", spec=hourly), None, timeout=30)
        slot = slot_name(datetime.now(UTC) - timedelta(seconds=30))
        fire = FireRecord(
            schedule_id="hourly",
            slot=slot,
            job_id=fire_job_id("hourly", slot),
            action="fired",
            created_at=(datetime.now(UTC) - timedelta(seconds=10)).isoformat().replace("+00:00", "Z"),
        )
        store = create_store(str(tmp_path / "registry.db"))
        await store.open()
        await store.claim_fire(fire)  # decided, never stamped published ...
        task = inference(fire.job_id, rows=1)
        await client.publish(task_channel(TaskKind.INFERENCE), encode(task))  # ... though it went out
        replayed = worker.metrics.jobs.labels(TaskKind.INFERENCE.value, "replayed")
        for _ in range(300):
            (stamped,) = [f for f in await store.list_fires("hourly") if f.slot == slot]
            job = await store.get_job(fire.job_id)
            if replayed._value.get() >= 1:  # the second copy reached the worker
                break
            await asyncio.sleep(0.2)
        await store.close()
    await client.close()
    assert stamped.published_at is not None, "the unrecorded fire was not published again"
    assert job is not None and job.state is JobState.COMPLETED
    assert replayed._value.get() == 1, "the second copy never came: the fire was not published again"
    assert handler.runs == 1, "the fire published twice ran twice"
