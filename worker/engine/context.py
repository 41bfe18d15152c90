"""What a handler sees of its job: progress, cancellation and pause points, folders, the registry.

Handlers run their heavy work off the event loop, so it keeps serving control events and progress
while they compute: `await ctx.work(fn, ...)` runs it in a child process of the worker where the
worker isolates jobs (isolation.py), else in a thread; `await ctx.run(fn, ...)` always in a thread,
for light blocking calls. The work gets a `Work` (this context, or its mirror in the child) and calls
`progress(...)`, `checkpointed(step)`, and at its safe points `check()` or `hold()` (the SB3
`_on_step() -> bool` shape).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Container
from contextlib import AbstractContextManager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from forseti.adapters import tracing
from forseti.adapters.bus import Bus
from forseti.adapters.registry import Artifact, ModelRecord, RegistryStore
from forseti.schemas.capabilities import Capability
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.jobs import JobProgress, JobResult, JobState
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import TaskBase, TaskKind, dump_task

from .inputs import Inputs
from .limits import default_memory_limit

if TYPE_CHECKING:
    from .checkpoints import SharedCheckpoints
    from .isolation import ChildPool
    from .ranks import RankDesk, Recruiter

P = ParamSpec("P")
T = TypeVar("T")


class StopReason(StrEnum):
    """Why a job was asked to stop."""

    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"
    """Another worker took the job over: this one stops and leaves the outcome to it."""
    TIMEOUT = "timeout"
    """The job ran past its `max_duration`: it stops and fails as `timeout`."""


class JobStopped(ForsetiError):
    """Raised inside a handler at a safe point once the job was asked to stop."""

    def __init__(self, reason: StopReason, detail: str = "") -> None:
        code = ErrorCode.HANDLER_ERROR if reason is StopReason.CANCEL else ErrorCode.SHUTDOWN
        super().__init__(detail or f"job stopped: {reason}", code=code)
        self.reason = reason


class Announcer(Protocol):
    """Where a context sends its events (the worker, in practice)."""

    def progress(self, event: JobProgress) -> None:
        """Queue a progress event for publishing, in order."""

    async def announce_model(self, event: ModelAvailable, job_id: str) -> None:
        """Publish a model.available event."""

    async def fence(self) -> None:
        """Raise JobStopped(LEASE_LOST) unless this worker still holds the job (before it registers
        or announces what only the job's holder may)."""


class Steps(Protocol):
    """What a training loop uses of its job: its safe points, its reports, its memory budget (a
    job's context, or one rank's of a distributed run)."""

    job_id: str
    memory_limit: int

    @property
    def should_stop(self) -> bool:
        """True once the job was asked to stop."""

    @property
    def paused(self) -> bool:
        """True while a pause is in force."""

    def hold(self) -> bool:
        """Block while paused; False once asked to stop."""

    def check(self) -> None:
        """Block while paused; raise JobStopped once asked to stop."""

    def progress(
        self,
        fraction: float,
        *,
        step: int = 0,
        total: int | None = None,
        message: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Report progress."""

    def checkpointed(self, step: int) -> None:
        """Say a whole checkpoint was just written to `checkpoint_dir` at `step`."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        """Mark a phase of the job (data, training, evaluation, export, announce) around a block."""


class Work(Steps, Protocol):
    """What a job's heavy work may use of its job, in a thread of the worker or in a child process."""

    kind: TaskKind
    attempt: int
    resumed: bool
    inputs: Inputs

    @property
    def bus(self) -> Bus | None:
        """The worker's bus; None in a child process."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop (raises in a child process)."""

    @property
    def work_dir(self) -> Path:
        """The job's private folder."""

    @property
    def artifacts_dir(self) -> Path:
        """Where the job's exported files go."""

    @property
    def checkpoint_dir(self) -> Path:
        """Where the job's checkpoints go."""


class SafePoints:
    """A job's pause and stop state, and the safe points where its work honours them: the same for
    the job's context in the worker and for its mirror in a child process."""

    def __init__(self) -> None:
        self._stop: StopReason | None = None
        self._stop_detail = ""
        self._unpaused = threading.Event()
        self._unpaused.set()

    def phase(self, name: str) -> AbstractContextManager[object]:
        """Mark a phase of the job around a block: a span of the job's trace when tracing is on (in a
        child process, which exports no spans, nothing: the phase that called the child covers it)."""
        return tracing.span(f"forseti.phase {name}", attributes={"forseti.phase": name})

    @property
    def should_stop(self) -> bool:
        """True once a cancel or a shutdown asked the job to stop."""
        return self._stop is not None

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the job was asked to stop, if it was."""
        return self._stop

    @property
    def stop_detail(self) -> str:
        """What the stop said about itself ("the job ran past its max_duration of 60s")."""
        return self._stop_detail

    @property
    def paused(self) -> bool:
        """True while a pause is in force."""
        return not self._unpaused.is_set()

    def hold(self) -> bool:
        """A safe point for callbacks shaped like SB3's `_on_step() -> bool`: blocks while paused,
        returns False once the job was asked to stop. Call from the work's thread."""
        self._unpaused.wait()
        return self._stop is None

    def check(self) -> None:
        """A safe point: block while paused, raise JobStopped when asked to stop. Call from the work's thread."""
        self._unpaused.wait()
        if self._stop is not None:
            raise JobStopped(self._stop, self._stop_detail)


class JobContext(SafePoints):
    """One running job, as its handler sees it."""

    def __init__(
        self,
        *,
        job_id: str,
        kind: TaskKind,
        attempt: int,
        resumed: bool,
        work_dir: Path,
        inputs: Inputs,
        store: RegistryStore,
        announcer: Announcer,
        loop: asyncio.AbstractEventLoop,
        bus: Bus | None = None,
        artifacts_root: Path | None = None,
        checkpoints: SharedCheckpoints | None = None,
        memory_limit: int | None = None,
        threads: int | None = None,
        pool: ChildPool | None = None,
        ranks: RankDesk | None = None,
    ) -> None:
        super().__init__()
        self.job_id, self.kind, self.attempt, self.resumed = job_id, kind, attempt, resumed
        self._ranks = ranks
        self._work_dir = work_dir
        self._artifacts_root = artifacts_root or work_dir.parent.parent / "artifacts"
        self.bus = bus
        """The worker's bus (the protocol, not a transport), for handlers that talk to executors."""
        self.inputs = inputs
        """Where input files lie, and how encrypted ones are read."""
        self.store = store
        self.memory_limit = memory_limit if memory_limit is not None else default_memory_limit()
        """Bytes this job may plan to hold (its network and buffers), checked before they are made."""
        self.threads = threads
        """Torch CPU threads for the job's work in a child process (None: torch's own choice)."""
        self._pool = pool
        self._watchers: list[Callable[[], None]] = []
        self._announcer = announcer
        self._loop = loop
        self._checkpoints = checkpoints

    def recruiter(self, task: TaskBase) -> Recruiter | None:
        """What the job's thread calls to spread its ranks over several workers (None where this
        worker has no bus to recruit on). Call on the event loop."""
        if self._ranks is None:
            return None
        return self._ranks.recruiter(self.job_id, self.kind, dump_task(task), self)

    @property
    def work_dir(self) -> Path:
        """Private folder of this job, made on first use; survives redeliveries so a handler can resume."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    @property
    def artifacts_dir(self) -> Path:
        """Where this job's exported files go (`<data dir>/artifacts/<job id>`), made on first use."""
        path = self._artifacts_root / self.job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that owns the bus, for threads that need to reach it."""
        return self._loop

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go, made on first use; non-empty on a resumed job that checkpointed before."""
        path = self._work_dir / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpointed(self, step: int) -> None:
        """Say that a whole checkpoint was just written to `checkpoint_dir` at `step`: where the workers
        share an object store, the folder is packed now and uploaded in the background, so another
        worker can resume from it. Call from the handler's thread, after the checkpoint's last write."""
        if self._checkpoints is not None:
            self._checkpoints.snapshot(step)

    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        """Ask the job to stop at its next safe point (a cancel outranks a shutdown)."""
        if self._stop is None or reason is StopReason.CANCEL:
            self._stop, self._stop_detail = reason, detail
        self._unpaused.set()  # a paused job must wake up to stop
        self._changed()

    def pause(self) -> None:
        """Hold the job at its next pause point."""
        self._unpaused.clear()
        self._changed()

    def resume(self) -> None:
        """Let a paused job continue."""
        self._unpaused.set()
        self._changed()

    def control_state(self) -> tuple[bool, StopReason | None, str]:
        """(paused, stop reason, stop detail): what a child process mirrors of this job."""
        return self.paused, self._stop, self._stop_detail

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` after every pause, resume and stop; returns what undoes it."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    async def acheck(self) -> None:
        """`check()` for handlers that run on the event loop."""
        if not self._unpaused.is_set():
            await asyncio.to_thread(self._unpaused.wait)
        if self._stop is not None:
            raise JobStopped(self._stop, self._stop_detail)

    def progress(
        self,
        fraction: float,
        *,
        step: int = 0,
        total: int | None = None,
        message: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Report progress; safe from any thread, published in call order."""
        event = JobProgress(
            job_id=self.job_id,
            kind=self.kind,
            state=JobState.PAUSED if self.paused else JobState.RUNNING,
            fraction=min(max(fraction, 0.0), 1.0),
            step=step,
            total=total,
            message=message,
            metrics=metrics or {},
        )
        self._loop.call_soon_threadsafe(self._announcer.progress, event)

    async def announce_model(self, event: ModelAvailable) -> None:
        """Publish `forseti.model.available.v1` for an artifact this job registered."""
        await self._announcer.announce_model(event, self.job_id)

    async def register_model(self, model: ModelRecord) -> ModelRecord:
        """Register the job's model version, once: only while this worker holds the job, and an
        earlier attempt's registration of the same id (its worker killed after it) is kept."""
        await self._announcer.fence()
        return await self.store.get_model(model.id) or await self.store.add_model(model)

    async def publish_files(
        self,
        model: ModelRecord,
        files: list[tuple[str, str | None, Path]],
        *,
        announce: Container[str],
        parent_version: str | None = None,
        alias: str | None = None,
    ) -> list[Artifact]:
        """Register a model version's (format, quantization, path) files (digests taken off the event
        loop) and announce those whose format is in `announce` (naming `alias` when the version took one)."""
        from .models import announcements, describe

        artifacts = await self.run(describe, files, model.id)
        # a worker that a pause (or a cut) kept away past its lease finds the job taken over here,
        # and leaves the version and its announcements to the worker that holds it now
        await self._announcer.fence()
        for artifact in artifacts:
            await self.store.add_artifact(artifact)
        for event in announcements(model, artifacts, parent_version=parent_version, alias=alias):
            if event.format in announce:
                await self.announce_model(event)
        return artifacts

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking work in a thread, keeping the event loop free."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def work(self, fn: Callable[..., T], *args: Any, isolate: bool = True) -> T:
        """Run the job's heavy work, `fn(*args, work)` with `work` a `Work`: in a child process when
        the worker isolates jobs and `isolate` holds (then `fn`, its arguments and its result must
        pickle), else in a thread with this context. Work that needs the bus passes isolate=False."""
        if self._pool is None or not isolate:
            return await asyncio.to_thread(fn, *args, self)
        result: T = await self._pool.run(self, fn, args)
        return result


class Handler(Protocol):
    """Runs one kind of task. Registered with the worker per task kind."""

    kind: TaskKind

    def capabilities(self) -> list[Capability]:
        """What this handler can do, for `forseti.capabilities`."""

    async def run(self, task: Any, ctx: JobContext) -> JobResult:
        """Run the job to its result; raise ForsetiError (or JobStopped via ctx.check) otherwise."""
