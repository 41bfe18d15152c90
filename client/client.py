"""The async client: submit tasks, follow their jobs, ask the workers, follow model announcements."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import orjson
from pydantic import ValidationError

from forseti.adapters import tracing
from forseti.adapters.bus import Bus, Message, Subscription, create_bus
from forseti.adapters.bus.channels import is_task_channel
from forseti.adapters.signing import Signer, TrustedKeys, refusal, seal
from forseti.schemas.base import Strict
from forseti.schemas.capabilities import Capabilities, CapabilitiesError, CapabilitiesQuery
from forseti.schemas.catalog import CAPABILITIES, CONTROL, DEADLETTER, MODELS, MODELS_QUERY, STATUS, jobs_channel
from forseti.schemas.control import CancelJob, ControlCommand, PauseJob, ResumeJob
from forseti.schemas.deadletter import DeadLetter
from forseti.schemas.envelope import DEFAULT_SOURCE, Event, decode, encode
from forseti.schemas.errors import BusError, ErrorCode, InvalidTask, RequestTimeout
from forseti.schemas.jobs import (
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobProgress,
    JobResult,
    JobState,
    JobStatus,
    JobStatusError,
    JobStatusQuery,
)
from forseti.schemas.models import (
    ModelAvailable,
    ModelRollback,
    ModelsList,
    ModelsQuery,
    ModelsQueryError,
    ModelSummary,
)
from forseti.schemas.tasks import TASK_MODELS, TaskBase, TaskKind, task_channel

from .errors import ClientTimeout, JobCancelledError, JobFailedError, QueryRefused, TaskRefused, UnknownJob

DEFAULT_BUS_URL = "nats://127.0.0.1:4222"
"""Where `forseti up` serves its embedded NATS."""
ACCEPT_TIMEOUT = 60.0
"""Seconds a submitted task may wait for a worker before `events()` and `result()` give up on it."""
QUERY_TIMEOUT = 3.0
"""Seconds a query waits for a worker's answer."""
PUBLISH_ATTEMPTS = 3
"""Tries of one submit's publish; the same bytes each time, so the bus stores it once."""

JobUpdate = JobAccepted | JobProgress | JobCompleted | JobFailed | JobCancelled
"""An event on a job's progress stream."""
ModelEvent = ModelAvailable | ModelRollback
"""An event on `forseti.models`."""
QUERY_ERRORS = (CapabilitiesError, JobStatusError, ModelsQueryError)
"""The error replies of the query channels."""
A = TypeVar("A", bound=Strict)


def kind_of(task: TaskBase) -> TaskKind:
    """The task kind a task model belongs to."""
    for kind, model in TASK_MODELS.items():
        if isinstance(task, model):
            return kind
    raise InvalidTask(f"{type(task).__name__} is not a task model of forseti.schemas.tasks")


def as_task(task: TaskBase | Mapping[str, Any], kind: TaskKind | str | None = None) -> tuple[TaskKind, TaskBase]:
    """A validated task and its kind, from a task model, a task's `data` (with `kind`), or a whole CloudEvent."""
    if isinstance(task, TaskBase):
        return kind_of(task), task
    if "specversion" in task:
        event = decode(orjson.dumps(dict(task)), expect=TaskBase)
        return TaskKind(event.type.split(".")[2]), event.data
    if kind is None:
        raise InvalidTask("a task given as a dict needs its kind: submit(task, kind='rl')")
    try:
        task_kind = TaskKind(kind)
    except ValueError as exc:
        raise InvalidTask(f"unknown task kind {kind!r}; one of {', '.join(k.value for k in TaskKind)}") from exc
    try:
        return task_kind, TASK_MODELS[task_kind].model_validate(dict(task))
    except ValidationError as exc:
        raise InvalidTask(f"invalid {task_kind.value} task: {exc}") from exc


def _ending(status: JobStatus) -> JobCompleted | JobFailed | JobCancelled | None:
    """The terminal event a stored record stands for; None while the job has not ended."""
    if status.state is JobState.COMPLETED:
        if status.result is None:
            raise QueryRefused(
                f"job {status.job_id} completed, but its result is shown only to its owner (Client(user_id=...))",
                code=ErrorCode.FORBIDDEN,
            )
        return JobCompleted(job_id=status.job_id, kind=status.kind, result=status.result, duration_ms=0, replayed=True)
    if status.state is JobState.FAILED:
        return JobFailed(
            job_id=status.job_id,
            kind=status.kind,
            code=status.error_code or ErrorCode.HANDLER_ERROR,
            message=status.error_message or "(shown only to the job's owner)",
            replayed=True,
        )
    if status.state is JobState.CANCELLED:
        return JobCancelled(job_id=status.job_id, kind=status.kind, reason="cancelled earlier", replayed=True)
    return None


