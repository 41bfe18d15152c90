"""What a client call raises: one family, each carrying the wire's error code."""

from __future__ import annotations

from forseti.schemas.errors import ErrorCode, ForsetiError


class ClientError(ForsetiError):
    """The root of the errors `forseti.client` raises."""


class ClientTimeout(ClientError, TimeoutError):
    """Nothing answered in time: no worker took the task, no worker answered the query."""

    code = ErrorCode.TIMEOUT


class JobFailedError(ClientError):
    """The job ended as failed; `code` and `message` are the worker's."""

    def __init__(self, job_id: str, code: ErrorCode, message: str, *, retriable: bool = False) -> None:
        super().__init__(f"job {job_id} failed: {code.value}: {message}", code=code, retriable=retriable)
        self.job_id = job_id
        """The job."""
        self.reason = message
        """The worker's message, without the job id and code."""


class JobCancelledError(ClientError):
    """The job ended as cancelled."""

    code = ErrorCode.SHUTDOWN

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} was cancelled" + (f": {reason}" if reason else ""))
        self.job_id = job_id
        """The job."""
        self.reason = reason
        """Why, as the canceller said."""


class TaskRefused(ClientError):
    """A worker refused the task before it became a job (it went to the dead-letter channel)."""

    def __init__(self, job_id: str, code: ErrorCode, detail: str) -> None:
        super().__init__(f"task {job_id} was refused: {code.value}: {detail}", code=code)
        self.job_id = job_id
        """The job id the task would have had."""


class UnknownJob(ClientError):
    """No worker knows the job: it was never submitted on this bus, or it is still queued."""

    code = ErrorCode.UNKNOWN_JOB


class QueryRefused(ClientError):
    """A worker answered a query with an error (a kind it does not run, a malformed query)."""
