"""Every event a worker emits parses with the CloudEvents Python SDK in JSON structured mode, as a
consumer that knows nothing of Forseti would read it."""

from __future__ import annotations

from pathlib import Path

from cloudevents.core.formats.json import JSONFormat

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.schemas.capabilities import CapabilitiesQuery
from forseti.schemas.catalog import CAPABILITIES, DEADLETTER, STATUS, jobs_channel
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import JobStatusQuery
from forseti.schemas.tasks import TaskKind, task_channel

from ..helpers import EchoHandler, Inbox, StepHandler, inference, running_worker, submit, training


async def test_job_events_replies_and_dead_letters_parse_with_the_cloudevents_sdk(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    done, progress, dead = inference(rows=2), training(steps=2), Inbox()
    events = Inbox()
    raw: list[bytes] = []
    async with running_worker(MemoryBus(broker), [EchoHandler(), StepHandler(delay=0.01)], tmp_path):
        await client.subscribe(jobs_channel(">"), events.on_message)
        await client.subscribe(DEADLETTER, dead.on_message)
        await submit(client, done)
        await submit(client, progress)
        await client.publish(task_channel(TaskKind.INFERENCE), b"{broken")
        await events.wait_count(2 + 2 + 2)  # accepted, completed; accepted, 2 progress, completed
        await dead.wait_count(1)
        raw += [await client.request(CAPABILITIES, encode(CapabilitiesQuery()), timeout=3)]
        raw += [await client.request(STATUS, encode(JobStatusQuery(job_id=done.request_id or "")), timeout=3)]
        raw += [await client.request(STATUS, encode(JobStatusQuery(job_id="unknown")), timeout=3)]
    await client.close()
    raw += events.items + dead.items
    seen = set()
    for message in raw:
        event = JSONFormat().read(None, message)
        assert event.get_specversion() == "1.0"
        assert event.get_id() and event.get_source().startswith("forseti/")
        assert event.get_type().startswith("forseti.")
        assert event.get_datacontenttype() == "application/json"
        assert isinstance(event.get_data(), dict)
        seen.add(event.get_type())
    assert {
        "forseti.job.accepted.v1",
        "forseti.job.progress.v1",
        "forseti.job.completed.v1",
        "forseti.deadletter.v1",
        "forseti.capabilities.v1",
        "forseti.job.status.v1",
        "forseti.job.status.error.v1",
    } <= seen
