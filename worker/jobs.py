"""One job's lifecycle: accepted -> running (-> paused) -> completed | failed | cancelled, or handed back.

The delivery is settled only after the terminal state is stored and announced, so a worker that
dies at any point leaves a task that is delivered again and either resumes or replays its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forseti.adapters.bus import Delivery
from forseti.adapters.registry import JobRecord
from forseti.schemas.errors import BusError, ErrorCode, ForsetiError
from forseti.schemas.jobs import (
    FinetuneResult,
    GenericResult,
    InferenceResult,
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgress,
    JobResult,
    JobState,
    RLResult,
    TrainingResult,
)
from forseti.schemas.tasks import dump_task

from .context import Handler, JobContext, JobStopped, StopReason
from .intake import Accepted
from .logs import job_id_var

if TYPE_CHECKING:
    from .runtime import Worker

log = logging.getLogger(__name__)

RESULT_MODELS: tuple[type[JobResult], ...] = (TrainingResult, RLResult, FinetuneResult, InferenceResult, GenericResult)


def load_result(data: dict[str, object]) -> JobResult:
    """A stored result back as its model (the first model that validates it)."""
    for model in RESULT_MODELS:
        try:
            return model.model_validate(data)
        except ValueError:
            continue
    raise ValueError(f"stored result matches no result model: {sorted(data)}")


@dataclass(frozen=True)
class Requeue:
    """The job goes back to the bus for another try (shutdown, or a retriable error)."""

    delay: float
    why: str


class JobRunner:
    """Runs one accepted task to a settled delivery."""

    def __init__(self, worker: Worker, delivery: Delivery, accepted: Accepted, handler: Handler) -> None:
        self.worker, self.delivery, self.accepted, self.handler = worker, delivery, accepted, handler
        self.job_id, self.kind = accepted.job_id, accepted.kind
        self.ctx: JobContext | None = None
        self._events: asyncio.Queue[JobProgress | None] = asyncio.Queue()

    async def run(self) -> None:
        """Run or replay the job, then settle the delivery."""
        job_id_var.set(self.job_id)
        prior = await self.worker.store.get_job(self.job_id)
        if prior is not None and prior.state.terminal:
            await self._replay(prior)
            return
        record = JobRecord(
            job_id=self.job_id,
            kind=self.kind,
            state=JobState.RUNNING,
            attempt=(prior.attempt if prior else 0) + 1,
            task=dump_task(self.accepted.task),
            worker=self.worker.settings.worker_id,
            **({"created_at": prior.created_at} if prior else {}),
        )
        early_cancel = self.worker.take_early_cancel(self.job_id)
        if early_cancel is not None:
            await self._finish(
                record, JobState.CANCELLED, JobCancelled(job_id=self.job_id, kind=self.kind, reason=early_cancel), 0.0
            )
            return
        record = await self.worker.store.put_job(record)
        await self.worker.publish_job(
            JobAccepted(
                job_id=self.job_id,
                kind=self.kind,
                attempt=record.attempt,
                worker=self.worker.settings.worker_id,
                resumed=prior is not None,
            )
        )
        log.info("job started (attempt %d)", record.attempt)
        await self._execute(record)

    async def _execute(self, record: JobRecord) -> None:
        worker = self.worker
        self.ctx = JobContext(
            job_id=self.job_id,
            kind=self.kind,
            attempt=record.attempt,
            resumed=record.attempt > 1,
            work_dir=worker.settings.data_dir / "jobs" / self.job_id,
            inputs_root=worker.settings.inputs_root,
            store=worker.store,
            announcer=worker,
            loop=asyncio.get_running_loop(),
            bus=worker.bus,
            artifacts_root=worker.settings.data_dir / "artifacts",
        )
        worker.running[self.job_id] = self
        running = worker.metrics.jobs_running.labels(self.kind.value)
        running.inc()
        pump = asyncio.create_task(self._pump_progress())
        heartbeat = asyncio.create_task(self._heartbeat())
        started = time.monotonic()
        try:
            outcome = await self._outcome(record)
        finally:
            heartbeat.cancel()
            self._events.put_nowait(None)
            await pump
            running.dec()
            worker.running.pop(self.job_id, None)
        elapsed = time.monotonic() - started
        if isinstance(outcome, Requeue):
            await self._requeue(record, outcome, elapsed)
        elif isinstance(outcome, JobCompleted):
            outcome = outcome.model_copy(update={"duration_ms": int(elapsed * 1000)})
            await self._finish(
                record.model_copy(update={"result": outcome.result.model_dump(mode="json")}),
                JobState.COMPLETED,
                outcome,
                elapsed,
            )
        elif isinstance(outcome, JobFailed):
            await self._finish(
                record.model_copy(update={"error_code": outcome.code, "error_message": outcome.message}),
                JobState.FAILED,
                outcome,
                elapsed,
            )
        else:
            await self._finish(record, JobState.CANCELLED, outcome, elapsed)

    async def _outcome(self, record: JobRecord) -> JobCompleted | JobFailed | JobCancelled | Requeue:
        assert self.ctx is not None
        try:
            result = await self.handler.run(self.accepted.task, self.ctx)
            self.ctx.check()  # a stop that came as the handler returned still counts
        except JobStopped as stop:
            if stop.reason is StopReason.SHUTDOWN:
                return Requeue(0.0, "worker shutting down")
            return JobCancelled(job_id=self.job_id, kind=self.kind, reason=stop.message)
        except ForsetiError as exc:
            if exc.retriable and record.attempt < self.worker.settings.max_attempts:
                return Requeue(self.worker.settings.retry_delay, f"{exc.code}: {exc.message}")
            code = ErrorCode.RETRIES_EXHAUSTED if exc.retriable else exc.code
            return JobFailed(
                job_id=self.job_id, kind=self.kind, code=code, message=exc.message[:4096], retriable=exc.retriable
            )
        except Exception as exc:  # a handler bug fails its job, never the worker
            log.exception("handler raised")
            return JobFailed(
                job_id=self.job_id,
                kind=self.kind,
                code=ErrorCode.HANDLER_ERROR,
                message=f"{type(exc).__name__}: {exc}"[:4096],
            )
        return JobCompleted(job_id=self.job_id, kind=self.kind, result=result, duration_ms=0)

    async def _finish(
        self, record: JobRecord, state: JobState, event: JobCompleted | JobFailed | JobCancelled, elapsed: float
    ) -> None:
        await self.worker.store.put_job(record.model_copy(update={"state": state}))
        try:
            await self.worker.publish_job(event)
        except BusError:
            # stored as terminal: the redelivery replays it instead of running the job again
            log.warning("could not announce %s; handing the task back to replay it", state)
            await self.delivery.nak(self.worker.settings.retry_delay)
            return
        await self.delivery.ack()
        self.worker.metrics.jobs.labels(self.kind.value, state.value).inc()
        self.worker.metrics.job_duration.labels(self.kind.value, state.value).observe(elapsed)
        log.info("job %s in %.2fs", state.value, elapsed)

    async def _requeue(self, record: JobRecord, requeue: Requeue, elapsed: float) -> None:
        await self.worker.store.put_job(record.model_copy(update={"state": JobState.PENDING}))
        try:
            await self.worker.publish_job(
                JobProgress(
                    job_id=self.job_id,
                    kind=self.kind,
                    state=JobState.PENDING,
                    fraction=0.0,
                    message=f"handed back: {requeue.why}",
                )
            )
        except BusError:
            log.warning("could not announce the hand-back")
        await self.delivery.nak(requeue.delay)
        self.worker.metrics.jobs.labels(self.kind.value, "requeued").inc()
        log.info("job handed back after %.2fs: %s", elapsed, requeue.why)

    async def _replay(self, prior: JobRecord) -> None:
        event: JobCompleted | JobFailed | JobCancelled
        if prior.state is JobState.COMPLETED and prior.result is not None:
            event = JobCompleted(
                job_id=self.job_id, kind=self.kind, result=load_result(prior.result), duration_ms=0, replayed=True
            )
        elif prior.state is JobState.FAILED:
            event = JobFailed(
                job_id=self.job_id,
                kind=self.kind,
                code=prior.error_code or ErrorCode.HANDLER_ERROR,
                message=prior.error_message or "",
            )
        else:
            event = JobCancelled(job_id=self.job_id, kind=self.kind, reason="cancelled earlier")
        log.info("duplicate of a %s job: announcing the stored outcome", prior.state.value)
        await self.worker.publish_job(event)
        await self.delivery.ack()
        self.worker.metrics.jobs.labels(self.kind.value, "replayed").inc()

    def progress(self, event: JobProgress) -> None:
        """Queue a progress event (called on the loop)."""
        self._events.put_nowait(event)

    async def _pump_progress(self) -> None:
        while (event := await self._events.get()) is not None:
            try:
                await self.worker.publish_job(event)
            except BusError as exc:
                log.warning("progress not published: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.worker.settings.heartbeat_interval)
            try:
                await self.delivery.in_progress()
            except BusError as exc:
                log.warning("heartbeat failed: %s", exc)
