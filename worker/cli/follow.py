"""Following a job to its end, through `forseti.client`: `forseti watch`, `forseti submit --watch` and the
demo job of `forseti up`."""

from __future__ import annotations

import asyncio
from enum import IntEnum

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from forseti.client import ClientError, ClientTimeout, Job, QueryRefused, TaskRefused, UnknownJob
from forseti.schemas.jobs import JobAccepted, JobCancelled, JobCompleted, JobFailed, JobProgress


class ExitCode(IntEnum):
    """How `forseti watch`, `submit --watch`, `cancel`, `pause` and `resume` exit."""

    COMPLETED = 0
    FAILED = 1
    CANCELLED = 2
    GAVE_UP = 3
    UNKNOWN = 4
    REFUSED = 5


# the figures a progress bar shows when a handler reports them, in this order: what a person watching
# a job wants to see move (a handler's own message says the rest)
SHOWN = (
    ("mean_reward_100", "mean reward {:.4g}"),
    ("val_loss", "val_loss {:.4g}"),
    ("loss", "loss {:.4g}"),
    ("steps_per_second", "{:,.0f} steps/s"),
    ("tokens_per_second", "{:,.0f} tokens/s"),
)


GAVE_UP_ON: tuple[tuple[type[ClientError], str, ExitCode], ...] = (
    (TaskRefused, "refused", ExitCode.REFUSED),
    (UnknownJob, "unknown job", ExitCode.UNKNOWN),
    (QueryRefused, "error", ExitCode.FAILED),
    (ClientTimeout, "gave up", ExitCode.GAVE_UP),
)
"""Why following a job stopped before its end: the client's error, the word shown, the exit code."""


def progress_detail(event: JobProgress) -> str:
    """What the bar shows beside a progress event: its step out of the total (never past it), the
    headline figures it carries, and the handler's message when it carries none of them."""
    figures = [fmt.format(event.metrics[key]) for key, fmt in SHOWN if key in event.metrics]
    if not figures:
        return event.message
    step = f"{min(event.step, event.total):,} / {event.total:,}  " if event.total else ""
    return step + "  ".join(figures)


def show_ending(job: Job, console: Console) -> ExitCode:
    """Print how a job ended (its result, its error) and the exit code that says so."""
    ending = job.ending
    if job.replayed and job.submitted:
        if job.task_differs:
            console.print(
                f"[yellow]replayed[/yellow]: job {job.job_id} ran before with a different task; this is that run's "
                "outcome and your task did not run (submit it with a new request_id)"
            )
        else:
            console.print(f"[yellow]replayed[/yellow]: job {job.job_id} ran before; this is its stored outcome")
    if isinstance(ending, JobCompleted):
        console.print(f"[green]completed[/green] {ending.job_id}")
        console.print_json(ending.result.model_dump_json())
        return ExitCode.COMPLETED
    if isinstance(ending, JobFailed):
        console.print(f"[red]failed[/red] {ending.job_id}: {ending.code}: {ending.message}")
        return ExitCode.FAILED
    assert isinstance(ending, JobCancelled)  # a followed job ends in one of three ways
    console.print(f"[yellow]cancelled[/yellow] {ending.job_id}" + (f": {ending.reason}" if ending.reason else ""))
    return ExitCode.CANCELLED


async def follow(job: Job, *, console: Console, timeout: float | None = None) -> ExitCode:
    """Show a progress bar until the job ends; the exit code says how it ended, or why we stopped
    waiting (a refused task, a job no worker knows, `timeout` seconds gone)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{job.job_id}: waiting for a worker", total=1.0, detail="")
        try:
            async with asyncio.timeout(timeout):
                async for event in job.events():
                    if isinstance(event, JobAccepted):
                        bar.update(task, description=f"{event.job_id}: running on {event.worker}")
                    elif isinstance(event, JobProgress):
                        bar.update(
                            task,
                            completed=event.fraction or bar.tasks[0].completed,
                            description=f"{event.job_id}: {event.state}",
                            detail=progress_detail(event),
                        )
        except (TaskRefused, UnknownJob, QueryRefused, ClientTimeout) as exc:
            bar.stop()
            label, code = next((label, code) for kind, label, code in GAVE_UP_ON if isinstance(exc, kind))
            console.print(f"[red]{label}[/red]: {exc.message}")
            return code
        except TimeoutError:
            bar.stop()
            console.print(f"gave up waiting for {job.job_id} after {timeout:g}s (it runs on)")
            return ExitCode.GAVE_UP
    return show_ending(job, console)
