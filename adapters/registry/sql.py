"""The registry's queries, written once for every SQL store; each store brings its dialect and a way to run them.

A store subclasses `SqlStore` and implements `_fetch` (a read) and `_change` (a write, whose
`RETURNING` rows it returns once committed). Statements are built with `Params`, which numbers the
placeholders the way the dialect wants (`?` for SQLite, `$1` for PostgreSQL), and times come from the
database's own clock (`Dialect.now`), so leases taken on different hosts compare on one clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind

from .base import (
    Artifact,
    CheckpointRecord,
    Claim,
    EvaluationRecord,
    FederationClaim,
    FederationRecord,
    FireRecord,
    JobRecord,
    ModelRecord,
    PrivacyRecord,
    Record,
    RLAgent,
    RolloutRecord,
    RolloutStepRecord,
    ScheduleRecord,
    TrainingRun,
    utcnow,
)

R = TypeVar("R", bound=Record)

JSON_FIELDS = frozenset(
    {"task", "result", "metrics", "config", "device_tags", "summary", "snapshot", "spec", "candidates", "evidence"}
)
"""Columns that hold JSON documents."""
TIME_FIELDS = frozenset(
    {"created_at", "updated_at", "started_at", "completed_at", "lease_expires_at", "set_at", "published_at"}
)
"""Columns that hold points in time."""
TERMINAL = tuple(state.value for state in JobState if state.terminal)
USER_TABLES = ("aliases", "artifacts", "training_runs", "rl_agents", "checkpoints", "models", "jobs")
"""The tables that hold a user's rows, in the order deletes must go (what refers to a model first)."""
LIVE = (JobState.RUNNING.value, JobState.PAUSED.value)
"""States of a job that a worker holds: found so with the lease run out, its worker went away."""


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """What differs between the SQL engines a store runs on."""

    mark: Callable[[int], str]
    """The placeholder for the n-th parameter (1-based)."""
    now: str
    """An expression for the database's current time, in the type of the time columns."""
    later: Callable[[str], str]
    """An expression for now plus the seconds in a placeholder."""
    seconds_until: Callable[[str], str]
    """An expression for the seconds from now until a time column (negative once it passed)."""
    to_db: Callable[[str, Any], Any]
    """A record field's value as the driver takes it for its column."""
    from_db: Callable[[str, Any], Any]
    """A column's value as the record field takes it."""
    task_user: str
    """An expression for the `user_id` inside a job's task document."""


