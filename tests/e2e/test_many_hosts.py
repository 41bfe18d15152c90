"""Two `forseti worker` processes with data dirs of their own (two hosts) on one nats-server and one
PostgreSQL registry: the one running a job is killed with SIGKILL, the other takes the job over; and
`forseti up --registry postgres`."""

from __future__ import annotations

import asyncio
import io
import signal
import stat
import tempfile
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.registry import create_store
from forseti.adapters.registry.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from forseti.schemas.envelope import encode
from forseti.worker.embedded import EmbeddedRegistry, embedded_registry

from ..helpers import training, watch
from .test_cli import WorkerProcess, run


@pytest.fixture
def bus_url(nats_server: NatsServer) -> str:
    return nats_server.url + "?ack_wait=2"


def test_a_job_whose_worker_is_killed_is_finished_by_the_other_host_once(
    bus_url: str, tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORSETI_LEASE_TTL", "2")  # the heartbeat is 0.5 s in these tests
    monkeypatch.setenv("FORSETI_REGISTRY_URL", postgres_url)
    task = training(steps=60)
    job_id = task.request_id or ""

    async def scenario() -> None:
        client = NatsBus(bus_url.split("?")[0])
        await client.connect()
        events = await watch(client, job_id)
        hosts = {name: WorkerProcess(bus_url, tmp_path / name, "--worker-id", name) for name in ("host-a", "host-b")}
        try:
            await client.publish("forseti.tasks.training", encode(task))
            first = (await events.wait_for("accepted", timeout=30)).data
            await events.wait_for("progress", count=5, timeout=30)
            hosts[first.worker].stop(signal.SIGKILL)  # no ack, no nak, no lease renewal any more
            done = await events.wait_for("completed", timeout=60)
            await asyncio.sleep(1.0)  # not waiting for anything: a second run would end within this window
        finally:
            for host in hosts.values():
                host.stop()
            await client.close()
        accepted = [e.data for e in events.events if e.type.endswith("accepted.v1")]
        survivor = next(name for name in hosts if name != first.worker)
        assert [(a.attempt, a.resumed, a.worker) for a in accepted] == [(1, False, first.worker), (2, True, survivor)]
        assert [e.type for e in events.events if e.type.endswith(("completed.v1", "failed.v1"))] == [done.type]

    asyncio.run(scenario())
    listed = run(bus_url, "jobs", "--json", "--data-dir", str(tmp_path / "elsewhere"))
    assert listed.returncode == 0, listed.stderr.decode()
    (row,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (row["job_id"], row["state"], row["attempt"], row["lease_owner"]) == (job_id, "completed", 2, None)


def test_forseti_up_keeps_its_registry_in_a_postgres_server_under_the_data_dir() -> None:
    # under root the server runs as the postgres user, who cannot enter pytest's folders
    with tempfile.TemporaryDirectory(prefix="forseti-up-") as scratch:
        Path(scratch).chmod(0o755)
        check_embedded_postgres(Path(scratch) / "data")


def check_embedded_postgres(data_dir: Path) -> None:
    printed = io.StringIO()
    console = Console(file=printed)
    with embedded_registry(EmbeddedRegistry.POSTGRES, data_dir, console=console) as started:
        assert started is not None
        url = started
        url_file = data_dir / "postgres.url"
        assert url_file.read_text().strip() == url
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        password = url.split(":")[2].split("@")[0]
        assert password not in printed.getvalue()

        async def check() -> int:
            store = create_store(url)
            await store.open()
            try:
                return await store.schema_version()
            finally:
                await store.close()

        assert asyncio.run(check()) == len(POSTGRES_MIGRATIONS)
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    with embedded_registry(EmbeddedRegistry.SQLITE, data_dir, console=console) as none:
        assert none is None, "sqlite: the worker's own file under the data dir"
