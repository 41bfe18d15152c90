"""forseti.client on every transport a worker takes (memory, NATS, Kafka): submit, follow, result,
failure, queries, and a retried publish that stays one task; and the blocking SyncClient on NATS."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from forseti.adapters.bus import Bus
from forseti.adapters.bus.nats import STREAM
from forseti.adapters.bus.servers import NatsServer
from forseti.client import Client, JobFailedError, SyncClient, UnknownJob
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import GenericResult, JobCompleted, JobProgress, JobState
from forseti.schemas.tasks import RLTask, TaskKind, task_channel
from forseti.worker.engine.context import Handler

from ..helpers import FailingHandler, StepHandler, running_worker, training


async def test_submit_follow_fail_and_ask_on_every_transport(
    bus_factory: Callable[[], Bus], transport: str, tmp_path: Path
) -> None:
    forseti = Client(bus_factory())
    await forseti.bus.connect()
    handlers: list[Handler] = [StepHandler(delay=0.01), FailingHandler()]
    try:
        async with running_worker(bus_factory(), handlers, tmp_path):
            job = await forseti.submit(training(steps=3))
            events = [event async for event in job.events()]
            result = await job.result(timeout=30)
            assert [e.step for e in events if isinstance(e, JobProgress)] == [1, 2, 3]
            assert isinstance(events[-1], JobCompleted)
            assert isinstance(result, GenericResult) and result.metrics["steps"] == 3

            failing = await forseti.submit(RLTask(algorithm="dqn", environment="fatal"))
            with pytest.raises(JobFailedError, match="the environment does not exist"):
                await failing.result(timeout=30)

            assert (await forseti.status(job.job_id)).state is JobState.COMPLETED
            assert set((await forseti.capabilities()).task_kinds) == {TaskKind.TRAINING, TaskKind.RL}
            with pytest.raises(UnknownJob):
                await forseti.status("no-such-job")
    finally:
        await forseti.close()


async def test_a_publish_retried_with_its_dedup_id_is_one_task_on_nats(nats_server: NatsServer, tmp_path: Path) -> None:
    from forseti.adapters.bus import create_bus

    forseti = await Client.connect(nats_server.url)
    task = training("dedup-once", steps=2)
    raw = encode(task, subject="dedup-once")
    nc = await nats.connect(nats_server.url)
    stream = nc.jetstream()
    try:
        before = (await stream.stream_info(STREAM)).state.messages
        # the same bytes with the same id, as a submit whose acknowledgement was lost sends them again
        for _ in range(3):
            await forseti.bus.publish(task_channel(TaskKind.TRAINING), raw, dedup_id="dedup-once-event")
        assert (await stream.stream_info(STREAM)).state.messages == before + 1, "stored once"
        async with running_worker(create_bus(nats_server.url), [StepHandler(delay=0.01)], tmp_path):
            job = await forseti.job("dedup-once")
            assert isinstance(await job.result(timeout=30), GenericResult)
    finally:
        await nc.close()
        await forseti.close()


def test_the_sync_client_works_from_plain_threads(nats_server: NatsServer, tmp_path: Path) -> None:
    from forseti.adapters.bus import create_bus

    ready, stop = threading.Event(), threading.Event()

    async def worker() -> None:
        async with running_worker(create_bus(nats_server.url), [StepHandler(delay=0.01)], tmp_path):
            ready.set()
            await asyncio.to_thread(stop.wait)

    runner = threading.Thread(target=asyncio.run, args=(worker(),))
    runner.start()
    try:
        assert ready.wait(30)
        with SyncClient(nats_server.url) as forseti:
            job = forseti.submit(training(steps=2))
            steps = [e.step for e in job.events() if isinstance(e, JobProgress)]
            result = job.result(timeout=30)
            assert steps == [1, 2] and isinstance(result, GenericResult)
            assert forseti.status(job.job_id).state is JobState.COMPLETED
            assert TaskKind.TRAINING in forseti.capabilities().task_kinds
            assert forseti.models() == []
    finally:
        stop.set()
        runner.join(60)
