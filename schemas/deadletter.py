"""`forseti.deadletter`: input a worker could not turn into a job, kept whole for operators."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import Id, LongText, ShortText, Strict
from .errors import ErrorCode


class DeadLetter(Strict):
    """`forseti.deadletter.v1`: why a message was refused, and the message itself."""

    reason: ErrorCode
    """Machine-readable reason."""
    detail: LongText
    """What exactly was wrong."""
    channel: ShortText
    """Where the message arrived."""
    job_id: Id | None = None
    """The job id, where one could be read."""
    worker: ShortText
    """Which worker refused it."""
    original_b64: Annotated[str, Field(max_length=16 * 1024 * 1024)]
    """The original bytes, base64; cut to the worker's size limit when oversized."""
    original_size: int = Field(ge=0)
    """Size of the original message in bytes."""
