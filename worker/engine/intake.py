"""Turning a delivered task message into a validated task, or into a reason to refuse it."""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass

import orjson

from forseti.schemas.base import ID_PATTERN
from forseti.schemas.deadletter import DeadLetter
from forseti.schemas.envelope import decode, peek_job_id
from forseti.schemas.errors import ErrorCode, InvalidTask
from forseti.schemas.tasks import TaskBase, TaskKind, task_channel, task_type


@dataclass(frozen=True)
class Accepted:
    """A task that may become a job."""

    job_id: str
    kind: TaskKind
    task: TaskBase
    trace: dict[str, str] | None = None
    """The task event's `traceparent` / `tracestate` (the client's publish span), when it carried them."""


@dataclass(frozen=True)
class Refused:
    """A message that cannot become a job, and why."""

    reason: ErrorCode
    detail: str
    job_id: str | None

    def dead_letter(self, raw: bytes, *, channel: str, worker: str, limit: int) -> DeadLetter:
        """The dead-letter record, holding the original bytes (cut to `limit` when oversized)."""
        return DeadLetter(
            reason=self.reason,
            detail=self.detail[:4096],
            channel=channel,
            job_id=self.job_id,
            worker=worker,
            original_b64=base64.b64encode(raw[:limit]).decode(),
            original_size=len(raw),
        )


def job_id_for(task: TaskBase, event_id: str) -> str:
    """The task's request_id, else an id derived from the event id, so a redelivery maps to the same job."""
    if task.request_id:
        return task.request_id
    if re.fullmatch(ID_PATTERN, event_id):
        return event_id
    return str(uuid.uuid5(uuid.NAMESPACE_URL, event_id))


def read_task(raw: bytes, kind: TaskKind, *, max_bytes: int) -> Accepted | Refused:
    """Validate one task message that arrived on the channel of `kind`."""
    if len(raw) > max_bytes:
        # not parsed at all: reading an id out of an oversized message is the cost the limit avoids
        return Refused(ErrorCode.OVERSIZED, f"task is {len(raw)} bytes, the limit is {max_bytes}", None)
    try:
        event = decode(raw, expect=TaskBase)
    except InvalidTask as exc:
        return Refused(exc.code, exc.message, peek_job_id(raw))
    if event.type != task_type(kind):
        return Refused(
            ErrorCode.UNKNOWN_KIND,
            f"a {event.type} event arrived on the {kind.value} task channel; "
            f"publish it on forseti.tasks.{event.type.split('.')[2]}",
            peek_job_id(raw),
        )
    trace = None
    if event.traceparent is not None:
        trace = {"traceparent": event.traceparent, "tracestate": event.tracestate or ""}
    return Accepted(job_id_for(event.data, event.id), kind, event.data, trace)


KIND_OF_CHANNEL = {task_channel(kind): kind for kind in TaskKind}
"""The task kind each owned task channel carries."""
OWNED_CHANNELS = frozenset(KIND_OF_CHANNEL)
"""The task channels some kind owns; a task anywhere else under `forseti.tasks.` is a stray."""
_KIND_OF_TYPE = {task_type(kind): kind for kind in TaskKind}


def read_stray(raw: bytes, channel: str, *, max_bytes: int) -> tuple[Refused, TaskKind | None]:
    """Why a task on a channel that no kind owns is refused, and the kind its event names (so its
    job can be failed where an id can be read)."""
    detail = f"no task kind is published on {channel}: tasks go on " + ", ".join(sorted(OWNED_CHANNELS))
    if len(raw) > max_bytes:
        return Refused(ErrorCode.UNKNOWN_KIND, f"{detail} (not parsed: {len(raw)} bytes)", None), None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    named_type = doc.get("type") if isinstance(doc, dict) else None
    kind = _KIND_OF_TYPE.get(named_type) if isinstance(named_type, str) else None
    return Refused(ErrorCode.UNKNOWN_KIND, detail, peek_job_id(raw)), kind
