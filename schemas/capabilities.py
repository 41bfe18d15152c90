"""`forseti.capabilities`: what a worker can do, after the seed's capability list."""

from __future__ import annotations

from pydantic import Field

from .base import LongText, ShortText, Strict
from .errors import ErrorCode
from .tasks import TaskKind


class Capability(Strict):
    """One thing a worker can do, as the seed's `Capability::new(area, name)`."""

    area: ShortText
    """training, reinforcement-learning, finetune, inference or model-export."""
    name: ShortText
    """The model type, algorithm or format within the area."""


class CapabilitiesQuery(Strict):
    """`forseti.capabilities.query.v1`: ask any worker what it can do."""

    kind: TaskKind | None = None
    """Only answer about this task kind."""


class CapabilitiesError(Strict):
    """`forseti.capabilities.error.v1`: why a worker cannot answer a capabilities query (reply)."""

    code: ErrorCode
    """malformed_json or invalid_task (a query that is not a valid capabilities query), unknown_kind
    (no task kind the worker runs)."""
    message: LongText
    """What was wrong, for people."""
    worker: ShortText
    """The worker that answered."""


class Capabilities(Strict):
    """`forseti.capabilities.v1`: one worker's answer."""

    worker: ShortText
    """Worker id."""
    version: ShortText
    """Forseti version."""
    task_kinds: list[TaskKind]
    """Task kinds it consumes."""
    capabilities: list[Capability] = Field(default_factory=list, max_length=1024)
    """Algorithms, model types and formats, by area."""
    devices: list[ShortText] = Field(default_factory=list, max_length=64)
    """Compute devices it can train on (cpu, cuda:0, ...)."""
    concurrency: int = Field(ge=1)
    """Jobs it runs at once."""
    running_jobs: int = Field(ge=0)
    """Jobs it is running now."""