class Job:
    """A handle on one job: its progress stream, its result, and the commands that steer it."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        kind: TaskKind | None,
        *,
        event_id: str | None,
        accept_timeout: float | None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        """The job's id (the task's request_id)."""
        self.kind = kind
        """Its task kind, when known."""
        self.replayed = False
        """True once the job's ending turned out to be a stored one, announced again: its request_id had
        run before (resubmitting a used request_id returns the first run's outcome)."""
        self.task_differs = False
        """True when that replayed run was of a different task than the one submitted under its id."""
        self.ending: JobCompleted | JobFailed | JobCancelled | None = None
        """The job's terminal event, once seen."""
        self._event_id = event_id
        self._accept_timeout = accept_timeout
        self._queue: asyncio.Queue[JobUpdate | TaskRefused] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._seen_any = False

    @property
    def submitted(self) -> bool:
        """True for a job this client submitted; False for one followed by id."""
        return self._event_id is not None

    async def _open(self) -> None:
        """Subscribe to the job's channel (and, for a task submitted here, to the dead letters)."""
        self._subs.append(await self.client.bus.subscribe(jobs_channel(self.job_id), self._on_event))
        if self.submitted:
            self._subs.append(await self.client.bus.subscribe(DEADLETTER, self._on_dead_letter))

    async def _on_event(self, msg: Message) -> None:
        try:
            event = decode(msg.data, expect=JobEvent).data
        except InvalidTask:
            return  # not a job event we can read; workers dead-letter what they refuse
        if isinstance(event, JobUpdate) and event.job_id == self.job_id:
            self._queue.put_nowait(event)

    async def _on_dead_letter(self, msg: Message) -> None:
        try:
            record = decode(msg.data, expect=DeadLetter).data
        except InvalidTask:
            return
        if not is_task_channel(record.channel) or not self._is_mine(record):
            return
        self._queue.put_nowait(TaskRefused(self.job_id, record.reason, record.detail))

    def _is_mine(self, record: DeadLetter) -> bool:
        """Whether a dead-letter record is this submit's task: by job id where the worker could read
        one, else by this event's id in the refused bytes (an oversized task is never parsed)."""
        if record.job_id is not None:
            return record.job_id == self.job_id
        try:
            original = base64.b64decode(record.original_b64, validate=True)
        except (binascii.Error, ValueError):
            return False
        return self._event_id is not None and self._event_id.encode() in original

    async def close(self) -> None:
        """Stop listening to the job (it runs on)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(BusError):
                await sub.unsubscribe()

    async def status(self, *, timeout: float = QUERY_TIMEOUT) -> JobStatus:
        """The job's stored record; UnknownJob when no worker has it."""
        return await self.client.status(self.job_id, timeout=timeout)

    async def events(self) -> AsyncIterator[JobUpdate]:
        """The job's events, in order, up to and including its terminal one (completed, failed or
        cancelled). Raises TaskRefused when a worker refused the task, ClientTimeout when no worker
        took it within the accept timeout; for a job followed by id, UnknownJob when no worker has
        known it for that long."""
        if self.ending is not None:
            yield self.ending
            return
        known = await self._known_ending()
        if known is not None:
            yield self._end(known)
            return
        while True:
            item = await self._next()
            if isinstance(item, TaskRefused):
                raise item
            self._seen_any = True
            if isinstance(item, JobCompleted | JobFailed | JobCancelled):
                yield self._end(item)
                return
            yield item

    async def _known_ending(self) -> JobCompleted | JobFailed | JobCancelled | None:
        """For a job followed by id: its ending when it has one already (its events were sent before
        we listened). A job submitted here has sent nothing yet."""
        if self.submitted:
            return None
        try:
            return _ending(await self.client.status(self.job_id))
        except (UnknownJob, ClientTimeout):
            return None  # not taken yet, or no worker answers now: its events will tell

    async def _next(self) -> JobUpdate | TaskRefused:
        if self._seen_any or self._accept_timeout is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(self._accept_timeout):
                return await self._queue.get()
        except TimeoutError:
            pass
        # no event in the accept timeout: a job already running elsewhere is fine, an unknown one is not
        try:
            status = await self.client.status(self.job_id)
        except UnknownJob as exc:
            if not self.submitted:
                raise UnknownJob(
                    f"no worker knows job {self.job_id} after {self._accept_timeout:g}s: was it submitted on "
                    f"{self.client.bus.url}? (a task still queued behind busy workers is not known yet either)"
                ) from exc
            what = f"{self.kind.value} " if self.kind else ""
            raise ClientTimeout(
                f"no worker took job {self.job_id} within {self._accept_timeout:g}s: is a worker for {what}tasks "
                f"running on {self.client.bus.url}? (the task stays queued until one is)"
            ) from exc
        ending = _ending(status)
        self._seen_any = True
        return ending if ending is not None else await self._queue.get()

    def _end(self, event: JobCompleted | JobFailed | JobCancelled) -> JobCompleted | JobFailed | JobCancelled:
        self.ending = event
        self.replayed = event.replayed
        self.task_differs = event.task_differs
        return event

    async def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end: its result when it completed; JobFailedError (the worker's code and
        message) or JobCancelledError otherwise; ClientTimeout after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.events():
                    pass
        except TimeoutError as exc:
            if isinstance(exc, ClientTimeout):
                raise
            raise ClientTimeout(f"job {self.job_id} did not end within {timeout:g}s (it runs on)") from exc
        ending = self.ending
        if isinstance(ending, JobFailed):
            raise JobFailedError(self.job_id, ending.code, ending.message, retriable=ending.retriable)
        if isinstance(ending, JobCancelled):
            raise JobCancelledError(self.job_id, ending.reason)
        assert isinstance(ending, JobCompleted)  # events() ends only on a terminal event
        return ending.result

    async def cancel(self, reason: str = "", *, operator: Signer | None = None) -> None:
        """Ask the workers to stop the job (it ends as cancelled, keeping its last checkpoint)."""
        await self.client.cancel(self.job_id, reason, operator=operator)

    async def pause(self, reason: str = "", *, operator: Signer | None = None) -> None:
        """Hold the job at its next safe point."""
        await self.client.pause(self.job_id, reason, operator=operator)

    async def resume(self, reason: str = "", *, operator: Signer | None = None) -> None:
        """Let a paused job go on."""
        await self.client.resume(self.job_id, reason, operator=operator)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """A connection to Forseti's bus for programs that submit tasks and follow jobs and models.

    `async with await Client.connect("nats://127.0.0.1:4222") as forseti: ...`; every transport URL the
    worker takes works (memory://, nats://, tls://, kafka://)."""

    def __init__(self, bus: Bus, *, user_id: str | None = None, source: str = DEFAULT_SOURCE) -> None:
        self.bus = bus
        """The connected bus."""
        self.user_id = user_id
        """Who this client acts for: set on tasks that name nobody, and sent with every query and command."""
        self.source = source
        """The CloudEvents `source` of what this client publishes."""
        self._jobs: list[Job] = []

    @classmethod
    async def connect(cls, url: str = DEFAULT_BUS_URL, *, user_id: str | None = None) -> Client:
        """Connect to the bus at `url`; a BusError saying why when it does not answer."""
        bus = create_bus(url)
        await bus.connect()
        return cls(bus, user_id=user_id)

    async def close(self) -> None:
        """Stop following every job and close the connection."""
        for job in self._jobs:
            await job.close()
        await self.bus.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def submit(
        self,
        task: TaskBase | Mapping[str, Any],
        *,
        kind: TaskKind | str | None = None,
        accept_timeout: float | None = ACCEPT_TIMEOUT,
    ) -> Job:
        """Publish a task; the handle on its job. `task`: a task model (`RLTask(...)`), a task's data as a
        dict with `kind`, or a whole CloudEvent as a dict. A task without a request_id gets a random one.
        The job's stream is open before the task is sent, so no event is missed."""
        task_kind, model = as_task(task, kind)
        updates: dict[str, Any] = {}
        if model.request_id is None:
            updates["request_id"] = uuid.uuid4().hex
        if model.user_id is None and self.user_id is not None:
            updates["user_id"] = self.user_id
        if updates:
            model = model.model_copy(update=updates)
        job_id = model.request_id or ""
        with tracing.span(f"forseti.publish {task_kind.value}", kind="producer", attributes={"forseti.job_id": job_id}):
            raw = encode(model, source=self.source, subject=job_id)
        event_id = str(orjson.loads(raw)["id"])
        job = Job(self, job_id, task_kind, event_id=event_id, accept_timeout=accept_timeout)
        await job._open()
        self._jobs.append(job)
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.bus.publish(task_channel(task_kind), raw, dedup_id=event_id)
                break
            except BusError:
                if attempt == PUBLISH_ATTEMPTS - 1:
                    await job.close()
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
        return job

    async def job(self, job_id: str, *, accept_timeout: float | None = ACCEPT_TIMEOUT) -> Job:
        """A handle on a job submitted earlier (by anyone): follow it, wait for it, steer it."""
        job = Job(self, job_id, None, event_id=None, accept_timeout=accept_timeout)
        await job._open()
        self._jobs.append(job)
        return job

    async def _ask(
        self, channel: str, query: Strict, answer: type[A], *, what: str, timeout: float, subject: str | None = None
    ) -> A:
        """Send a query and return its `answer`; a worker's error reply (any `*.error.v1`, each with a
        `code` and `message`) raises UnknownJob or QueryRefused, silence ClientTimeout."""
        try:
            raw = await self.bus.request(channel, encode(query, source=self.source, subject=subject), timeout=timeout)
        except RequestTimeout as exc:
            raise ClientTimeout(f"no worker answered the {what} query on {self.bus.url} within {timeout:g}s") from exc
        reply: Strict = decode(raw).data
        if isinstance(reply, answer):
            return reply
        if isinstance(reply, QUERY_ERRORS):
            if reply.code is ErrorCode.UNKNOWN_JOB:
                raise UnknownJob(reply.message)
            raise QueryRefused(reply.message, code=reply.code)
        raise QueryRefused(f"a {type(reply).__name__} answered a {what} query", code=ErrorCode.INVALID_TASK)

    async def status(self, job_id: str, *, timeout: float = QUERY_TIMEOUT) -> JobStatus:
        """Where a job stands, from the registry; UnknownJob when no worker has it, ClientTimeout when
        no worker answers."""
        query = JobStatusQuery(job_id=job_id, user_id=self.user_id)
        return await self._ask(STATUS, query, JobStatus, what="status", timeout=timeout, subject=job_id)

    async def capabilities(self, kind: TaskKind | str | None = None, *, timeout: float = QUERY_TIMEOUT) -> Capabilities:
        """What a worker can do (the first to answer; with `kind`, one that runs that kind of task)."""
        query = CapabilitiesQuery(kind=TaskKind(kind) if kind is not None else None)
        return await self._ask(CAPABILITIES, query, Capabilities, what="capabilities", timeout=timeout)

    async def models(
        self, name: str | None = None, *, limit: int = 50, timeout: float = QUERY_TIMEOUT
    ) -> list[ModelSummary]:
        """The model versions in the workers' registry, newest first (a worker's answer: on one shared
        registry, every worker's)."""
        query = ModelsQuery(name=name, limit=limit)
        return (await self._ask(MODELS_QUERY, query, ModelsList, what="models", timeout=timeout)).models

    async def follow_models(
        self, *, durable: str | None = None, trusted: TrustedKeys | None = None
    ) -> AsyncIterator[Event[ModelEvent]]:
        """Model announcements (`model.available`, `model.rollback`) as they come. With `durable`, the
        bus keeps this follower's place: the announcements it missed while away come first, from the
        oldest kept for a new name. With `trusted`, events not signed by one of those keys are skipped."""
        queue: asyncio.Queue[Event[ModelEvent]] = asyncio.Queue()

        async def on_message(msg: Message) -> None:
            if refusal(trusted, msg.data) is not None:
                return
            with contextlib.suppress(InvalidTask):
                event: Event[Strict] = decode(msg.data)
                if isinstance(event.data, ModelEvent):
                    queue.put_nowait(cast(Event[ModelEvent], event))  # its data is one, checked just above

        if durable is not None:
            sub = await self.bus.follow(MODELS, on_message, durable=durable)
        else:
            sub = await self.bus.subscribe(MODELS, on_message)
        try:
            while True:
                yield await queue.get()
        finally:
            await sub.unsubscribe()

    async def _command(self, command: type[ControlCommand], job_id: str, reason: str, operator: Signer | None) -> None:
        event = encode(command(job_id=job_id, reason=reason, user_id=self.user_id), source=self.source)
        await self.bus.publish(CONTROL, seal(event, operator))

    async def cancel(self, job_id: str, reason: str = "", *, operator: Signer | None = None) -> None:
        """Ask the workers to stop a job; `operator`: sign as an operator (for any user's job)."""
        await self._command(CancelJob, job_id, reason, operator)

    async def pause(self, job_id: str, reason: str = "", *, operator: Signer | None = None) -> None:
        """Hold a running job at its next safe point."""
        await self._command(PauseJob, job_id, reason, operator)

    async def resume(self, job_id: str, reason: str = "", *, operator: Signer | None = None) -> None:
        """Let a paused job go on."""
        await self._command(ResumeJob, job_id, reason, operator)
