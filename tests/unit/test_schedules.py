"""Schedules on an in-process bus: slots and time zones, the requests, overlap policies, catch-up,
dataset triggers and pausing after failures."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from forseti.adapters.bus import Bus, MemoryBroker, MemoryBus, Message
from forseti.adapters.registry import RegistryStore, ScheduleRecord, create_store
from forseti.adapters.signing import Signer, generate
from forseti.schemas.catalog import SCHEDULES, SCHEDULES_FIRED
from forseti.schemas.envelope import decode
from forseti.schemas.errors import InvalidTask
from forseti.schemas.jobs import JobState
from forseti.schemas.rollouts import ServeHealth, VersionHealth
from forseti.schemas.schedules import (
    DatasetGrowth,
    MetricDrift,
    Overlap,
    ScheduleCreate,
    ScheduleFired,
    SchedulePause,
    ScheduleSpec,
    SchedulesQuery,
)
from forseti.schemas.tasks import TaskKind, task_channel
from forseti.worker.cli.schedules import ask_schedules
from forseti.worker.engine.context import Handler
from forseti.worker.engine.metrics import Metrics
from forseti.worker.rollouts.fleet import Fleet
from forseti.worker.rollouts.judge import Report
from forseti.worker.schedules.clock import due_slots, jitter_offset, next_slot, slot_name
from forseti.worker.schedules.desk import ScheduleDesk
from forseti.worker.schedules.firing import Scheduler
from forseti.worker.services.traffic import Traffic

from ..helpers import FailingHandler, StepHandler, running_worker, training

STEP_TASK = training(steps=8).model_dump(mode="json", exclude_none=True)
STEP_TASK.pop("request_id")


def spec(**fields: Any) -> ScheduleSpec:
    """A schedule of StepHandler training jobs."""
    return ScheduleSpec(kind=TaskKind.TRAINING, task=STEP_TASK, **fields)


def test_cron_slots_follow_the_time_zone_across_dst() -> None:
    """'0 3 * * *' in Paris is 01:00 UTC on the last summer day and 02:00 UTC the day clocks go back."""
    paris = spec(cron="0 3 * * *", timezone="Europe/Paris")
    summer = next_slot(paris, datetime(2026, 10, 23, 12, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
    winter = next_slot(paris, summer, datetime(2026, 1, 1, tzinfo=UTC))
    assert (summer.hour, winter.hour) == (1, 2)  # CEST (UTC+2) then CET (UTC+1)
    assert slot_name(summer) == "20261024T010000.000Z"


def test_interval_slots_and_jitter_are_the_same_on_every_worker() -> None:
    anchor = datetime(2026, 12, 6, tzinfo=UTC)
    s = spec(every_seconds=10, jitter_seconds=5)
    slots = due_slots(s, "nightly", after=anchor, anchor=anchor, now=anchor + timedelta(seconds=61))
    assert [int((t - anchor).total_seconds()) for t in slots][:5] == [10, 20, 30, 40, 50]
    offsets = [jitter_offset("nightly", slot_name(t), 5) for t in slots]
    assert all(0 <= o < 5 for o in offsets) and len(set(offsets)) == len(offsets)
    assert offsets == [jitter_offset("nightly", slot_name(t), 5) for t in slots]  # deterministic


def test_a_spec_needs_one_trigger_a_valid_cron_and_a_known_zone() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        spec(cron="* * * * *", every_seconds=5)
    with pytest.raises(ValidationError, match="not a cron expression"):
        spec(cron="every day")
    with pytest.raises(ValidationError, match="unknown time zone"):
        spec(cron="* * * * *", timezone="Mars/Olympus")


async def fired_events(bus: Bus) -> list[ScheduleFired]:
    """Collect the schedule notices from now on."""
    seen: list[ScheduleFired] = []

    async def on(msg: Message) -> None:
        seen.append(decode(msg.data, expect=ScheduleFired).data)

    await bus.subscribe(SCHEDULES_FIRED, on)
    return seen


async def test_requests_check_the_template_and_the_owner(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler()], tmp_path):
        bad = ScheduleSpec(kind=TaskKind.TRAINING, task={"config": {}}, cron="0 3 * * *")
        with pytest.raises(InvalidTask, match=r"invalid: .*model_type"):
            await ask_schedules(client, ScheduleCreate(id="bad", spec=bad, user_id="ana"), None, timeout=5)
        created = await ask_schedules(
            client, ScheduleCreate(id="nightly", spec=spec(cron="0 3 * * *"), user_id="ana"), None, timeout=5
        )
        assert created.schedules[0].next_fire is not None and created.schedules[0].owner == "ana"
        with pytest.raises(InvalidTask, match="forbidden"):
            await ask_schedules(client, SchedulePause(id="nightly", user_id="bob"), None, timeout=5)
        stolen = ScheduleCreate(id="nightly", spec=spec(every_seconds=1), user_id="bob")
        with pytest.raises(InvalidTask, match="forbidden"):
            await ask_schedules(client, stolen, None, timeout=5)
        as_other = spec(cron="0 3 * * *").model_copy(update={"task": {**STEP_TASK, "user_id": "ana"}})
        with pytest.raises(InvalidTask, match="forbidden: a schedule's tasks run as its creator"):
            await ask_schedules(client, ScheduleCreate(id="mine", spec=as_other, user_id="bob"), None, timeout=5)
        assert (await ask_schedules(client, SchedulesQuery(user_id="bob"), None, timeout=5)).schedules == []
        paused = await ask_schedules(client, SchedulePause(id="nightly", user_id="ana"), None, timeout=5)
        assert paused.schedules[0].paused and paused.schedules[0].next_fire is None


async def run_schedule(
    broker: MemoryBroker,
    client: MemoryBus,
    tmp_path: Path,
    schedule: ScheduleSpec,
    seconds: float,
    *,
    pause: bool = True,
) -> tuple[list[ScheduleFired], RegistryStore]:
    """Run one worker with `schedule` stored for `seconds`, then pause it (unless it paused itself)
    and let its jobs end."""
    notices = await fired_events(client)
    handlers: list[Handler] = [StepHandler(delay=0.25), FailingHandler()]
    async with running_worker(MemoryBus(broker), handlers, tmp_path, schedule_poll=0.1):
        await ask_schedules(client, ScheduleCreate(id="s", spec=schedule), None, timeout=5)
        await asyncio.sleep(seconds)
        if pause:
            await ask_schedules(client, SchedulePause(id="s"), None, timeout=5)
        store = create_store(str(tmp_path / "registry.db"))
        await store.open()
        for _ in range(100):
            jobs = await store.list_jobs()
            if jobs and all(j.state.terminal for j in jobs):
                break
            await asyncio.sleep(0.1)
    return notices, store


async def jobs_of(store: RegistryStore) -> list[tuple[str, JobState, str, str]]:
    """(job id, state, created, updated) of every job, oldest first."""
    return sorted((j.job_id, j.state, j.created_at, j.updated_at) for j in await store.list_jobs())


async def test_overlap_skip_never_runs_two_jobs_at_once(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    notices, store = await run_schedule(broker, client, tmp_path, spec(every_seconds=0.5), 3.5)
    actions = [n.fire.action for n in notices]
    assert "skipped" in actions and actions.count("fired") >= 1
    jobs = await jobs_of(store)
    assert len(jobs) == actions.count("fired")
    for earlier, later in itertools.pairwise(jobs):
        assert later[2] >= earlier[3], "a job started before the previous one ended"


async def test_overlap_buffer_one_fires_the_held_slot_when_the_job_ends(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    notices, store = await run_schedule(
        broker, client, tmp_path, spec(every_seconds=0.5, overlap=Overlap.BUFFER_ONE), 3.5
    )
    buffered = [n.fire.slot for n in notices if n.fire.action == "buffered"]
    fired = [n.fire.slot for n in notices if n.fire.action == "fired"]
    assert buffered and buffered[0] in fired, "the held slot was not fired once the running job ended"
    assert "skipped" in [n.fire.action for n in notices]  # further slots while one is held
    assert all(state is JobState.COMPLETED for _, state, _, _ in await jobs_of(store))


async def test_overlap_cancel_other_cancels_the_running_job(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    notices, store = await run_schedule(
        broker, client, tmp_path, spec(every_seconds=1.0, overlap=Overlap.CANCEL_OTHER), 2.6
    )
    assert "cancelled_other" in [n.fire.action for n in notices]
    states = [state for _, state, _, _ in await jobs_of(store)]
    assert JobState.CANCELLED in states


async def test_overlap_allow_all_runs_jobs_side_by_side(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    notices, store = await run_schedule(
        broker, client, tmp_path, spec(every_seconds=0.5, overlap=Overlap.ALLOW_ALL), 2.0
    )
    assert {n.fire.action for n in notices} == {"fired"}
    jobs = await jobs_of(store)
    assert any(later[2] < earlier[3] for earlier, later in itertools.pairwise(jobs))


async def test_pause_after_failures(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    failing = ScheduleSpec(
        kind=TaskKind.RL,
        task={"algorithm": "ppo", "environment": "fatal"},
        every_seconds=0.3,
        pause_after_failures=2,
        overlap=Overlap.ALLOW_ALL,
    )
    _, store = await run_schedule(broker, client, tmp_path, failing, 3.0, pause=False)
    stored = await store.get_schedule("s")
    assert stored is not None and stored.paused
    assert stored.pause_reason is not None and "2 failed job(s) in a row" in stored.pause_reason


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = create_store(str(tmp_path / "registry.db"))
    await s.open()
    yield s
    await s.close()


async def test_catch_up_fires_missed_slots_inside_the_window_only(store: RegistryStore, client: MemoryBus) -> None:
    """Down for 10 s with a 1 s interval and a 3.5 s window: the 3 newest missed slots fire, the rest not."""
    now = datetime.now(UTC)
    created = now - timedelta(seconds=20)
    record = ScheduleRecord(
        id="c",
        spec=spec(every_seconds=1.0, catchup_window_seconds=3.5, overlap=Overlap.ALLOW_ALL).model_dump(
            mode="json", exclude_none=True
        ),
        created_at=created.isoformat().replace("+00:00", "Z"),
        last_slot=slot_name(created + timedelta(seconds=10)),
    )
    await store.put_schedule(record)
    queued: list[bytes] = []

    async def on_task(msg: Message) -> None:
        queued.append(msg.data)

    await client.subscribe(task_channel(TaskKind.TRAINING), on_task)
    metrics = Metrics()
    await Scheduler(bus=client, store=store, metrics=metrics, source="test", poll=1.0).tick()
    fires = await store.list_fires("c")
    assert [f.action for f in fires] == ["fired"] * len(fires)
    assert 3 <= len(fires) <= 4  # the slots of the last 3.5 s, as the second turns
    newest = datetime.strptime(fires[0].slot, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    assert now - newest < timedelta(seconds=1.1)
    assert metrics.schedule_fires.labels(action="missed")._value.get() >= 6
    stored = await store.get_schedule("c")
    assert stored is not None and stored.last_slot == fires[0].slot


async def test_a_second_scheduler_on_the_same_slots_fires_nothing(store: RegistryStore, client: MemoryBus) -> None:
    """Two schedulers (two workers) tick over the same due slots: each slot is decided once."""
    created = datetime.now(UTC) - timedelta(seconds=5)
    record = ScheduleRecord(
        id="twice",
        spec=spec(every_seconds=1.0, overlap=Overlap.ALLOW_ALL).model_dump(mode="json", exclude_none=True),
        created_at=created.isoformat().replace("+00:00", "Z"),
        last_slot=slot_name(created),
    )
    await store.put_schedule(record)
    first, second = (Scheduler(bus=client, store=store, metrics=Metrics(), source=n, poll=1.0) for n in "ab")
    await asyncio.gather(first.tick(), second.tick())
    fires = await store.list_fires("twice")
    decided = sum(s.metrics.schedule_fires.labels(action="fired")._value.get() for s in (first, second))
    assert len(fires) == decided == len({f.slot for f in fires}) >= 4


async def test_dataset_growth_fires_after_k_new_lines(store: RegistryStore, client: MemoryBus, tmp_path: Path) -> None:
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text('{"a": 1}\n' * 3)
    grown = spec(when_grown=DatasetGrowth(path=str(feedback), lines=5))
    await store.put_schedule(ScheduleRecord(id="g", spec=grown.model_dump(mode="json", exclude_none=True), baseline=3))
    scheduler = Scheduler(bus=client, store=store, metrics=Metrics(), source="test", poll=1.0)
    with feedback.open("a") as f:
        f.write('{"a": 2}\n' * 4)
    await scheduler.tick()
    assert await store.list_fires("g") == []
    with feedback.open("a") as f:
        f.write('{"a": 3}\n')
    await scheduler.tick()
    await scheduler.tick()  # the baseline moved: no second fire for the same lines
    fires = await store.list_fires("g")
    assert [(f.slot, f.job_id) for f in fires] == [("grown-000000000001", "g-grown-000000000001")]


async def test_a_drifting_error_rate_fires_once_per_window(store: RegistryStore, client: MemoryBus) -> None:
    """The served model's replicas report failing requests: the schedule fires, once per window."""
    watched = MetricDrift(name="assistant", above=0.1, window_seconds=1.0, min_requests=5)
    drift = spec(when_drifts=watched, overlap=Overlap.ALLOW_ALL)  # nobody runs the fired jobs here
    created = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    await store.put_schedule(
        ScheduleRecord(id="d", spec=drift.model_dump(mode="json", exclude_none=True), created_at=created)
    )
    queued: list[bytes] = []

    async def on_task(msg: Message) -> None:
        queued.append(msg.data)

    await client.subscribe(task_channel(TaskKind.TRAINING), on_task)
    fleet = Fleet()
    scheduler = Scheduler(bus=client, store=store, metrics=Metrics(), source="test", poll=1.0, fleet=fleet)

    def served(requests: int, errors: int, name: str = "assistant") -> Report:
        version = VersionHealth(model_id="m1", version="v1", requests=requests, errors=errors,
                                latency_ms_sum=requests * 4.0, latency_ms_max=4.0)  # fmt: skip
        return Report(time.time(), ServeHealth(consumer="r1", name=name, every_seconds=1.0, versions=[version]))

    fleet.add(served(10, 0))
    fleet.add(served(10, 10, name="another-model"))
    await scheduler.tick()
    assert await store.list_fires("d") == []  # healthy, and the failing model is not the watched one
    fleet.add(served(3, 1))  # 1 in 13 failed: under the bound... (7.7%)
    await scheduler.tick()
    assert await store.list_fires("d") == []
    fleet.add(served(10, 5))  # ...6 in 23: past it
    await scheduler.tick()
    await scheduler.tick()  # within the window after a fire: nothing more
    assert [f.slot for f in await store.list_fires("d")] == ["drifted-000000000001"]
    await asyncio.sleep(1.05)
    await scheduler.tick()
    assert len(await store.list_fires("d")) == 1  # the window after the fire holds no reports yet
    fleet.add(served(10, 4))
    await scheduler.tick()
    fires = await store.list_fires("d")
    assert [(f.slot, f.action) for f in fires] == [("drifted-000000000002", "fired"), ("drifted-000000000001", "fired")]
    assert len(queued) == 2
    with pytest.raises(ValidationError, match="exactly one of"):
        spec(every_seconds=5, when_drifts=MetricDrift(name="assistant", above=0.1))


