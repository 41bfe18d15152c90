"""Two `forseti worker` processes with data dirs of their own (two hosts) on one nats-server and one
PostgreSQL registry, sharing checkpoints through the bus's object store or a real S3 server: the one
running a job is killed with SIGKILL after it shared a checkpoint, the other takes the job over and
finishes it from that checkpoint, once; and `forseti up --registry postgres`."""

from __future__ import annotations

import asyncio
import io
import signal
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.registry import create_store
from forseti.adapters.registry.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from forseti.adapters.signing import generate
from forseti.schemas.envelope import encode
from forseti.schemas.tasks import RLTask, TaskBase
from forseti.worker.cli.embedded import EmbeddedRegistry, embedded_registry

from ..helpers import breast_cancer_training, watch
from ..llm import data_root_with_tiny_llama, finetune
from .test_cli import WorkerProcess, run


@pytest.fixture
def bus_url(nats_server: NatsServer) -> str:
    return nats_server.url + "?ack_wait=2"


@pytest.fixture
def hosts_env(monkeypatch: pytest.MonkeyPatch, postgres_url: str) -> str:
    """Both hosts' settings: the shared registry, and leases short enough to take a job over quickly."""
    monkeypatch.setenv("FORSETI_LEASE_TTL", "2")  # the heartbeat is 0.5 s in these tests
    monkeypatch.setenv("FORSETI_REGISTRY_URL", postgres_url)
    return postgres_url


def take_over(bus_url: str, registry_url: str, tmp_path: Path, kind: str, task: TaskBase) -> Any:
    """Publish `task` to two hosts, SIGKILL the one that runs it as soon as the registry records a shared
    checkpoint of it, and return the survivor's `completed` event data, having checked that the job
    ran twice (attempt 1 on the first host, attempt 2 resumed on the other), ended once, and left no
    checkpoints behind."""
    job_id = task.request_id or ""

    async def scenario() -> Any:
        client = NatsBus(bus_url.split("?")[0])
        await client.connect()
        store = create_store(registry_url)
        await store.open()
        events = await watch(client, job_id)
        hosts = {
            name: WorkerProcess(bus_url, tmp_path / name, "--worker-id", name, handlers=[])
            for name in ("host-a", "host-b")
        }
        try:
            await client.publish(f"forseti.tasks.{kind}", encode(task))
            first = (await events.wait_for("accepted", timeout=60)).data
            deadline = time.monotonic() + 120
            while not await store.list_checkpoints(job_id):
                assert time.monotonic() < deadline, "no checkpoint was shared:\n" + "".join(hosts[first.worker].lines)
                await asyncio.sleep(0.02)
            hosts[first.worker].stop(signal.SIGKILL)  # no ack, no nak, no lease renewal any more
            done = await events.wait_end(timeout=180)
            await asyncio.sleep(1.0)  # not waiting for anything: a second run would end within this window
            left = await store.list_checkpoints(job_id)
        finally:
            for host in hosts.values():
                host.stop()
            await store.close()
            await client.close()
        accepted = [e.data for e in events.events if e.type.endswith("accepted.v1")]
        survivor = next(name for name in hosts if name != first.worker)
        assert [(a.attempt, a.resumed, a.worker) for a in accepted] == [(1, False, first.worker), (2, True, survivor)]
        assert [e.type for e in events.events if e.type.endswith(("completed.v1", "failed.v1"))] == [done.type]
        assert any("resuming from the checkpoint" in getattr(e.data, "message", "") for e in events.events)
        assert left == [], "an ended job's checkpoints are removed"
        return done.data

    return asyncio.run(scenario())


