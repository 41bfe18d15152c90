"""Job events on `forseti.jobs.<job_id>`, and the results they carry (the seed's ForsetiResponse)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from .base import FiniteFloat, Id, LongText, MetricMap, Name, ShortText, Strict
from .errors import ErrorCode
from .tasks import TaskKind


class JobState(StrEnum):
    """Where a job is in its lifecycle."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job can change no more."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class TrainingMetrics(Strict):
    """Supervised training figures (the seed's TrainingMetrics)."""

    final_loss: FiniteFloat | None = None
    """Loss at the end of training."""
    final_accuracy: FiniteFloat | None = None
    """Accuracy at the end of training, for classifiers."""
    total_epochs: int = Field(default=0, ge=0)
    """Epochs actually run."""
    training_time_ms: int = Field(default=0, ge=0)
    """Wall time spent training."""
    custom_metrics: MetricMap = Field(default_factory=dict)
    """Every other figure by name."""


class TrainingResult(Strict):
    """What a training job produced."""

    model_id: Id
    """The registry id of the trained model."""
    export_path: Annotated[str, Field(max_length=4096)]
    """Where the exported model lies."""
    metrics: TrainingMetrics
    """Training figures."""


class RLMetrics(Strict):
    """RL evaluation figures (the seed's RLMetrics)."""

    mean_reward: FiniteFloat
    """Mean return over the evaluation episodes."""
    std_reward: FiniteFloat
    """Standard deviation of that return."""
    total_episodes: int = Field(ge=0)
    """Evaluation episodes run."""
    training_time_ms: int = Field(ge=0)
    """Wall time spent training."""
    custom_metrics: MetricMap = Field(default_factory=dict)
    """Every other figure by name."""


class RLResult(Strict):
    """What an RL job produced."""

    agent_id: Id
    """The registry id of the agent."""
    policy_path: Annotated[str, Field(max_length=4096)]
    """Where the exported policy lies."""
    metrics: RLMetrics
    """Evaluation figures."""


class InferenceResult(Strict):
    """What an inference job produced."""

    outputs: list[Any] = Field(max_length=1_000_000)
    """One prediction per input row."""
    inference_time_ms: int = Field(ge=0)
    """Wall time spent predicting."""
    batch_size: int = Field(ge=1)
    """Rows per batch used."""


class FinetuneResult(Strict):
    """What a fine-tune job produced."""

    model_id: Id
    """The registry id of the adapter version."""
    name: Name
    """Adapter name."""
    version: ShortText
    """This version (v1.0, v1.1, ...)."""
    parent_version: ShortText | None = None
    """The version it continued from, with EWC against forgetting it."""
    adapter_path: Annotated[str, Field(max_length=4096)]
    """The peft adapter folder."""
    gguf: dict[ShortText, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict, max_length=16)
    """GGUF files by type (f32, f16, q8_0, lora, base)."""
    training_time_ms: int = Field(ge=0)
    """Wall time spent training."""
    metrics: MetricMap = Field(default_factory=dict)
    """Loss, tokens/s, EWC penalty and the export parity figures."""


class GenericResult(Strict):
    """A result for handlers whose output has no dedicated model yet."""

    summary: LongText = ""
    """One line on what was done."""
    metrics: MetricMap = Field(default_factory=dict)
    """Figures by name."""
    artifacts: dict[ShortText, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict, max_length=64)
    """Produced files by role."""


JobResult = TrainingResult | RLResult | FinetuneResult | InferenceResult | GenericResult


class JobEvent(Strict):
    """Fields every job event carries."""

    job_id: Id
    """The job this event is about."""
    kind: TaskKind
    """The kind of task the job runs."""


class JobAccepted(JobEvent):
    """`forseti.job.accepted.v1`: a worker took the task."""

    worker: ShortText
    """Which worker took it."""
    attempt: int = Field(ge=1)
    """1 for the first delivery, more when the task was delivered again."""
    resumed: bool = False
    """True when the job continues from a checkpoint."""


class JobProgress(JobEvent):
    """`forseti.job.progress.v1`: how far a running job has come."""

    state: JobState
    """running or paused; pending when the job was handed back for another try."""
    fraction: float = Field(ge=0, le=1)
    """Share of the work done."""
    step: int = Field(default=0, ge=0)
    """Steps, epochs or batches done, by the handler's unit."""
    total: int | None = Field(default=None, ge=0)
    """Steps in all, where known."""
    message: LongText = ""
    """What is happening now."""
    metrics: MetricMap = Field(default_factory=dict)
    """Current figures (loss, reward, throughput, ...)."""


class JobCompleted(JobEvent):
    """`forseti.job.completed.v1`: the job finished and this is what it produced."""

    result: JobResult
    """The result."""
    duration_ms: int = Field(ge=0)
    """Wall time from start to end."""
    replayed: bool = False
    """True when this announces a stored result again for a duplicate task."""
    task_differs: bool = False
    """True when that duplicate is a different task under a request_id that already ran: the stored
    result is the first task's, and the new one did not run."""


class JobFailed(JobEvent):
    """`forseti.job.failed.v1`: the job ended with an error."""

    code: ErrorCode
    """Machine-readable reason."""
    message: LongText
    """What went wrong, for people."""
    retriable: bool = False
    """Whether submitting the same task again may succeed."""
    replayed: bool = False
    """True when this announces a stored failure again for a duplicate task."""
    task_differs: bool = False
    """True when that duplicate is a different task under a request_id that already ran."""


class JobCancelled(JobEvent):
    """`forseti.job.cancelled.v1`: the job stopped on request."""

    reason: LongText = ""
    """Why it stopped."""
    replayed: bool = False
    """True when this announces a stored cancellation again for a duplicate task."""
    task_differs: bool = False
    """True when that duplicate is a different task under a request_id that already ran."""


class JobStatusQuery(Strict):
    """`forseti.job.status.query.v1`: ask the workers where a job stands."""

    job_id: Id
    """The job to look up."""
    user_id: ShortText | None = None
    """Who asks: a job whose task named a `user_id` shows its result and error text only to it."""


class JobStatusError(Strict):
    """`forseti.job.status.error.v1`: why a status query was not answered with a record (reply)."""

    code: ErrorCode
    """malformed_json or invalid_task (not a valid status query), unknown_job (no such job in the
    registry: never submitted, or still waiting for a worker)."""
    message: LongText
    """What was wrong, for people."""
    job_id: Id | None = None
    """The job asked about, when the query named one."""


class JobStatus(Strict):
    """`forseti.job.status.v1`: one job's stored record."""

    job_id: Id
    """The job."""
    kind: TaskKind
    """Its task kind."""
    state: JobState
    """Where it stands."""
    attempt: int = Field(ge=0)
    """Deliveries so far."""
    error_code: ErrorCode | None = None
    """Failure reason, when failed."""
    error_message: LongText | None = None
    """Failure text, when failed."""
    result: JobResult | None = None
    """The result, when completed."""
    created_at: ShortText
    """When the job was first seen (ISO 8601)."""
    updated_at: ShortText
    """When it last changed (ISO 8601)."""
    worker: ShortText | None = None
    """The worker that runs it, or ran it last."""
    lease_expires_at: ShortText | None = None
    """While it runs: when its worker's lease runs out unless renewed (ISO 8601)."""
    orphaned: bool = False
    """True when it is running or paused but its worker stopped renewing the lease (it died, and no
    other worker has taken the job over yet); the bus delivers it again to one that will."""
    withheld: bool = False
    """True when `result` and `error_message` were left out: the query's `user_id` is not the job's owner."""
