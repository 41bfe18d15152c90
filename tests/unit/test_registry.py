"""What only the SQLite store does (upgrading an old file), and the store URLs; the registry contract
itself is tests/contract/test_registry.py, run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from forseti.adapters.registry import JobRecord, ModelRecord, SqliteStore, create_store
from forseti.adapters.registry.postgres import PostgresStore
from forseti.adapters.registry.sqlite import MIGRATIONS
from forseti.adapters.urls import redact
from forseti.schemas.tasks import TaskKind


async def test_a_registry_from_before_device_tags_migrates_and_keeps_its_models(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the schema as migrations 1 and 2 left it, with one model
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        for version, script in enumerate(MIGRATIONS[:2], start=1):
            db.executescript(script)
            db.execute("INSERT INTO schema_migrations VALUES (?, '2026-11-01T00:00:00Z')", (version,))
        db.execute(
            "INSERT INTO models (id, name, version, framework, model_type, export_path, export_format, metrics, "
            "created_at, updated_at) VALUES ('old', 'm', 1, 'pytorch', 'classifier', '/m.onnx', 'onnx', '{}', 'x', 'x')"
        )
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        old = await store.get_model("old")
        assert old is not None and old.device_tags == []
        tagged = ModelRecord(
            id="new", name="m", model_type="classifier", export_path="/n.onnx", export_format="onnx",
            device_tags=["pumps", "site-3"],
        )  # fmt: skip
        assert (await store.add_model(tagged)).device_tags == ["pumps", "site-3"]
    finally:
        await store.close()


def test_store_urls() -> None:
    assert isinstance(create_store("sqlite:////tmp/x.db"), SqliteStore)
    assert isinstance(create_store("postgresql://u:p@db.example:5432/forseti"), PostgresStore)
    with pytest.raises(ValueError, match="unsupported registry URL 'mysql://u:\\*\\*\\*@h/db'"):
        create_store("mysql://u:secret@h/db")


def test_urls_are_shown_without_their_password() -> None:
    assert redact("postgresql://forseti:s3cr%40t@db:5432/reg?sslmode=require") == (
        "postgresql://forseti:***@db:5432/reg?sslmode=require"
    )
    assert redact("postgresql://db/reg") == "postgresql://db/reg"
    assert "s3cr" not in repr(create_store("postgresql://forseti:s3cret@db/reg"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://alice:pw@nats:4222", "nats://alice:***@nats:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://***@nats:4222"),
        ("tls://nats:4222?token=s3cr3t&ack_wait=4", "tls://nats:4222?token=***&ack_wait=4"),
        ("kafka://k:9092?sasl_password=s3cr3t&sasl_username=bob", "kafka://k:9092?sasl_password=***&sasl_username=bob"),
        ("postgresql://forseti@db/reg", "postgresql://forseti@db/reg"),
    ],
)
def test_bus_urls_are_shown_without_their_secrets(url: str, shown: str) -> None:
    """A NATS token travels as the URL's user; passwords, tokens and seeds also as query values."""
    assert redact(url) == shown


async def test_a_write_whose_caller_was_cancelled_does_not_strand_the_others_of_its_batch(tmp_path: Path) -> None:
    """A heartbeat cancelled while its lease renewal shared a commit with other writes made the
    batch's flusher die on the cancelled future, and every other write in it waited for ever: a
    job's outcome was never stored (seen as a hung RL job once executor timeouts were retried)."""
    store = SqliteStore(tmp_path / "r.db")
    await store.open()
    try:
        jobs = [JobRecord(job_id=f"j{n}", kind=TaskKind.TRAINING) for n in range(3)]
        writes = [asyncio.create_task(store.claim_job(job, owner="w", ttl=30)) for job in jobs]
        await asyncio.sleep(0)
        assert len(store._pending) == 3, "all three wait for one commit"
        writes[0].cancel()
        claims = await asyncio.wait_for(asyncio.gather(*writes[1:]), 10)
        assert [claim.won for claim in claims] == [True, True]
        assert (await store.get_job("j0")) is not None, "the cancelled caller's write was committed all the same"
    finally:
        await store.close()
