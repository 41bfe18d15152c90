"""One job's lifecycle: accepted -> running (-> paused) -> completed | failed | cancelled, or handed back.

The delivery is settled only after the terminal state is stored and announced, so a worker that
dies at any point leaves a task that is delivered again and either resumes or replays its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from forseti.adapters import tracing
from forseti.adapters.bus import Bus, Delivery
from forseti.adapters.encryption import Keyring
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import Claim, JobRecord, RegistryStore
from forseti.schemas.errors import BusError, ErrorCode, ForsetiError
from forseti.schemas.jobs import (
    FinetuneResult,
    GenericResult,
    InferenceResult,
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobProgress,
    JobResult,
    JobState,
    RLResult,
    TrainingResult,
)
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import dump_task

from .checkpoints import SharedCheckpoints, forget
from .context import Handler, JobContext, JobStopped, StopReason
from .inputs import Inputs
from .intake import Accepted, Refused
from .isolation import ChildPool
from .limits import default_memory_limit
from .logs import job_id_var
from .metrics import Metrics
from .ranks import RankDesk
from .settings import WorkerSettings

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


class JobEvents(Protocol):
    """Where a job's events go (the worker, which publishes them on its bus)."""

    async def publish_job(self, event: JobEvent) -> None:
        """Publish a job event on `forseti.jobs.<job_id>`."""

    async def announce_model(self, event: ModelAvailable, job_id: str) -> None:
        """Publish `forseti.model.available.v1`, its files first put where other hosts reach them."""

    async def dead_letter(self, refused: Refused, raw: bytes, *, channel: str) -> None:
        """Publish a `forseti.deadletter.v1` record."""


@dataclass(frozen=True, kw_only=True)
class JobServices:
    """What a job needs from the worker that runs it, and nothing more."""

    settings: WorkerSettings
    """The worker's settings (folders, leases, retries, heartbeats)."""
    store: RegistryStore
    """The registry: the job's lease, state and outcome."""
    metrics: Metrics
    """Job counters and durations."""
    events: JobEvents
    """Publishes the job's events."""
    bus: Bus
    """The bus, for handlers that talk to executors."""
    objects: ObjectStore | None
    """Where checkpoints are shared with the other workers (None: local disk only)."""
    running: dict[str, JobRunner]
    """The worker's running jobs by id, where control events and shutdown find them."""
    early_cancel: Callable[[str, str | None], str | None]
    """The reason of a cancel that came before the job did, taken once, given the job's owner (a
    cancel from another user is dropped)."""
    pool: ChildPool | None = None
    """The child processes jobs' heavy work runs in (None: threads of the worker)."""
    keyring: Keyring | None = None
    """Encrypts the checkpoints shared through `objects` (None: shared as they are)."""
    ranks: RankDesk | None = None
    """Recruits workers for the job's distributed runs spread over several (None: none)."""


@dataclass(frozen=True)
class Requeue:
    """The job goes back to the bus for another try (shutdown, or a retriable error)."""

    delay: float
    why: str


