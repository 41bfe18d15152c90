"""The registry on SQLite (aiosqlite): the default store, one file under the data dir."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from forseti.schemas.errors import StoreError
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind

from .base import Artifact, JobRecord, ModelRecord, Record, RLAgent, TrainingRun, utcnow

R = TypeVar("R", bound=Record)

MIGRATIONS: list[str] = [
    # 1: the seed's tables, plus jobs and artifacts
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        task TEXT NOT NULL, result TEXT, error_code TEXT, error_message TEXT, worker TEXT,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
    CREATE INDEX idx_jobs_state ON jobs(state);
    CREATE TABLE models (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, framework TEXT NOT NULL,
        model_type TEXT NOT NULL, base_model TEXT, export_path TEXT NOT NULL, export_format TEXT NOT NULL,
        metrics TEXT, user_id TEXT, device_id TEXT, job_id TEXT,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE(name, version));
    CREATE INDEX idx_models_user ON models(user_id);
    CREATE INDEX idx_models_device ON models(device_id);
    CREATE INDEX idx_models_framework ON models(framework);
    CREATE TABLE training_runs (
        id TEXT PRIMARY KEY, model_id TEXT REFERENCES models(id), framework TEXT NOT NULL, config TEXT NOT NULL,
        status TEXT NOT NULL, progress REAL, metrics TEXT, user_id TEXT, device_id TEXT,
        started_at TEXT NOT NULL, completed_at TEXT);
    CREATE INDEX idx_runs_model ON training_runs(model_id);
    CREATE INDEX idx_runs_status ON training_runs(status);
    CREATE TABLE rl_agents (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, algorithm TEXT NOT NULL, environment TEXT NOT NULL,
        policy_path TEXT NOT NULL, metrics TEXT, user_id TEXT, device_id TEXT, job_id TEXT,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
    CREATE INDEX idx_agents_algorithm ON rl_agents(algorithm);
    CREATE TABLE artifacts (
        id TEXT PRIMARY KEY, model_id TEXT NOT NULL REFERENCES models(id), format TEXT NOT NULL,
        uri TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, quantization TEXT,
        created_at TEXT NOT NULL);
    CREATE INDEX idx_artifacts_model ON artifacts(model_id);
    """,
    # 2: lineage and labels of model versions; MLflow-style aliases, kept as a history so a rollback
    # returns to where the alias pointed before
    """
    ALTER TABLE models ADD COLUMN parent_id TEXT;
    ALTER TABLE models ADD COLUMN label TEXT;
    CREATE TABLE aliases (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
        model_id TEXT NOT NULL REFERENCES models(id), set_at TEXT NOT NULL);
    CREATE INDEX idx_aliases_name ON aliases(name, alias);
    """,
    # 3: device tags a model version is addressed to (a JSON list)
    """
    ALTER TABLE models ADD COLUMN device_tags TEXT NOT NULL DEFAULT '[]';
    """,
]
"""Schema migrations in order; migration N is applied once and recorded in `schema_migrations`."""

_JSON_FIELDS = {"task", "result", "metrics", "config", "device_tags"}


def _row_values(record: Record) -> dict[str, Any]:
    values = record.model_dump(mode="json")
    return {k: orjson.dumps(v).decode() if k in _JSON_FIELDS and v is not None else v for k, v in values.items()}


def _from_row(cls: type[R], row: sqlite3.Row) -> R:
    values = {k: orjson.loads(row[k]) if k in _JSON_FIELDS and row[k] is not None else row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row iterates values)
    return cls.model_validate(values)


