"""The worker runtime on the memory bus: lifecycle, idempotency, invalid input, control, retries, shutdown."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from forseti.adapters import signing
from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import JobRecord, SqliteStore
from forseti.adapters.signing import Signer
from forseti.schemas.capabilities import Capabilities, CapabilitiesQuery
from forseti.schemas.catalog import CAPABILITIES, CONTROL, DEADLETTER, STATUS
from forseti.schemas.control import CancelJob, PauseJob, ResumeJob
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.jobs import JobState, JobStatus, JobStatusQuery
from forseti.schemas.tasks import RLTask, TaskKind, dump_task, task_channel
from forseti.worker.engine.slots import Slots

from ..helpers import (
    EchoHandler,
    FailingHandler,
    StepHandler,
    Watcher,
    inference,
    running_worker,
    submit,
    training,
    watch,
)


async def dead_letters(client: MemoryBus) -> Watcher:
    watcher = Watcher()
    await client.subscribe(DEADLETTER, watcher.on_message)
    return watcher


async def test_a_job_is_accepted_run_and_completed_with_its_result(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path) as worker:
        task = inference(rows=3)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        done = await watcher.wait_for("completed")
        assert watcher.types == ["accepted", "completed"]
        assert done.data.result.metrics == {"rows": 3.0}
        assert done.subject == task.request_id
        job = await worker.store.get_job(task.request_id or "")
        assert job is not None and job.state is JobState.COMPLETED and job.attempt == 1


async def test_progress_arrives_in_order_while_the_loop_stays_free(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.05)], tmp_path):
        task = training(steps=8)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("progress")
        # the handler computes in a thread: a request is answered while it runs
        reply = decode(await client.request(CAPABILITIES, encode(CapabilitiesQuery()), timeout=2), expect=Capabilities)
        assert reply.data.running_jobs == 1
        await watcher.wait_for("completed")
        steps = [e.data.step for e in watcher.events if e.type.endswith("progress.v1")]
        assert steps == list(range(1, 9))


async def test_a_repeated_request_id_replays_the_stored_result(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    handler = EchoHandler()
    async with running_worker(MemoryBus(broker), [handler], tmp_path):
        task = inference(rows=2)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        first = await watcher.wait_for("completed")
        await submit(client, task)
        second = await watcher.wait_for("completed", count=2)
        assert handler.runs == 1
        assert (first.data.replayed, second.data.replayed) == (False, True)
        assert second.data.result == first.data.result


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed_json"),
        (
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": "e1",
                    "source": "t",
                    "type": "forseti.task.inference.v1",
                    "data": {"request_id": "bad-schema-1", "model_id": "m", "inputs": [], "surprise": 1},
                }
            ),
            "invalid_task",
        ),
        (
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": "e2",
                    "source": "t",
                    "type": "forseti.task.rl.v1",
                    "data": {"request_id": "wrong-channel-1", "algorithm": "ppo", "environment": "CartPole-v1"},
                }
            ),
            "unknown_kind",
        ),
        (
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": "e3",
                    "source": "t",
                    "type": "forseti.task.teleport.v1",
                    "data": {"request_id": "unknown-type-1"},
                }
            ),
            "unknown_kind",
        ),
        (b"[" + b"1," * 200_000 + b"1]", "oversized"),
    ],
)
async def test_invalid_tasks_are_dead_lettered_and_the_worker_keeps_serving(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, raw: bytes, reason: str
) -> None:
    letters = await dead_letters(client)
    job_id = peeked = None
    doc = orjson.loads(raw) if reason not in ("malformed_json", "oversized") else None
    if doc is not None:
        job_id = doc["data"]["request_id"]
        peeked = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path, max_task_bytes=64 * 1024):
        await client.publish(task_channel(TaskKind.INFERENCE), raw)
        letter = (await letters.wait_for("deadletter")).data
        assert letter.reason == reason
        assert letter.channel == "forseti.tasks.inference"
        assert letter.original_size == len(raw)
        assert base64.b64decode(letter.original_b64) == raw[: 64 * 1024]
        if peeked is not None:
            failed = (await peeked.wait_for("failed")).data
            assert failed.code == "invalid_task" and reason in failed.message
        good = inference()
        watcher = await watch(client, good.request_id or "")
        await submit(client, good)
        await watcher.wait_for("completed")


async def test_an_invalid_task_under_a_running_jobs_id_does_not_fail_that_job(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Anyone on the bus can publish a bad task with another job's id: it is dead-lettered, and the
    job's own channel hears nothing of it (no forged `failed`)."""
    letters = await dead_letters(client)
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path):
        task = training(steps=40)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("progress")
        forged = {"request_id": task.request_id, "model_type": "classifier", "surprise": 1}
        await client.publish(
            task_channel(TaskKind.TRAINING),
            orjson.dumps(
                {"specversion": "1.0", "id": "x", "source": "t", "type": "forseti.task.training.v1", "data": forged}
            ),
        )
        assert (await letters.wait_for("deadletter")).data.reason == "invalid_task"
        await watcher.wait_for("completed")
        assert "failed" not in watcher.types, watcher.types


