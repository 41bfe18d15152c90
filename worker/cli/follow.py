"""Following a job to its end: `forseti watch` and `forseti submit --watch`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import IntEnum

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from forseti.adapters.bus import Bus, Message
from forseti.schemas.catalog import STATUS, jobs_channel
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import InvalidTask, RequestTimeout
from forseti.schemas.jobs import (
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobProgress,
    JobStatus,
    JobStatusQuery,
)


class ExitCode(IntEnum):
    """How `forseti watch` exits."""

    COMPLETED = 0
    FAILED = 1
    CANCELLED = 2
    GAVE_UP = 3


@dataclass
class JobStream:
    """A subscription to one job's events, opened before anything that could produce them."""

    job_id: str
    queue: asyncio.Queue[Event[JobEvent]]

    @classmethod
    async def open(cls, bus: Bus, job_id: str) -> JobStream:
        """Subscribe to `forseti.jobs.<job_id>`."""
        queue: asyncio.Queue[Event[JobEvent]] = asyncio.Queue()

        async def on_message(msg: Message) -> None:
            try:
                queue.put_nowait(decode(msg.data, expect=JobEvent))
            except InvalidTask:
                return  # not ours to judge here; workers dead-letter what they refuse

        await bus.subscribe(jobs_channel(job_id), on_message)
        return cls(job_id, queue)


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])


def _ending(event: JobEvent | JobStatus, console: Console) -> ExitCode | None:
    if isinstance(event, JobCompleted) or (isinstance(event, JobStatus) and event.state == "completed"):
        result = event.result
        console.print(f"[green]completed[/green] {event.job_id}")
        if result is not None:
            console.print_json(result.model_dump_json())
        return ExitCode.COMPLETED
    if isinstance(event, JobFailed) or (isinstance(event, JobStatus) and event.state == "failed"):
        code = event.code if isinstance(event, JobFailed) else event.error_code
        message = event.message if isinstance(event, JobFailed) else event.error_message
        console.print(f"[red]failed[/red] {event.job_id}: {code}: {message}")
        return ExitCode.FAILED
    if isinstance(event, JobCancelled) or (isinstance(event, JobStatus) and event.state == "cancelled"):
        console.print(f"[yellow]cancelled[/yellow] {event.job_id}")
        return ExitCode.CANCELLED
    return None


async def follow(
    bus: Bus, stream: JobStream, *, console: Console, timeout: float | None = None, user_id: str | None = None
) -> ExitCode:
    """Show a progress bar until the job ends; the exit code says how it ended. `user_id`: who asks
    for its status (an owned job shows its result only to its owner)."""
    try:
        query = JobStatusQuery(job_id=stream.job_id, user_id=user_id)
        reply = await bus.request(STATUS, encode(query), timeout=1.0)
        known = _ending(decode(reply, expect=JobStatus).data, console)
        if known is not None:
            return known
    except (RequestTimeout, InvalidTask):
        pass  # no worker has seen it yet: wait for its events
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{stream.job_id}: waiting for a worker", total=1.0, detail="")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = (await stream.queue.get()).data
                    if isinstance(event, JobAccepted):
                        bar.update(task, description=f"{event.job_id}: running on {event.worker}")
                    elif isinstance(event, JobProgress):
                        detail = event.message or _metrics_text(event.metrics)
                        bar.update(
                            task,
                            completed=event.fraction or bar.tasks[0].completed,
                            description=f"{event.job_id}: {event.state}",
                            detail=detail,
                        )
                    else:
                        bar.stop()
                        ending = _ending(event, console)
                        if ending is not None:
                            return ending
        except TimeoutError:
            console.print(f"gave up waiting for {stream.job_id} after {timeout:g}s")
            return ExitCode.GAVE_UP
