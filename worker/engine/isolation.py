"""Jobs' heavy work in child processes, so a segfault, an out-of-memory kill or a loop that never
reaches a safe point ends that job alone while the worker and its other jobs go on.

A `ChildPool` keeps warm processes, started with `spawn` (torch is not safe to fork) and reused from
job to job, since importing torch again costs seconds. Each runs one job's work at a time, under
that job's limits: an address-space rlimit of the job's memory limit over what the process already
held, and its CPU threads. The job's `JobContext` stays in the worker; the work sees a
`ChildContext` with the same calls, mirrored over a pipe: progress and checkpoints go up, pause,
resume and stop come down. A child that dies without an outcome fails its job with a code that says
how (`resource_exhausted` for a SIGKILL, which is what the kernel's out-of-memory killer sends;
`handler_crashed` otherwise), and one asked to cancel or time out that does not reach a safe point
within `stop_grace` seconds is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import TaskKind

from .context import JobStopped, SafePoints, StopReason
from .inputs import Inputs

if TYPE_CHECKING:
    from .context import JobContext

log = logging.getLogger(__name__)

KILLED_ON_STOP = (StopReason.CANCEL, StopReason.TIMEOUT)
"""Stops that end the job, so its process may be killed when it does not stop by itself. A shutdown
or a takeover waits for a safe point instead: the job resumes from the checkpoint it leaves."""

POLL_SECONDS = 0.2
"""How often the worker's side looks at a silent child (is it alive, is its stop overdue)."""

OUT_OF_MEMORY = ("not enough memory", "can't allocate memory", "cannot allocate memory")
"""How torch's and numpy's allocators word a failed allocation in a RuntimeError."""


@dataclass(frozen=True, kw_only=True)
class WorkOrder:
    """One job's work as it crosses to a child: what to call, and the job as its context shows it."""

    fn: Callable[..., Any]
    """A picklable callable (a module-level function, or a method of a picklable handler)."""
    args: tuple[Any, ...]
    """Its arguments; the child's context is passed after them."""
    job_id: str
    """The job's id."""
    kind: TaskKind
    """The job's task kind."""
    attempt: int
    """Which delivery of the task this is (1 for the first)."""
    resumed: bool
    """True when an earlier attempt may have left checkpoints."""
    work_dir: Path
    """The job's private folder."""
    artifacts_dir: Path
    """Where the job's exported files go."""
    inputs: Inputs
    """Where input files lie, and how encrypted ones are read."""
    memory_limit: int
    """Bytes the job may plan to hold; also its address-space rlimit, over what the child held before."""
    threads: int | None
    """Torch CPU threads for the job (None: torch's own choice)."""
    paused: bool = False
    """Whether a pause was in force when the work was sent."""
    stop: StopReason | None = None
    """A stop asked for before the work was sent."""
    stop_detail: str = ""
    """Why the stop was asked for."""


# -- the child's side ----------------------------------------------------------------------------


