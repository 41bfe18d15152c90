"""`forseti models rollout | rollouts | rollout-abort`: progressive rollouts from the command line.

Like `forseti models promote`, these act on the registry and the bus directly; the workers then move
the rollout on from the replicas' health reports.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.table import Table

from forseti.adapters.bus import Bus, Message
from forseti.adapters.registry import RegistryStore
from forseti.schemas.catalog import MODELS
from forseti.schemas.envelope import decode
from forseti.schemas.errors import InvalidTask, validation_summary
from forseti.schemas.rollouts import ENDED, RolloutBounds, RolloutSpec, RolloutStep, StepEvidence

from ..engine.loop import run as run_loop
from ..engine.models import version_label
from ..engine.settings import DEFAULT_BUS_URL
from ..rollouts.judge import latency
from ..rollouts.steps import abort_rollout, start_rollout
from .commands import (
    DEFAULT_DATA_DIR,
    AliasOpt,
    ArtifactStoreOpt,
    BusOpt,
    DataDirOpt,
    KeyFileOpt,
    RegistryOpt,
    SigningKeyOpt,
    _fail,
    _keyring,
    _s3_store,
    _signer,
    _store,
    _with_store_and_bus,
    err,
    models_app,
    out,
)

UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `90`, `30s`, `5m`, `1.5h`; ValueError for anything else."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration: use 90, 30s, 5m or 1h")
    return float(found[1]) * UNITS[found[2]]


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise _fail(f"--steps {text!r}: shares in percent, comma-separated (10,50,100)") from exc


def _line(step: RolloutStep) -> str:
    where = "loading" if step.step == 0 else f"step {step.step} ({step.share}%)"
    return f"{step.rollout_id} {where}: {step.state}. {step.reason}"


@models_app.command("rollout")
def models_rollout(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="The version to roll out (label or number).")],
    strategy: Annotated[
        str,
        typer.Option(
            help="canary: shares of requests grow along --steps; blue_green: all traffic in one switch; rolling: "
            "shares of the edge devices with --tag."
        ),
    ] = "canary",
    tag: Annotated[
        str | None, typer.Option(help="rolling: the device tag rolled across (devices started with --tag).")
    ] = None,
    steps: Annotated[str, typer.Option(help="The candidate's share of requests at each step, in percent.")] = (
        "10,50,100"
    ),
    interval: Annotated[str, typer.Option(help="How long each step runs before it is judged (90, 30s, 5m, 1h).")] = (
        "5m"
    ),
    max_error_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Roll back past this share of failed candidate requests.")
    ] = 0.05,
    max_latency_ratio: Annotated[
        float, typer.Option(min=1, help="Roll back past this candidate / baseline latency (see --latency).")
    ] = 1.5,
    min_requests: Annotated[
        int, typer.Option(min=1, help="Candidate requests a step needs before it is judged (fewer: it holds).")
    ] = 20,
    latency: Annotated[
        str,
        typer.Option(
            help="The latency figure --max-latency-ratio bounds: mean, p50, p90, p95 or p99 (percentiles from the "
            "replicas' latency buckets)."
        ),
    ] = "mean",
    max_hold: Annotated[
        str | None,
        typer.Option(
            help="Roll back when a step holds this long past its interval (too few requests, or replicas that do "
            "not load the version), e.g. 30m; unset: it holds until judged or aborted."
        ),
    ] = None,
    alias: AliasOpt = "production",
    follow: Annotated[
        bool, typer.Option("--follow", help="Print each move until the rollout ends; exit 1 unless it completes.")
    ] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    object_store_url: ArtifactStoreOpt = None,
    signing_key: SigningKeyOpt = None,
    encryption_key_file: KeyFileOpt = None,
) -> None:
    """Roll a version out to the replicas that follow an alias: they load it beside the version the alias
    holds, give it a growing share of requests, and report their health; the workers move the rollout on,
    hold it, or roll it back on their own when the version's error rate or latency passes a bound. The
    alias moves to the version when the last step is healthy."""
    try:
        bounds = RolloutBounds.model_validate(
            {
                "max_error_rate": max_error_rate,
                "max_latency_ratio": max_latency_ratio,
                "min_requests": min_requests,
                "latency": latency,
                "max_hold_seconds": parse_duration(max_hold) if max_hold is not None else None,
            }
        )
        given: dict[str, Any] = {
            "strategy": strategy,
            "interval_seconds": parse_duration(interval),
            "bounds": bounds,
            "device_tag": tag,
        }
        if strategy != "blue_green" or steps != "10,50,100":
            given["steps"] = _steps(steps)
        spec = RolloutSpec.model_validate(given)
    except (ValueError, ValidationError) as exc:
        raise _fail(validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)) from exc
    objects = _s3_store(object_store_url)
    signer = _signer(signing_key, data_dir)
    keyring = _keyring(encryption_key_file)

    async def work(store: RegistryStore, client: Bus) -> None:
        moves: asyncio.Queue[RolloutStep] = asyncio.Queue()

        async def on_model(msg: Message) -> None:
            try:
                event: Any = decode(msg.data).data
            except InvalidTask:
                return
            if isinstance(event, RolloutStep):
                moves.put_nowait(event)

        sub = await client.subscribe(MODELS, on_model) if follow else None
        rollout, _ = await start_rollout(
            store, client, name, version, spec, alias=alias, objects=objects, signer=signer, keyring=keyring
        )
        err.print(f"rollout {rollout.id}: {name} {version} to {alias}, {spec.strategy} {spec.steps}")
        if sub is None:
            out.print(rollout.id)
            return
        try:
            while True:
                move = await moves.get()
                if move.rollout_id != rollout.id:
                    continue
                out.print(_line(move))
                if move.state in ENDED:
                    if move.state != "completed":
                        raise typer.Exit(1)
                    return
        finally:
            await sub.unsubscribe()

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), bus, work))


@models_app.command("rollouts")
def models_rollouts(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Only rollouts of this model name.")] = None,
    rollout: Annotated[str | None, typer.Option("--id", help="Show this rollout's every move.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
) -> None:
    """Rollouts, newest first, with where each stands; with --id, one rollout's moves and their evidence."""

    async def work(store: RegistryStore, _: Any) -> None:
        chosen = [r for r in await store.list_rollouts(name=name) if rollout is None or r.id == rollout]
        if rollout is not None and not chosen:
            raise _fail(f"no rollout {rollout}")
        labels: dict[str, str] = {}
        for model_id in {m for r in chosen for m in (r.model_id, r.baseline_id)}:
            model = await store.get_model(model_id)
            labels[model_id] = version_label(model) if model is not None else model_id
        rows = {r.id: await store.list_rollout_steps(r.id) for r in chosen}
        if as_json:
            doc = [
                {
                    **r.model_dump(mode="json", exclude={"candidates"}),
                    "moves": [m.model_dump(mode="json") for m in rows[r.id]],
                }
                for r in chosen
            ]
            out.print_json(orjson.dumps(doc).decode())
            return
        if rollout is None:
            table = Table("rollout", "name", "alias", "candidate", "baseline", "strategy", "state", "share", "started")
            for r in chosen:
                last = rows[r.id][-1] if rows[r.id] else None
                table.add_row(
                    r.id, r.name, r.alias, labels[r.model_id], labels[r.baseline_id], r.spec.get("strategy", ""),
                    last.state if last else "-", f"{last.share}%" if last else "-", r.created_at,
                )  # fmt: skip
            out.print(table if chosen else "no rollouts")
            return
        figure = RolloutSpec.model_validate(chosen[0].spec).bounds.latency  # the one its bound is on
        table = Table(
            "seq", "step", "share", "state", f"candidate req/err/{figure} ms", f"baseline req/err/{figure} ms", "at",
            "reason",
        )  # fmt: skip
        for m in rows[chosen[0].id]:
            ev = StepEvidence.model_validate(m.evidence) if m.evidence else None
            table.add_row(
                str(m.seq), str(m.step), f"{m.share}%", m.state,
                _counts(ev.candidate_requests, ev.candidate_errors, latency(ev, "candidate", figure)) if ev else "-",
                _counts(ev.baseline_requests, ev.baseline_errors, latency(ev, "baseline", figure)) if ev else "-",
                m.created_at, m.reason,
            )  # fmt: skip
        out.print(table)

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), None, work))


def _counts(requests: int, errors: int, latency: float | None) -> str:
    return f"{requests}/{errors}/" + ("-" if latency is None else f"{latency:.1f}")


@models_app.command("rollout-abort")
def models_rollout_abort(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    alias: AliasOpt = "production",
    reason: Annotated[str, typer.Option(help="Why, for the rollout's history.")] = "aborted from the command line",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    signing_key: SigningKeyOpt = None,
) -> None:
    """End the rollout of NAME's alias going on: the replicas drop the candidate, the alias stays."""
    signer = _signer(signing_key, data_dir)

    async def work(store: RegistryStore, client: Bus) -> None:
        rollout, _ = await abort_rollout(store, client, name, alias=alias, reason=reason, signer=signer)
        err.print(f"rollout {rollout.id} aborted; {name} {alias} stays where it was")

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), bus, work))
