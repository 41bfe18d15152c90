"""The recommended nats-server permissions (deploy/nats/permissions.conf), on a real nats-server: each
role does its whole part of the path (a client's task trained by a worker, announced, fetched and
loaded by a device, its report read by the client; an RL job stepped on an executor), and nothing
more (issue 14)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from forseti.adapters import signing
from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer, free_port
from forseti.adapters.registry import create_store
from forseti.adapters.signing import TrustedKeys
from forseti.envs.executor import EnvServer, gym_factory
from forseti.schemas.catalog import CONTROL, HEALTH, LOADED, MODELS, federation_channel
from forseti.schemas.federation import FederationConfig
from forseti.schemas.models import ModelLoaded
from forseti.schemas.tasks import RLTask
from forseti.worker.engine.context import Handler
from forseti.worker.federation.agent import UpdateAgent
from forseti.worker.federation.coordinator import Coordinator
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.services.edge import EdgeAgent

from ..helpers import Watcher, breast_cancer_training, running_worker, submit, tiny_announcement, watch

PERMISSIONS = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "permissions.conf"
ROLES = ("worker", "executor", "client", "device", "operator")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for role in ROLES:
        monkeypatch.setenv(f"FORSETI_{role.upper()}_PASSWORD", f"{role}-pw")
    with NatsServer(tmp_path / "nats", free_port(), config=PERMISSIONS.read_text()) as running:
        yield running


def url(server: NatsServer, role: str) -> str:
    return server.url.replace("nats://", f"nats://{role}:{role}-pw@")


class Violations:
    """A raw nats-py connection as one role, and the permission violations the server reports to it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.arrived = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc).lower())
            self.arrived.set()

    async def expect(self, action: str, subject: str) -> None:
        """Wait until the server refuses `action` on `subject`."""
        # nats-py lowercases the server's "-ERR 'Permissions Violation for Publish to ...'"
        while not any(action.lower() in seen and subject.lower() in seen for seen in self.seen):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)


@pytest.fixture
async def as_role(server: NatsServer) -> AsyncIterator[dict[str, tuple[Client, Violations]]]:
    roles: dict[str, tuple[Client, Violations]] = {}
    for role in ("client", "device", "executor"):
        violations = Violations()
        nc = await nats.connect(url(server, role), error_cb=violations.on_error, allow_reconnect=False)
        roles[role] = (nc, violations)
    yield roles
    for nc, _ in roles.values():
        await nc.close()


async def test_each_role_does_its_part_of_the_path(server: NatsServer, tmp_path: Path) -> None:
    private, public = signing.generate(tmp_path / "keys")
    client, device_bus = create_bus(url(server, "client")), create_bus(url(server, "device"))
    executor_bus = create_bus(url(server, "executor"))
    handlers: list[Handler] = [TrainingHandler(), RLHandler()]
    worker_bus = create_bus(url(server, "worker"))
    async with running_worker(worker_bus, handlers, tmp_path / "worker", signing_key=private) as worker:
        # the worker made the streams; clients and devices only read their state
        await client.connect()
        await device_bus.connect()
        device = EdgeAgent(
            device_bus,
            device_id="d1",
            data_dir=tmp_path / "device",
            trusted=TrustedKeys.from_paths([public]),
            health_every=0.1,
        )
        await device.start()
        reports = Watcher()
        await client.subscribe(LOADED, reports.on_message)
        try:
            task = breast_cancer_training("perm-1", epochs=1).model_copy(update={"device_id": "d1"})
            events = await watch(client, "perm-1")
            await submit(client, task)
            await events.wait_end(timeout=120)
            loaded = await reports.wait_until(lambda es: [e for e in es if isinstance(e.data, ModelLoaded)], timeout=60)
            assert loaded[0].data.ok, loaded[0].data.message
            assert device.current, "the device fetched the model from the object store and serves it"
            # its health reports reach the workers
            name = loaded[0].data.name
            for _ in range(100):
                if worker.metrics.registry.get_sample_value("forseti_replicas_reporting", {"name": name, "alias": ""}):
                    break
                await asyncio.sleep(0.05)
            assert worker.metrics.registry.get_sample_value("forseti_replicas_reporting", {"name": name, "alias": ""})

            await executor_bus.connect()
            executor = EnvServer(executor_bus, "perm-env", gym_factory("CartPole-v1"), environment="CartPole-v1")
            await executor.start()
            rl = RLTask.model_validate(
                {
                    "request_id": "perm-rl",
                    "algorithm": "ppo",
                    "environment": "CartPole-v1",
                    "executor": "perm-env",
                    "config": {"total_timesteps": 64, "n_steps": 32},
                    "policy": {"net_arch": [8]},
                    "evaluation": {"episodes": 1},
                }
            )
            events = await watch(client, "perm-rl")
            await submit(client, rl)
            await events.wait_end(timeout=120)  # every step went out to the executor and back
            await executor.stop()
        finally:
            await device.stop()
            for bus in (client, device_bus, executor_bus):
                await bus.close()


