"""Privacy requests end to end (issue 14): two workers on one nats-server and one PostgreSQL registry,
each with its own disk, a user's jobs trained on them; an export gathers everything held for the user
into one archive, an erase leaves nothing of the user in any store, and a request that an operator
did not sign changes nothing."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
from nats.js.errors import NotFoundError
from sklearn.datasets import load_breast_cancer

from forseti.adapters import signing
from forseti.adapters.artifacts import BUCKET
from forseti.adapters.bus import create_bus
from forseti.adapters.bus.nats import RECORDS, STREAM, NatsBus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.registry import create_store
from forseti.adapters.signing import Signer
from forseti.schemas.catalog import MODELS
from forseti.schemas.privacy import PrivacyErase, PrivacyExport
from forseti.schemas.tasks import TrainingTask
from forseti.worker.cli.privacy import ask, gather_export
from forseti.worker.engine.runtime import Worker
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import Inbox, running_worker, submit, watch
from .test_cli import WorkerProcess, run


def write_dataset(path: Path, rows: int = 200) -> None:
    cancer = load_breast_cancer()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*(f"f{i}" for i in range(5)), "label"])
        for row, label in list(zip(cancer.data, cancer.target, strict=True))[:rows]:
            writer.writerow([*row[:5], int(label)])


def task(job_id: str, user: str, dataset: str) -> TrainingTask:
    return TrainingTask.model_validate(
        {
            "request_id": job_id,
            "user_id": user,
            "name": f"cls-{job_id}",
            "model_type": "classifier",
            "config": {"epochs": 1, "hidden": [8]},
            "data_sources": [{"uri": dataset, "target": "label"}],
        }
    )


async def kept_history(bus: NatsBus) -> list[bytes]:
    """Every message the bus keeps: the records stream and the task stream."""
    assert bus._js is not None
    kept = []
    for stream in (RECORDS, STREAM):
        state = (await bus._js.stream_info(stream)).state
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                kept.append((await bus._js.get_msg(stream, seq)).data or b"")
            except NotFoundError:  # deleted
                continue
    return kept


async def registry_text(url: str) -> str:
    """Every row of every table of the registry, as text."""
    conn = await asyncpg.connect(url)
    try:
        tables = [
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        rows = [row for table in tables for row in await conn.fetch(f'SELECT * FROM "{table}"')]
        return "\n".join(str(dict(row)) for row in rows)
    finally:
        await conn.close()


def disk_text(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


async def test_export_and_erase_reach_every_store_and_only_an_operator_may_ask(
    nats_server: NatsServer, postgres_url: str, tmp_path: Path
) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    datasets = tmp_path / "datasets"  # one data root both hosts mount
    write_dataset(datasets / "alice.csv")
    write_dataset(datasets / "alice-2.csv", rows=150)
    private, public = signing.generate(tmp_path / "operator")
    operator = Signer.from_file(private)
    stranger = Signer.from_file(signing.generate(tmp_path / "stranger")[0])
    client = create_bus(nats_server.url)
    await client.connect()
    announced = Inbox()
    await client.subscribe(MODELS, announced.on_message)
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    async with AsyncExitStack() as stack:
        workers: list[Worker] = [
            await stack.enter_async_context(
                running_worker(
                    create_bus(nats_server.url),
                    [TrainingHandler()],
                    host,
                    registry_url=postgres_url,
                    data_root=datasets,
                    operator_keys=[public],
                    concurrency=1,
                )
            )
            for host in hosts
        ]
        jobs = {
            f"a1-{alice}": task(f"a1-{alice}", alice, "alice.csv"),
            f"a2-{alice}": task(f"a2-{alice}", alice, "alice-2.csv"),
            f"b1-{bob}": task(f"b1-{bob}", bob, "alice.csv"),  # bob trained on a file alice's tasks named too
        }
        watchers = [await watch(client, job_id) for job_id in jobs]
        for t in jobs.values():
            await submit(client, t)
        for watcher in watchers:
            await watcher.wait_end(timeout=120)
        await announced.wait_count(3)
        ran_on = {w.settings.worker_id for w in workers}
        assert len(ran_on) == 2

        # a request no operator signed changes nothing: every worker refuses it
        for signer in (stranger, None):
            forged = PrivacyErase(request_id=f"forged-{uuid.uuid4().hex[:6]}", user_id=alice)
            receipts = await ask(client, forged, signer, quiet=1.5, timeout=10)
            assert {r.worker for r in receipts} == ran_on
            assert all(r.error and r.error.startswith("forbidden") and not r.removed for r in receipts)
        assert [w.metrics.refused.labels("privacy")._value.get() for w in workers] == [2, 2]

        # export: one archive, a part from each worker, every job, model, dataset and artifact in it
        export = PrivacyExport(request_id=f"x-{uuid.uuid4().hex[:6]}", user_id=alice, requested_by="dpo")
        receipts = await ask(client, export, operator, quiet=2, timeout=30)
        assert {r.worker for r in receipts} == ran_on and sum(r.shared for r in receipts) == 1
        archive = tmp_path / "alice.tar.gz"
        manifest = await gather_export(client, receipts, archive)
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            shared = next(r.worker for r in receipts if r.shared)
            rows = json.load(tar.extractfile(f"{shared}/registry.json"))  # type: ignore[arg-type]
        assert {row["job_id"] for row in rows["jobs"]} == {f"a1-{alice}", f"a2-{alice}"}
        assert len(rows["models"]) == 2 and all(m["user_id"] == alice for m in rows["models"])
        assert any(n.endswith("disk/datasets/alice.csv") for n in names)
        assert any(n.endswith("disk/datasets/alice-2.csv") for n in names)
        assert sum(1 for n in names if n.endswith(".onnx") and "/objects/" in n) >= 2, "the shared copies"
        assert sum(1 for n in names if "/disk/jobs/" in n) >= 2, "each job's folder, from the disk it ran on"
        assert len(manifest["parts"]) == 2

        # erase: nothing of alice is left in any store; bob's model is marked, not removed
        erase = PrivacyErase(request_id=f"e-{uuid.uuid4().hex[:6]}", user_id=alice)
        receipts = await ask(client, erase, operator, quiet=2, timeout=30)
        assert {r.worker for r in receipts} == ran_on and not any(r.error for r in receipts)
        shared_receipt = next(r for r in receipts if r.shared)
        assert shared_receipt.removed["registry.jobs"] == 2 and shared_receipt.removed["registry.models"] == 2
        assert shared_receipt.removed["bus.history"] >= 2, "alice's announcements"
        store = create_store(postgres_url)
        await store.open()
        try:
            assert await store.jobs_of_user(alice) == []
            bob_model = (await store.models_of(bob, [f"b1-{bob}"]))[0]
            assert bob_model.erased_lineage and erase.request_id in bob_model.erased_lineage
            assert shared_receipt.marked == [bob_model.id]
            audit = [r for r in await store.list_privacy() if r.request_id in (erase.request_id, export.request_id)]
            assert len(audit) == 6 and {r.user_hash for r in audit} == {hashlib.sha256(alice.encode()).hexdigest()}
        finally:
            await store.close()

    # the scan of every store: registry (bar the audit's hash), both disks, the object store, the bus's history
    registry = await registry_text(postgres_url)
    assert alice not in registry.replace(hashlib.sha256(alice.encode()).hexdigest(), "")
    assert bob in registry
    for host in hosts:
        assert alice.encode() not in disk_text(host), f"{host} still holds something of alice"
    assert not (datasets / "alice.csv").exists() and not (datasets / "alice-2.csv").exists()
    nats = client
    assert isinstance(nats, NatsBus)
    assert all(alice.encode() not in m for m in await kept_history(nats))
    for model in rows["models"]:
        store_files = await list_objects(nats, model["id"])
        assert store_files == [], f"{model['id']} is still in {BUCKET}"
    await client.close()


async def list_objects(bus: NatsBus, model_id: str) -> list[str]:
    """The objects of one model version in the artifacts bucket."""
    assert bus._js is not None
    store = await bus._js.object_store(BUCKET)
    try:
        listed = await store.list()
    except NotFoundError:  # the bucket holds nothing at all
        return []
    return [info.name for info in listed if info.name.startswith(f"{model_id}/") and not info.deleted]


def test_the_privacy_command_signs_with_the_data_dirs_key_and_says_when_it_cannot(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`forseti privacy` as a user runs it: `forseti keys generate` makes the operator's key under the
    data dir, the worker started with that data dir trusts it, the command signs with it; without a
    key the command says what to do, and a stranger's key gets every worker's refusal."""
    data = tmp_path / "data"
    assert run(nats_server.url, "keys", "generate", "--data-dir", str(data)).returncode == 0
    worker = WorkerProcess(nats_server.url, data, handlers=["--handler", "tests.helpers:StepHandler"])
    try:
        erased = run(nats_server.url, "privacy", "erase", "--user", "nobody", "--data-dir", str(data), "--quiet", "1")
        assert erased.returncode == 0, erased.stderr.decode()
        assert b"shared + disk" in erased.stdout
        unsigned = run(nats_server.url, "privacy", "erase", "--user", "nobody", "--data-dir", str(tmp_path / "none"))
        assert unsigned.returncode == 1 and b"must be signed by an operator key" in unsigned.stderr
        assert run(nats_server.url, "keys", "generate", "--data-dir", str(tmp_path / "other")).returncode == 0
        stranger = run(
            nats_server.url, "privacy", "export", "--user", "nobody", "--data-dir", str(tmp_path / "other"),
            "--quiet", "1", "--json",
        )  # fmt: skip
        assert stranger.returncode == 1
        assert "not an operator key here" in json.loads(stranger.stdout)["error"]
        audit = run(nats_server.url, "privacy", "audit", "--data-dir", str(data))
        assert audit.returncode == 0 and b"erase" in audit.stdout and b"nobody" not in audit.stdout
    finally:
        assert worker.stop() == 0
