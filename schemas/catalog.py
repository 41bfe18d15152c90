"""Every event type Forseti speaks: its payload model, its channel, and who sends it to whom.

The catalog drives decoding, the generated JSON Schemas and the AsyncAPI document, so a new event
is added here once.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from .base import Strict
from .capabilities import Capabilities, CapabilitiesError, CapabilitiesQuery
from .control import CancelJob, PauseJob, ResumeJob
from .deadletter import DeadLetter
from .env import EnvClose, EnvError, EnvOpen, EnvReset, EnvSpec, EnvStep, EnvTransition
from .federation import (
    ExperienceExport,
    FederationError,
    FederationPull,
    FederationReceipt,
    FederationRound,
    FederationTask,
    FederationUpdate,
    WarmStart,
    WarmStartQuery,
)
from .inference import ActReply, ActRequest, InferError, InferReply, InferRequest
from .jobs import (
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobStatus,
    JobStatusError,
    JobStatusQuery,
)
from .llm import CompleteReply, CompleteRequest, LlmError
from .models import ModelAvailable, ModelLoaded, ModelRollback, ModelsList, ModelsQuery, ModelsQueryError
from .privacy import PrivacyErase, PrivacyExport, PrivacyReceipt, PrivacyRectify
from .ranks import RankJoin, RankJoined
from .rollouts import RolloutStep, ServeHealth
from .schedules import (
    ScheduleCreate,
    ScheduleDelete,
    ScheduleError,
    ScheduleFired,
    SchedulePause,
    ScheduleResume,
    SchedulesList,
    SchedulesQuery,
)
from .tasks import TASK_MODELS, task_channel, task_type


@dataclass(frozen=True)
class EventSpec:
    """One event type on the wire."""

    type: str
    model: builtins.type[Strict]
    channel: str
    summary: str


JOBS = "forseti.jobs.{job_id}"
CONTROL = "forseti.control"
MODELS = "forseti.models"
LOADED = "forseti.models.loaded"
HEALTH = "forseti.models.health"
MODELS_QUERY = "forseti.models.query"
ENV = "forseti.env.{executor_id}"
CAPABILITIES = "forseti.capabilities"
STATUS = "forseti.status"
DEADLETTER = "forseti.deadletter"
LLM = "forseti.llm.{name}.complete"
INFER = "forseti.infer.{model_id}"
EDGE = "forseti.edge.{device_id}.infer"
PRIVACY = "forseti.privacy"
RECEIPTS = "forseti.privacy.receipts.{request_id}"
RANKS = "forseti.ranks"
FEDERATION = "forseti.federation.{name}.{verb}"
SCHEDULES = "forseti.schedules"
SCHEDULES_FIRED = "forseti.schedules.fired"
FEDERATION_VERBS = ("pull", "update", "experience", "warmstart", "rounds")
"""The channels of one federation: what agents ask (`pull`, `update`, `experience`, `warmstart`) and
where the coordinator announces rounds (`rounds`)."""


def federation_channel(name: str, verb: str) -> str:
    """One of a federation's channels (`verb` in FEDERATION_VERBS)."""
    if verb not in FEDERATION_VERBS:
        raise ValueError(f"unknown federation channel {verb!r}; one of {', '.join(FEDERATION_VERBS)}")
    return FEDERATION.format(name=name, verb=verb)


def jobs_channel(job_id: str) -> str:
    """The progress channel of one job."""
    return JOBS.format(job_id=job_id)


def env_channel(executor_id: str) -> str:
    """The request channel of one executor."""
    return ENV.format(executor_id=executor_id)


def infer_channel(model_id: str) -> str:
    """The streaming inference channel of one registered model."""
    return INFER.format(model_id=model_id)


def edge_channel(device_id: str) -> str:
    """Where an edge device answers inference and act requests."""
    return EDGE.format(device_id=device_id)


def receipts_channel(request_id: str) -> str:
    """Where the workers' receipts for one privacy request go."""
    return RECEIPTS.format(request_id=request_id)


def llm_channel(name: str) -> str:
    """The completion channel of the LLM service that serves model `name`."""
    return LLM.format(name=name)