def test_a_training_job_whose_worker_is_killed_is_finished_from_its_s3_checkpoint_by_the_other_host(
    bus_url: str, hosts_env: str, tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORSETI_OBJECT_STORE_URL", s3_url)
    task = breast_cancer_training(
        f"tr-{uuid.uuid4().hex[:8]}", epochs=60, batch_size=4, hidden=[16], checkpoint_interval=2
    )
    done = take_over(bus_url, hosts_env, tmp_path, "training", task)
    assert done.result.metrics.custom_metrics["resumed_from_epoch"] >= 2
    assert done.result.metrics.total_epochs == 60

    listed = run(bus_url, "jobs", "--json", "--data-dir", str(tmp_path / "elsewhere"))
    assert listed.returncode == 0, listed.stderr.decode()
    (row,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (row["job_id"], row["state"], row["attempt"], row["lease_owner"]) == (task.request_id, "completed", 2, None)


def test_a_ppo_job_on_a_remote_executor_is_finished_from_its_shared_checkpoint_by_the_other_host(
    bus_url: str, hosts_env: str, tmp_path: Path
) -> None:
    executor = WorkerProcess(
        bus_url.split("?")[0],
        None,
        handlers=[],
        command=("executor", "--env", "CartPole-v1", "--id", "cartpole", "--num-envs", "2"),
        ready="serving",
    )
    task = RLTask.model_validate(
        {
            "request_id": f"rl-{uuid.uuid4().hex[:8]}",
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "executor": "cartpole",
            "config": {"total_timesteps": 6000, "n_steps": 128, "num_envs": 2, "checkpoint_interval": 512, "seed": 1},
            "policy": {"net_arch": [16]},
            "evaluation": {"episodes": 1},
        }
    )
    try:
        done = take_over(bus_url, hosts_env, tmp_path, "rl", task)
    finally:
        executor.stop()
    assert done.result.metrics.custom_metrics["resumed_from_timesteps"] >= 512
    assert done.result.metrics.custom_metrics["timesteps"] >= 6000


def test_a_finetune_whose_worker_is_killed_is_finished_from_its_shared_checkpoint_by_the_other_host(
    bus_url: str, hosts_env: str, tmp_path: Path, tiny_llama: Path
) -> None:
    for host in ("host-a", "host-b"):  # each host has the base model and the dataset on its own disk
        data_root_with_tiny_llama(tmp_path / host, tiny_llama)
    task = finetune(config={"epochs": 60, "checkpoint_interval": 5})
    done = take_over(bus_url, hosts_env, tmp_path, "finetune", task)
    assert done.result.metrics["resumed_from_step"] >= 5


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


def test_a_distributed_training_job_spreads_its_ranks_over_two_worker_processes(
    bus_url: str, hosts_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `forseti worker` processes (isolating jobs in child processes, as by default) sharing one
    key: the one that takes the task recruits the other over nats-server, each runs one rank."""
    key, _ = generate(tmp_path / "keys")
    monkeypatch.setenv("FORSETI_SIGNING_KEY", str(key))
    task = breast_cancer_training(
        f"ddp-{uuid.uuid4().hex[:8]}", epochs=3, batch_size=32, hidden=[16], distributed=True, world_size=2, workers=2
    )

    async def scenario() -> tuple[Any, Any, dict[str, WorkerProcess]]:
        client = NatsBus(bus_url.split("?")[0])
        await client.connect()
        events = await watch(client, task.request_id or "")
        hosts = {
            name: WorkerProcess(bus_url, tmp_path / name, "--worker-id", name, handlers=[])
            for name in ("host-a", "host-b")
        }
        try:
            await client.publish("forseti.tasks.training", encode(task))
            done = await events.wait_end(timeout=180)
        finally:
            for host in hosts.values():
                host.stop()
            await client.close()
        return done, events, hosts

    done, events, hosts = asyncio.run(scenario())
    assert done.type.endswith("completed.v1"), done.data
    accepted = next(e.data for e in events.events if e.type.endswith("accepted.v1"))
    joiner = next(name for name in hosts if name != accepted.worker)
    assert any("joining as node 1" in line for line in hosts[joiner].lines), "".join(hosts[joiner].lines)
    progress = [e.data for e in events.events if e.type.endswith("progress.v1") and "world_size" in e.data.metrics]
    assert [p.step for p in progress] == [1, 2, 3] and {p.metrics["world_size"] for p in progress} == {2.0}
    assert done.data.result.metrics.custom_metrics["test_accuracy"] > 0.9
