"""The CloudEvents 1.0 envelope (JSON structured mode) and the codec every transport's bytes go through."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar, cast

import orjson
from pydantic import Field, StringConstraints, ValidationError

from .base import ID_PATTERN, Strict
from .catalog import BY_TYPE, TYPE_OF
from .errors import ErrorCode, InvalidTask, validation_summary

M = TypeVar("M", bound=Strict)

trace_context: Callable[[], dict[str, str]] | None = None
"""Set by `forseti.adapters.tracing` while tracing is on: the current span's `traceparent` (and
`tracestate`), which `encode` adds to every event; None (the default) adds nothing."""

TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""A W3C Trace Context `traceparent`: version, trace id, parent span id, flags."""

CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_SOURCE = f"forseti/{socket.gethostname()}"


class Envelope(Strict):
    """A CloudEvents 1.0 event in JSON structured mode; extension attributes other than the signature's
    and the distributed-tracing extension's are refused."""

    specversion: Literal["1.0"]
    """CloudEvents version."""
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    """Unique id of this event."""
    source: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    """Who sent it."""
    type: Annotated[str, StringConstraints(pattern=r"^forseti\.[a-z0-9_.]{1,120}\.v[0-9]+$")]
    """Event type, `forseti.<area>.<name>.v<N>`."""
    time: datetime | None = None
    """When it was sent."""
    subject: Annotated[str, StringConstraints(max_length=256)] | None = None
    """The job id, for job events."""
    datacontenttype: Literal["application/json"] = "application/json"
    """Encoding of `data`."""
    data: dict[str, Any] = Field(default_factory=dict)
    """The payload; its schema follows from `type`."""
    signingkey: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    """Extension attribute of signed events (model announcements): the id of the ed25519 key that
    signed, the first 16 hex digits of the sha256 of its raw public bytes (docs/security.md)."""
    signature: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")] | None = None
    """Extension attribute of signed events: base64 of the ed25519 signature of the event without
    `signingkey` and `signature`, in RFC 8785 canonical JSON."""
    traceparent: Annotated[str, StringConstraints(pattern=TRACEPARENT)] | None = None
    """Distributed-tracing extension attribute: the W3C `traceparent` of the span that sent the event."""
    tracestate: Annotated[str, StringConstraints(max_length=512)] | None = None
    """Distributed-tracing extension attribute: the W3C `tracestate` that goes with it."""


@dataclass(frozen=True)
class Event(Generic[M]):
    """A decoded event: envelope attributes and the typed payload."""

    type: str
    id: str
    source: str
    subject: str | None
    time: datetime | None
    data: M
    traceparent: str | None = None
    tracestate: str | None = None


def encode(
    data: Strict, *, source: str = DEFAULT_SOURCE, subject: str | None = None, type_: str | None = None
) -> bytes:
    """Serialise a payload model as a CloudEvent; its type comes from the catalog unless given."""
    event_type = type_ or TYPE_OF[type(data)]
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": source,
        "type": event_type,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    if subject is not None:
        doc["subject"] = subject
    if trace_context is not None:
        doc.update(trace_context())
    return orjson.dumps(doc)


def peek_job_id(raw: bytes) -> str | None:
    """The job id of a message that may not validate, or None; used to report invalid tasks."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    data = doc.get("data")
    candidates = [data.get("request_id") if isinstance(data, dict) else None, doc.get("subject")]
    for value in candidates:
        if isinstance(value, str) and re.fullmatch(ID_PATTERN, value):
            return value
    return None


def decode(raw: bytes, expect: type[M] | None = None) -> Event[M]:
    """Parse and validate an event; raises InvalidTask with a code saying what was wrong."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidTask(f"not valid JSON: {exc}", code=ErrorCode.MALFORMED_JSON) from exc
    try:
        envelope = Envelope.model_validate(doc)
    except ValidationError as exc:
        raise InvalidTask(f"not a valid CloudEvent: {validation_summary(exc)}") from exc
    spec = BY_TYPE.get(envelope.type)
    if spec is None:
        raise InvalidTask(f"unknown event type {envelope.type!r}", code=ErrorCode.UNKNOWN_KIND)
    if expect is not None and not issubclass(spec.model, expect):
        raise InvalidTask(
            f"expected a {TYPE_OF.get(expect, expect.__name__)} event, got {envelope.type!r}",
            code=ErrorCode.UNKNOWN_KIND,
        )
    try:
        data = spec.model.model_validate(envelope.data)
    except ValidationError as exc:
        raise InvalidTask(f"invalid {envelope.type} data: {validation_summary(exc)}") from exc
    return Event(
        type=envelope.type,
        id=envelope.id,
        source=envelope.source,
        subject=envelope.subject,
        time=envelope.time,
        data=cast(M, data),  # spec.model is `expect` or a subclass of it, checked above
        traceparent=envelope.traceparent,
        tracestate=envelope.tracestate,
    )