async def test_cancel_stops_a_running_job(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.05)], tmp_path) as worker:
        task = training(steps=1000)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("progress")
        await client.publish(CONTROL, encode(CancelJob(job_id=task.request_id or "", reason="enough")))
        cancelled = await watcher.wait_for("cancelled", timeout=5)
        assert cancelled.data.reason == "enough"
        job = await worker.store.get_job(task.request_id or "")
        assert job is not None and job.state is JobState.CANCELLED


async def test_a_cancel_that_arrives_first_cancels_the_job_before_it_runs(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    handler = EchoHandler()
    async with running_worker(MemoryBus(broker), [handler], tmp_path):
        task = inference()
        watcher = await watch(client, task.request_id or "")
        await client.publish(CONTROL, encode(CancelJob(job_id=task.request_id or "")))
        await asyncio.sleep(0)  # the control message is delivered before the task is published
        await submit(client, task)
        await watcher.wait_for("cancelled")
        assert handler.runs == 0


async def test_only_its_owner_controls_an_owned_job_and_reads_its_result(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Anyone on the bus could pause, cancel or pre-cancel any job, and read any job's result:
    a job whose task names a user_id obeys only that user, and shows its result only to it."""
    letters = await dead_letters(client)
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path) as worker:
        task = training(steps=60).model_copy(update={"user_id": "alice"})
        job_id = task.request_id or ""
        watcher = await watch(client, job_id)
        await client.publish(CONTROL, encode(CancelJob(job_id=job_id)))  # a pre-cancel from a stranger
        await asyncio.sleep(0)
        await submit(client, task)
        await watcher.wait_for("progress")
        for stranger in (None, "mallory"):
            for command in (PauseJob, CancelJob):
                await client.publish(CONTROL, encode(command(job_id=job_id, user_id=stranger)))
        refusals = [(await letters.wait_for("deadletter", count=k)).data for k in range(1, 5)]
        assert {r.reason for r in refusals} == {"forbidden"} and {r.job_id for r in refusals} == {job_id}
        assert worker.metrics.refused.labels("control")._value.get() >= 4
        await watcher.wait_for("completed")
        assert "cancelled" not in watcher.types and "paused" not in [
            getattr(e.data, "message", "") for e in watcher.events
        ]

        def status(user: str | None) -> JobStatus:
            return JobStatus.model_validate(orjson.loads(reply[user])["data"])

        reply = {
            user: await client.request(STATUS, encode(JobStatusQuery(job_id=job_id, user_id=user)), timeout=5)
            for user in (None, "mallory", "alice")
        }
        assert status("alice").result is not None and not status("alice").withheld
        for stranger in (None, "mallory"):
            assert status(stranger).state is JobState.COMPLETED
            assert status(stranger).result is None and status(stranger).withheld

        other = training(steps=400).model_copy(update={"user_id": "alice"})
        watcher = await watch(client, other.request_id or "")
        await submit(client, other)
        await watcher.wait_for("progress")
        await client.publish(CONTROL, encode(CancelJob(job_id=other.request_id or "", user_id="alice")))
        await watcher.wait_for("cancelled", timeout=5)


async def test_pause_holds_a_job_and_resume_lets_it_finish(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path) as worker:
        task = training(steps=40)
        job_id = task.request_id or ""
        watcher = await watch(client, job_id)
        await submit(client, task)
        await watcher.wait_for("progress")
        await client.publish(CONTROL, encode(PauseJob(job_id=job_id)))

        await watcher.wait_until(
            lambda events: [e for e in events if e.type.endswith("progress.v1") and e.data.state == "paused"]
        )
        job = await worker.store.get_job(job_id)
        assert job is not None and job.state is JobState.PAUSED
        await asyncio.sleep(0.3)  # while paused no step may finish
        held = [e.data.step for e in watcher.events if e.type.endswith("progress.v1") and e.data.step]
        await asyncio.sleep(0.3)
        assert [e.data.step for e in watcher.events if e.type.endswith("progress.v1") and e.data.step] == held
        assert max(held) < 40
        await client.publish(CONTROL, encode(ResumeJob(job_id=job_id)))
        await watcher.wait_for("completed")


async def test_the_concurrency_limit_holds(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path, concurrency=1):
        first, second = training(steps=5), training(steps=5)
        everything = Watcher()
        await client.subscribe("forseti.jobs.>", everything.on_message)
        await submit(client, first)
        await submit(client, second)
        await everything.wait_for("completed", count=2)
        order = [(e.subject, Watcher.short(e.type)) for e in everything.events if not e.type.endswith("progress.v1")]
        assert order == [
            (first.request_id, "accepted"),
            (first.request_id, "completed"),
            (second.request_id, "accepted"),
            (second.request_id, "completed"),
        ]


@pytest.mark.parametrize(
    ("environment", "code", "runs"),
    [
        ("retriable", "retries_exhausted", 3),
        ("fatal", "handler_error", 1),
        ("bug", "handler_error", 1),
    ],
)
async def test_failures_are_retried_only_when_retriable(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, environment: str, code: str, runs: int
) -> None:
    handler = FailingHandler()
    async with running_worker(MemoryBus(broker), [handler], tmp_path, max_attempts=3):
        task = RLTask(request_id=uuid.uuid4().hex, algorithm="ppo", environment=environment)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        failed = (await watcher.wait_for("failed")).data
        assert failed.code == code
        assert handler.runs == runs
        if environment == "bug":
            assert "ValueError: a bug in the handler" in failed.message


async def test_shutdown_hands_running_jobs_back_and_the_next_worker_resumes(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    task = training(steps=30)
    job_id = task.request_id or ""
    watcher = await watch(client, job_id)
    handler = StepHandler(delay=0.02)
    async with running_worker(MemoryBus(broker), [handler], tmp_path, shutdown_grace=0.0):
        await submit(client, task)
        await watcher.wait_for("progress", count=3)
    # the worker stopped mid-job: the job is pending again, its checkpoint on disk
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    job = await store.get_job(job_id)
    await store.close()
    assert job is not None and job.state is JobState.PENDING
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path):
        done = (await watcher.wait_for("completed")).data
    assert done.result.metrics["started_from"] >= 3
    accepted = [e.data for e in watcher.events if e.type.endswith("accepted.v1")]
    assert [(a.attempt, a.resumed) for a in accepted] == [(1, False), (2, True)]


async def test_capabilities_and_status_are_answered(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [EchoHandler(), StepHandler()], tmp_path, concurrency=3) as worker:
        caps = decode(await client.request(CAPABILITIES, encode(CapabilitiesQuery()), timeout=5), expect=Capabilities)
        assert set(caps.data.task_kinds) == {TaskKind.INFERENCE, TaskKind.TRAINING}
        assert caps.data.concurrency == 3 and "cpu" in caps.data.devices
        assert {(c.area, c.name) for c in caps.data.capabilities} == {("inference", "echo"), ("training", "steps")}
        task = inference()
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("completed")
        status = decode(
            await client.request(STATUS, encode(JobStatusQuery(job_id=task.request_id or "")), timeout=5),
            expect=JobStatus,
        )
        assert status.data.state is JobState.COMPLETED and status.data.result is not None
        assert worker.settings.worker_id.startswith("w-")


async def test_burst_mode_ends_once_the_queue_is_empty(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    from forseti.worker.engine.runtime import Worker

    from ..helpers import settings

    for _ in range(3):
        await submit(client, inference())
    handler = EchoHandler()
    worker = Worker(
        bus=MemoryBus(broker),
        store=SqliteStore(tmp_path / "r.db"),
        handlers=[handler],
        settings=settings(tmp_path, burst=True),
    )
    await asyncio.wait_for(worker.run(), 10)
    assert handler.runs == 3


async def test_slots_serve_waiters_in_turn_so_no_kind_starves() -> None:
    slots = Slots(1)
    order: list[str] = []

    async def kind(name: str, rounds: int) -> None:
        for _ in range(rounds):
            assert await slots.reserve(1) == 1
            order.append(name)
            await asyncio.sleep(0.001)
            slots.release(1)  # and asks again at once, as an intake loop does after an empty poll

    await asyncio.gather(kind("a", 3), kind("b", 3), kind("c", 3))
    assert order == ["a", "b", "c"] * 3
    slots.close()
    assert await slots.reserve(1) == 0


class Idle(EchoHandler):
    """A handler for a kind on which nothing is published."""

    def __init__(self, kind: TaskKind) -> None:
        super().__init__()
        self.kind = kind


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_idle_kinds_hold_no_slot_while_a_busy_kind_has_work(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, concurrency: int
) -> None:
    """Each kind's intake held a slot through its whole poll: at concurrency 1 with idle kinds
    beside it, a 42 ms job took 3 s (issue 13). Polls here last 3 s; jobs must not wait for them."""
    idle = [Idle(kind) for kind in (TaskKind.RL, TaskKind.TRAINING, TaskKind.FINETUNE)]
    async with running_worker(
        MemoryBus(broker), [EchoHandler(), *idle], tmp_path, concurrency=concurrency, poll_interval=3.0
    ):
        await asyncio.sleep(0.2)  # every kind is polling
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(4):
            task = inference()
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            await events.wait_end("completed", timeout=30)
        assert loop.time() - started < 1.5, "jobs waited for the idle kinds' polls to end"


@pytest.mark.parametrize("where", ["task", "worker"])
async def test_a_job_past_its_max_duration_is_stopped_and_failed_as_timeout(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, where: str
) -> None:
    """Nothing bounded a job: `total_timesteps: 1e10` or `epochs: 1e5` ran without end (issue 13)."""
    task = training(steps=200).model_copy(update={"max_duration": 0.5 if where == "task" else None})
    limits: dict[str, Any] = {"max_duration": 0.5} if where == "worker" else {}
    handler = StepHandler(delay=0.05)
    async with running_worker(MemoryBus(broker), [handler], tmp_path, **limits):
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        failed = (await watcher.wait_end("failed", timeout=30)).data
        assert failed.code == "timeout"
        assert "ran past its max_duration of 0.5s" in failed.message
        steps = [e.data.step for e in watcher.events if e.type.endswith("progress.v1")]
        assert steps and max(steps) < 100, "stopped long before its 200 steps"


async def test_max_duration_counts_from_the_first_start_across_attempts(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    task = training(steps=10).model_copy(update={"max_duration": 1.0})  # 0.5 s of work: one attempt fits
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    record = JobRecord(job_id=task.request_id or "", kind=TaskKind.TRAINING, task=dump_task(task))
    assert (await store.claim_job(record, owner="host-that-died", ttl=0.05)).won
    await store.close()
    await asyncio.sleep(1.2)  # the first attempt spent the whole budget before its worker died
    handler = StepHandler(delay=0.05)
    async with running_worker(MemoryBus(broker), [handler], tmp_path, lease_ttl=1.0, heartbeat_interval=0.2):
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        assert (await watcher.wait_end("failed", timeout=30)).data.code == "timeout"


async def test_an_operator_signed_command_acts_on_any_users_job(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """There was no operator role: only the user a job named could stop it or read its result (issue 14)."""
    private, public = signing.generate(tmp_path / "keys")
    operator = Signer.from_file(private)
    stranger = Signer.from_file(signing.generate(tmp_path / "stranger")[0])
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.02)], tmp_path / "w", operator_keys=[public]):
        task = training(steps=400).model_copy(update={"user_id": "alice"})
        job_id = task.request_id or ""
        watcher = await watch(client, job_id)
        await submit(client, task)
        await watcher.wait_for("progress")
        await client.publish(CONTROL, stranger.sign(encode(CancelJob(job_id=job_id, reason="not mine"))))
        await client.publish(CONTROL, operator.sign(encode(CancelJob(job_id=job_id, reason="by the operator"))))
        cancelled = (await watcher.wait_end("cancelled", timeout=5)).data
        assert cancelled.reason == "by the operator"
        query = encode(JobStatusQuery(job_id=job_id))
        shown = JobStatus.model_validate(
            orjson.loads(await client.request(STATUS, operator.sign(query), timeout=5))["data"]
        )
        hidden = JobStatus.model_validate(orjson.loads(await client.request(STATUS, query, timeout=5))["data"])
        assert not shown.withheld and hidden.withheld


async def test_a_query_that_cannot_be_served_gets_an_error_reply_naming_why(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Malformed or mistyped queries on forseti.capabilities and forseti.status, an unknown job and a
    kind the worker does not run each get an error reply; before, the asker waited its whole timeout."""
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path):
        asked = {
            "malformed capabilities": (CAPABILITIES, b"{not json"),
            "mistyped capabilities": (CAPABILITIES, encode(JobStatusQuery(job_id="x"))),
            "kind not run": (CAPABILITIES, encode(CapabilitiesQuery(kind=TaskKind.RL))),
            "malformed status": (STATUS, b"[1, 2"),
            "mistyped status": (STATUS, encode(CapabilitiesQuery())),
            "unknown job": (STATUS, encode(JobStatusQuery(job_id="no-such-job"))),
        }
        codes = {}
        for what, (channel, query) in asked.items():
            reply: Event[Any] = decode(await client.request(channel, query, timeout=3))
            assert reply.type.endswith(".error.v1"), (what, reply.type)
            codes[what] = reply.data.code.value
            assert reply.data.message
    assert codes == {
        "malformed capabilities": "malformed_json",
        "mistyped capabilities": "unknown_kind",
        "kind not run": "unknown_kind",
        "malformed status": "malformed_json",
        "mistyped status": "unknown_kind",
        "unknown job": "unknown_job",
    }


async def test_a_worker_that_knows_the_job_answers_before_one_that_does_not(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Two workers with registries of their own: the one that ran the job answers the status query;
    the other's 'unknown job' comes later and is not the reply."""
    async with (
        running_worker(MemoryBus(broker), [EchoHandler()], tmp_path / "a"),
        running_worker(MemoryBus(broker), [], tmp_path / "b"),
    ):
        task = inference(rows=1)
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("completed")
        for _ in range(5):
            query = encode(JobStatusQuery(job_id=task.request_id or ""))
            reply: Event[Any] = decode(await client.request(STATUS, query, timeout=3))
            assert isinstance(reply.data, JobStatus)
            assert reply.data.state is JobState.COMPLETED
