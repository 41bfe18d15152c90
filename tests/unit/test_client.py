"""forseti.client against a running worker on the memory bus: submit, follow, result, errors, replays,
queries, commands, de-duplication (the real transports and the sync facade: tests/contract/test_client.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.client import (
    Client,
    ClientTimeout,
    JobCancelledError,
    JobFailedError,
    QueryRefused,
    TaskRefused,
    UnknownJob,
)
from forseti.schemas.errors import ErrorCode, InvalidTask
from forseti.schemas.jobs import GenericResult, JobAccepted, JobCompleted, JobProgress
from forseti.schemas.tasks import RLTask, TaskKind, task_channel

from ..helpers import EchoHandler, FailingHandler, StepHandler, inference, running_worker, training


@pytest.fixture
async def forseti(broker: MemoryBroker) -> Client:
    bus = MemoryBus(broker)
    await bus.connect()
    return Client(bus)


async def test_submit_follows_the_progress_stream_and_returns_the_result(
    broker: MemoryBroker, forseti: Client, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.01)], tmp_path):
        job = await forseti.submit(training(steps=4))
        events = [event async for event in job.events()]
        result = await job.result(timeout=10)
    assert isinstance(events[0], JobAccepted)
    assert [e.step for e in events if isinstance(e, JobProgress)] == [1, 2, 3, 4]
    assert isinstance(events[-1], JobCompleted)
    assert isinstance(result, GenericResult) and result.metrics["steps"] == 4
    assert not job.replayed
    await forseti.close()


async def test_a_dict_task_needs_its_kind_and_is_validated_before_anything_is_sent(forseti: Client) -> None:
    with pytest.raises(InvalidTask, match="needs its kind"):
        await forseti.submit({"model_id": "m1", "inputs": [{"x": 1}]})
    with pytest.raises(InvalidTask, match="invalid rl task"):
        await forseti.submit({"algorithm": "nope", "environment": "CartPole-v1"}, kind="rl")
    with pytest.raises(InvalidTask, match="unknown task kind"):
        await forseti.submit({}, kind="painting")
    await forseti.close()


async def test_a_failed_job_raises_its_code_and_message(broker: MemoryBroker, forseti: Client, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [FailingHandler()], tmp_path):
        job = await forseti.submit(RLTask(algorithm="ppo", environment="fatal"))
        with pytest.raises(JobFailedError) as failed:
            await job.result(timeout=10)
    assert failed.value.code is ErrorCode.HANDLER_ERROR
    assert "does not exist" in failed.value.reason
    assert failed.value.job_id == job.job_id
    await forseti.close()


async def test_a_cancelled_job_raises_cancelled(broker: MemoryBroker, forseti: Client, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [StepHandler(delay=0.05)], tmp_path):
        job = await forseti.submit(training(steps=200))
        async for event in job.events():
            if isinstance(event, JobProgress):
                await job.cancel("enough")
                break
        with pytest.raises(JobCancelledError, match="enough"):
            await job.result(timeout=10)
    await forseti.close()


async def test_a_task_refused_before_its_id_was_read_ends_the_wait(
    broker: MemoryBroker, forseti: Client, tmp_path: Path
) -> None:
    """An oversized task is dead-lettered unparsed, so no job event can name it: the client finds its
    own event in the dead letter instead of waiting for ever."""
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path, max_task_bytes=4096):
        job = await forseti.submit(inference(rows=500))
        with pytest.raises(TaskRefused) as refused:
            await job.result(timeout=10)
    assert refused.value.code is ErrorCode.OVERSIZED
    await forseti.close()


async def test_a_task_no_worker_takes_is_a_clear_timeout(forseti: Client) -> None:
    job = await forseti.submit(inference(), accept_timeout=0.3)
    with pytest.raises(ClientTimeout, match="no worker answered the status query"):
        await job.result()
    await forseti.close()


async def test_a_task_for_a_kind_no_worker_runs_times_out_naming_it(
    broker: MemoryBroker, forseti: Client, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path):
        job = await forseti.submit(training(), accept_timeout=0.5)
        with pytest.raises(ClientTimeout, match=r"no worker took job .* training tasks"):
            await job.result()
    await forseti.close()


async def test_a_reused_request_id_says_it_is_a_replay(broker: MemoryBroker, forseti: Client, tmp_path: Path) -> None:
    """Resubmitting an edited task under a used request_id returns the first run's result, and says so."""
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path):
        first = await forseti.submit(inference("same-id", rows=2))
        await first.result(timeout=10)
        again = await forseti.submit(inference("same-id", rows=2))
        await again.result(timeout=10)
        edited = await forseti.submit(inference("same-id", rows=7))
        result = await edited.result(timeout=10)
    assert not first.replayed
    assert again.replayed and not again.task_differs
    assert edited.replayed and edited.task_differs
    assert isinstance(result, GenericResult) and result.metrics == {"rows": 2.0}  # the first task's
    await forseti.close()


async def test_a_retried_publish_of_one_submit_is_one_task(forseti: Client, client: MemoryBus) -> None:
    """The client publishes with a de-duplication id; the same bytes sent twice are stored once."""
    sent: list[bytes] = []
    publish = forseti.bus.publish

    async def twice(channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        sent.append(data)
        await publish(channel, data, key=key, dedup_id=dedup_id)
        await publish(channel, data, key=key, dedup_id=dedup_id)  # as if the first ack was lost

    forseti.bus.publish = twice  # type: ignore[method-assign]
    await forseti.submit(inference(), accept_timeout=None)
    intake = await client.intake(task_channel(TaskKind.INFERENCE), group="g")
    taken = await intake.take(10, timeout=0.2)
    assert len(sent) == 1 and len(taken) == 1
    await forseti.close()


async def test_queries_answer_or_say_why(broker: MemoryBroker, forseti: Client, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path):
        caps = await forseti.capabilities()
        assert caps.task_kinds == [TaskKind.INFERENCE]
        with pytest.raises(QueryRefused, match="runs no rl tasks") as refused:
            await forseti.capabilities("rl")
        assert refused.value.code is ErrorCode.UNKNOWN_KIND
        with pytest.raises(UnknownJob, match="no-such-job"):
            await forseti.status("no-such-job")
        job = await forseti.submit(inference())
        await job.result(timeout=10)
        assert (await forseti.status(job.job_id)).state.value == "completed"
        assert await forseti.models() == []
    with pytest.raises(ClientTimeout, match="no worker answered the capabilities query"):
        await forseti.capabilities(timeout=0.2)
    await forseti.close()


async def test_following_a_job_that_already_ended_gives_its_stored_ending(
    broker: MemoryBroker, forseti: Client, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [EchoHandler()], tmp_path):
        submitted = await forseti.submit(inference(rows=3))
        await submitted.result(timeout=10)
        later = await forseti.job(submitted.job_id)
        result = await later.result(timeout=10)
    assert isinstance(result, GenericResult) and result.metrics == {"rows": 3.0}
    assert later.replayed
    await forseti.close()
