"""Foreign clients: a plain nats-py or aiokafka program, not Forseti's client, submits hand-written JSON."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path
from typing import Any

import nats
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer, TansuBroker

from ..helpers import EchoHandler, running_worker


def raw_task(job_id: str) -> bytes:
    """An inference task written by hand, as a client in another language would."""
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "curl-like-client",
            "type": "forseti.task.inference.v1",
            "datacontenttype": "application/json",
            "data": {"request_id": job_id, "model_id": "m1", "inputs": [{"x": 1}, {"x": 2}]},
        }
    )


async def test_a_plain_nats_client_submits_and_a_malformed_task_is_dead_lettered(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    job_id, after = f"raw-{uuid.uuid4().hex[:8]}", f"raw-{uuid.uuid4().hex[:8]}"
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_msg(msg: Any) -> None:
        await seen.put(orjson.loads(msg.data))

    await nc.subscribe("forseti.jobs.>", cb=on_msg)
    await nc.subscribe("forseti.deadletter", cb=on_msg)
    async with running_worker(create_bus(nats_server.url), [EchoHandler()], tmp_path):
        await nc.publish("forseti.tasks.inference", raw_task(job_id))  # core NATS: the stream captures it
        await nc.publish("forseti.tasks.inference", b'{"specversion": "1.0", oops')
        await nc.publish("forseti.tasks.inference", raw_task(after))
        types: dict[str, str] = {}
        while len([t for t in types.values() if t == "forseti.job.completed.v1"]) < 2 or "dl" not in types:
            event = await asyncio.wait_for(seen.get(), 20)
            key = event.get("subject") or ("dl" if event["type"] == "forseti.deadletter.v1" else "?")
            types[key] = event["type"]
            if event["type"] == "forseti.deadletter.v1":
                assert event["data"]["reason"] == "malformed_json"
                assert event["data"]["channel"] == "forseti.tasks.inference"
    assert types[job_id] == types[after] == "forseti.job.completed.v1"
    await nc.close()


async def test_a_plain_kafka_client_submits_and_a_malformed_task_is_dead_lettered(
    fresh_tansu: TansuBroker, tmp_path: Path
) -> None:
    tansu = fresh_tansu
    bootstrap = tansu.url.removeprefix("kafka://")
    job_id = f"raw-{uuid.uuid4().hex[:8]}"
    url = tansu.url + "?session_timeout_ms=6000&heartbeat_interval_ms=500&partitions=4"
    async with running_worker(create_bus(url), [EchoHandler()], tmp_path):
        watcher = AIOKafkaConsumer(
            "forseti.jobs",
            "forseti.deadletter",
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            # A topic the worker creates after this consumer starts is only seen at the next
            # metadata refresh, five minutes by default.
            metadata_max_age_ms=500,
        )
        await watcher.start()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        completed = dead = False
        try:
            await producer.send_and_wait("forseti.tasks.inference", b"not json at all", key=b"x")
            await producer.send_and_wait("forseti.tasks.inference", raw_task(job_id), key=job_id.encode())
            async with asyncio.timeout(60):
                async for record in watcher:
                    try:  # earlier tests on this broker left other bytes on these topics
                        event = orjson.loads(record.value or b"")
                    except orjson.JSONDecodeError:
                        continue
                    if record.topic == "forseti.deadletter":
                        data = event["data"]
                        dead = dead or (
                            data["reason"] == "malformed_json"
                            and base64.b64decode(data["original_b64"]) == b"not json at all"
                        )
                    elif record.key == job_id.encode() and event["type"] == "forseti.job.completed.v1":
                        completed = event["data"]["result"]["metrics"] == {"rows": 2.0}
                    if completed and dead:
                        break
        finally:
            await producer.stop()
            await watcher.stop()
    assert completed
    assert dead
