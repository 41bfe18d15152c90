"""The registry on SQLite (aiosqlite): the default store, one file under the data dir."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from forseti.schemas.errors import StoreError

from .base import utcnow
from .sql import JSON_FIELDS, Dialect, SqlStore

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
    # 4: job leases, so one worker at a time runs a job and a dead worker's job can be taken over
    """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at TEXT;
    """,
]
"""Schema migrations in order; migration N is applied once and recorded in `schema_migrations`."""


def _to_db(column: str, value: Any) -> Any:
    return orjson.dumps(value).decode() if column in JSON_FIELDS and value is not None else value


def _from_db(column: str, value: Any) -> Any:
    return orjson.loads(value) if column in JSON_FIELDS and value is not None else value


# ISO 8601 with milliseconds and a Z, as `utcnow()` writes it, so stored times compare as text
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

SQLITE = Dialect(
    mark=lambda _: "?",
    now=_NOW,
    later=lambda seconds: f"strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || {seconds} || ' seconds')",
    seconds_until=lambda column: f"(julianday({column}) - julianday('now')) * 86400.0",
    to_db=_to_db,
    from_db=_from_db,
)
"""SQLite's dialect: `?` placeholders, JSON and times as text."""


_Write = tuple[str, list[Any], "asyncio.Future[list[Mapping[str, Any]]]"]
"""A queued write: statement, parameters, and the future its rows go to."""


def _rows(rows: Iterable[sqlite3.Row]) -> list[Mapping[str, Any]]:
    return [dict(zip(row.keys(), row, strict=True)) for row in rows]


class SqliteStore(SqlStore):
    """RegistryStore on one SQLite file (WAL mode, so readers such as `forseti jobs` do not block the worker)."""

    dialect = SQLITE

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._pending: list[_Write] = []
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

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one statement (autocommit) and return its rows."""
        try:
            return _rows(await self.db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the registry: {exc}") from exc

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one write; writes that arrive while another commits share the next transaction (group
        commit), so a busy worker pays one thread hop and one commit for many jobs. Returns its
        `RETURNING` rows once the write is committed."""
        done: asyncio.Future[list[Mapping[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending.append((sql, list(params), done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            if len(batch) == 1:
                await self._run_alone(*batch[0])
                continue
            try:
                results = await self._run_together(batch)
            except sqlite3.Error:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                for item in batch:  # one bad write must not fail the others that shared its commit
                    await self._run_alone(*item)
            else:
                for (_, _, done), rows in zip(batch, results, strict=True):
                    done.set_result(rows)

    async def _run_together(self, batch: list[_Write]) -> list[list[Mapping[str, Any]]]:
        results: list[list[Mapping[str, Any]]] = []
        await self.db.execute("BEGIN")
        # a run of the same statement without RETURNING (a busy worker's job rows) is one executemany
        for sql, group in itertools.groupby(batch, key=lambda item: item[0]):
            items = list(group)
            if "RETURNING" in sql:
                for _, params, _ in items:
                    results.append(_rows(await self.db.execute_fetchall(sql, params)))
            else:
                await self.db.executemany(sql, [params for _, params, _ in items])
                results += [[] for _ in items]
        await self.db.execute("COMMIT")
        return results

    async def _run_alone(self, sql: str, params: list[Any], done: asyncio.Future[list[Mapping[str, Any]]]) -> None:
        try:
            rows = _rows(await self.db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            done.set_exception(StoreError(f"cannot write the registry: {exc}"))
        else:
            done.set_result(rows)
