"""Pydantic models of every Forseti event, the CloudEvents codec and the error codes."""

from .catalog import BY_TYPE, all_specs, env_channel, jobs_channel
from .envelope import Envelope, Event, decode, encode, peek_job_id
from .errors import ErrorCode, ForsetiError, InvalidTask
from .jobs import JobState
from .tasks import TASK_MODELS, TaskKind, task_channel, task_type

__all__ = [
    "BY_TYPE",
    "TASK_MODELS",
    "Envelope",
    "ErrorCode",
    "Event",
    "ForsetiError",
    "InvalidTask",
    "JobState",
    "TaskKind",
    "all_specs",
    "decode",
    "encode",
    "env_channel",
    "jobs_channel",
    "peek_job_id",
    "task_channel",
    "task_type",
]
