"""The registry on PostgreSQL (asyncpg with its connection pool): one store shared by workers on many hosts.

`postgresql://user:password@host:5432/db` selects it. The tables are SQLite's, in PostgreSQL's types
(JSONB documents, TIMESTAMPTZ times), under the same numbered migrations; workers that start at
once apply them one after another, behind a transaction-scoped advisory lock.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from forseti.adapters.urls import redact
from forseti.schemas.errors import StoreError

from .base import ModelRecord
from .sql import TIME_FIELDS, Dialect, SqlStore

MIGRATIONS: list[str] = [
    # 1: the seed's tables, plus jobs and artifacts
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        task JSONB NOT NULL, result JSONB, error_code TEXT, error_message TEXT, worker TEXT,
        created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
    CREATE INDEX idx_jobs_state ON jobs(state);
    CREATE TABLE models (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, framework TEXT NOT NULL,
        model_type TEXT NOT NULL, base_model TEXT, export_path TEXT NOT NULL, export_format TEXT NOT NULL,
        metrics JSONB, user_id TEXT, device_id TEXT, job_id TEXT,
        created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL, UNIQUE(name, version));
    CREATE INDEX idx_models_user ON models(user_id);
    CREATE INDEX idx_models_device ON models(device_id);
    CREATE INDEX idx_models_framework ON models(framework);
    CREATE TABLE training_runs (
        id TEXT PRIMARY KEY, model_id TEXT REFERENCES models(id), framework TEXT NOT NULL, config JSONB NOT NULL,
        status TEXT NOT NULL, progress DOUBLE PRECISION, metrics JSONB, user_id TEXT, device_id TEXT,
        started_at TIMESTAMPTZ NOT NULL, completed_at TIMESTAMPTZ);
    CREATE INDEX idx_runs_model ON training_runs(model_id);
    CREATE INDEX idx_runs_status ON training_runs(status);
    CREATE TABLE rl_agents (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, algorithm TEXT NOT NULL, environment TEXT NOT NULL,
        policy_path TEXT NOT NULL, metrics JSONB, user_id TEXT, device_id TEXT, job_id TEXT,
        created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
    CREATE INDEX idx_agents_algorithm ON rl_agents(algorithm);
    CREATE TABLE artifacts (
        id TEXT PRIMARY KEY, model_id TEXT NOT NULL REFERENCES models(id), format TEXT NOT NULL,
        uri TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes BIGINT NOT NULL, quantization TEXT,
        created_at TIMESTAMPTZ NOT NULL);
    CREATE INDEX idx_artifacts_model ON artifacts(model_id);
    """,
    # 2: lineage and labels of model versions; aliases kept as a history so a rollback returns to
    # where the alias pointed before
    """
    ALTER TABLE models ADD COLUMN parent_id TEXT;
    ALTER TABLE models ADD COLUMN label TEXT;
    CREATE TABLE aliases (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name TEXT NOT NULL, alias TEXT NOT NULL,
        model_id TEXT NOT NULL REFERENCES models(id), set_at TIMESTAMPTZ NOT NULL);
    CREATE INDEX idx_aliases_name ON aliases(name, alias);
    """,
    # 3: device tags a model version is addressed to
    """
    ALTER TABLE models ADD COLUMN device_tags JSONB NOT NULL DEFAULT '[]';
    """,
    # 4: job leases; the seed's user indexes on runs and agents
    """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at TIMESTAMPTZ;
    CREATE INDEX idx_runs_user ON training_runs(user_id);
    CREATE INDEX idx_agents_user ON rl_agents(user_id);
    """,
    # 5: checkpoint snapshots in the shared object store, so another worker can resume a job
    """
    CREATE TABLE checkpoints (
        job_id TEXT NOT NULL, seq BIGINT NOT NULL, uri TEXT NOT NULL, sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL, step BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (job_id, seq));
    """,
    # 6: attempts whose worker went away without an outcome (poison tasks)
    """
    ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: privacy requests: versions derived from erased data, and the audit of every request
    """
    ALTER TABLE models ADD COLUMN erased_lineage TEXT;
    CREATE TABLE privacy_requests (
        request_id TEXT NOT NULL, part TEXT NOT NULL, kind TEXT NOT NULL, user_hash TEXT NOT NULL,
        requested_by TEXT, worker TEXT NOT NULL, summary JSONB NOT NULL DEFAULT '{}', created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (request_id, part));
    CREATE INDEX idx_privacy_user ON privacy_requests(user_hash);
    CREATE INDEX idx_jobs_user ON jobs((task->>'user_id'));
    """,
    # 8: federations: a coordinator's config and state, under a lease, so another host can resume it
    """
    CREATE TABLE federations (
        name TEXT PRIMARY KEY, config JSONB NOT NULL, snapshot JSONB NOT NULL, round INTEGER NOT NULL,
        lease_owner TEXT, lease_expires_at TIMESTAMPTZ, created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL);
    """,
    # 9: schedules: task templates any worker fires, and each slot's decision (the first worker's)
    """
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY, spec JSONB NOT NULL, owner TEXT, paused BOOLEAN NOT NULL DEFAULT FALSE,
        pause_reason TEXT, last_slot TEXT NOT NULL, baseline BIGINT NOT NULL DEFAULT 0, buffered TEXT,
        created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
    CREATE TABLE schedule_fires (
        schedule_id TEXT NOT NULL, slot TEXT NOT NULL, job_id TEXT NOT NULL, action TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL, published_at TIMESTAMPTZ, PRIMARY KEY (schedule_id, slot));
    """,
    # 10: evaluation gates: a challenger's score against the champion of an alias, and the verdict
    """
    CREATE TABLE evaluations (
        model_id TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, against_id TEXT, metric TEXT NOT NULL,
        value DOUBLE PRECISION NOT NULL, against_value DOUBLE PRECISION, margin DOUBLE PRECISION NOT NULL,
        promoted BOOLEAN NOT NULL, reason TEXT NOT NULL, rows INTEGER NOT NULL, created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (model_id, alias));
    CREATE INDEX idx_evaluations_against ON evaluations(against_id);
    """,
    # 11: progressive rollouts, at most one going on per name and alias, and each of their moves
    """
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, alias TEXT NOT NULL, model_id TEXT NOT NULL,
        baseline_id TEXT NOT NULL, spec JSONB NOT NULL, candidates JSONB NOT NULL, ended BOOLEAN NOT NULL DEFAULT FALSE,
        created_at TIMESTAMPTZ NOT NULL);
    CREATE UNIQUE INDEX idx_rollouts_going_on ON rollouts(name, alias) WHERE NOT ended;
    CREATE TABLE rollout_steps (
        rollout_id TEXT NOT NULL, seq INTEGER NOT NULL, step INTEGER NOT NULL, share INTEGER NOT NULL,
        state TEXT NOT NULL, reason TEXT NOT NULL, evidence JSONB, created_at TIMESTAMPTZ NOT NULL,
        published_at TIMESTAMPTZ, PRIMARY KEY (rollout_id, seq));
    """,
]
"""Schema migrations in order, numbered as SQLite's; migration N is applied once and recorded in `schema_migrations`."""

