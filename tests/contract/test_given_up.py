"""A task the bus stops delivering is dead-lettered and its job failed (issue 13: a task whose every
delivery ended unsettled was dropped after `max_deliver` with no dead-letter record and no `failed`
event, its registry row left behind); and the embedded nats-server's durability setting."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from forseti.adapters.bus import BusSettings, Delivery
from forseti.adapters.bus.nats import STREAM, NatsBus
from forseti.adapters.bus.servers import NatsServer, free_port
from forseti.schemas.catalog import DEADLETTER
from forseti.schemas.errors import BusError
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind, task_channel

from ..helpers import EchoHandler, Watcher, running_worker, stored_job, submit, training, watch

GROUP = "forseti-workers"


async def _exhaust(bus: NatsBus, deliveries: int) -> None:
    """Take the training task and hand it back `deliveries` times, then ask once more: JetStream
    sends its max-deliveries advisory when it would deliver the task again."""
    intake = await bus.intake(task_channel(TaskKind.TRAINING), group=GROUP)
    for _ in range(deliveries):
        taken: list[Delivery] = []
        for _ in range(50):
            taken = await intake.take(1, 0.2)
            if taken:
                break
        assert taken, "the task was not delivered"
        await taken[0].nak(0.0)
    assert await intake.take(1, 0.5) == []
    await intake.close()


async def test_a_task_the_bus_gave_up_on_is_dead_lettered_and_its_job_failed(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    settings = BusSettings(max_deliver=2)
    client = NatsBus(fresh_nats.url, settings=settings)
    await client.connect()
    try:
        task = training()
        job_id = task.request_id or ""
        letters, events = Watcher(), await watch(client, job_id)
        await client.subscribe(DEADLETTER, letters.on_message)
        # the worker runs no training: a worker of the group settles a given-up task of any kind
        async with running_worker(NatsBus(fresh_nats.url, settings=settings), [EchoHandler()], tmp_path):
            await submit(client, task)
            await _exhaust(client, deliveries=2)
            failed = (await events.wait_end("failed", timeout=20)).data
            assert failed.code == "retries_exhausted"
            assert "after 2 deliveries" in failed.message
            letter = (await letters.wait_until(lambda seen: seen, count=1))[0].data
            assert (letter.reason, letter.job_id, letter.channel) == (
                "retries_exhausted",
                job_id,
                "forseti.tasks.training",
            )
        assert (await stored_job(tmp_path, job_id)).state is JobState.FAILED
        assert client._js is not None
        info = await client._js.stream_info(STREAM)
        assert info.state.messages == 0, "the given-up task is still stored"
    finally:
        await client.close()


async def test_a_given_up_copy_of_a_job_that_ended_replays_its_outcome_and_is_removed(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    settings = BusSettings(max_deliver=1)
    client = NatsBus(fresh_nats.url, settings=settings)
    await client.connect()
    try:
        task = training()
        job_id = task.request_id or ""
        events = await watch(client, job_id)
        async with running_worker(NatsBus(fresh_nats.url, settings=settings), [EchoHandler()], tmp_path):
            await submit(client, task)
            await _exhaust(client, deliveries=1)
            await events.wait_end("failed", timeout=20)
            await submit(client, task)  # a resubmission of the failed job, given up on in turn
            await _exhaust(client, deliveries=1)
            failures = await events.wait_until(
                lambda seen: [e for e in seen if e.type.endswith("failed.v1")], count=2, timeout=20
            )
            assert [e.data.code for e in failures] == ["retries_exhausted"] * 2  # the stored outcome, again
            await asyncio.sleep(0.3)  # the replay's ack removes the copy
        assert client._js is not None
        assert (await client._js.stream_info(STREAM)).state.messages == 0
    finally:
        await client.close()


def _read_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


class _MonitoredNats(NatsServer):
    """nats-server with its monitoring endpoint, where /varz says how JetStream syncs."""

    def __init__(self, store_dir: Path, *, sync: str) -> None:
        super().__init__(store_dir, sync=sync)
        self.monitor = free_port()

    def command(self) -> list[str]:
        return [*super().command(), "-m", str(self.monitor)]


async def test_the_embedded_nats_server_can_fsync_every_write(tmp_path: Path) -> None:
    with pytest.raises(BusError, match="sync must be"):
        NatsServer(tmp_path / "bad", sync="sometimes")
    interval = NatsServer(tmp_path / "every", sync="30s").command()  # a duration is taken as it is
    assert "sync_interval: 30s" in Path(interval[interval.index("-c") + 1]).read_text()
    server = _MonitoredNats(tmp_path / "nats", sync="always").start()
    try:
        varz = await asyncio.to_thread(_read_json, f"http://127.0.0.1:{server.monitor}/varz")
        config = varz["jetstream"]["config"]
        assert config["sync_always"] is True
        assert config["store_dir"].startswith(str(tmp_path / "nats"))
        bus = NatsBus(server.url)
        await bus.connect()  # the task stream is made on this store, and takes a task
        try:
            await bus.publish("forseti.tasks.training", b"{}")
            assert bus._js is not None
            assert (await bus._js.stream_info(STREAM)).state.messages == 1
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_a_given_up_task_handed_back_is_stored_again_and_delivered_afresh(fresh_nats: NatsServer) -> None:
    """What a worker does with a given-up copy of a job whose lease is live: the only message of a
    job must not vanish while that job may still need to be taken over."""
    bus = NatsBus(fresh_nats.url, settings=BusSettings(max_deliver=1))
    await bus.connect()
    given_up: asyncio.Queue[Delivery] = asyncio.Queue()
    try:
        await bus.on_given_up(given_up.put, group=GROUP)
        await submit(bus, training())
        await _exhaust(bus, deliveries=1)
        delivery = await asyncio.wait_for(given_up.get(), 10)
        assert (delivery.given_up_after, delivery.channel) == (1, "forseti.tasks.training")
        await delivery.nak()
        intake = await bus.intake(task_channel(TaskKind.TRAINING), group=GROUP)
        again = await intake.take(1, 5.0)
        assert [d.data for d in again] == [delivery.data] and again[0].attempt == 1
        await again[0].ack()
        await intake.close()
        assert bus._js is not None
        for _ in range(50):  # the ack is not waited for: the server removes the task once it reads it
            if (await bus._js.stream_info(STREAM)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        assert (await bus._js.stream_info(STREAM)).state.messages == 0
    finally:
        await bus.close()
