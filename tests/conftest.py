"""Fixtures: real nats-server and Tansu on free ports, and a `bus_url` for every transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from forseti.adapters.bus import Bus, MemoryBroker, create_bus
from forseti.adapters.bus.servers import NatsServer, TansuBroker

TRANSPORTS = ["memory", "nats", "kafka"]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for the whole session."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuBroker]:
    """A real Kafka-compatible broker for the whole session."""
    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def fresh_tansu() -> Iterator[TansuBroker]:
    """A Kafka broker of this test's own, for tests that must not meet other tests' groups and topics."""
    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that stop or restart it."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport in turn."""
    return str(request.param)


@pytest.fixture
def bus_factory(transport: str, request: pytest.FixtureRequest) -> Callable[..., Bus]:
    """Makes unconnected clients of one server of the current transport (tight timeouts for tests)."""
    broker = MemoryBroker()
    if transport == "memory":
        url = "memory://"
    elif transport == "nats":
        url = request.getfixturevalue("nats_server").url + "?ack_wait=2"
    else:
        url = request.getfixturevalue("tansu").url + "?session_timeout_ms=6000&heartbeat_interval_ms=500&partitions=4"

    def make() -> Bus:
        return create_bus(url, broker=broker)

    return make


@pytest.fixture
async def connect(bus_factory: Callable[..., Bus]) -> AsyncIterator[Callable[[], object]]:
    """Connects clients and closes them all at the end of the test."""
    opened: list[Bus] = []

    async def open_one() -> Bus:
        bus = bus_factory()
        await bus.connect()
        opened.append(bus)
        return bus

    yield open_one
    for bus in reversed(opened):
        await bus.close()


TINY_TEXTS = [
    f"Sensor {i} reads {i * 7 % 13} degrees; the pump is {('off', 'on')[i % 2]} "
    f"and the valve is {('shut', 'open', 'open')[i % 3]}."
    for i in range(120)
]
"""Text the tiny test LLM's tokenizer is trained on, and the fine-tune datasets are drawn from."""


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder (2 layers, hidden 64) with a byte-level BPE tokenizer, built once per run."""
    from forseti.adapters.llm.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama", TINY_TEXTS)
