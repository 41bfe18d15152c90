"""The registry on SQLite (the standard library's sqlite3, in a thread of its own): the default store, one
file under the data dir."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    # 5: checkpoint snapshots in the shared object store, so another worker can resume a job
    """
    CREATE TABLE checkpoints (
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, uri TEXT NOT NULL, sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, step INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (job_id, seq));
    """,
    # 6: attempts whose worker went away without an outcome, so a task that kills every worker it
    # reaches is failed instead of taking them down one after another
    """
    ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: privacy requests: versions derived from erased data, and the audit of every request
    """
    ALTER TABLE models ADD COLUMN erased_lineage TEXT;
    CREATE TABLE privacy_requests (
        request_id TEXT NOT NULL, part TEXT NOT NULL, kind TEXT NOT NULL, user_hash TEXT NOT NULL,
        requested_by TEXT, worker TEXT NOT NULL, summary TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL,
        PRIMARY KEY (request_id, part));
    CREATE INDEX idx_privacy_user ON privacy_requests(user_hash);
    """,
    # 8: federations: a coordinator's config and state, under a lease, so another host can resume it
    """
    CREATE TABLE federations (
        name TEXT PRIMARY KEY, config TEXT NOT NULL, snapshot TEXT NOT NULL, round INTEGER NOT NULL,
        lease_owner TEXT, lease_expires_at TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
    """,
    # 9: schedules: task templates any worker fires, and each slot's decision (the first worker's)
    """
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY, spec TEXT NOT NULL, owner TEXT, paused INTEGER NOT NULL DEFAULT 0, pause_reason TEXT,
        last_slot TEXT NOT NULL, baseline INTEGER NOT NULL DEFAULT 0, buffered TEXT, created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL);
    CREATE TABLE schedule_fires (
        schedule_id TEXT NOT NULL, slot TEXT NOT NULL, job_id TEXT NOT NULL, action TEXT NOT NULL,
        created_at TEXT NOT NULL, published_at TEXT, PRIMARY KEY (schedule_id, slot));
    """,
    # 10: evaluation gates: a challenger's score against the champion of an alias, and the verdict
    """
    CREATE TABLE evaluations (
        model_id TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, against_id TEXT, metric TEXT NOT NULL,
        value REAL NOT NULL, against_value REAL, margin REAL NOT NULL, promoted INTEGER NOT NULL,
        reason TEXT NOT NULL, rows INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (model_id, alias));
    CREATE INDEX idx_evaluations_against ON evaluations(against_id);
    """,
    # 11: progressive rollouts, at most one going on per name and alias, and each of their moves
    """
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, alias TEXT NOT NULL, model_id TEXT NOT NULL,
        baseline_id TEXT NOT NULL, spec TEXT NOT NULL, candidates TEXT NOT NULL, ended INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL);
    CREATE UNIQUE INDEX idx_rollouts_going_on ON rollouts(name, alias) WHERE ended = 0;
    CREATE TABLE rollout_steps (
        rollout_id TEXT NOT NULL, seq INTEGER NOT NULL, step INTEGER NOT NULL, share INTEGER NOT NULL,
        state TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT, created_at TEXT NOT NULL,
        published_at TEXT, PRIMARY KEY (rollout_id, seq));
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
    # julianday is a float of days: rounded to the milliseconds the times are stored in, or a lease
    # just taken for 30 s could read as 30.00004 s left
    seconds_until=lambda column: f"ROUND((julianday({column}) - julianday('now')) * 86400.0, 3)",
    to_db=_to_db,
    from_db=_from_db,
    task_user="json_extract(task, '$.user_id')",
)
"""SQLite's dialect: `?` placeholders, JSON and times as text."""


_Write = tuple[str, list[Any], "asyncio.Future[list[Mapping[str, Any]]]"]
"""A queued write: statement, parameters, and the future its rows go to."""
_Done = list[Mapping[str, Any]] | StoreError
"""What became of one write of a batch: its RETURNING rows, or why it failed."""

T = TypeVar("T")


def _rows(rows: Iterable[sqlite3.Row]) -> list[Mapping[str, Any]]:
    return [dict(zip(row.keys(), row, strict=True)) for row in rows]


class SqliteStore(SqlStore):
    """RegistryStore on one SQLite file (WAL mode, so readers such as `forseti jobs` do not block the worker).

    The connection lives in one thread of the store's own, and every call is one hop to it: a read,
    or a whole batch of writes (group commit). A busy worker's writes arrive while the previous
    batch commits and share the next one, so they cost one hop and one commit together.
    """

    dialect = SQLITE

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the connection's thread."""
        if self._thread is None:
            raise StoreError(f"registry {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (use it only in the store's thread)."""
        if self._db is None:
            raise StoreError(f"registry {self.path} is not open")
        return self._db

    async def open(self) -> None:
        """Open the file (creating it) and apply pending migrations."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forseti-sqlite")
        try:
            self._db = await self._call(self._connect)
        except sqlite3.Error as exc:
            self._thread.shutdown()
            self._thread = None
            raise StoreError(f"cannot open registry {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # autocommit: each statement is its own transaction; batches and migrations bring their own BEGIN
        db = sqlite3.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL stays consistent after a crash and skips an fsync per commit; a job lost in a
        # power cut is not lost to the system, because its task is acked on the bus only after this.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
        for version, script in enumerate(MIGRATIONS, start=1):
            if version > current:
                db.executescript(
                    f"BEGIN;\n{script}\nINSERT INTO schema_migrations VALUES ({version}, '{utcnow()}');\nCOMMIT;"
                )
        return db

    async def close(self) -> None:
        """Close the file and the store's thread."""
        if self._flusher is not None:
            await self._flusher
        db, self._db = self._db, None
        if db is not None:
            await self._call(db.close)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown()

    async def schema_version(self) -> int:
        """The newest applied migration."""
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations", [])
        return int(rows[0]["version"])

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one read (autocommit) and return its rows."""
        return await self._call(self._read, sql, list(params))

    def _read(self, sql: str, params: list[Any]) -> list[Mapping[str, Any]]:
        try:
            return _rows(self.db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the registry: {exc}") from exc

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Queue one write for the next batch; returns its `RETURNING` rows once the batch is committed."""
        done: asyncio.Future[list[Mapping[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending.append((sql, list(params), done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            outcomes = await self._call(self._commit, [(sql, params) for sql, params, _ in batch])
            for (_, _, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():  # its caller was cancelled (a heartbeat stopped mid-renewal): the write stands
                    continue
                if isinstance(outcome, StoreError):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)

    def _commit(self, batch: list[tuple[str, list[Any]]]) -> list[_Done]:
        """Run a batch of writes in one transaction (in the store's thread); should one fail, each
        runs alone, so a bad write does not fail the others that shared its commit."""
        if len(batch) == 1:
            return [self._alone(*batch[0])]
        try:
            self.db.execute("BEGIN")
            outcomes: list[_Done] = []
            # a run of the same statement without RETURNING (a busy worker's job rows) is one executemany
            for sql, group in itertools.groupby(batch, key=lambda item: item[0]):
                items = [params for _, params in group]
                if "RETURNING" in sql:
                    outcomes += [_rows(self.db.execute(sql, params).fetchall()) for params in items]
                else:
                    self.db.executemany(sql, items)
                    outcomes += [[] for _ in items]
            self.db.execute("COMMIT")
            return outcomes
        except sqlite3.Error:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            return [self._alone(sql, params) for sql, params in batch]

    def _alone(self, sql: str, params: list[Any]) -> _Done:
        try:
            return _rows(self.db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            return StoreError(f"cannot write the registry: {exc}")
