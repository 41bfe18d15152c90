"""The SQLite registry: migrations, jobs, model versions, runs, agents, artifacts."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forseti.adapters.registry import (
    Artifact,
    JobRecord,
    ModelRecord,
    RLAgent,
    SqliteStore,
    TrainingRun,
    create_store,
)
from forseti.adapters.registry.sqlite import MIGRATIONS
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    yield store
    await store.close()


async def test_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    for _ in range(2):
        store = SqliteStore(path)
        await store.open()
        assert await store.schema_version() == len(MIGRATIONS)
        await store.close()


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


async def test_jobs_round_trip_and_filter(store: SqliteStore) -> None:
    await store.put_job(JobRecord(job_id="a", kind=TaskKind.RL, task={"algorithm": "ppo"}))
    done = JobRecord(job_id="b", kind=TaskKind.TRAINING, state=JobState.COMPLETED, result={"summary": "ok"})
    await store.put_job(done)
    got = await store.get_job("b")
    assert got is not None
    assert got.result == {"summary": "ok"}
    assert got.state is JobState.COMPLETED
    assert [j.job_id for j in await store.list_jobs(state=JobState.PENDING)] == ["a"]
    assert [j.job_id for j in await store.list_jobs(kind=TaskKind.TRAINING)] == ["b"]
    assert await store.get_job("missing") is None


async def test_model_versions_count_per_name(store: SqliteStore) -> None:
    def model(model_id: str, name: str) -> ModelRecord:
        return ModelRecord(
            id=model_id,
            name=name,
            model_type="classifier",
            export_path=f"/m/{model_id}.onnx",
            export_format="onnx",
            metrics={"accuracy": 0.9},
        )

    versions = [(await store.add_model(model(i, n))).version for i, n in [("1", "a"), ("2", "a"), ("3", "b")]]
    assert versions == [1, 2, 1]
    assert [m.version for m in await store.list_models(name="a")] == [2, 1]
    fetched = await store.get_model("3")
    assert fetched is not None
    assert fetched.metrics == {"accuracy": 0.9}
    await store.add_artifact(
        Artifact(id="f1", model_id="1", format="onnx", uri="file:///m/1.onnx", sha256="0" * 64, size_bytes=10)
    )
    assert [a.id for a in await store.list_artifacts("1")] == ["f1"]


async def test_runs_and_agents(store: SqliteStore) -> None:
    await store.put_training_run(TrainingRun(id="r1", config={"epochs": 3}, progress=0.5))
    await store.put_training_run(TrainingRun(id="r1", config={"epochs": 3}, status=JobState.COMPLETED, progress=1))
    runs = await store.list_training_runs()
    assert [(r.id, r.status, r.progress) for r in runs] == [("r1", JobState.COMPLETED, 1.0)]
    await store.add_rl_agent(
        RLAgent(
            id="g1",
            name="cart",
            algorithm="ppo",
            environment="CartPole-v1",
            policy_path="/p.onnx",
            metrics={"mean_reward": 500},
        )
    )
    assert [a.id for a in await store.list_rl_agents(algorithm="ppo")] == ["g1"]
    assert await store.list_rl_agents(algorithm="dqn") == []


def test_store_urls() -> None:
    assert isinstance(create_store("sqlite:////tmp/x.db"), SqliteStore)
    with pytest.raises(ValueError, match="unsupported registry URL"):
        create_store("postgresql://localhost/forseti")


async def test_aliases_move_and_roll_back_through_their_history(store: SqliteStore) -> None:
    for model_id in ("a1", "a2", "a3"):
        await store.add_model(
            ModelRecord(
                id=model_id, name="llm", model_type="llm", export_path="/x", export_format="peft", label=model_id
            )
        )
    assert await store.get_alias("llm", "production") is None
    assert await store.rollback_alias("llm", "production") is None
    for model_id in ("a1", "a3"):
        await store.set_alias("llm", "production", model_id)
    await store.set_alias("llm", "staging", "a2")
    current = await store.get_alias("llm", "production")
    assert current is not None
    assert current.id == "a3"
    moved = await store.rollback_alias("llm", "production")
    assert moved is not None
    assert [m.id for m in moved] == ["a3", "a1"]
    again = await store.get_alias("llm", "production")
    assert again is not None
    assert again.id == "a1"
    assert await store.rollback_alias("llm", "production") is None, "nothing before the first position"
    staging = await store.get_alias("llm", "staging")
    assert staging is not None
    assert staging.id == "a2"
