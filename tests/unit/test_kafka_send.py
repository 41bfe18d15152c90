"""KafkaBus.send retries what the broker calls retriable (a new topic without a leader yet) and
gives up at once on the rest."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaError, NotLeaderForPartitionError, RecordTooLargeError

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.kafka import SEND_ATTEMPTS, KafkaBus
from forseti.schemas.errors import BusError


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
