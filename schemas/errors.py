"""Error codes carried on the wire, and the one exception family that carries them.

Adapters translate third-party errors into these at their boundary (``raise ... from exc``); the
worker reads ``retriable`` to decide between handing a task back and failing its job.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ErrorCode(StrEnum):
    """Why a job failed or a record went to the dead-letter channel."""

    INVALID_TASK = "invalid_task"
    UNKNOWN_KIND = "unknown_kind"
    OVERSIZED = "oversized"
    MALFORMED_JSON = "malformed_json"
    HANDLER_ERROR = "handler_error"
    HANDLER_CRASHED = "handler_crashed"
    TIMEOUT = "timeout"
    BUS_UNAVAILABLE = "bus_unavailable"
    STORE_ERROR = "store_error"
    EXECUTOR_TIMEOUT = "executor_timeout"
    SESSION_LOST = "session_lost"
    INVALID_DATA = "invalid_data"
    INVALID_PATH = "invalid_path"
    INVALID_MODEL = "invalid_model"
    UNSUPPORTED_MODEL = "unsupported_model"
    EXPORT_MISMATCH = "export_mismatch"
    RETRIES_EXHAUSTED = "retries_exhausted"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    SHUTDOWN = "shutdown"
    FORBIDDEN = "forbidden"
    UNKNOWN_JOB = "unknown_job"
    RENDEZVOUS_TIMEOUT = "rendezvous_timeout"


class ForsetiError(Exception):
    """The root of every error Forseti raises on purpose."""

    code: ErrorCode = ErrorCode.HANDLER_ERROR
    retriable: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None, retriable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable


class InvalidTask(ForsetiError):
    """A task event that cannot become a job: bad JSON, schema errors, unknown kind, too large."""

    code = ErrorCode.INVALID_TASK


class BusError(ForsetiError):
    """A transport failed; usually worth another try."""

    code = ErrorCode.BUS_UNAVAILABLE
    retriable = True


class RequestTimeout(BusError):
    """Nobody answered a request within its timeout."""

    code = ErrorCode.TIMEOUT


class StoreError(ForsetiError):
    """The registry store failed."""

    code = ErrorCode.STORE_ERROR
    retriable = True


def validation_summary(exc: ValidationError, limit: int = 5) -> str:
    """What a pydantic validation error says, for people: `field: message` for its first `limit` errors."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