class JobRunner:
    """Runs one accepted task to a settled delivery."""

    def __init__(self, services: JobServices, delivery: Delivery, accepted: Accepted, handler: Handler | None) -> None:
        self.services, self.delivery, self.accepted, self.handler = services, delivery, accepted, handler
        self.job_id, self.kind = accepted.job_id, accepted.kind
        self.ctx: JobContext | None = None
        self.shared: SharedCheckpoints | None = None
        """The job's checkpoints on the shared object store, when the workers have one."""
        self._events: asyncio.Queue[JobProgress | None] = asyncio.Queue()

    async def run(self) -> None:
        """Claim the job's lease and run it, or settle a delivery that must not run it: replay an ended
        job's outcome, or hand back a duplicate of a job whose lease is live (here or on another host).
        Traced as one span under the client's publish, when tracing is on."""
        attributes = {"forseti.job_id": self.job_id, "forseti.kind": self.kind.value, "forseti.worker": self.owner}
        with tracing.span(f"forseti.job {self.kind.value}", parent=self.accepted.trace, kind="consumer",
                          attributes=attributes):  # fmt: skip
            await self._run()

    async def _run(self) -> None:
        job_id_var.set(self.job_id)
        services = self.services
        claim = await services.store.claim_job(
            JobRecord(job_id=self.job_id, kind=self.kind, task=dump_task(self.accepted.task)),
            owner=self.owner,
            ttl=services.settings.lease_ttl,
        )
        if not claim.won:
            if claim.job.state.terminal:
                await self._replay(claim.job)
            else:
                await self._defer(claim)
            return
        record = claim.job
        if record.crashes >= services.settings.max_crashes:
            await self._give_up(record, self._crashed(record))
            return
        if self.delivery.given_up_after is not None:
            await self._give_up(record, self._undelivered(record, self.delivery.given_up_after))
            return
        early_cancel = services.early_cancel(self.job_id, self.accepted.task.user_id)
        if early_cancel is not None:
            await self._finish(
                record, JobState.CANCELLED, JobCancelled(job_id=self.job_id, kind=self.kind, reason=early_cancel), 0.0
            )
            return
        await services.events.publish_job(
            JobAccepted(
                job_id=self.job_id,
                kind=self.kind,
                attempt=record.attempt,
                worker=services.settings.worker_id,
                resumed=record.attempt > 1,
            )
        )
        log.info("job started (attempt %d)", record.attempt)
        await self._execute(record)

    @property
    def owner(self) -> str:
        """The lease owner's name: this worker's id."""
        return self.services.settings.worker_id

    def _memory_limit(self) -> int:
        """Bytes the job may take: the worker's limit (half the host when unset), lowered by the task's."""
        worker, task = self.services.settings.max_job_memory_mb, self.accepted.task.max_memory_mb
        limit = default_memory_limit() if worker is None else worker << 20
        return limit if task is None else min(limit, task << 20)

    def _threads(self) -> int:
        """Torch threads for the job: the worker's share of cores, lowered by the task's `max_threads`."""
        worker, task = self.services.settings.threads_per_job, self.accepted.task.max_threads
        return worker if task is None else min(worker, task)

    def _deadline(self, record: JobRecord) -> asyncio.TimerHandle | None:
        """Stop the job once it has run `max_duration` seconds since its first start (the worker's
        limit, or the task's where lower), counted on the registry's record so a resumed job does
        not start its time again."""
        limits = [x for x in (self.services.settings.max_duration, self.accepted.task.max_duration) if x is not None]
        if not limits or self.ctx is None:
            return None
        limit = min(limits)
        spent = (datetime.now(UTC) - datetime.fromisoformat(record.created_at)).total_seconds()
        detail = f"the job ran past its max_duration of {limit:g}s"
        return asyncio.get_running_loop().call_later(
            max(limit - spent, 0.0), self.ctx.request_stop, StopReason.TIMEOUT, detail
        )

    def _crashed(self, record: JobRecord) -> str:
        return (
            f"{record.crashes} attempts ended with their worker gone, without an outcome (killed, out of "
            f"memory, or crashed); not run again (max_crashes is {self.services.settings.max_crashes})"
        )

    def _undelivered(self, record: JobRecord, deliveries: int) -> str:
        return (
            f"the bus gave up on the task after {deliveries} deliveries without an outcome (max_deliver); "
            f"the registry counted {record.attempt - 1} earlier attempts, {record.crashes} of them ending "
            "with their worker gone"
        )

    async def _give_up(self, record: JobRecord, detail: str) -> None:
        """A task that will not be run again: a poison task, whose earlier attempts each ended with
        their worker gone (killed, out of memory, crashed), where it would take this worker down too;
        or one the bus stopped delivering. It goes to the dead-letter channel and its job fails, so
        neither the task nor a waiting client is lost."""
        log.error("task given up: %s", detail)
        refused = Refused(ErrorCode.RETRIES_EXHAUSTED, detail, self.job_id)
        try:
            await self.services.events.dead_letter(refused, self.delivery.data, channel=self.delivery.channel)
        except BusError as exc:  # the record is the reason to drop the task: without it, try again later
            log.warning("dead-letter not recorded (%s); handing the task back", exc)
            await self.delivery.nak(self.services.settings.retry_delay)
            return
        failed = JobFailed(job_id=self.job_id, kind=self.kind, code=ErrorCode.RETRIES_EXHAUSTED, message=detail)
        await self._finish(
            record.model_copy(update={"error_code": failed.code, "error_message": detail}), JobState.FAILED, failed, 0.0
        )

    async def _defer(self, claim: Claim) -> None:
        """Another delivery of a job whose lease is live. It is handed back to come again when that
        lease would run out, never acked: it may be the only message of a job whose worker just died
        (the bus redelivers before the lease lapses), and then it is the one that takes the job over."""
        delay = min(max(claim.lease_left, 1.0), self.services.settings.lease_ttl) + 0.5
        log.info(
            "job runs on %s (lease for %.1fs more); this delivery comes back in %.1fs",
            claim.job.lease_owner,
            claim.lease_left,
            delay,
        )
        await self.delivery.nak(delay)
        self.services.metrics.jobs.labels(self.kind.value, "deferred").inc()

    async def _execute(self, record: JobRecord) -> None:
        services = self.services
        work_dir = services.settings.data_dir / "jobs" / self.job_id
        loop = asyncio.get_running_loop()
        if services.objects is not None:
            self.shared = SharedCheckpoints(
                services.objects,
                services.store,
                job_id=self.job_id,
                attempt=record.attempt,
                folder=work_dir / "checkpoints",
                spool=work_dir / "shared",
                loop=loop,
                keyring=services.keyring,
                wait=services.settings.lease_ttl,
            )
        self.ctx = JobContext(
            job_id=self.job_id,
            kind=self.kind,
            attempt=record.attempt,
            resumed=record.attempt > 1,
            work_dir=work_dir,
            inputs=Inputs(services.settings.inputs_root, services.keyring, work_dir / "inputs"),
            store=services.store,
            announcer=self,
            loop=loop,
            bus=services.bus,
            artifacts_root=services.settings.data_dir / "artifacts",
            checkpoints=self.shared,
            memory_limit=self._memory_limit(),
            threads=self._threads(),
            pool=services.pool,
            ranks=services.ranks,
        )
        services.running[self.job_id] = self
        running = services.metrics.jobs_running.labels(self.kind.value)
        running.inc()
        pump = asyncio.create_task(self._pump_progress())
        heartbeat = asyncio.create_task(self._heartbeat())
        deadline = self._deadline(record)
        started = time.monotonic()
        try:
            if self.shared is not None and record.attempt > 1:
                await self._restore(self.shared)
            outcome = await self._outcome(record)
        finally:
            if self.shared is not None:  # under the lease still: the heartbeat renews it meanwhile
                await self.shared.close(timeout=services.settings.lease_ttl)
            heartbeat.cancel()
            if deadline is not None:
                deadline.cancel()
            self._events.put_nowait(None)
            await pump
            running.dec()
            services.running.pop(self.job_id, None)
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

    async def _restore(self, shared: SharedCheckpoints) -> None:
        """A job taken over from another worker starts from the newest checkpoint it shared."""
        try:
            restored = await shared.restore()
        except ForsetiError as exc:  # the registry is away: resume from what this disk holds
            log.warning("shared checkpoints not read: %s", exc.message)
            return
        if restored is not None:
            self.progress(
                JobProgress(
                    job_id=self.job_id,
                    kind=self.kind,
                    state=JobState.RUNNING,
                    fraction=0.0,
                    step=restored.step,
                    message=f"resuming from the checkpoint an earlier attempt shared at step {restored.step}",
                )
            )

    async def _outcome(self, record: JobRecord) -> JobCompleted | JobFailed | JobCancelled | Requeue:
        assert self.ctx is not None and self.handler is not None
        try:
            result = await self.handler.run(self.accepted.task, self.ctx)
            self.ctx.check()  # a stop that came as the handler returned still counts
        except JobStopped as stop:
            if stop.reason is StopReason.SHUTDOWN:
                return Requeue(0.0, "worker shutting down")
            if stop.reason is StopReason.LEASE_LOST:  # the hand-back finds the lease gone and stays quiet
                return Requeue(0.0, "another worker took the job over")
            if stop.reason is StopReason.TIMEOUT:
                return JobFailed(job_id=self.job_id, kind=self.kind, code=ErrorCode.TIMEOUT, message=stop.message)
            return JobCancelled(job_id=self.job_id, kind=self.kind, reason=stop.message)
        except ForsetiError as exc:
            if exc.retriable and record.attempt < self.services.settings.max_attempts:
                return Requeue(self.services.settings.retry_delay, f"{exc.code}: {exc.message}")
            code, message = exc.code, exc.message
            if exc.retriable:
                code, message = (
                    ErrorCode.RETRIES_EXHAUSTED,
                    f"{exc.code.value} on attempt {record.attempt}, the last: {message}",
                )
            return JobFailed(
                job_id=self.job_id, kind=self.kind, code=code, message=message[:4096], retriable=exc.retriable
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
        held = await self.services.store.update_held_job(
            record.model_copy(update={"state": state}), owner=self.owner, release=True
        )
        if not held:
            await self._lost(state.value)
            return
        try:
            await self.services.events.publish_job(event)
        except BusError:
            # stored as terminal: the redelivery replays it instead of running the job again
            log.warning("could not announce %s; handing the task back to replay it", state)
            await self.delivery.nak(self.services.settings.retry_delay)
            return
        await self.delivery.ack()
        self.services.metrics.jobs.labels(self.kind.value, state.value).inc()
        self.services.metrics.job_duration.labels(self.kind.value, state.value).observe(elapsed)
        log.info("job %s in %.2fs", state.value, elapsed)
        objects = self.services.objects
        # only a job that shared checkpoints (here, or on an earlier attempt elsewhere) has any to remove
        if objects is not None and (record.attempt > 1 or (self.shared is not None and self.shared.shared)):
            try:
                await forget(objects, self.services.store, self.job_id)
            except ForsetiError as exc:  # what is left is pruned at a worker's next start
                log.warning("checkpoints of the ended job not removed: %s", exc.message)

    async def _requeue(self, record: JobRecord, requeue: Requeue, elapsed: float) -> None:
        held = await self.services.store.update_held_job(
            record.model_copy(update={"state": JobState.PENDING}), owner=self.owner, release=True
        )
        if not held:
            await self._lost("handed back")
            return
        try:
            await self.services.events.publish_job(
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
        self.services.metrics.jobs.labels(self.kind.value, "requeued").inc()
        log.info("job handed back after %.2fs: %s", elapsed, requeue.why)

    async def _lost(self, outcome: str) -> None:
        """Another worker took the job over (this one's lease lapsed, its registry out of reach): its
        outcome is that worker's to announce, so this one says nothing and hands its delivery back."""
        log.warning("job ended here as %s, but another worker holds it now; its outcome is not announced", outcome)
        await self.delivery.nak(self.services.settings.lease_ttl)
        self.services.metrics.jobs.labels(self.kind.value, "lost").inc()

    async def set_state(self, state: JobState) -> None:
        """Record a pause or a resume of the running job (its lease kept)."""
        record = await self.services.store.get_job(self.job_id)
        if record is not None:
            await self.services.store.update_held_job(
                record.model_copy(update={"state": state}), owner=self.owner, release=False
            )

    async def _replay(self, prior: JobRecord) -> None:
        event: JobCompleted | JobFailed | JobCancelled
        # a request_id reused for another task replays the first task's outcome; say so, not silently
        differs = dump_task(self.accepted.task) != prior.task
        job_id, kind = self.job_id, self.kind
        if prior.state is JobState.COMPLETED and prior.result is not None:
            result = load_result(prior.result)
            event = JobCompleted(
                job_id=job_id, kind=kind, result=result, duration_ms=0, replayed=True, task_differs=differs
            )
        elif prior.state is JobState.FAILED:
            code, message = prior.error_code or ErrorCode.HANDLER_ERROR, prior.error_message or ""
            event = JobFailed(job_id=job_id, kind=kind, code=code, message=message, replayed=True, task_differs=differs)
        else:
            event = JobCancelled(
                job_id=job_id, kind=kind, reason="cancelled earlier", replayed=True, task_differs=differs
            )
        log.info(
            "duplicate of a %s job%s: announcing the stored outcome",
            prior.state.value,
            " (a different task under the same request_id, not run)" if differs else "",
        )
        await self.services.events.publish_job(event)
        await self.delivery.ack()
        self.services.metrics.jobs.labels(self.kind.value, "replayed").inc()

    def progress(self, event: JobProgress) -> None:
        """Queue a progress event behind the job's earlier ones (the context's Announcer; on the loop)."""
        self._events.put_nowait(event)

    async def announce_model(self, event: ModelAvailable, job_id: str) -> None:
        """Announce a model the job registered (the context's Announcer)."""
        await self.fence()
        await self.services.events.announce_model(event, job_id)

    async def fence(self) -> None:
        """Renew the job's lease now, or stop the job when another worker holds it (the Announcer's
        fence: the heartbeat alone notices a takeover only at its next beat)."""
        settings = self.services.settings
        if await self.services.store.renew_lease(self.job_id, owner=self.owner, ttl=settings.lease_ttl):
            return
        log.warning("job %s was taken over by another worker; its models are not announced here", self.job_id)
        if self.ctx is not None:
            self.ctx.request_stop(StopReason.LEASE_LOST, "another worker took the job over")
        raise JobStopped(StopReason.LEASE_LOST, "another worker took the job over")

    async def _pump_progress(self) -> None:
        steps = self.services.metrics.job_steps.labels(self.kind.value)
        last: int | None = None  # the first report is the baseline: a resumed job's earlier steps are not counted
        while (event := await self._events.get()) is not None:
            if event.step:
                if last is not None and event.step > last:
                    steps.inc(event.step - last)
                last = event.step
            try:
                await self.services.events.publish_job(event)
            except BusError as exc:
                log.warning("progress not published: %s", exc)

    async def _heartbeat(self) -> None:
        settings = self.services.settings
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            try:
                await self.delivery.in_progress()
            except BusError as exc:
                log.warning("heartbeat failed: %s", exc)
            try:
                held = await self.services.store.renew_lease(self.job_id, owner=self.owner, ttl=settings.lease_ttl)
            except ForsetiError as exc:  # the registry is away: keep running, renew at the next beat
                log.warning("lease not renewed: %s", exc)
                continue
            if not held and self.ctx is not None:
                log.warning("job %s was taken over by another worker; stopping it here", self.job_id)
                self.ctx.request_stop(StopReason.LEASE_LOST, "another worker took the job over")