async def test_a_drifting_latency_percentile_fires_where_the_mean_does_not(
    store: RegistryStore, client: MemoryBus
) -> None:
    """The drift trigger watched the mean latency only: a tail of slow requests did not move it."""
    created = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    for schedule_id, figure in (("p95", "p95"), ("mean", "mean")):
        watched = MetricDrift(name="assistant", metric="latency_ms", latency=figure, above=200, window_seconds=1.0,
                              min_requests=5)  # fmt: skip
        drift = spec(when_drifts=watched, overlap=Overlap.ALLOW_ALL)
        await store.put_schedule(
            ScheduleRecord(id=schedule_id, spec=drift.model_dump(mode="json", exclude_none=True), created_at=created)
        )
    fleet = Fleet()
    scheduler = Scheduler(bus=client, store=store, metrics=Metrics(), source="test", poll=1.0, fleet=fleet)
    tallies = Traffic()
    for ms in [10.0] * 90 + [1000.0] * 10:  # mean 109 ms; p95 in the (500, 1000] ms bucket
        tallies.record("m1", "v1", ms, ok=True)
    fleet.add(Report(time.time(), ServeHealth(consumer="r1", name="assistant", every_seconds=1.0,
                                              versions=tallies.drain())))  # fmt: skip
    await scheduler.tick()
    assert [f.slot for f in await store.list_fires("p95")] == ["drifted-000000000001"]
    assert await store.list_fires("mean") == []
    with pytest.raises(ValidationError, match="goes with metric latency_ms"):
        MetricDrift(name="assistant", metric="error_rate", latency="p95", above=0.1)