def _fed(verb: str) -> str:
    return FEDERATION.replace("{verb}", verb)


_SPECS: list[EventSpec] = [
    *(
        EventSpec(task_type(kind), model, task_channel(kind), f"Client asks for {kind.value} work.")
        for kind, model in TASK_MODELS.items()
    ),
    EventSpec("forseti.job.accepted.v1", JobAccepted, JOBS, "A worker took the task."),
    EventSpec("forseti.job.progress.v1", JobProgress, JOBS, "How far the job has come."),
    EventSpec("forseti.job.completed.v1", JobCompleted, JOBS, "The job finished, with its result."),
    EventSpec("forseti.job.failed.v1", JobFailed, JOBS, "The job ended with an error."),
    EventSpec("forseti.job.cancelled.v1", JobCancelled, JOBS, "The job stopped on request."),
    EventSpec("forseti.control.cancel.v1", CancelJob, CONTROL, "Stop a job."),
    EventSpec("forseti.control.pause.v1", PauseJob, CONTROL, "Hold a job at its next safe point."),
    EventSpec("forseti.control.resume.v1", ResumeJob, CONTROL, "Continue a paused job."),
    EventSpec("forseti.model.available.v1", ModelAvailable, MODELS, "A new artifact is ready."),
    EventSpec("forseti.model.rollback.v1", ModelRollback, MODELS, "Serve an earlier version again."),
    EventSpec("forseti.model.loaded.v1", ModelLoaded, LOADED, "A consumer loaded (or failed to load) a version."),
    EventSpec("forseti.rollout.step.v1", RolloutStep, MODELS, "A rollout moved, held or ended."),
    EventSpec("forseti.model.health.v1", ServeHealth, HEALTH, "A replica's traffic per version, periodically."),
    EventSpec("forseti.models.query.v1", ModelsQuery, MODELS_QUERY, "Ask for the registered model versions."),
    EventSpec("forseti.models.list.v1", ModelsList, MODELS_QUERY, "The model versions in a registry (reply)."),
    EventSpec("forseti.models.query.error.v1", ModelsQueryError, MODELS_QUERY, "Why a models query failed (reply)."),
    EventSpec("forseti.env.open.v1", EnvOpen, ENV, "Open an env session (request)."),
    EventSpec("forseti.env.reset.v1", EnvReset, ENV, "Reset a session (request)."),
    EventSpec("forseti.env.step.v1", EnvStep, ENV, "Step all sub-envs (request)."),
    EventSpec("forseti.env.close.v1", EnvClose, ENV, "Close a session (request)."),
    EventSpec("forseti.env.spec.v1", EnvSpec, ENV, "The session's spaces (reply to open)."),
    EventSpec("forseti.env.transition.v1", EnvTransition, ENV, "Observations and rewards (reply)."),
    EventSpec("forseti.env.error.v1", EnvError, ENV, "What the executor refused, and why (reply)."),
    EventSpec("forseti.llm.complete.v1", CompleteRequest, LLM, "Continue a prompt (request)."),
    EventSpec("forseti.llm.completion.v1", CompleteReply, LLM, "The continuation and its version (reply)."),
    EventSpec("forseti.llm.error.v1", LlmError, LLM, "Why a completion was refused (reply)."),
    EventSpec("forseti.infer.request.v1", InferRequest, INFER, "Predict on rows now (request)."),
    EventSpec("forseti.infer.result.v1", InferReply, INFER, "One prediction per row (reply)."),
    EventSpec("forseti.infer.error.v1", InferError, INFER, "Why a prediction was refused (reply)."),
    EventSpec("forseti.edge.act.v1", ActRequest, EDGE, "An edge policy's actions for observations (request)."),
    EventSpec("forseti.edge.actions.v1", ActReply, EDGE, "The actions (reply)."),
    EventSpec("forseti.capabilities.query.v1", CapabilitiesQuery, CAPABILITIES, "Ask what workers can do."),
    EventSpec("forseti.capabilities.v1", Capabilities, CAPABILITIES, "One worker's capabilities (reply)."),
    EventSpec(
        "forseti.capabilities.error.v1", CapabilitiesError, CAPABILITIES, "Why a query was not answered (reply)."
    ),
    EventSpec("forseti.job.status.query.v1", JobStatusQuery, STATUS, "Ask where a job stands."),
    EventSpec("forseti.job.status.v1", JobStatus, STATUS, "A job's stored record (reply)."),
    EventSpec("forseti.job.status.error.v1", JobStatusError, STATUS, "Why a status query has no record (reply)."),
    EventSpec("forseti.deadletter.v1", DeadLetter, DEADLETTER, "A message that could not become a job."),
    EventSpec("forseti.privacy.export.v1", PrivacyExport, PRIVACY, "Gather everything held for a user."),
    EventSpec("forseti.privacy.erase.v1", PrivacyErase, PRIVACY, "Delete everything held for a user."),
    EventSpec("forseti.privacy.rectify.v1", PrivacyRectify, PRIVACY, "Replace a user's dataset and train again."),
    EventSpec("forseti.privacy.receipt.v1", PrivacyReceipt, RECEIPTS, "What one worker found and did (reply)."),
    EventSpec("forseti.ranks.join.v1", RankJoin, RANKS, "Run a share of a distributed job's ranks (signed request)."),
    EventSpec("forseti.ranks.joined.v1", RankJoined, RANKS, "Taken, or why not (reply)."),
    EventSpec("forseti.federation.pull.v1", FederationPull, _fed("pull"), "An agent asks what to do (request)."),
    EventSpec("forseti.federation.task.v1", FederationTask, _fed("pull"), "Train, wait or stop (reply)."),
    EventSpec("forseti.federation.update.v1", FederationUpdate, _fed("update"), "An agent's weight change (request)."),
    EventSpec(
        "forseti.federation.experience.v1", ExperienceExport, _fed("experience"), "An ending agent's trajectories."
    ),
    EventSpec(
        "forseti.federation.receipt.v1", FederationReceipt, _fed("update"), "What became of a contribution (reply)."
    ),
    EventSpec(
        "forseti.federation.warmstart.query.v1", WarmStartQuery, _fed("warmstart"), "A new agent asks for a warm start."
    ),
    EventSpec("forseti.federation.warmstart.v1", WarmStart, _fed("warmstart"), "What the federation learned (reply)."),
    EventSpec("forseti.federation.round.v1", FederationRound, _fed("rounds"), "A round opened, closed or failed."),
    EventSpec("forseti.federation.error.v1", FederationError, _fed("pull"), "Why a request was refused (reply)."),
    EventSpec("forseti.schedule.create.v1", ScheduleCreate, SCHEDULES, "Store a schedule (request)."),
    EventSpec("forseti.schedule.pause.v1", SchedulePause, SCHEDULES, "Stop firing a schedule (request)."),
    EventSpec("forseti.schedule.resume.v1", ScheduleResume, SCHEDULES, "Fire a paused schedule again (request)."),
    EventSpec("forseti.schedule.delete.v1", ScheduleDelete, SCHEDULES, "Remove a schedule (request)."),
    EventSpec("forseti.schedule.query.v1", SchedulesQuery, SCHEDULES, "List schedules (request)."),
    EventSpec("forseti.schedule.list.v1", SchedulesList, SCHEDULES, "The schedules asked for (reply)."),
    EventSpec("forseti.schedule.error.v1", ScheduleError, SCHEDULES, "Why a schedule request was refused (reply)."),
    EventSpec("forseti.schedule.fired.v1", ScheduleFired, SCHEDULES_FIRED, "A worker decided a schedule's slot."),
]

BY_TYPE: dict[str, EventSpec] = {spec.type: spec for spec in _SPECS}
"""Event specs by CloudEvents type."""

TYPE_OF: dict[type[Strict], str] = {spec.model: spec.type for spec in _SPECS}
"""CloudEvents type by payload model."""


def all_specs() -> list[EventSpec]:
    """Every event type, in catalog order."""
    return list(_SPECS)
