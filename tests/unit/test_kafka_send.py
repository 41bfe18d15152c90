"""KafkaBus.send retries what the broker calls retriable (a new topic without a leader yet) and
gives up at once on the rest; the CloudEvents Kafka binary binding round-trips an event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError, NotLeaderForPartitionError, RecordTooLargeError

from forseti.adapters import signing
from forseti.adapters.bus import create_bus
from forseti.adapters.bus.kafka import SEND_ATTEMPTS, KafkaBus, binary_record, structured_event
from forseti.adapters.signing import Signer, TrustedKeys, refusal, seal
from forseti.schemas.envelope import encode
from forseti.schemas.errors import BusError
from forseti.schemas.jobs import JobCancelled
from forseti.schemas.tasks import TaskKind


class FlakyProducer:
    """Fails the first `failures` sends with `error`, then succeeds."""

    def __init__(self, error: type[KafkaError], failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    async def send_and_wait(self, topic: str, data: bytes, **_: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()


def bus_with(producer: FlakyProducer) -> KafkaBus:
    bus = KafkaBus()
    bus._producer = producer
    bus._topics.add("t")  # as if ensure_topic had run
    return bus


async def test_a_retriable_error_is_retried_until_the_send_goes_through() -> None:
    producer = FlakyProducer(NotLeaderForPartitionError, failures=2)
    await bus_with(producer).send("t", b"x")
    assert producer.calls == 3


async def test_a_persisting_retriable_error_and_a_final_error_become_bus_errors() -> None:
    stuck = FlakyProducer(NotLeaderForPartitionError, failures=SEND_ATTEMPTS)
    with pytest.raises(BusError, match="publish to t failed"):
        await bus_with(stuck).send("t", b"x")
    assert stuck.calls == SEND_ATTEMPTS
    final = FlakyProducer(RecordTooLargeError, failures=1)
    with pytest.raises(BusError):
        await bus_with(final).send("t", b"x")
    assert final.calls == 1


async def test_the_producer_waits_for_every_in_sync_replica_and_idempotence_is_a_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks were produced with acks=1: a leader that failed before its followers copied one lost it (issue 13)."""
    made: list[dict[str, Any]] = []

    class Recorded:
        def __init__(self, **config: Any) -> None:
            made.append(config)

        async def start(self) -> None:
            return None

    monkeypatch.setattr("forseti.adapters.bus.kafka.AIOKafkaProducer", Recorded)
    monkeypatch.setattr("forseti.adapters.bus.kafka.AIOKafkaAdminClient", Recorded)
    for url, idempotent in [("kafka://127.0.0.1:9", False), ("kafka://127.0.0.1:9?idempotence=true", True)]:
        await create_bus(url).connect()
        producer = made[-1]
        assert (producer["acks"], producer["enable_idempotence"]) == ("all", idempotent)


def test_a_signed_event_survives_the_binary_binding_and_still_verifies(tmp_path: Path) -> None:
    private, public = signing.generate(tmp_path)
    event = seal(
        encode(JobCancelled(job_id="j1", kind=TaskKind.RL, reason="x"), subject="j1"), Signer.from_file(private)
    )
    binary = binary_record(event)
    assert binary is not None
    value, headers = binary
    assert orjson.loads(value) == orjson.loads(event)["data"]
    assert headers["ce_type"] == "forseti.job.cancelled.v1" and headers["content-type"] == "application/json"
    assert "ce_signature" in headers and "ce_data" not in headers
    record = ConsumerRecord(
        topic="forseti.jobs", partition=0, offset=0, timestamp=0, timestamp_type=0, key=b"j1", value=value,
        checksum=None, serialized_key_size=2, serialized_value_size=len(value),
        headers=[(k, v.encode()) for k, v in headers.items()],
    )  # fmt: skip
    rebuilt = structured_event(record, headers)
    assert orjson.loads(rebuilt) == orjson.loads(event)
    assert refusal(TrustedKeys.from_paths([public]), rebuilt) is None, "the signature covers content, not layout"
    assert binary_record(b"not json") is None and binary_record(b'{"no": "specversion"}') is None