MIGRATION_LOCK = zlib.crc32(b"forseti.registry.migrations")
"""The advisory lock key that serialises migrations across workers starting at once."""
MODEL_NAME_LOCKS = zlib.crc32(b"forseti.registry.model-names") & 0x7FFFFFFF
"""The first key of the advisory locks (one per model name) that order version numbering."""


def _to_db(column: str, value: Any) -> Any:
    if column in TIME_FIELDS and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def _from_db(column: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


POSTGRES = Dialect(
    mark=lambda n: f"${n}",
    now="now()",
    later=lambda seconds: f"now() + make_interval(secs => {seconds}::double precision)",
    seconds_until=lambda column: f"EXTRACT(EPOCH FROM ({column} - now()))::double precision",
    to_db=_to_db,
    from_db=_from_db,
    task_user="task->>'user_id'",
)
"""PostgreSQL's dialect: `$n` placeholders, JSONB through orjson, TIMESTAMPTZ times."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for jsontype in ("jsonb", "json"):
        await conn.set_type_codec(
            jsontype, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


class PostgresStore(SqlStore):
    """RegistryStore on a PostgreSQL database, through a pool of asyncpg connections."""

    dialect = POSTGRES

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self.min_size, self.max_size = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self.url)!r})"

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        if self._pool is None:
            raise StoreError(f"registry {redact(self.url)} is not open")
        return self._pool

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self.min_size, max_size=self.max_size, init=_init_connection
            )
            await self._migrate()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            # the driver's message names the host and the user, never the password
            raise StoreError(f"cannot open registry {redact(self.url)}: {exc}") from exc

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
            )
            current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
            for version, script in enumerate(MIGRATIONS, start=1):
                if version > current:
                    await conn.execute(script)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)

    async def close(self) -> None:
        """Close every connection of the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def schema_version(self) -> int:
        """The newest applied migration."""
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations", [])
        return int(rows[0]["version"])

    async def add_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; the store assigns the next version of its name. Under READ
        COMMITTED two inserts could read the same MAX(version), so a lock per name orders them."""
        sql, params = self._add_model_statement(model)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", MODEL_NAME_LOCKS, model.name)
                row = await conn.fetchrow(sql, *params)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot register model {model.name}: {exc}") from exc
        return self._record(ModelRecord, dict(row))

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one statement on a pooled connection and return its rows."""
        try:
            return [dict(row) for row in await self.pool.fetch(sql, *params)]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"registry statement failed: {exc}") from exc

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one write in its own transaction and return its `RETURNING` rows."""
        return await self._fetch(sql, params)
