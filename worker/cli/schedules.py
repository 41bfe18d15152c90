"""`forseti schedules ...`: create, list, show, pause, resume and delete schedules over the bus."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from forseti.adapters.bus import Bus
from forseti.adapters.signing import Signer, seal
from forseti.schemas.catalog import SCHEDULES
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import InvalidTask, RequestTimeout
from forseti.schemas.schedules import (
    DatasetGrowth,
    MetricDrift,
    Overlap,
    ScheduleCreate,
    ScheduleDelete,
    ScheduleError,
    ScheduleInfo,
    SchedulePause,
    ScheduleRequest,
    ScheduleResume,
    SchedulesList,
    ScheduleSpec,
    SchedulesQuery,
)
from forseti.schemas.tasks import TASK_MODELS, TaskKind

from ..engine.loop import run as run_loop
from ..engine.settings import DEFAULT_BUS_URL
from .commands import (
    DEFAULT_DATA_DIR,
    PLAIN_HELP,
    BusOpt,
    DataDirOpt,
    OperatorOpt,
    SigningKeyOpt,
    UserOpt,
    _connected,
    _fail,
    _operator,
    app,
    out,
    read_task_file,
)

REQUEST_TIMEOUT = 10.0
"""Seconds to wait for a worker's answer."""

schedules_app = typer.Typer(
    rich_markup_mode=PLAIN_HELP,
    help="Task templates the workers fire on a cron expression, an interval or a dataset's growth, once per slot.",
    no_args_is_help=True,
)
app.add_typer(schedules_app, name="schedules")
IdArg = Annotated[str, typer.Argument(metavar="SCHEDULE_ID", help="The schedule's id (fires are <id>-<slot>).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


async def ask_schedules(bus: Bus, request: ScheduleRequest, signer: Signer | None, *, timeout: float) -> SchedulesList:
    """Send a schedule request (signed when `signer` is given) and return the answer; raises
    InvalidTask with the workers' reason when refused, RequestTimeout when no worker answers."""
    raw = await bus.request(SCHEDULES, seal(encode(request), signer), timeout=timeout)
    answer: object = decode(raw).data
    if isinstance(answer, ScheduleError):
        raise InvalidTask(f"{answer.code}: {answer.message}")
    if not isinstance(answer, SchedulesList):
        raise InvalidTask(f"a {type(answer).__name__} answered a schedule request")
    return answer


def _send(request: ScheduleRequest, bus: str, signer: Signer | None, as_json: bool, *, detail: bool = False) -> None:
    async def go() -> SchedulesList:
        connected = await _connected(bus)
        try:
            return await ask_schedules(connected, request, signer, timeout=REQUEST_TIMEOUT)
        finally:
            await connected.close()

    try:
        answer = run_loop(go())
    except InvalidTask as exc:
        raise _fail(exc.message) from exc
    except RequestTimeout as exc:
        raise _fail(f"no worker answered on {bus} within {REQUEST_TIMEOUT:g}s (is one running?)", 3) from exc
    if as_json:
        out.print_json(answer.model_dump_json())
        return
    out.print(_table(answer.schedules))
    if detail:
        for info in answer.schedules:
            fires = Table("slot", "action", "job", "decided at")
            for fire in info.fires:
                fires.add_row(fire.slot, fire.action, fire.job_id, fire.at)
            out.print(fires)


def _table(schedules: list[ScheduleInfo]) -> Table:
    table = Table("id", "kind", "when", "overlap", "owner", "next fire", "state")
    for s in schedules:
        spec = s.spec
        if spec.cron is not None:
            when = f"{spec.cron} ({spec.timezone})"
        elif spec.when_grown is not None:
            when = f"+{spec.when_grown.lines} lines of {spec.when_grown.path}"
        elif spec.when_drifts is not None:
            d = spec.when_drifts
            figure = "" if d.metric == "error_rate" or d.latency == "mean" else f" {d.latency}"
            when = f"{d.metric}{figure} of {d.name} > {d.above:g} over {d.window_seconds:g}s"
        else:
            when = f"every {spec.every_seconds:g}s"
        state = f"paused: {s.pause_reason}" if s.paused else "active"
        table.add_row(s.id, spec.kind.value, when, spec.overlap.value, s.owner or "-", s.next_fire or "-", state)
    return table


@schedules_app.command("create")
def create(
    schedule_id: IdArg,
    task_file: Annotated[Path, typer.Option("--task", help="The task each fire publishes (JSON, as for submit).")],
    kind: Annotated[TaskKind | None, typer.Option(help="Task kind, when the file does not say.")] = None,
    cron: Annotated[str | None, typer.Option(help="A cron expression: '0 3 * * *' is 03:00 every day.")] = None,
    every: Annotated[float | None, typer.Option(help="Fire every so many seconds instead.")] = None,
    when_grown: Annotated[Path | None, typer.Option(help="Fire when this dataset grows by --lines lines.")] = None,
    lines: Annotated[int, typer.Option(help="New lines that make a --when-grown fire.")] = 1000,
    when_drifts: Annotated[
        str | None,
        typer.Option(help="Fire when the served model of this name drifts: its --metric past --above over --window."),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="What --when-drifts watches: error_rate, or latency_ms (in the --latency figure).")
    ] = "error_rate",
    latency: Annotated[
        str,
        typer.Option(help="The latency_ms figure: mean, p50, p90, p95 or p99 (from the replicas' latency buckets)."),
    ] = "mean",
    above: Annotated[float, typer.Option(help="The --when-drifts bound (0.05: 5% of requests failing).")] = 0.05,
    window: Annotated[float, typer.Option(help="Seconds the --when-drifts metric is measured over.")] = 300.0,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron fields.")] = "UTC",
    jitter: Annotated[float, typer.Option(help="Fire up to this many seconds after each slot.")] = 0.0,
    overlap: Annotated[Overlap, typer.Option(help="While the previous job runs.")] = Overlap.SKIP,
    catchup_window: Annotated[float, typer.Option(help="Seconds of missed slots fired after downtime.")] = 60.0,
    pause_after_failures: Annotated[
        int, typer.Option(help="Pause after this many failed jobs in a row (0: never).")
    ] = 0,
    user: UserOpt = None,
    operator: OperatorOpt = False,
    signing_key: SigningKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
    as_json: JsonOpt = False,
) -> None:
    """Store a schedule: the task in --task, fired on --cron, --every, --when-grown or --when-drifts."""
    task = read_task_file(str(task_file), kind)
    payload = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    payload.pop("request_id", None)  # each fire sets its own
    try:
        spec = ScheduleSpec(
            kind=task_kind(task),
            task=payload,
            cron=cron,
            every_seconds=every,
            when_grown=DatasetGrowth(path=str(when_grown), lines=lines) if when_grown is not None else None,
            when_drifts=(
                MetricDrift.model_validate(
                    {
                        "name": when_drifts,
                        "metric": metric,
                        "latency": latency,
                        "above": above,
                        "window_seconds": window,
                    }
                )
                if when_drifts is not None
                else None
            ),
            timezone=timezone,
            jitter_seconds=jitter,
            overlap=overlap,
            catchup_window_seconds=catchup_window,
            pause_after_failures=pause_after_failures,
        )
        request = ScheduleCreate(id=schedule_id, spec=spec, user_id=user)
    except ValidationError as exc:
        raise _fail(f"not a valid schedule:\n{exc}") from exc
    _send(request, bus, _operator(operator, signing_key, data_dir), as_json)


def task_kind(task: object) -> TaskKind:
    """The kind of a task model read from a file."""
    return next(kind for kind, model in TASK_MODELS.items() if type(task) is model)


@schedules_app.command("list")
def list_(
    user: UserOpt = None,
    operator: OperatorOpt = False,
    signing_key: SigningKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
    as_json: JsonOpt = False,
) -> None:
    """The schedules (yours; every one with --operator), with their next fire."""
    _send(SchedulesQuery(user_id=user), bus, _operator(operator, signing_key, data_dir), as_json)


def _by_id(name: str, build: Callable[[str, str | None], ScheduleRequest], doc: str, *, detail: bool = False) -> None:
    """Register `forseti schedules NAME SCHEDULE_ID`: send the request `build(id, user)` makes."""

    def command(
        schedule_id: IdArg,
        user: UserOpt = None,
        operator: OperatorOpt = False,
        signing_key: SigningKeyOpt = None,
        data_dir: DataDirOpt = DEFAULT_DATA_DIR,
        bus: BusOpt = DEFAULT_BUS_URL,
        as_json: JsonOpt = False,
    ) -> None:
        signer = _operator(operator, signing_key, data_dir)
        _send(build(schedule_id, user), bus, signer, as_json, detail=detail)

    command.__doc__ = doc
    schedules_app.command(name)(command)


_by_id(
    "show",
    lambda schedule_id, user: SchedulesQuery(id=schedule_id, user_id=user),
    "One schedule and its recent fires (slot, action, job id).",
    detail=True,
)


def _change(verb: type[SchedulePause | ScheduleResume | ScheduleDelete]) -> None:
    def build(schedule_id: str, user: str | None) -> ScheduleRequest:
        return verb(id=schedule_id, user_id=user)

    doc = (verb.__doc__ or "").split(": ", 1)[-1].capitalize()
    _by_id(verb.__name__.removeprefix("Schedule").lower(), build, doc)


for _verb in (SchedulePause, ScheduleResume, ScheduleDelete):
    _change(_verb)