class ChildContext(SafePoints):
    """What a job's work sees of its job inside a child process: the calls of `JobContext` that work
    running off the event loop makes, each one sent to or answered by the worker over the pipe."""

    bus = None
    """A child has no bus: work that talks to remote executors runs in the worker (`isolate=False`)."""

    def __init__(self, order: WorkOrder, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self.job_id, self.kind, self.attempt, self.resumed = order.job_id, order.kind, order.attempt, order.resumed
        self.inputs = order.inputs
        """Where input files lie, and how encrypted ones are read."""
        self.memory_limit = order.memory_limit
        """Bytes this job may plan to hold (its network and buffers), checked before they are made."""
        self._work_dir, self._artifacts_dir = order.work_dir, order.artifacts_dir
        self._send = send
        self._stop, self._stop_detail = order.stop, order.stop_detail
        if order.paused:
            self._unpaused.clear()
        self._acks: queue.SimpleQueue[None] = queue.SimpleQueue()

    @property
    def work_dir(self) -> Path:
        """Private folder of this job, made on first use."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    @property
    def artifacts_dir(self) -> Path:
        """Where this job's exported files go, made on first use."""
        self._artifacts_dir.mkdir(parents=True, exist_ok=True)
        return self._artifacts_dir

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go, made on first use."""
        path = self._work_dir / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop is not in this process."""
        raise RuntimeError("work in a child process has no event loop; run it with isolate=False")

    def progress(
        self,
        fraction: float,
        *,
        step: int = 0,
        total: int | None = None,
        message: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Report progress; the worker publishes it in call order."""
        self._send(("progress", {"step": step, "total": total, "message": message, "metrics": metrics}, fraction))

    def checkpointed(self, step: int) -> None:
        """Say a whole checkpoint is in `checkpoint_dir`; returns once the worker took its snapshot."""
        self._send(("checkpointed", step))
        self._acks.get()

    def control(self, paused: bool, stop: StopReason | None, detail: str) -> None:
        """Take the job's pause and stop state from the worker (the pipe reader calls this)."""
        if stop is not None:
            self._stop, self._stop_detail = stop, detail
        if paused and stop is None:
            self._unpaused.clear()
        else:
            self._unpaused.set()

    def acked(self) -> None:
        """The worker took the snapshot `checkpointed` waits for."""
        self._acks.put(None)


class _ChildServer:
    """The loop of a child process: one work order at a time, its outcome sent back."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._orders: queue.SimpleQueue[tuple[WorkOrder, ChildContext] | None] = queue.SimpleQueue()
        self._ctx: ChildContext | None = None
        threading.Thread(target=self._read, name="forseti-child-pipe", daemon=True).start()

    def send(self, message: tuple[Any, ...]) -> None:
        """One message to the worker, whole (the work's thread and this reader both send)."""
        with self._send_lock:
            self.conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the worker is gone, and so is the job this work was for
            match message:
                case ("work", WorkOrder() as order):
                    # made here, so that a control message right behind the order finds it
                    self._ctx = ChildContext(order, self.send)
                    self._orders.put((order, self._ctx))
                case ("control", paused, stop, detail) if self._ctx is not None:
                    self._ctx.control(paused, stop, detail)
                case ("ack",) if self._ctx is not None:
                    self._ctx.acked()
                case ("close",):
                    self._orders.put(None)

    def serve(self) -> None:
        """Run work orders until the worker says close; exit after one that ran out of memory."""
        while (item := self._orders.get()) is not None:
            order, ctx = item
            outcome = _perform(order, ctx)
            try:
                self.send(outcome)
            except Exception as exc:  # a result that does not pickle is the work's bug, not the pipe's
                self.send(("error", ErrorCode.HANDLER_ERROR, f"the job's result cannot cross to the worker: {exc}"))
            if outcome[0] == "error" and outcome[1] is ErrorCode.RESOURCE_EXHAUSTED:
                return  # a process whose allocation failed is not trusted with another job


def _perform(order: WorkOrder, ctx: ChildContext) -> tuple[Any, ...]:
    """Run one order under its limits; its outcome as the message that reports it."""
    _limit_memory(order.memory_limit)
    _limit_threads(order.threads)
    try:
        return ("done", order.fn(*order.args, ctx))
    except JobStopped as stopped:
        return ("stopped", stopped.reason, stopped.message)
    except MemoryError:
        return ("error", ErrorCode.RESOURCE_EXHAUSTED, _out_of_memory(order.memory_limit))
    except ForsetiError as exc:
        return ("error", exc.code, exc.message, exc.retriable)
    except Exception as exc:
        if isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in OUT_OF_MEMORY):
            return ("error", ErrorCode.RESOURCE_EXHAUSTED, _out_of_memory(order.memory_limit))
        return ("error", ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", False, traceback.format_exc())


def _out_of_memory(limit: int) -> str:
    return (
        f"the job ran out of memory: an allocation failed past the {limit / 2**20:,.0f} MiB it may take "
        "on this worker (max_job_memory_mb, or the task's max_memory_mb)"
    )


def _limit_memory(limit: int) -> None:
    """Cap the address space at what this process holds now plus the job's limit (Linux only: other
    systems do not enforce RLIMIT_AS). The soft limit moves for each job, under the hard one."""
    if not sys.platform.startswith("linux"):
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = _address_space() + limit
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _address_space() -> int:
    """This process's virtual memory size in bytes (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _limit_threads(threads: int | None) -> None:
    if (
        threads is not None and "torch" in sys.modules
    ):  # only work that trains imports torch; the rest has nothing to limit
        import torch

        torch.set_num_threads(threads)


def child_main(conn: Connection, preload: Sequence[str]) -> None:
    """Entry point of a child process: import what jobs need, then serve work orders."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; the worker decides
    # what its jobs do then (finish, hand back), so the child leaves those signals to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in preload:
        # warming only: a worker without torch still runs work that does not need it
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _ChildServer(conn).serve()


# -- the worker's side ---------------------------------------------------------------------------


@dataclass(eq=False)  # held in a set by identity
class _Child:
    """One child process, as the worker holds it."""

    process: BaseProcess
    conn: Connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    usable: bool = True
    """False once it died, was killed or ran out of memory: not given another job."""

    def send(self, message: tuple[Any, ...]) -> None:
        """One message to the child; a dead child's pipe is left to `serve` to notice."""
        with self.lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self.usable = False

    def kill(self) -> None:
        """End the process now."""
        self.usable = False
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


class ChildPool:
    """Warm child processes that run jobs' work, at most `size` kept between jobs."""

    def __init__(self, *, size: int, stop_grace: float, preload: Sequence[str] = ("torch",)) -> None:
        self.size, self.stop_grace = size, stop_grace
        self.preload = tuple(preload)
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._closed = False

    @property
    def warm(self) -> int:
        """Processes waiting for a job."""
        return len(self._idle)

    async def run(self, ctx: JobContext, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run `fn(*args, child_ctx)` in a child process and return its result; raises what the work
        raised (JobStopped, ForsetiError), or ForsetiError when the child died without an outcome."""
        if self._closed:
            raise ForsetiError("the worker is shutting down", code=ErrorCode.SHUTDOWN, retriable=True)
        child = self._idle.pop() if self._idle else await asyncio.to_thread(self._spawn)
        self._busy.add(child)
        paused, stop, detail = ctx.control_state()
        order = WorkOrder(
            fn=fn,
            args=args,
            job_id=ctx.job_id,
            kind=ctx.kind,
            attempt=ctx.attempt,
            resumed=ctx.resumed,
            work_dir=ctx.work_dir,
            artifacts_dir=ctx.artifacts_dir,
            inputs=ctx.inputs,
            memory_limit=ctx.memory_limit,
            threads=ctx.threads,
            paused=paused,
            stop=stop,
            stop_detail=detail,
        )
        child.send(("work", order))
        unwatch = ctx.watch(lambda: child.send(("control", *ctx.control_state())))
        try:
            return await asyncio.to_thread(self._serve, child, ctx)
        finally:
            unwatch()
            self._busy.discard(child)
            if child.usable and not self._closed and len(self._idle) < self.size:
                self._idle.append(child)
            else:
                await asyncio.to_thread(self._retire, child)

    def close(self) -> None:
        """Stop every child: idle ones are asked to exit, busy ones (past every shutdown bound) killed."""
        self._closed = True
        for child in self._idle:
            self._retire(child)
        self._idle.clear()
        for child in list(self._busy):
            child.kill()

    def _spawn(self) -> _Child:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=child_main, args=(theirs, self.preload), name="forseti-job", daemon=True)
        process.start()
        theirs.close()
        log.debug("started job process %d", process.pid)
        return _Child(process, ours)

    def _retire(self, child: _Child) -> None:
        child.send(("close",))
        child.process.join(5)
        if child.process.is_alive():
            child.kill()
        child.conn.close()

    def _serve(self, child: _Child, ctx: JobContext) -> Any:
        """Relay the child's messages to the job until its outcome comes; watch it meanwhile."""
        stop_asked: float | None = None
        while True:
            message = _next_message(child)
            if message is not None:
                outcome = _relay(child, ctx, message)
                if outcome is not _PENDING:
                    return outcome
                continue
            if not child.process.is_alive():
                child.usable = False
                raise _died(child.process.exitcode, ctx.memory_limit)
            if ctx.stop_reason in KILLED_ON_STOP:
                stop_asked = stop_asked or time.monotonic()
                if time.monotonic() - stop_asked > self.stop_grace:
                    log.warning("job did not stop within %.1fs; killing its process", self.stop_grace)
                    child.kill()
                    raise JobStopped(ctx.stop_reason, ctx.stop_detail)


_PENDING = object()
"""What `_relay` returns for a message that is not the work's outcome."""


def _next_message(child: _Child) -> tuple[Any, ...] | None:
    """The child's next message, or None after POLL_SECONDS of silence or once its pipe closed."""
    try:
        if child.conn.poll(POLL_SECONDS):
            message: tuple[Any, ...] = child.conn.recv()
            return message
    except (EOFError, OSError):  # it died: give it a moment to be reaped, so its exit code is known
        child.process.join(5)
    return None


def _relay(child: _Child, ctx: JobContext, message: tuple[Any, ...]) -> Any:
    """Pass one message of the child's on to its job: the work's result, or _PENDING; raises the
    work's exception."""
    match message:
        case ("progress", fields, fraction):
            ctx.progress(fraction, **fields)
        case ("checkpointed", step):
            try:
                ctx.checkpointed(step)
            finally:
                child.send(("ack",))
        case ("done", value):
            return value
        case ("stopped", reason, detail):
            raise JobStopped(reason, detail)
        case ("error", code, text, *rest):
            if code is ErrorCode.RESOURCE_EXHAUSTED:
                child.usable = False
            if len(rest) > 1:
                log.error("job work raised in its process:\n%s", rest[1])
            raise ForsetiError(text, code=code, retriable=bool(rest[0]) if rest else False)
    return _PENDING


def _died(exitcode: int | None, limit: int) -> ForsetiError:
    """The error for a child that ended without an outcome."""
    if exitcode == -signal.SIGKILL:
        return ForsetiError(
            "the job's process was killed (SIGKILL), most likely by the kernel's out-of-memory killer; "
            f"the job may take {limit / 2**20:,.0f} MiB on this worker (max_job_memory_mb)",
            code=ErrorCode.RESOURCE_EXHAUSTED,
        )
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return ForsetiError(f"the job's process died of {name}", code=ErrorCode.HANDLER_CRASHED)
    return ForsetiError(
        f"the job's process exited with status {exitcode} before its work was done", code=ErrorCode.HANDLER_CRASHED
    )