async def test_a_new_interval_schedule_does_not_fire_at_its_creation(
    store: RegistryStore, client: MemoryBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The desk read the clock twice (the last slot, then the creation time): when a millisecond
    passed in between, the creation instant itself became a due slot and fired at once (a Kafka
    schedule test ran two jobs for one fire, 1 run in 5)."""

    class Earlier(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) - timedelta(milliseconds=5)  # as if the second read came 5 ms later

    monkeypatch.setattr("forseti.worker.schedules.desk.datetime", Earlier)
    desk = ScheduleDesk(store, source="test", by_operator=lambda raw: False)
    await client.subscribe(SCHEDULES, desk.on_request)
    hourly = spec(every_seconds=3600)
    await ask_schedules(client, ScheduleCreate(id="hourly", spec=hourly), None, timeout=5)
    await Scheduler(bus=client, store=store, metrics=Metrics(), source="test", poll=1.0).tick()
    assert await store.list_fires("hourly") == []


async def test_an_operator_sees_and_changes_every_schedule(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    private, public = generate(tmp_path / "keys", "operator")
    operator = Signer.from_file(private)
    async with running_worker(MemoryBus(broker), [StepHandler()], tmp_path, operator_keys=[public]):
        await ask_schedules(
            client, ScheduleCreate(id="ana-s", spec=spec(cron="0 3 * * *"), user_id="ana"), None, timeout=5
        )
        listed = await ask_schedules(client, SchedulesQuery(), operator, timeout=5)
        assert [s.id for s in listed.schedules] == ["ana-s"]
        paused = await ask_schedules(client, SchedulePause(id="ana-s"), operator, timeout=5)
        assert paused.schedules[0].paused
