"""The registry: jobs, models, training runs, RL agents and artifacts, behind one store protocol.

Tables follow the seed (`models`, `training_runs`, `rl_agents`) plus `jobs` (the worker's lifecycle
record, which makes intake idempotent) and `artifacts` (every exported file with its digest).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from forseti.schemas.errors import ErrorCode
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind


def utcnow() -> str:
    """Now, as ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Record(BaseModel):
    """A registry row."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class JobRecord(Record):
    """One job as the worker last saw it."""

    job_id: str
    """The job id (the task's request_id)."""
    kind: TaskKind
    """Task kind."""
    state: JobState = JobState.PENDING
    """Lifecycle state."""
    attempt: int = 0
    """Deliveries that reached a handler."""
    crashes: int = 0
    """Attempts whose worker went away without an outcome (killed, out of memory, crashed): counted
    when a claim finds the job still running or paused with its lease run out."""
    task: dict[str, Any] = Field(default_factory=dict)
    """The validated task payload."""
    result: dict[str, Any] | None = None
    """The result, once completed."""
    error_code: ErrorCode | None = None
    """Why it failed."""
    error_message: str | None = None
    """What failed, for people."""
    worker: str | None = None
    """The worker that ran it last."""
    created_at: str = Field(default_factory=utcnow)
    """First seen."""
    updated_at: str = Field(default_factory=utcnow)
    """Last change."""
    lease_owner: str | None = None
    """The worker that holds the job's lease while it runs (None once it settled or was handed back)."""
    lease_expires_at: str | None = None
    """When that lease runs out unless its owner renews it (ISO 8601, the registry's clock)."""

    def orphaned(self, now: str | None = None) -> bool:
        """True for a running or paused job whose lease ran out: its worker died and no other took it over yet."""
        live = self.state in (JobState.RUNNING, JobState.PAUSED)
        return live and self.lease_expires_at is not None and self.lease_expires_at < (now or utcnow())


@dataclass(frozen=True)
class Claim:
    """What `RegistryStore.claim_job` found: the job as it stands, and whether the caller now holds it."""

    job: JobRecord
    """The stored job after the claim (with the attempt counted, when won)."""
    won: bool
    """True when the caller holds the lease now and should run the job."""
    lease_left: float = 0.0
    """When not won and the job has not ended: seconds until the holder's lease runs out."""


class Registered(Record):
    """Provenance shared by registered things: who asked, for which device, from which job, when."""

    user_id: str | None = None
    """Who asked for it."""
    device_id: str | None = None
    """Device it is meant for."""
    job_id: str | None = None
    """The job that produced it."""
    created_at: str = Field(default_factory=utcnow)
    """Registered at."""
    updated_at: str = Field(default_factory=utcnow)
    """Last change."""


class ModelRecord(Registered):
    """A registered model version (the seed's `models`)."""

    id: str
    """Registry id of this version."""
    name: str
    """Model name; versions count per name."""
    version: int = 0
    """Version number, assigned by the store (1, 2, ...)."""
    framework: str = "pytorch"
    """Framework that trained it."""
    model_type: str
    """classifier, regressor, policy, llm, ..."""
    base_model: str | None = None
    """What it was derived from."""
    export_path: str
    """Main exported file."""
    export_format: str
    """Its format."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Quality figures."""
    parent_id: str | None = None
    """The version this one continued from (lineage)."""
    label: str | None = None
    """A version label other than the number, when the producer keeps one (v1.0, v1.1, ...)."""
    device_tags: list[str] = Field(default_factory=list)
    """Tags of the devices it is meant for (the task's `device_tags`)."""
    erased_lineage: str | None = None
    """Set when data it was trained on, or a version it was derived from, was erased by a privacy
    request: which request, and what was erased."""


class TrainingRun(Record):
    """One training run (the seed's `training_runs`)."""

    id: str
    """Run id (the job id)."""
    model_id: str | None = None
    """The model it produced, once it did."""
    framework: str = "pytorch"
    """Framework."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The training config."""
    status: JobState = JobState.RUNNING
    """Run state."""
    progress: float = 0.0
    """Share done."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest figures."""
    user_id: str | None = None
    """Who asked."""
    device_id: str | None = None
    """Target device."""
    started_at: str = Field(default_factory=utcnow)
    """Start."""
    completed_at: str | None = None
    """End."""


class RLAgent(Registered):
    """A trained RL agent (the seed's `rl_agents`)."""

    id: str
    """Agent id."""
    name: str
    """Agent name."""
    algorithm: str
    """ppo, sac, dqn, a2c."""
    environment: str
    """Env id."""
    policy_path: str
    """Exported policy."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Evaluation figures."""


class Artifact(Record):
    """One exported file."""

    id: str
    """Artifact id."""
    model_id: str
    """The model version it belongs to."""
    format: str
    """onnx, safetensors, gguf, gguf-lora, peft."""
    uri: str
    """Where it lies."""
    sha256: str
    """Digest."""
    size_bytes: int
    """Size."""
    quantization: str | None = None
    """Quantization type, if any."""
    created_at: str = Field(default_factory=utcnow)
    """Written at."""


class CheckpointRecord(Record):
    """One snapshot of a running job's checkpoint folder in the shared object store."""

    job_id: str
    """The job it belongs to."""
    seq: int
    """Orders a job's snapshots across hosts: attempt * 1,000,000 + the snapshot's number in that attempt."""
    uri: str
    """Where the snapshot (a tar of the checkpoint folder) lies in the object store."""
    sha256: str
    """Its digest: a download that does not match is refused."""
    size_bytes: int
    """Its size."""
    step: int
    """How far the job had got (timesteps, epochs, optimizer steps, finished trials)."""
    created_at: str = Field(default_factory=utcnow)
    """Written at."""


class PrivacyRecord(Record):
    """The audit record of one part of a privacy request: what was asked, by whom, and the counts of
    what was found and done, never the data itself."""

    request_id: str
    """The request."""
    part: str
    """`shared` (the registry, object stores and bus history, done by one worker) or a worker's id
    (its own disk)."""
    kind: str
    """export, erase or rectify."""
    user_hash: str
    """sha256 of the user id: an auditor holding the id can find its requests; the table does not
    name the user."""
    requested_by: str | None = None
    """Who asked."""
    worker: str
    """The worker that did this part."""
    summary: dict[str, Any] = Field(default_factory=dict)
    """Counts of what was found and removed, by place."""
    created_at: str = Field(default_factory=utcnow)
    """When it was done."""


class FederationRecord(Record):
    """A federation as its coordinator last saved it: its config and its state, so a coordinator
    started on another host resumes it where it was."""

    name: str
    """The federation's name."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Its config (`schemas.federation.FederationConfig`)."""
    snapshot: dict[str, Any] = Field(default_factory=dict)
    """Its state (`worker/federation/state.py`): round, global weights, optimizer moments,
    contributions, counters. Not named `state`: that column is the jobs' lifecycle state, which the
    SQL stores read as text."""
    round: int = 0
    """The round it is at."""
    lease_owner: str | None = None
    """The coordinator running it now."""
    lease_expires_at: str | None = None
    """When that coordinator's lease runs out unless renewed."""
    created_at: str = Field(default_factory=utcnow)
    """First saved."""
    updated_at: str = Field(default_factory=utcnow)
    """Last saved."""


@dataclass(frozen=True)
class FederationClaim:
    """What `RegistryStore.claim_federation` found."""

    federation: FederationRecord
    """The stored federation (the given one when it was new)."""
    won: bool
    """True when the caller holds its lease now and runs it."""
    lease_left: float = 0.0
    """When not won: seconds until the holder's lease runs out."""


class EvaluationRecord(Record):
    """An evaluation gate's verdict: a new version (challenger) against the version holding an alias
    (champion), on the same held-out rows."""

    model_id: str
    """The challenger."""
    name: str
    """The model name."""
    alias: str
    """The alias at stake."""
    against_id: str | None = None
    """The champion (None: the alias was free)."""
    metric: str
    """accuracy, mae or rmse."""
    value: float
    """The challenger's score."""
    against_value: float | None = None
    """The champion's score on the same rows."""
    margin: float = 0.0
    """The margin asked for."""
    promoted: bool
    """Whether the challenger took the alias."""
    reason: str
    """Why, for people."""
    rows: int = 0
    """Held-out rows scored."""
    created_at: str = Field(default_factory=utcnow)
    """When it was judged."""


class ScheduleRecord(Record):
    """A stored schedule (`schemas.schedules`) and where its firing stands, shared by every worker."""

    id: str
    """The schedule's id."""
    spec: dict[str, Any] = Field(default_factory=dict)
    """What it fires and when (`schemas.schedules.ScheduleSpec`)."""
    owner: str | None = None
    """Who created it; fired tasks carry this `user_id`."""
    paused: bool = False
    """True while it does not fire."""
    pause_reason: str | None = None
    """Why it was paused."""
    last_slot: str = ""
    """The last slot decided (a clock's slot time, ISO 8601 UTC; a trigger's fire count, zero-padded),
    moved forward only, so a restarted worker starts after it."""
    baseline: int = 0
    """For a dataset trigger: the line count the next fire counts from."""
    buffered: str | None = None
    """A slot held by the buffer_one overlap policy until the running job ends."""
    created_at: str = Field(default_factory=utcnow)
    """Created (or last replaced)."""
    updated_at: str = Field(default_factory=utcnow)
    """Last change."""


class FireRecord(Record):
    """One slot of a schedule and what a worker decided for it; the first worker to store it decides."""

    schedule_id: str
    """The schedule."""
    slot: str
    """The slot (see `schemas.schedules.ScheduleFire`)."""
    job_id: str
    """The job id the fire publishes under."""
    action: str
    """fired, skipped, buffered, missed or cancelled_other."""
    created_at: str = Field(default_factory=utcnow)
    """When it was decided."""
    published_at: str | None = None
    """When its task went onto the bus (None: not yet; another worker republishes it)."""


class RolloutRecord(Record):
    """A progressive rollout of one version to an alias; where it stands is its newest step row."""

    id: str
    """The rollout's id."""
    name: str
    """The model name."""
    alias: str
    """The alias rolled out."""
    model_id: str
    """The candidate version."""
    baseline_id: str
    """The version the alias held when the rollout started."""
    spec: dict[str, Any] = Field(default_factory=dict)
    """How it goes (`schemas.rollouts.RolloutSpec`)."""
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    """The candidate's announcements as shared when the rollout started (`ModelAvailable` documents)."""
    ended: bool = False
    """True once the move that ended it (completed, rolled_back, aborted) was announced."""
    created_at: str = Field(default_factory=utcnow)
    """When it started."""


class RolloutStepRecord(Record):
    """One move of a rollout (a step, a hold, its end); the first worker to store a `seq` made the move."""

    rollout_id: str
    """The rollout."""
    seq: int
    """The move's number, from 0."""
    step: int
    """0: candidate loading; n: the n-th share of the rollout's steps."""
    share: int
    """The candidate's share of requests, in percent."""
    state: str
    """progressing, holding, completed, rolled_back or aborted."""
    reason: str = ""
    """Why, for people."""
    evidence: dict[str, Any] | None = None
    """What the move was judged on (`schemas.rollouts.StepEvidence`)."""
    created_at: str = Field(default_factory=utcnow)
    """When it was decided: the step's interval counts from here."""
    published_at: str | None = None
    """When its event went onto the bus (None: not yet; a worker publishes it again)."""


class RegistryStore(Protocol):
    """What the worker and the CLI need from a registry: SQLite on one host, PostgreSQL for many."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Disconnect."""

    async def schema_version(self) -> int:
        """The newest applied migration."""

    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job, or None."""

    async def put_job(self, job: JobRecord) -> JobRecord:
        """Insert or replace a job; stamps updated_at."""

    async def list_jobs(
        self, *, state: JobState | None = None, kind: TaskKind | None = None, limit: int = 50
    ) -> list[JobRecord]:
        """Newest jobs first, optionally filtered."""

    async def claim_job(self, job: JobRecord, *, owner: str, ttl: float) -> Claim:
        """Take a job's lease for `ttl` seconds and count the attempt, unless it ended or its lease is live."""

    async def renew_lease(self, job_id: str, *, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease by `ttl` seconds from now; False when another worker holds it."""

    async def update_held_job(self, job: JobRecord, *, owner: str, release: bool) -> bool:
        """Write a job's state and outcome while `owner` holds its lease (giving it up with `release`);
        False when another worker took the job over."""

    async def add_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; the store assigns the next version of its name."""

    async def get_model(self, model_id: str) -> ModelRecord | None:
        """One model version, or None."""

    async def list_models(self, *, name: str | None = None, limit: int = 50) -> list[ModelRecord]:
        """Newest versions first."""

    async def set_alias(self, name: str, alias: str, model_id: str) -> None:
        """Point `alias` of model `name` at a version (remembering where it pointed before)."""

    async def get_alias(self, name: str, alias: str) -> ModelRecord | None:
        """The version `alias` of `name` points at, or None."""

    async def rollback_alias(self, name: str, alias: str) -> tuple[ModelRecord, ModelRecord] | None:
        """Move `alias` back to where it pointed before its last move: (left, now served), or None."""

    async def put_training_run(self, run: TrainingRun) -> None:
        """Insert or replace a training run."""

    async def list_training_runs(self, *, status: JobState | None = None, limit: int = 50) -> list[TrainingRun]:
        """Newest runs first."""

    async def add_rl_agent(self, agent: RLAgent) -> None:
        """Register an agent."""

    async def list_rl_agents(self, *, algorithm: str | None = None, limit: int = 50) -> list[RLAgent]:
        """Newest agents first."""

    async def add_artifact(self, artifact: Artifact) -> None:
        """Register an exported file."""

    async def list_artifacts(self, model_id: str) -> list[Artifact]:
        """Files of one model version."""

    async def add_checkpoint(self, checkpoint: CheckpointRecord) -> None:
        """Record a job's checkpoint snapshot once it is in the object store."""

    async def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoint snapshots, newest (highest seq) first."""

    async def delete_checkpoint(self, job_id: str, seq: int) -> None:
        """Forget one snapshot (after its object was removed)."""

    async def ended_checkpoints(self, limit: int = 100) -> list[CheckpointRecord]:
        """Snapshots of jobs that have ended (completed, failed or cancelled), oldest first: what retention prunes."""

    async def jobs_of_user(self, user_id: str) -> list[JobRecord]:
        """Every job whose task named `user_id`, oldest first."""

    async def models_of(self, user_id: str, job_ids: list[str]) -> list[ModelRecord]:
        """Model versions registered for `user_id` or produced by one of `job_ids`."""

    async def user_rows(
        self, user_id: str, job_ids: list[str], model_ids: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        """Every row held for a user, by table (for an export)."""

    async def erase_rows(self, user_id: str, job_ids: list[str], model_ids: list[str]) -> dict[str, int]:
        """Delete every row held for a user; the rows removed, by table."""

    async def mark_erased_lineage(self, model_ids: list[str], reason: str) -> None:
        """Mark versions as trained on (or derived from) erased data."""

    async def claim_privacy(self, record: PrivacyRecord) -> bool:
        """Record a part of a privacy request; False when that part was recorded already (another
        worker does it)."""

    async def finish_privacy(self, request_id: str, part: str, summary: dict[str, Any]) -> None:
        """Store the counts of what a part found and did."""

    async def list_privacy(self, *, limit: int = 100) -> list[PrivacyRecord]:
        """The audit records, newest first."""

    async def claim_federation(self, federation: FederationRecord, *, owner: str, ttl: float) -> FederationClaim:
        """Take a federation's lease for `ttl` seconds (storing it when new) unless another coordinator's
        lease is live; the stored federation either way."""

    async def save_federation(self, federation: FederationRecord, *, owner: str, ttl: float) -> bool:
        """Store a federation's state and renew `owner`'s lease; False when another coordinator holds it."""

    async def release_federation(self, name: str, *, owner: str) -> None:
        """Give up `owner`'s lease of a federation (a coordinator stopping cleanly)."""

    async def get_federation(self, name: str) -> FederationRecord | None:
        """One federation, or None."""

    async def add_evaluation(self, evaluation: EvaluationRecord) -> None:
        """Store an evaluation gate's verdict (one per challenger and alias; a replay replaces it)."""

    async def list_evaluations(self, model_ids: list[str]) -> list[EvaluationRecord]:
        """The verdicts in which any of `model_ids` was challenger or champion, newest first."""

    async def put_schedule(self, schedule: ScheduleRecord) -> None:
        """Store a schedule, replacing one of the same id."""

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """One schedule, or None."""

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, by id."""

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule and its fire records; False when there was none."""

    async def change_schedule(self, schedule_id: str, **fields: Any) -> bool:
        """Set some of a schedule's fields (paused, pause_reason, buffered, baseline); False when there is none."""

    async def advance_schedule(self, schedule_id: str, slot: str) -> None:
        """Move a schedule's `last_slot` to `slot` unless it is already there or past it."""

    async def claim_fire(self, fire: FireRecord) -> bool:
        """Store a slot's decision; False when another worker stored that slot first."""

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

    async def list_fires(self, schedule_id: str, *, limit: int = 20) -> list[FireRecord]:
        """A schedule's fires, newest slot first."""

    async def put_rollout(self, rollout: RolloutRecord, first: RolloutStepRecord) -> bool:
        """Store a new rollout and its first step; False (nothing stored) while another rollout of the
        same name and alias has not ended."""

    async def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        """One rollout, or None."""

    async def list_rollouts(self, *, name: str | None = None, active: bool = False) -> list[RolloutRecord]:
        """Rollouts, newest first; `active`: only those not ended."""

    async def claim_rollout_step(self, step: RolloutStepRecord) -> bool:
        """Store a rollout's next move; False when another worker stored that `seq` first."""

    async def end_rollout(self, rollout_id: str) -> None:
        """Mark a rollout ended (its last move ended it and was announced): another of its name and
        alias may start."""

    async def list_rollout_steps(self, rollout_id: str) -> list[RolloutStepRecord]:
        """A rollout's moves, oldest first."""

    async def published_rollout_step(self, rollout_id: str, seq: int) -> None:
        """Stamp a move's event as published."""
