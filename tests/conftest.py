"""Fixtures: real nats-server, Tansu, PostgreSQL and an S3 server on free ports, a `bus_url` for every
transport and a `registry_url` for every registry store."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from forseti.adapters.bus import Bus, MemoryBroker, create_bus
from forseti.adapters.bus.servers import NatsServer, TansuBroker
from forseti.adapters.registry.server import PostgresServer

from .s3 import SeaweedS3

TRANSPORTS = ["memory", "nats", "kafka"]
STORES = ["sqlite", "postgres"]


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the whole session (fsync off). Its cluster lies in a folder of its own under
    the system's temp dir, which the server's user can reach when the tests run as root."""
    with tempfile.TemporaryDirectory(prefix="forseti-pg-") as scratch:
        Path(scratch).chmod(0o755)
        with PostgresServer(Path(scratch) / "cluster", durable=False) as server:
            yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible server (SeaweedFS) for the whole session, which requires requests signed with
    the keys set here (the server and boto3 both read them from the environment)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "forseti-tests")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "forseti-tests")
    try:
        with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
            yield server
    finally:
        mp.undo()


@pytest.fixture
def s3_url(s3_server: SeaweedS3) -> str:
    """An object store URL with a key prefix of this test's own, in one bucket of the session's S3 server
    (made by the first test that writes: SeaweedFS gives each bucket volumes of its own, and runs out)."""
    return f"s3://forseti-tests/t-{uuid.uuid4().hex[:12]}?endpoint={s3_server.endpoint}"


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A database of this test's own on the session's server: its URL, password included."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=STORES)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each registry store in turn: a SQLite file under the test's folder, a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


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
