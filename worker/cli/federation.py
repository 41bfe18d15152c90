"""`forseti coordinator` and `forseti federate`: run a federation, or take part in one as an agent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer
import yaml
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from forseti.adapters.registry import RegistryStore
from forseti.adapters.signing import Signer
from forseti.schemas.errors import ForsetiError
from forseti.schemas.federation import FederationConfig

from ..engine.http import MetricsServer
from ..engine.logs import setup_logging
from ..engine.loop import run as run_loop
from ..engine.settings import DEFAULT_BUS_URL
from .commands import (
    DEFAULT_DATA_DIR,
    ArtifactStoreOpt,
    BusOpt,
    DataDirOpt,
    KeyFileOpt,
    LogJsonOpt,
    RegistryOpt,
    SigningKeyOpt,
    _connected,
    _fail,
    _keyring,
    _s3_store,
    _signer,
    _store,
    _trusted,
    app,
    err,
)


def read_config(path: Path) -> FederationConfig:
    """A federation's config from a YAML or JSON file; exit 1 with what is wrong."""
    try:
        doc = yaml.safe_load(path.read_text())
        return FederationConfig.model_validate(doc)
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise _fail(f"{path} is not YAML or JSON: {exc}") from exc
    except ValidationError as exc:
        raise _fail(f"{path} is not a federation config:\n{exc}") from exc


@app.command()
def coordinator(
    name: Annotated[str, typer.Option(help="The federation; its channels are forseti.federation.NAME.*.")],
    config: Annotated[
        Path | None,
        typer.Option(
            help="The federation's config (YAML or JSON; docs/federated.md). Without it, the config "
            "stored in the registry is resumed."
        ),
    ] = None,
    lease_ttl: Annotated[
        float, typer.Option(min=1, help="Seconds another coordinator waits after this one stops renewing.")
    ] = 30.0,
    agent_keys: Annotated[
        list[Path] | None,
        typer.Option(
            help="Take contributions only when signed by one of these ed25519 public keys (PEM files or "
            "folders of *.pub; repeatable) [anyone's, checked for NaN, shapes and norm]."
        ),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    object_store_url: ArtifactStoreOpt = None,
    signing_key: SigningKeyOpt = None,
    encryption_key_file: KeyFileOpt = None,
    log_json: LogJsonOpt = False,
) -> None:
    """Run a federation until its last round (updates form) or SIGTERM (experience form). Its state is saved
    in the registry after every round: a coordinator started with the same name on another host (same
    registry and bus) takes over once this one's lease runs out, and resumes it."""
    from ..federation.coordinator import Coordinator

    setup_logging(json_lines=log_json)
    if config is not None:
        federation = read_config(config)
        if federation.name != name:
            raise _fail(f"--name {name} but the config names federation {federation.name!r}")
    store = _store(data_dir, registry_url)
    objects = _s3_store(object_store_url)
    signer = _signer(signing_key, data_dir)
    keyring = _keyring(encryption_key_file)
    trusted = _trusted(agent_keys, data_dir) if agent_keys else None

    async def go() -> None:
        await store.open()
        client = await _connected(bus)
        try:
            chosen = read_config(config) if config else await _stored_config(store, name)
            registry = CollectorRegistry()
            service = Coordinator(
                client,
                store,
                chosen,
                data_dir=data_dir,
                owner=_owner(),
                lease_ttl=lease_ttl,
                objects=objects,
                signer=signer,
                trusted=trusted,
                keyring=keyring,
                registry=registry,
            )
            metrics = (
                MetricsServer(registry, lambda: (True, {}), host="0.0.0.0", port=metrics_port) if metrics_port else None
            )
            if metrics:
                await metrics.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await service.start()
            except ForsetiError as exc:
                raise _fail(exc.message) from exc
            err.print(
                f"coordinator {name}: round {service.state.round}, agents on forseti.federation.{name}.*, "
                f"progress on forseti.jobs.{service.job_id}"
            )
            done = asyncio.create_task(service.done.wait())
            halt = asyncio.create_task(stop.wait())
            await asyncio.wait({done, halt}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            halt.cancel()
            await service.stop()
            if metrics:
                await metrics.close()
            if service.error is not None:
                raise _fail(f"federation {name}: the coordinator stopped: {service.error!r} (its state is saved)")
            if service.done.is_set():
                err.print(
                    f"federation {name}: done after {service.state.round} rounds; "
                    f"last version {service.state.versions[-1] if service.state.versions else '-'}"
                )
        finally:
            await client.close()
            await store.close()

    run_loop(go())


@app.command()
def federate(
    name: Annotated[str, typer.Option(help="The federation to take part in.")],
    data: Annotated[Path, typer.Option(help="This agent's rows (CSV, Parquet or JSON Lines); they never leave it.")],
    agent_id: Annotated[str | None, typer.Option(help="This agent's id, unique in the federation [HOST-PID].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the local batch order.")] = 0,
    patience: Annotated[
        float, typer.Option(min=1, help="Give up after this many seconds without a coordinator.")
    ] = 120.0,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
    signing_key: SigningKeyOpt = None,
    log_json: LogJsonOpt = False,
) -> None:
    """Take part in an updates federation: pull the global model, train on DATA locally, send the change;
    until the federation is done. Needs torch (forseti[federated])."""
    from ..federation.agent import UpdateAgent
    from ..handlers.training_data import read_file

    setup_logging(json_lines=log_json)
    try:
        rows = list(read_file(data))
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read {data}: {exc}") from exc
    if not rows:
        raise _fail(f"{data} holds no rows")
    signer: Signer | None = _signer(signing_key, data_dir)
    me = agent_id or _owner()

    async def go() -> None:
        client = await _connected(bus)
        try:
            agent = UpdateAgent(client, name, me, rows, signer=signer, seed=seed, patience=patience)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            err.print(f"agent {me}: {len(rows)} rows, federation {name}")
            try:
                report = await agent.run(stop=stop)
            except ForsetiError as exc:
                raise _fail(exc.message) from exc
            refused = sum(not r.accepted for r in report.receipts)
            err.print(
                f"agent {me}: sent {len(report.rounds)} updates ({refused} refused); "
                f"{'federation done' if report.finished else 'stopped'}"
            )
        finally:
            await client.close()

    run_loop(go())


async def _stored_config(store: RegistryStore, name: str) -> FederationConfig:
    """The config a federation was started with, from the registry; exit 1 when there is none."""
    stored = await store.get_federation(name)
    if stored is None:
        raise _fail(f"no federation {name!r} in the registry: start it with --config FILE")
    return FederationConfig.model_validate(stored.config)


def _owner() -> str:
    """This process, as a coordinator's lease owner or an agent's default id."""
    return f"{socket.gethostname()}-{os.getpid()}"
