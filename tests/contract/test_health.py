"""/healthz follows the bus's server: 503 while it is away, 200 again once it is back (issue 13:
it answered 200 through a whole broker outage, its intake seeing only empty fetches)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from forseti.adapters.bus import Bus
from forseti.adapters.bus.kafka import KafkaBus
from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer, TansuBroker

from ..helpers import EchoHandler, running_worker
from ..unit.test_metrics import http_get


async def status_becomes(port: int, expected: int, timeout: float = 20.0) -> None:
    """Poll /healthz until it answers `expected`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (status := (await http_get(port, "/healthz"))[0]) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"/healthz still {status} after {timeout:g}s"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("transport", ["nats", "kafka"])
async def test_health_turns_503_while_the_bus_is_away_and_200_once_back(
    transport: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server: NatsServer | TansuBroker = request.getfixturevalue("fresh_nats" if transport == "nats" else "fresh_tansu")
    bus: Bus = NatsBus(server.url) if isinstance(server, NatsServer) else KafkaBus(server.url)
    async with running_worker(bus, [EchoHandler()], tmp_path, metrics_port=0) as worker:
        port = worker.metrics_port
        assert port is not None
        await status_becomes(port, 200)
        await asyncio.to_thread(server.stop)
        await status_becomes(port, 503)
        _, health = await http_get(port, "/healthz")
        assert '"bus_ok":false' in health
        await asyncio.to_thread(server.start)
        await status_becomes(port, 200, timeout=40)


async def test_the_bus_password_is_shown_nowhere(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `nats://user:pass@` URL (nats-server without auth takes any credentials) is shown in
    /healthz and the start-up log with its password masked."""
    url = nats_server.url.replace("nats://", "nats://alice:s3cret-pw@")
    caplog.set_level("INFO")
    async with running_worker(NatsBus(url), [EchoHandler()], tmp_path, metrics_port=0) as worker:
        assert worker.metrics_port is not None
        await status_becomes(worker.metrics_port, 200)
        _, health = await http_get(worker.metrics_port, "/healthz")
    assert "alice:***@" in health and "s3cret" not in health, health
    assert "pulling" in caplog.text and "s3cret" not in caplog.text