async def test_a_role_is_refused_what_is_not_its_part(
    as_role: dict[str, tuple[Client, Violations]], server: NatsServer, tmp_path: Path
) -> None:
    forged = tiny_announcement(tmp_path, "forged", device_id="d1").model_dump_json().encode()
    device, device_says = as_role["device"]
    await device.publish(MODELS, forged)  # a device announcing a model of its own
    await device_says.expect("Publish", MODELS)
    await device.publish("forseti.tasks.training", b"{}")
    await device_says.expect("Publish", "forseti.tasks.training")
    await device.publish(CONTROL, b"{}")
    await device_says.expect("Publish", CONTROL)

    client, client_says = as_role["client"]
    await client.publish(MODELS, forged)
    await client_says.expect("Publish", MODELS)
    await client.subscribe("forseti.env.>")  # sniffing executors' sessions
    await client_says.expect("Subscription", "forseti.env.>")
    await client.publish("forseti.privacy", b"{}")
    await client_says.expect("Publish", "forseti.privacy")
    await client.publish(HEALTH, b"{}")  # only devices and LLM hosts report health
    await client_says.expect("Publish", HEALTH)

    executor, executor_says = as_role["executor"]
    await executor.publish("forseti.jobs.someone", b"{}")
    await executor_says.expect("Publish", "forseti.jobs.someone")


async def test_a_device_takes_part_in_a_federation_and_cannot_play_its_coordinator(
    as_role: dict[str, tuple[Client, Violations]], server: NatsServer, tmp_path: Path
) -> None:
    """A coordinator runs as a worker; an agent on a device's account pulls, trains and sends its update,
    and may neither answer agents in the coordinator's place nor announce rounds."""
    store = create_store(str(tmp_path / "registry.db"))
    await store.open()
    coordinator_bus, agent_bus = create_bus(url(server, "worker")), create_bus(url(server, "device"))
    await coordinator_bus.connect()
    await agent_bus.connect()
    config = FederationConfig.model_validate(
        {"name": "fed", "model": {"columns": ["a"], "classes": [0, 1]}, "rounds": 1, "min_participants": 1}
    )
    coordinator = Coordinator(coordinator_bus, store, config, data_dir=tmp_path / "c", owner="c")
    await coordinator.start()
    try:
        rows = [{"a": float(i % 2), "label": i % 2} for i in range(8)]
        report = await asyncio.wait_for(UpdateAgent(agent_bus, "fed", "phone", rows).run(), 60)
        assert report.finished and [r.accepted for r in report.receipts] == [True]
    finally:
        await coordinator.stop()
        await coordinator_bus.close()
        await agent_bus.close()
        await store.close()
    device, device_says = as_role["device"]
    await device.subscribe(federation_channel("fed", "pull"))  # answering agents as the coordinator
    await device_says.expect("Subscription", federation_channel("fed", "pull"))
    await device.publish(federation_channel("fed", "rounds"), b"{}")
    await device_says.expect("Publish", federation_channel("fed", "rounds"))
