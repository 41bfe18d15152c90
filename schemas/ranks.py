"""Distributed jobs over several workers, on `forseti.ranks`: the job's worker asks the others, one
request each, to run their share of its ranks; one worker of the group answers each.

The request is signed by the asking worker's key and is only acted on by workers that trust that
key: it makes the joiner connect to the asker's rendezvous store, whose state torch keeps pickled,
so a join must never come from whoever is on the bus."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import Id, LongText, ShortText, Strict
from .errors import ErrorCode
from .tasks import TaskKind


class RankJoin(Strict):
    """`forseti.ranks.join.v1`: run your share of the ranks of job `job_id`, meeting at host:port."""

    job_id: Id
    """The job whose ranks these are (the rendezvous run id)."""
    kind: TaskKind
    """Its task kind: which handler builds the run."""
    task: dict[str, Any]
    """The job's task, as the joiner validates it and reads its data (under its own data root)."""
    run: dict[str, Any] = Field(default_factory=dict)
    """What the run needs beyond the task, as the job's handler says (a search trial's config, a
    fine-tune's parent version)."""
    host: ShortText
    """Where the group's rendezvous store listens (the asking worker's `rendezvous_host`)."""
    port: int = Field(ge=1, le=65_535)
    """Its port; with the job id, it names this start of the group (a join is taken once)."""
    node: int = Field(ge=1, le=63)
    """The joiner's place in the group: it runs ranks `node * world_size / workers` onwards (the
    job's own worker is node 0, with rank 0)."""
    world_size: int = Field(ge=2, le=64)
    """Ranks of the group on all workers together."""
    workers: int = Field(ge=2, le=64)
    """Workers the ranks are spread over."""


class RankJoined(Strict):
    """`forseti.ranks.joined.v1`: the answer to a join: taken, or why not."""

    joined: bool
    """True when this worker runs a share of the ranks now."""
    worker_id: ShortText
    """Who answered."""
    code: ErrorCode | None = None
    """Why not, when it is about the job (the asker fails it); None when the worker only cannot now
    (busy, the job's own worker, joined it already), and the asker asks again."""
    reason: LongText = ""
    """Why not, in words."""
