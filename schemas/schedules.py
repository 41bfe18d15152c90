"""Schedules on `forseti.schedules`: stored task templates that workers fire on a clock or a trigger.

A schedule is created, listed, paused, resumed and deleted by request-reply events; any worker
fires it, and each fire has a deterministic job id (schedule id + slot) so that N workers and a
restarted one fire a slot once. Policies follow Temporal's schedules (overlap, catch-up window,
pause after failures).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import Field, field_validator, model_validator

from .base import Id, LongText, Name, ShortText, Strict
from .rollouts import LatencyFigure
from .tasks import TaskKind


class Overlap(StrEnum):
    """What a fire does while the schedule's previous job has not ended."""

    SKIP = "skip"
    """Leave this slot out (recorded as skipped)."""
    BUFFER_ONE = "buffer_one"
    """Hold one slot and fire it when the running job ends; further slots meanwhile are skipped."""
    CANCEL_OTHER = "cancel_other"
    """Cancel the running job, then fire."""
    ALLOW_ALL = "allow_all"
    """Fire regardless: jobs of one schedule may run side by side."""


class DatasetGrowth(Strict):
    """Fire when a line-per-record dataset (JSON lines, CSV) has grown by `lines` since the last fire."""

    path: LongText
    """The dataset's path as the workers see it (a shared volume when workers run on many hosts)."""
    lines: int = Field(ge=1)
    """How many new lines make a fire."""


class MetricDrift(Strict):
    """Fire when a served model's error rate or latency, as the replicas serving it report it
    (`forseti.model.health.v1`), has passed a bound over a window."""

    name: Name
    """The model name whose replicas (llm-serve, edge devices) are watched."""
    alias: ShortText | None = None
    """Only the replicas following this alias (None: every replica of the name)."""
    metric: Literal["error_rate", "latency_ms"] = "error_rate"
    """error_rate: failed over answered requests; latency_ms: their latency, in the `latency` figure."""
    latency: LatencyFigure = "mean"
    """latency_ms: the mean, or a percentile estimated from the replicas' latency buckets."""
    above: float = Field(ge=0.0)
    """The bound: a fire when the metric is past it."""
    window_seconds: float = Field(default=300.0, ge=1.0)
    """The window the metric is measured over; after a fire, the next is judged on a fresh window."""
    min_requests: int = Field(default=20, ge=1)
    """Requests the window must hold before the metric is judged."""

    @model_validator(mode="after")
    def _latency_of_latency(self) -> MetricDrift:
        if self.metric != "latency_ms" and self.latency != "mean":
            raise ValueError("latency names a latency figure: it goes with metric latency_ms")
        return self


