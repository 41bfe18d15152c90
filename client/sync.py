"""The blocking facade: the async client run on an event loop of its own, in a background thread, for
scripts and notebooks that do not run asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

from forseti.schemas.capabilities import Capabilities
from forseti.schemas.jobs import JobResult, JobStatus
from forseti.schemas.models import ModelSummary
from forseti.schemas.tasks import TaskBase, TaskKind

from .client import ACCEPT_TIMEOUT, DEFAULT_BUS_URL, QUERY_TIMEOUT, Client, Job, JobUpdate

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread; coroutines are handed to it and waited for."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forseti-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class SyncJob:
    """The blocking handle on one job (see `Job`)."""

    def __init__(self, job: Job, loop: _Loop) -> None:
        self._job, self._loop = job, loop

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self._job.job_id

    @property
    def replayed(self) -> bool:
        """True when the job's ending was a stored one, announced again (its request_id had run before)."""
        return self._job.replayed

    def events(self) -> Iterator[JobUpdate]:
        """The job's events up to and including its terminal one."""
        stream = self._job.events()
        while True:
            try:
                yield self._loop.run(anext(stream))  # type: ignore[arg-type]  # an async generator's anext is a coroutine
            except StopAsyncIteration:
                return

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end: its result, or JobFailedError / JobCancelledError / ClientTimeout."""
        return self._loop.run(self._job.result(timeout))

    def status(self) -> JobStatus:
        """The job's stored record."""
        return self._loop.run(self._job.status())

    def cancel(self, reason: str = "") -> None:
        """Ask the workers to stop the job."""
        self._loop.run(self._job.cancel(reason))

    def pause(self, reason: str = "") -> None:
        """Hold the job at its next safe point."""
        self._loop.run(self._job.pause(reason))

    def resume(self, reason: str = "") -> None:
        """Let a paused job go on."""
        self._loop.run(self._job.resume(reason))


class SyncClient:
    """`with SyncClient("nats://127.0.0.1:4222") as forseti: job = forseti.submit(task)`: the async
    `Client` for code that does not run asyncio."""

    def __init__(self, url: str = DEFAULT_BUS_URL, *, user_id: str | None = None) -> None:
        self._loop = _Loop()
        try:
            self._client = self._loop.run(Client.connect(url, user_id=user_id))
        except BaseException:
            self._loop.stop()
            raise

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def submit(
        self,
        task: TaskBase | Mapping[str, Any],
        *,
        kind: TaskKind | str | None = None,
        accept_timeout: float | None = ACCEPT_TIMEOUT,
    ) -> SyncJob:
        """Publish a task; the handle on its job."""
        return SyncJob(self._loop.run(self._client.submit(task, kind=kind, accept_timeout=accept_timeout)), self._loop)

    def job(self, job_id: str, *, accept_timeout: float | None = ACCEPT_TIMEOUT) -> SyncJob:
        """A handle on a job submitted earlier."""
        return SyncJob(self._loop.run(self._client.job(job_id, accept_timeout=accept_timeout)), self._loop)

    def status(self, job_id: str, *, timeout: float = QUERY_TIMEOUT) -> JobStatus:
        """Where a job stands."""
        return self._loop.run(self._client.status(job_id, timeout=timeout))

    def capabilities(self, kind: TaskKind | str | None = None, *, timeout: float = QUERY_TIMEOUT) -> Capabilities:
        """What a worker can do."""
        return self._loop.run(self._client.capabilities(kind, timeout=timeout))

    def models(self, name: str | None = None, *, limit: int = 50, timeout: float = QUERY_TIMEOUT) -> list[ModelSummary]:
        """The registered model versions, newest first."""
        return self._loop.run(self._client.models(name, limit=limit, timeout=timeout))

    def cancel(self, job_id: str, reason: str = "") -> None:
        """Ask the workers to stop a job."""
        self._loop.run(self._client.cancel(job_id, reason))
