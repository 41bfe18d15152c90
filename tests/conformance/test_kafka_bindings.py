"""The Kafka transport driven by an independent client, kafka-python (not aiokafka, which Forseti uses),
and its events read with the CloudEvents SDK's Kafka binding: a worker writing in binary mode
(`cloudevents_mode=binary`: ce_* headers, the data as the value) takes tasks in either mode."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import orjson
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from kafka import KafkaConsumer, KafkaProducer

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import TansuBroker

from ..helpers import EchoHandler, running_worker


def task_data(job_id: str) -> dict[str, Any]:
    """An inference task's data, for EchoHandler."""
    return {"request_id": job_id, "model_id": "m1", "inputs": [{"x": 1}, {"x": 2}, {"x": 3}]}


def task_event(job_id: str) -> dict[str, Any]:
    """The task as a CloudEvent's attributes and data."""
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "kafka-python",
        "type": "forseti.task.inference.v1",
        "datacontenttype": "application/json",
        "data": task_data(job_id),
    }


def structured(job_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The task as one JSON CloudEvent in the record's value."""
    return orjson.dumps(task_event(job_id)), []


def binary(job_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The task in the Kafka binary binding: attributes in ce_* headers, the data as the value."""
    event = task_event(job_id)
    data, content_type = event.pop("data"), event.pop("datacontenttype")
    headers = [(f"ce_{name}", str(value).encode()) for name, value in event.items()]
    return orjson.dumps(data), [*headers, ("content-type", content_type.encode())]


def completed_events(bootstrap: str, job_ids: set[str]) -> dict[str, Any]:
    """Read forseti.jobs with kafka-python until each job's completed event came; each record parsed
    with the CloudEvents SDK's Kafka binding."""
    consumer = KafkaConsumer(
        "forseti.jobs",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        metadata_max_age_ms=500,
        consumer_timeout_ms=60_000,
    )
    done: dict[str, Any] = {}
    try:
        for record in consumer:
            message = KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
            event = from_binary(message, JSONFormat())
            if event.get_type() == "forseti.job.completed.v1" and event.get_subject() in job_ids:
                done[event.get_subject() or ""] = event
            if set(done) == job_ids:
                break
    finally:
        consumer.close()
    return done


async def test_kafka_python_submits_in_both_modes_and_reads_binary_events_with_the_cloudevents_sdk(
    fresh_tansu: TansuBroker, tmp_path: Path
) -> None:
    bootstrap = fresh_tansu.url.removeprefix("kafka://")
    url = fresh_tansu.url + "?session_timeout_ms=6000&heartbeat_interval_ms=500&partitions=2&cloudevents_mode=binary"
    as_structured, as_binary = f"kp-s-{uuid.uuid4().hex[:6]}", f"kp-b-{uuid.uuid4().hex[:6]}"
    async with running_worker(create_bus(url), [EchoHandler()], tmp_path):
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for job_id, record in ((as_structured, structured(as_structured)), (as_binary, binary(as_binary))):
            value, headers = record
            producer.send("forseti.tasks.inference", value=value, key=job_id.encode(), headers=headers).get(30)
        producer.close()
        done = await asyncio.to_thread(completed_events, bootstrap, {as_structured, as_binary})
    assert set(done) == {as_structured, as_binary}, "a task in either mode runs"
    for event in done.values():
        data = event.get_data()
        assert isinstance(data, dict) and data["result"]["metrics"] == {"rows": 3.0}
        assert event.get_datacontenttype() == "application/json"
        assert event.get_source().startswith("forseti/")
