"""Tasks published on channels that no kind owns are dead-lettered, not stored for ever (issue 13:
50 x 500 KB messages on `forseti.tasks.bogus` and `forseti.tasks.training.extra` stayed in
FORSETI_TASKS, never consumed nor dead-lettered)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from nats.js.api import DiscardPolicy

from forseti.adapters.bus import Bus, BusSettings, MemoryBroker, MemoryBus
from forseti.adapters.bus.nats import STREAM, NatsBus
from forseti.adapters.bus.servers import NatsServer
from forseti.schemas.catalog import DEADLETTER
from forseti.schemas.envelope import encode
from forseti.schemas.errors import BusError

from ..helpers import EchoHandler, Watcher, inference, running_worker, submit, training, watch


@pytest.mark.parametrize("transport", ["memory", "nats"])
async def test_tasks_on_channels_no_kind_owns_are_dead_lettered_and_removed(
    transport: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server: NatsServer | None = request.getfixturevalue("fresh_nats") if transport == "nats" else None

    def connect() -> Bus:
        return NatsBus(server.url) if server is not None else MemoryBus(broker)

    broker = MemoryBroker()
    client = connect()
    await client.connect()
    try:
        misplaced = training()
        await client.publish("forseti.tasks.bogus", b"x" * 2_000)
        await client.publish("forseti.tasks.training.extra", encode(misplaced))
        letters, failed = Watcher(), await watch(client, misplaced.request_id or "")
        await client.subscribe(DEADLETTER, letters.on_message)
        async with running_worker(connect(), [EchoHandler()], tmp_path, stray_sweep_interval=0.2):
            by_channel = {
                letter.data.channel: letter.data for letter in await letters.wait_until(lambda seen: seen, count=2)
            }
            assert set(by_channel) == {"forseti.tasks.bogus", "forseti.tasks.training.extra"}
            assert {letter.reason for letter in by_channel.values()} == {"unknown_kind"}
            assert "tasks go on forseti.tasks." in by_channel["forseti.tasks.bogus"].detail
            assert base64.b64decode(by_channel["forseti.tasks.bogus"].original_b64) == b"x" * 2_000
            assert by_channel["forseti.tasks.training.extra"].job_id == misplaced.request_id
            end = (await failed.wait_end("failed")).data
            assert end.code == "invalid_task" and "forseti.tasks.training.extra" in end.message
            task = inference()  # tasks on owned channels are not the sweep's
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            await events.wait_end("completed")
        if isinstance(client, NatsBus):
            assert client._js is not None
            info = await client._js.stream_info(STREAM, subjects_filter="forseti.tasks.>")
            assert not info.state.subjects, f"still stored: {info.state.subjects}"
        else:
            assert not any(queue.pending for queue in broker.queues.values())
    finally:
        await client.close()


async def test_the_task_stream_is_bounded_and_a_full_one_refuses_publishes(fresh_nats: NatsServer) -> None:
    """The task stream had no size nor age limit (issue 13); a full one refuses new tasks with an
    error the publisher sees, rather than dropping the oldest untaken ones."""
    first = NatsBus(fresh_nats.url)
    await first.connect()
    small = NatsBus(fresh_nats.url, settings=BusSettings(tasks_max_bytes=8_192, tasks_max_age_days=1))
    try:
        assert first._js is not None
        config = (await first._js.stream_info(STREAM)).config
        assert (config.max_bytes, config.max_age, config.discard) == (1 << 30, 7 * 86_400, DiscardPolicy.NEW)
        await small.connect()  # the newest settings apply to the stream that exists
        config = (await first._js.stream_info(STREAM)).config
        assert (config.max_bytes, config.max_age) == (8_192, 86_400)
        for _ in range(3):  # 6 KB of 8
            await small.publish("forseti.tasks.training", b"x" * 2_000)
        with pytest.raises(BusError, match="refused"):
            await small.publish("forseti.tasks.training", b"x" * 2_000)
    finally:
        await small.close()
        await first.close()