class Params:
    """The parameters of one statement, numbered as they are added."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        """Add a value; the placeholder to write where it goes."""
        self.values.append(value)
        return self.dialect.mark(len(self.values))


class SqlStore(ABC):
    """RegistryStore on a SQL engine: every query of the protocol, over two primitives a store provides."""

    dialect: Dialect

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one read and return its rows as column -> value."""

    @abstractmethod
    async def _change(self, sql: str, params: Sequence[Any]) -> list[Mapping[str, Any]]:
        """Run one write and return the rows it names in `RETURNING` (none without), once committed."""

    # -- rows <-> records ------------------------------------------------------------------------

    def _values(self, record: Record) -> dict[str, Any]:
        return {k: self.dialect.to_db(k, v) for k, v in record.model_dump(mode="json").items()}

    def _record(self, cls: type[R], row: Mapping[str, Any]) -> R:
        return cls.model_validate({k: self.dialect.from_db(k, row[k]) for k in row if k in cls.model_fields})

    async def _select(self, cls: type[R], sql: str, params: Sequence[Any]) -> list[R]:
        return [self._record(cls, row) for row in await self._fetch(sql, params)]

    async def _upsert(self, table: str, key: str, record: Record) -> None:
        values = self._values(record)
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != key)
        await self._change(
            f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {updates}",
            p.values,
        )

    async def _insert_once(self, table: str, key: str, record: Record) -> bool:
        """Insert `record` unless a row with its `key` (columns, comma-separated) exists; whether it was
        inserted. One statement: of writers racing for one key, exactly one gets True."""
        values = self._values(record)
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        rows = await self._change(
            f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks}) ON CONFLICT ({key}) DO NOTHING RETURNING 1",
            p.values,
        )
        return bool(rows)

    def _where(self, p: Params, filters: dict[str, Any]) -> str:
        clause = " AND ".join(f"{k} = {p(v)}" for k, v in filters.items() if v is not None)
        return f" WHERE {clause}" if clause else ""

    # -- jobs ------------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job, or None."""
        p = Params(self.dialect)
        rows = await self._select(JobRecord, f"SELECT * FROM jobs WHERE job_id = {p(job_id)}", p.values)
        return rows[0] if rows else None

    async def put_job(self, job: JobRecord) -> JobRecord:
        """Insert or replace a job; stamps updated_at."""
        job = job.model_copy(update={"updated_at": utcnow()})
        await self._upsert("jobs", "job_id", job)
        return job

    async def list_jobs(
        self, *, state: JobState | None = None, kind: TaskKind | None = None, limit: int = 50
    ) -> list[JobRecord]:
        """Newest jobs first, optionally filtered."""
        p = Params(self.dialect)
        where = self._where(p, {"state": state, "kind": kind})
        return await self._select(
            JobRecord, f"SELECT * FROM jobs{where} ORDER BY created_at DESC LIMIT {p(limit)}", p.values
        )

    async def claim_job(self, job: JobRecord, *, owner: str, ttl: float) -> Claim:
        """Take the lease of a job for `ttl` seconds and count the attempt (and, when the job was still
        running or paused, its last attempt's crash), unless the job ended or its lease is live (held
        by anyone, `owner` included); one statement, so two claims never both win."""
        d, p = self.dialect, Params(self.dialect)
        new = {
            **self._values(job),
            "state": JobState.RUNNING.value,
            "attempt": 1,
            "worker": owner,
            "lease_owner": owner,
        }
        columns = [c for c in new if c not in ("created_at", "updated_at", "lease_expires_at")]
        marks = [p(new[c]) for c in columns]
        stamp, expiry = d.now, d.later(p(ttl))
        carried = ("kind", "state", "task", "worker", "lease_owner", "updated_at", "lease_expires_at")
        rows = await self._change(
            f"INSERT INTO jobs ({', '.join(columns)}, created_at, updated_at, lease_expires_at) "
            f"VALUES ({', '.join(marks)}, {stamp}, {stamp}, {expiry}) "
            f"ON CONFLICT (job_id) DO UPDATE SET attempt = jobs.attempt + 1, "
            f"crashes = jobs.crashes + CASE WHEN jobs.state IN ({', '.join(p(s) for s in LIVE)}) THEN 1 ELSE 0 END, "
            f"{', '.join(f'{c} = excluded.{c}' for c in carried)} "
            f"WHERE jobs.state NOT IN ({', '.join(p(s) for s in TERMINAL)}) "
            f"AND (jobs.lease_expires_at IS NULL OR jobs.lease_expires_at < {stamp}) RETURNING *",
            p.values,
        )
        if rows:
            return Claim(job=self._record(JobRecord, rows[0]), won=True)
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT *, {d.seconds_until('lease_expires_at')} AS lease_left FROM jobs WHERE job_id = {p(job.job_id)}",
            p.values,
        )
        if not rows:  # deleted between the two statements: nothing holds it, so the next delivery takes it
            return Claim(job=job, won=False)
        left = rows[0]["lease_left"]
        return Claim(job=self._record(JobRecord, rows[0]), won=False, lease_left=max(float(left or 0.0), 0.0))

    async def renew_lease(self, job_id: str, *, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease of a job by `ttl` seconds from now; False when another worker holds it."""
        p = Params(self.dialect)
        rows = await self._change(
            f"UPDATE jobs SET lease_expires_at = {self.dialect.later(p(ttl))} "
            f"WHERE job_id = {p(job_id)} AND lease_owner = {p(owner)} RETURNING job_id",
            p.values,
        )
        return bool(rows)

    async def update_held_job(self, job: JobRecord, *, owner: str, release: bool) -> bool:
        """Write a job's state, attempt, result and error only while `owner` holds its lease, and with
        `release` give the lease up; False (nothing written) when another worker took the job over."""
        values = self._values(job)
        p = Params(self.dialect)
        fields = ("state", "attempt", "result", "error_code", "error_message", "worker")
        sets = [f"{c} = {p(values[c])}" for c in fields]
        sets.append(f"updated_at = {self.dialect.now}")
        if release:
            sets += ["lease_owner = NULL", "lease_expires_at = NULL"]
        rows = await self._change(
            f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = {p(job.job_id)} AND lease_owner = {p(owner)} "
            "RETURNING job_id",
            p.values,
        )
        return bool(rows)

    # -- models and aliases ----------------------------------------------------------------------

    async def add_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; the store assigns the next version of its name."""
        rows = await self._change(*self._add_model_statement(model))
        return self._record(ModelRecord, rows[0])

    def _add_model_statement(self, model: ModelRecord) -> tuple[str, list[Any]]:
        """The insert that numbers a version: one statement, so on SQLite (one writer at a time) two
        workers cannot take the same version; PostgreSQL adds a lock per name around it."""
        values = self._values(model)
        values.pop("version")
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        sql = (
            f"INSERT INTO models ({', '.join(values)}, version) VALUES ({marks}, "
            f"(SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = {p(model.name)})) RETURNING *"
        )
        return sql, p.values

    async def get_model(self, model_id: str) -> ModelRecord | None:
        """One model version, or None."""
        p = Params(self.dialect)
        rows = await self._select(ModelRecord, f"SELECT * FROM models WHERE id = {p(model_id)}", p.values)
        return rows[0] if rows else None

    async def list_models(self, *, name: str | None = None, limit: int = 50) -> list[ModelRecord]:
        """Newest versions first."""
        p = Params(self.dialect)
        where = self._where(p, {"name": name})
        return await self._select(
            ModelRecord,
            f"SELECT * FROM models{where} ORDER BY created_at DESC, version DESC LIMIT {p(limit)}",
            p.values,
        )

    async def set_alias(self, name: str, alias: str, model_id: str) -> None:
        """Point `alias` of model `name` at a version (remembering where it pointed before)."""
        p = Params(self.dialect)
        await self._change(
            f"INSERT INTO aliases (name, alias, model_id, set_at) VALUES ({p(name)}, {p(alias)}, {p(model_id)}, "
            f"{p(self.dialect.to_db('set_at', utcnow()))})",
            p.values,
        )

    async def _alias_history(self, name: str, alias: str, depth: int) -> list[ModelRecord]:
        p = Params(self.dialect)
        return await self._select(
            ModelRecord,
            "SELECT models.* FROM aliases JOIN models ON models.id = aliases.model_id "
            f"WHERE aliases.name = {p(name)} AND aliases.alias = {p(alias)} ORDER BY aliases.seq DESC LIMIT {p(depth)}",
            p.values,
        )

    async def get_alias(self, name: str, alias: str) -> ModelRecord | None:
        """The version `alias` of `name` points at, or None."""
        rows = await self._alias_history(name, alias, 1)
        return rows[0] if rows else None

    async def rollback_alias(self, name: str, alias: str) -> tuple[ModelRecord, ModelRecord] | None:
        """Move `alias` back to where it pointed before its last move: (left, now served), or None
        when there is no earlier position."""
        history = await self._alias_history(name, alias, 2)
        if len(history) < 2:
            return None
        p = Params(self.dialect)
        await self._change(
            "DELETE FROM aliases WHERE seq = "
            f"(SELECT MAX(seq) FROM aliases WHERE name = {p(name)} AND alias = {p(alias)})",
            p.values,
        )
        return history[0], history[1]

    # -- runs, agents, artifacts -----------------------------------------------------------------

    async def put_training_run(self, run: TrainingRun) -> None:
        """Insert or replace a training run."""
        await self._upsert("training_runs", "id", run)

    async def list_training_runs(self, *, status: JobState | None = None, limit: int = 50) -> list[TrainingRun]:
        """Newest runs first."""
        p = Params(self.dialect)
        where = self._where(p, {"status": status})
        return await self._select(
            TrainingRun, f"SELECT * FROM training_runs{where} ORDER BY started_at DESC LIMIT {p(limit)}", p.values
        )

    async def add_rl_agent(self, agent: RLAgent) -> None:
        """Register an agent."""
        await self._upsert("rl_agents", "id", agent)

    async def list_rl_agents(self, *, algorithm: str | None = None, limit: int = 50) -> list[RLAgent]:
        """Newest agents first."""
        p = Params(self.dialect)
        where = self._where(p, {"algorithm": algorithm})
        return await self._select(
            RLAgent, f"SELECT * FROM rl_agents{where} ORDER BY created_at DESC LIMIT {p(limit)}", p.values
        )

    async def add_artifact(self, artifact: Artifact) -> None:
        """Register an exported file."""
        await self._upsert("artifacts", "id", artifact)

    async def list_artifacts(self, model_id: str) -> list[Artifact]:
        """Files of one model version."""
        p = Params(self.dialect)
        return await self._select(
            Artifact, f"SELECT * FROM artifacts WHERE model_id = {p(model_id)} ORDER BY created_at", p.values
        )

    # -- checkpoints -----------------------------------------------------------------------------

    async def add_checkpoint(self, checkpoint: CheckpointRecord) -> None:
        """Record a job's checkpoint snapshot once it is in the object store."""
        values = self._values(checkpoint)
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        await self._change(
            f"INSERT INTO checkpoints ({', '.join(values)}) VALUES ({marks}) ON CONFLICT (job_id, seq) DO NOTHING",
            p.values,
        )

    async def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoint snapshots, newest (highest seq) first."""
        p = Params(self.dialect)
        return await self._select(
            CheckpointRecord, f"SELECT * FROM checkpoints WHERE job_id = {p(job_id)} ORDER BY seq DESC", p.values
        )

    async def delete_checkpoint(self, job_id: str, seq: int) -> None:
        """Forget one snapshot (after its object was removed)."""
        p = Params(self.dialect)
        await self._change(f"DELETE FROM checkpoints WHERE job_id = {p(job_id)} AND seq = {p(seq)}", p.values)

    async def ended_checkpoints(self, limit: int = 100) -> list[CheckpointRecord]:
        """Snapshots of jobs that have ended (completed, failed or cancelled), oldest first: what retention prunes."""
        p = Params(self.dialect)
        return await self._select(
            CheckpointRecord,
            "SELECT checkpoints.* FROM checkpoints JOIN jobs ON jobs.job_id = checkpoints.job_id "
            f"WHERE jobs.state IN ({', '.join(p(s) for s in TERMINAL)}) ORDER BY checkpoints.created_at "
            f"LIMIT {p(limit)}",
            p.values,
        )

    # -- privacy ---------------------------------------------------------------------------------

    async def jobs_of_user(self, user_id: str) -> list[JobRecord]:
        """Every job whose task named `user_id`, oldest first."""
        p = Params(self.dialect)
        return await self._select(
            JobRecord,
            f"SELECT * FROM jobs WHERE {self.dialect.task_user} = {p(user_id)} ORDER BY created_at",
            p.values,
        )

    async def models_of(self, user_id: str, job_ids: list[str]) -> list[ModelRecord]:
        """Model versions registered for `user_id` or produced by one of `job_ids`."""
        p = Params(self.dialect)
        return await self._select(
            ModelRecord,
            f"SELECT * FROM models WHERE user_id = {p(user_id)} OR {_in(p, 'job_id', job_ids)} ORDER BY created_at",
            p.values,
        )

    @staticmethod
    def _user_condition(table: str, p: Params, user_id: str, job_ids: list[str], model_ids: list[str]) -> str:
        """The condition that picks a user's rows in `table` (one of USER_TABLES)."""
        if table in ("aliases", "artifacts"):
            return _in(p, "model_id", model_ids)
        if table == "training_runs":
            return f"user_id = {p(user_id)} OR {_in(p, 'id', job_ids)} OR {_in(p, 'model_id', model_ids)}"
        if table == "rl_agents":
            return f"user_id = {p(user_id)} OR {_in(p, 'job_id', job_ids)}"
        if table == "models":
            return _in(p, "id", model_ids)
        return _in(p, "job_id", job_ids)  # checkpoints, jobs

    async def user_rows(
        self, user_id: str, job_ids: list[str], model_ids: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        """Every row held for a user, by table (for an export)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for table in USER_TABLES:
            p = Params(self.dialect)
            condition = self._user_condition(table, p, user_id, job_ids, model_ids)
            rows = await self._fetch(f"SELECT * FROM {table} WHERE {condition}", p.values)
            found[table] = [{k: self.dialect.from_db(k, v) for k, v in row.items()} for row in rows]
        return found

    async def erase_rows(self, user_id: str, job_ids: list[str], model_ids: list[str]) -> dict[str, int]:
        """Delete every row held for a user; the rows removed, by table."""
        removed: dict[str, int] = {}
        for table in USER_TABLES:
            p = Params(self.dialect)
            condition = self._user_condition(table, p, user_id, job_ids, model_ids)
            removed[table] = len(await self._change(f"DELETE FROM {table} WHERE {condition} RETURNING 1", p.values))
        return removed

    async def mark_erased_lineage(self, model_ids: list[str], reason: str) -> None:
        """Mark versions as trained on (or derived from) erased data."""
        if model_ids:
            p = Params(self.dialect)
            await self._change(
                f"UPDATE models SET erased_lineage = {p(reason)} WHERE {_in(p, 'id', model_ids)}", p.values
            )

    async def claim_privacy(self, record: PrivacyRecord) -> bool:
        """Record a part of a privacy request; False when that part was recorded already."""
        return await self._insert_once("privacy_requests", "request_id, part", record)

    async def finish_privacy(self, request_id: str, part: str, summary: dict[str, Any]) -> None:
        """Store the counts of what a part found and did."""
        p = Params(self.dialect)
        await self._change(
            f"UPDATE privacy_requests SET summary = {p(self.dialect.to_db('summary', summary))} "
            f"WHERE request_id = {p(request_id)} AND part = {p(part)}",
            p.values,
        )

    async def list_privacy(self, *, limit: int = 100) -> list[PrivacyRecord]:
        """The audit records, newest first."""
        p = Params(self.dialect)
        return await self._select(
            PrivacyRecord, f"SELECT * FROM privacy_requests ORDER BY created_at DESC LIMIT {p(limit)}", p.values
        )

    # -- federations -----------------------------------------------------------------------------

    async def claim_federation(self, federation: FederationRecord, *, owner: str, ttl: float) -> FederationClaim:
        """Take a federation's lease for `ttl` seconds (storing it when new) unless another coordinator's
        lease is live; one statement, so two coordinators never both win."""
        d, p = self.dialect, Params(self.dialect)
        new = {**self._values(federation), "lease_owner": owner}
        columns = [c for c in new if c not in ("created_at", "updated_at", "lease_expires_at")]
        marks = [p(new[c]) for c in columns]
        stamp, expiry = d.now, d.later(p(ttl))
        rows = await self._change(
            f"INSERT INTO federations ({', '.join(columns)}, created_at, updated_at, lease_expires_at) "
            f"VALUES ({', '.join(marks)}, {stamp}, {stamp}, {expiry}) "
            f"ON CONFLICT (name) DO UPDATE SET lease_owner = excluded.lease_owner, "
            f"lease_expires_at = excluded.lease_expires_at "
            f"WHERE federations.lease_owner IS NULL OR federations.lease_owner = excluded.lease_owner "
            f"OR federations.lease_expires_at < {stamp} RETURNING *",
            p.values,
        )
        if rows:
            return FederationClaim(federation=self._record(FederationRecord, rows[0]), won=True)
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT *, {d.seconds_until('lease_expires_at')} AS lease_left FROM federations "
            f"WHERE name = {p(federation.name)}",
            p.values,
        )
        left = float(rows[0]["lease_left"] or 0.0) if rows else 0.0
        stored = self._record(FederationRecord, rows[0]) if rows else federation
        return FederationClaim(federation=stored, won=False, lease_left=max(left, 0.0))

    async def save_federation(self, federation: FederationRecord, *, owner: str, ttl: float) -> bool:
        """Store a federation's config, snapshot and round and renew `owner`'s lease; False (nothing
        written) when another coordinator holds it."""
        values = self._values(federation)
        p = Params(self.dialect)
        sets = [f"{c} = {p(values[c])}" for c in ("config", "snapshot", "round")]
        sets += [f"updated_at = {self.dialect.now}", f"lease_expires_at = {self.dialect.later(p(ttl))}"]
        rows = await self._change(
            f"UPDATE federations SET {', '.join(sets)} WHERE name = {p(federation.name)} "
            f"AND lease_owner = {p(owner)} RETURNING name",
            p.values,
        )
        return bool(rows)

    async def release_federation(self, name: str, *, owner: str) -> None:
        """Give up `owner`'s lease of a federation."""
        p = Params(self.dialect)
        await self._change(
            f"UPDATE federations SET lease_owner = NULL, lease_expires_at = NULL "
            f"WHERE name = {p(name)} AND lease_owner = {p(owner)}",
            p.values,
        )

    async def get_federation(self, name: str) -> FederationRecord | None:
        """One federation, or None."""
        p = Params(self.dialect)
        rows = await self._select(FederationRecord, f"SELECT * FROM federations WHERE name = {p(name)}", p.values)
        return rows[0] if rows else None

    # -- evaluation gates ------------------------------------------------------------------------

    async def add_evaluation(self, evaluation: EvaluationRecord) -> None:
        """Store an evaluation gate's verdict (one per challenger and alias; a replay replaces it)."""
        values = self._values(evaluation)
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c not in ("model_id", "alias"))
        await self._change(
            f"INSERT INTO evaluations ({', '.join(values)}) VALUES ({marks}) "
            f"ON CONFLICT (model_id, alias) DO UPDATE SET {updates}",
            p.values,
        )

    async def list_evaluations(self, model_ids: list[str]) -> list[EvaluationRecord]:
        """The verdicts in which any of `model_ids` was challenger or champion, newest first."""
        p = Params(self.dialect)
        where = f"{_in(p, 'model_id', model_ids)} OR {_in(p, 'against_id', model_ids)}"
        return await self._select(
            EvaluationRecord, f"SELECT * FROM evaluations WHERE {where} ORDER BY created_at DESC", p.values
        )

    # -- schedules -------------------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRecord) -> None:
        """Store a schedule, replacing one of the same id."""
        await self._upsert("schedules", "id", schedule.model_copy(update={"updated_at": utcnow()}))

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """One schedule, or None."""
        p = Params(self.dialect)
        rows = await self._select(ScheduleRecord, f"SELECT * FROM schedules WHERE id = {p(schedule_id)}", p.values)
        return rows[0] if rows else None

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, by id."""
        return await self._select(ScheduleRecord, "SELECT * FROM schedules ORDER BY id", [])

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule and its fire records; False when there was none."""
        p = Params(self.dialect)
        await self._change(f"DELETE FROM schedule_fires WHERE schedule_id = {p(schedule_id)}", p.values)
        p = Params(self.dialect)
        return bool(await self._change(f"DELETE FROM schedules WHERE id = {p(schedule_id)} RETURNING id", p.values))

    async def change_schedule(self, schedule_id: str, **fields: Any) -> bool:
        """Set some of a schedule's fields (paused, pause_reason, buffered, baseline); False when there is none."""
        allowed = {"paused", "pause_reason", "buffered", "baseline"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"change_schedule sets {sorted(allowed)}, not {sorted(set(fields) - allowed)}")
        p = Params(self.dialect)
        sets = [f"{c} = {p(self.dialect.to_db(c, v))}" for c, v in fields.items()]
        rows = await self._change(
            f"UPDATE schedules SET {', '.join(sets)}, updated_at = {self.dialect.now} "
            f"WHERE id = {p(schedule_id)} RETURNING id",
            p.values,
        )
        return bool(rows)

    async def advance_schedule(self, schedule_id: str, slot: str) -> None:
        """Move a schedule's `last_slot` to `slot` unless it is already there or past it."""
        p = Params(self.dialect)
        await self._change(
            f"UPDATE schedules SET last_slot = {p(slot)} WHERE id = {p(schedule_id)} AND last_slot < {p(slot)}",
            p.values,
        )

    async def claim_fire(self, fire: FireRecord) -> bool:
        """Store a slot's decision; False when another worker stored that slot first (one statement,
        so of N workers deciding one slot exactly one wins)."""
        return await self._insert_once("schedule_fires", "schedule_id, slot", fire)

    async def change_fire(
        self,
        schedule_id: str,
        slot: str,
        *,
        action: str | None = None,
        expect: str | None = None,
        published: bool = False,
    ) -> bool:
        """Set a fire's action (only while it is `expect`, when given) and/or stamp it published; False
        when no fire matched."""
        p = Params(self.dialect)
        sets = [f"action = {p(action)}"] if action is not None else []
        if published:
            sets.append(f"published_at = {self.dialect.now}")
        where = f"schedule_id = {p(schedule_id)} AND slot = {p(slot)}"
        if expect is not None:
            where += f" AND action = {p(expect)}"
        rows = await self._change(f"UPDATE schedule_fires SET {', '.join(sets)} WHERE {where} RETURNING slot", p.values)
        return bool(rows)

    async def list_fires(self, schedule_id: str, *, limit: int = 20) -> list[FireRecord]:
        """A schedule's fires, newest slot first."""
        p = Params(self.dialect)
        return await self._select(
            FireRecord,
            f"SELECT * FROM schedule_fires WHERE schedule_id = {p(schedule_id)} ORDER BY slot DESC LIMIT {p(limit)}",
            p.values,
        )

    # -- rollouts -------------------------------------------------------------------------------

    async def put_rollout(self, rollout: RolloutRecord, first: RolloutStepRecord) -> bool:
        """Store a new rollout and its first step; False (nothing stored) while another rollout of the
        same name and alias has not ended."""
        values = self._values(rollout)
        p = Params(self.dialect)
        marks = ", ".join(p(v) for v in values.values())
        # the partial unique index on (name, alias) of rollouts not ended refuses a second one
        stored = await self._change(
            f"INSERT INTO rollouts ({', '.join(values)}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING 1", p.values
        )
        return bool(stored) and await self.claim_rollout_step(first)

    async def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        """One rollout, or None."""
        p = Params(self.dialect)
        rows = await self._select(RolloutRecord, f"SELECT * FROM rollouts WHERE id = {p(rollout_id)}", p.values)
        return rows[0] if rows else None

    async def list_rollouts(self, *, name: str | None = None, active: bool = False) -> list[RolloutRecord]:
        """Rollouts, newest first; `active`: only those not ended."""
        p = Params(self.dialect)
        where = self._where(p, {"name": name, "ended": False if active else None})
        return await self._select(
            RolloutRecord, f"SELECT * FROM rollouts{where} ORDER BY created_at DESC, id", p.values
        )

    async def claim_rollout_step(self, step: RolloutStepRecord) -> bool:
        """Store a rollout's next move; False when another worker stored that `seq` first."""
        return await self._insert_once("rollout_steps", "rollout_id, seq", step)

    async def end_rollout(self, rollout_id: str) -> None:
        """Mark a rollout ended (its last move ended it and was announced): another of its name and
        alias may start."""
        p = Params(self.dialect)
        await self._change(f"UPDATE rollouts SET ended = {p(True)} WHERE id = {p(rollout_id)}", p.values)

    async def list_rollout_steps(self, rollout_id: str) -> list[RolloutStepRecord]:
        """A rollout's moves, oldest first."""
        p = Params(self.dialect)
        return await self._select(
            RolloutStepRecord, f"SELECT * FROM rollout_steps WHERE rollout_id = {p(rollout_id)} ORDER BY seq", p.values
        )

    async def published_rollout_step(self, rollout_id: str, seq: int) -> None:
        """Stamp a move's event as published."""
        p = Params(self.dialect)
        await self._change(
            f"UPDATE rollout_steps SET published_at = {self.dialect.now} "
            f"WHERE rollout_id = {p(rollout_id)} AND seq = {p(seq)}",
            p.values,
        )


def _in(p: Params, column: str, values: list[str]) -> str:
    """`column IN (...)`, or FALSE for no values (an empty IN list is not SQL)."""
    return f"{column} IN ({', '.join(p(v) for v in values)})" if values else "FALSE"