class ScheduleSpec(Strict):
    """What a schedule fires and when: exactly one of `cron`, `every_seconds`, `when_grown`, `when_drifts`."""

    kind: TaskKind
    """The task kind each fire publishes."""
    task: dict[str, Any]
    """The task's payload, checked against the kind's task model when the schedule is created; each
    fire sets `request_id` (the fire's job id) and `user_id` (the schedule's owner)."""
    cron: ShortText | None = None
    """A cron expression (five fields, croniter's syntax: `*/15 * * * *`, `0 3 * * mon`)."""
    every_seconds: float | None = Field(default=None, ge=0.05)
    """An interval instead of cron: slots at creation + n * every_seconds."""
    timezone: ShortText = "UTC"
    """The IANA time zone cron fields are read in (`Europe/Paris`); DST shifts follow it."""
    jitter_seconds: float = Field(default=0.0, ge=0.0)
    """Fire up to this many seconds after the slot, by an offset derived from the slot (so every worker
    agrees on it), to spread schedules that share a minute."""
    overlap: Overlap = Overlap.SKIP
    """What a fire does while the previous job runs."""
    catchup_window_seconds: float = Field(default=60.0, ge=0.0)
    """After downtime (no worker running), slots missed by up to this much are still fired, in order;
    older ones are recorded as missed."""
    pause_after_failures: int = Field(default=0, ge=0)
    """Pause the schedule once this many fired jobs in a row failed (0: never)."""
    when_grown: DatasetGrowth | None = None
    """A trigger instead of a clock: fire when a dataset grew by so many lines."""
    when_drifts: MetricDrift | None = None
    """A trigger instead of a clock: fire when a served model's error rate or latency drifts past a bound."""

    @property
    def triggered(self) -> bool:
        """Whether it fires on a trigger (dataset growth, metric drift) rather than a clock."""
        return self.when_grown is not None or self.when_drifts is not None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (five fields, e.g. '*/15 * * * *')")
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleSpec:
        triggers = ("cron", "every_seconds", "when_grown", "when_drifts")
        given = [name for name in triggers if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a schedule needs exactly one of {', '.join(triggers)} (got {given or 'none'})")
        return self


class ScheduleRequest(Strict):
    """Fields every schedule request carries."""

    user_id: ShortText | None = None
    """Who asks: a schedule is its creator's; only they (or an operator's signed request) may change it."""


class ScheduleCreate(ScheduleRequest):
    """`forseti.schedule.create.v1`: store a schedule (replacing the asker's own of that id)."""

    id: Id
    """The schedule's id; fires are `<id>-<slot>`."""
    spec: ScheduleSpec
    """What it fires and when."""


class ScheduleChange(ScheduleRequest):
    """Fields of the requests that act on one schedule."""

    id: Id
    """The schedule."""


class SchedulePause(ScheduleChange):
    """`forseti.schedule.pause.v1`: stop firing until resumed."""


class ScheduleResume(ScheduleChange):
    """`forseti.schedule.resume.v1`: fire again (slots missed while paused are not caught up)."""


class ScheduleDelete(ScheduleChange):
    """`forseti.schedule.delete.v1`: remove the schedule and its fire records."""


class SchedulesQuery(ScheduleRequest):
    """`forseti.schedule.query.v1`: list schedules (the asker's; every one for an operator)."""

    id: Id | None = None
    """One schedule with its recent fires, instead of all."""


class ScheduleFire(Strict):
    """One slot of a schedule and what was done with it."""

    slot: ShortText
    """The slot: `20261206T130000Z` for a clock, `grown-<n>` for a dataset trigger, `drifted-<n>` for a
    metric drift."""
    job_id: Id
    """The job id a fire publishes under (`<schedule>-<slot>`)."""
    action: ShortText
    """fired, skipped, buffered, missed or cancelled_other (fired after cancelling the running job)."""
    at: ShortText
    """When the action was decided (ISO 8601, UTC)."""


class ScheduleInfo(Strict):
    """A stored schedule as workers see it."""

    id: Id
    """The schedule's id."""
    spec: ScheduleSpec
    """What it fires and when."""
    owner: ShortText | None = None
    """Who created it."""
    paused: bool = False
    """True while it does not fire."""
    pause_reason: LongText | None = None
    """Why it was paused (by a request, or after failures)."""
    next_fire: ShortText | None = None
    """The next slot, for a clock (ISO 8601, UTC)."""
    fires: list[ScheduleFire] = Field(default_factory=list)
    """Recent fires, newest first (with `id` queries)."""


class SchedulesList(Strict):
    """`forseti.schedule.list.v1`: the answer to a query or a change."""

    schedules: list[ScheduleInfo]
    """The schedules asked for (one after a create or change)."""


class ScheduleError(Strict):
    """`forseti.schedule.error.v1`: a request refused, and why."""

    code: ShortText
    """`invalid`, `not_found` or `forbidden`."""
    message: LongText
    """What was wrong, for people."""


class ScheduleFired(Strict):
    """`forseti.schedule.fired.v1` on `forseti.schedules.fired`: a worker decided a slot."""

    schedule_id: Id
    """The schedule."""
    fire: ScheduleFire
    """The slot and what was done."""
    late_seconds: float
    """How long after the slot (plus its jitter offset) the decision came."""