class SqliteStore:
    """RegistryStore on one SQLite file (WAL mode, so readers such as `forseti jobs` do not block the worker)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._pending: list[tuple[str, list[Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection."""
        if self._db is None:
            raise StoreError(f"registry {self.path} is not open")
        return self._db

    async def open(self) -> None:
        """Open the file (creating it) and apply pending migrations."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # autocommit: each statement is its own transaction, one thread hop per call (the worker
            # makes three per job); migrations bring their own BEGIN / COMMIT
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            await self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL stays consistent after a crash and skips an fsync per commit; a job lost in a
            # power cut is not lost to the system, because its task is acked on the bus only after this.
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open registry {self.path}: {exc}") from exc

    async def _migrate(self) -> None:
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = await self.schema_version()
        for version, script in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            await self.db.executescript(
                f"BEGIN;\n{script}\nINSERT INTO schema_migrations VALUES ({version}, '{utcnow()}');\nCOMMIT;"
            )

    async def close(self) -> None:
        """Close the file."""
        if self._flusher is not None:
            await self._flusher
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def schema_version(self) -> int:
        """The newest applied migration."""
        rows = list(await self.db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
        return int(rows[0][0]) if rows else 0

    async def _upsert(self, table: str, record: Record) -> None:
        values = _row_values(record)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        await self._write(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", list(values.values()))

    async def _write(self, sql: str, params: list[Any]) -> None:
        """Run one write; writes that arrive while another commits share the next transaction (group
        commit), so a busy worker pays one thread hop and one commit for many jobs. Returns once the
        write is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((sql, params, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                if len(batch) == 1:
                    await self.db.execute(batch[0][0], batch[0][1])
                else:
                    await self.db.execute("BEGIN")
                    for sql, group in itertools.groupby(batch, key=lambda item: item[0]):
                        await self.db.executemany(sql, [params for _, params, _ in group])
                    await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                error = StoreError(f"cannot write the registry: {exc}")
                for _, _, done in batch:
                    done.set_exception(error)
            else:
                for _, _, done in batch:
                    done.set_result(None)

    async def _select(self, cls: type[R], sql: str, params: list[Any]) -> list[R]:
        try:
            return [_from_row(cls, row) for row in await self.db.execute_fetchall(sql, params)]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read registry: {exc}") from exc

    @staticmethod
    def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
        used = {k: v for k, v in filters.items() if v is not None}
        clause = " AND ".join(f"{k} = ?" for k in used)
        return (f" WHERE {clause}" if clause else ""), list(used.values())

    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job, or None."""
        rows = await self._select(JobRecord, "SELECT * FROM jobs WHERE job_id = ?", [job_id])
        return rows[0] if rows else None

    async def put_job(self, job: JobRecord) -> JobRecord:
        """Insert or replace a job; stamps updated_at."""
        job = job.model_copy(update={"updated_at": utcnow()})
        await self._upsert("jobs", job)
        return job

    async def list_jobs(
        self, *, state: JobState | None = None, kind: TaskKind | None = None, limit: int = 50
    ) -> list[JobRecord]:
        """Newest jobs first, optionally filtered."""
        where, params = self._where({"state": state, "kind": kind})
        return await self._select(
            JobRecord, f"SELECT * FROM jobs{where} ORDER BY created_at DESC LIMIT ?", [*params, limit]
        )

    async def add_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; the store assigns the next version of its name."""
        values = _row_values(model)
        values.pop("version")
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        # one statement, so two workers registering the same name cannot take the same version
        sql = (
            f"INSERT INTO models ({columns}, version) VALUES ({marks}, "
            "(SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?))"
        )
        try:
            await self.db.execute(sql, [*values.values(), model.name])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot register model {model.name}: {exc}") from exc
        stored = await self.get_model(model.id)
        assert stored is not None
        return stored

    async def get_model(self, model_id: str) -> ModelRecord | None:
        """One model version, or None."""
        rows = await self._select(ModelRecord, "SELECT * FROM models WHERE id = ?", [model_id])
        return rows[0] if rows else None

    async def list_models(self, *, name: str | None = None, limit: int = 50) -> list[ModelRecord]:
        """Newest versions first."""
        where, params = self._where({"name": name})
        return await self._select(
            ModelRecord, f"SELECT * FROM models{where} ORDER BY created_at DESC, version DESC LIMIT ?", [*params, limit]
        )

    async def set_alias(self, name: str, alias: str, model_id: str) -> None:
        """Point `alias` of model `name` at a version (remembering where it pointed before)."""
        await self._write(
            "INSERT INTO aliases (name, alias, model_id, set_at) VALUES (?, ?, ?, ?)", [name, alias, model_id, utcnow()]
        )

    async def get_alias(self, name: str, alias: str) -> ModelRecord | None:
        """The version `alias` of `name` points at, or None."""
        rows = await self._select(
            ModelRecord,
            "SELECT models.* FROM aliases JOIN models ON models.id = aliases.model_id "
            "WHERE aliases.name = ? AND aliases.alias = ? ORDER BY aliases.seq DESC LIMIT 1",
            [name, alias],
        )
        return rows[0] if rows else None

    async def rollback_alias(self, name: str, alias: str) -> tuple[ModelRecord, ModelRecord] | None:
        """Move `alias` back to where it pointed before its last move: (left, now served), or None
        when there is no earlier position."""
        history = await self._select(
            ModelRecord,
            "SELECT models.* FROM aliases JOIN models ON models.id = aliases.model_id "
            "WHERE aliases.name = ? AND aliases.alias = ? ORDER BY aliases.seq DESC LIMIT 2",
            [name, alias],
        )
        if len(history) < 2:
            return None
        await self._write(
            "DELETE FROM aliases WHERE seq = (SELECT MAX(seq) FROM aliases WHERE name = ? AND alias = ?)",
            [name, alias],
        )
        return history[0], history[1]

    async def put_training_run(self, run: TrainingRun) -> None:
        """Insert or replace a training run."""
        await self._upsert("training_runs", run)

    async def list_training_runs(self, *, status: JobState | None = None, limit: int = 50) -> list[TrainingRun]:
        """Newest runs first."""
        where, params = self._where({"status": status})
        return await self._select(
            TrainingRun, f"SELECT * FROM training_runs{where} ORDER BY started_at DESC LIMIT ?", [*params, limit]
        )

    async def add_rl_agent(self, agent: RLAgent) -> None:
        """Register an agent."""
        await self._upsert("rl_agents", agent)

    async def list_rl_agents(self, *, algorithm: str | None = None, limit: int = 50) -> list[RLAgent]:
        """Newest agents first."""
        where, params = self._where({"algorithm": algorithm})
        return await self._select(
            RLAgent, f"SELECT * FROM rl_agents{where} ORDER BY created_at DESC LIMIT ?", [*params, limit]
        )

    async def add_artifact(self, artifact: Artifact) -> None:
        """Register an exported file."""
        await self._upsert("artifacts", artifact)

    async def list_artifacts(self, model_id: str) -> list[Artifact]:
        """Files of one model version."""
        return await self._select(
            Artifact, "SELECT * FROM artifacts WHERE model_id = ? ORDER BY created_at", [model_id]
        )
