"""The `forseti` command: worker, executor, submit, watch, cancel, pause, resume, jobs, models, capabilities,
llm-serve, complete, infer-serve, infer, edge, up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from forseti.adapters import tracing
from forseti.adapters.bus import Bus, create_bus
from forseti.adapters.encryption import Keyring
from forseti.adapters.registry import RegistryStore, create_store
from forseti.adapters.signing import Signer, TrustedKeys, configured_keys
from forseti.client import ACCEPT_TIMEOUT, Client, ClientError, ClientTimeout, UnknownJob, as_task
from forseti.schemas.base import Strict
from forseti.schemas.capabilities import Capabilities
from forseti.schemas.catalog import infer_channel, llm_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ForsetiError, InvalidTask, RequestTimeout
from forseti.schemas.jobs import JobState
from forseti.schemas.privacy import PrivacyErase, PrivacyExport, PrivacyReceipt, PrivacyRectify, PrivacyRequest
from forseti.schemas.tasks import TaskBase, TaskKind

from ..engine.context import Handler
from ..engine.logs import setup_logging
from ..engine.loop import run as run_loop
from ..engine.plugins import installed_handlers, load_handler
from ..engine.runtime import forseti_version
from ..engine.settings import DEFAULT_BUS_URL, WorkerSettings, default_data_dir
from .embedded import EmbeddedRegistry, run_stack
from .follow import ExitCode, follow

if TYPE_CHECKING:
    from forseti.adapters.objects import S3ObjectStore

DEFAULT_DATA_DIR = default_data_dir()

# click's plain help: typer's rich panels print a flag as taking a `<bool>` value, which it does not
PLAIN_HELP = None
app = typer.Typer(
    help="Forseti: an event-driven ML / RL worker on NATS or Kafka.",
    rich_markup_mode=PLAIN_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

UserOpt = Annotated[
    str | None, typer.Option("--user", help="Who asks: the user_id of the job's task, for a job that names one.")
]
BusOpt = Annotated[
    str,
    typer.Option(
        "--bus",
        envvar="FORSETI_BUS_URL",
        help="memory://, nats://HOST:PORT, tls://HOST:PORT or kafka://HOST:PORT (credentials and TLS files: "
        "docs/security.md).",
    ),
]
DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FORSETI_DATA_DIR", help="Registry, checkpoints and the embedded NATS store."),
]
LogJsonOpt = Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
ArtifactStoreOpt = Annotated[
    str | None,
    typer.Option(
        "--object-store-url",
        envvar="FORSETI_OBJECT_STORE_URL",
        help="On Kafka: the S3 store the workers put announced artifacts in (s3://BUCKET/PREFIX?endpoint=URL; "
        "credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Not needed on NATS.",
    ),
]
TrustedKeysOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-keys",
        envvar="FORSETI_TRUSTED_KEYS",
        help="Act only on announcements signed by one of these ed25519 public keys (PEM files, or folders of "
        "*.pub; repeatable) [<data-dir>/keys when it holds a .pub; else every announcement, unverified].",
    ),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--encryption-key-file",
        envvar="FORSETI_ENCRYPTION_KEY_FILE",
        help="AES-256 keys (base64, one per line; FORSETI_ENCRYPTION_KEY holds them inline) for artifacts "
        "stored encrypted (docs/security.md).",
    ),
]
SigningKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--signing-key",
        envvar="FORSETI_SIGNING_KEY",
        help="Sign the announcement with this ed25519 private key (PEM) [<data-dir>/keys/signing.key if present].",
    ),
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        envvar="FORSETI_REGISTRY_URL",
        help="sqlite:///PATH, or postgresql://USER:PASSWORD@HOST/DB shared by many hosts [<data-dir>/registry.db].",
        show_envvar=True,
    ),
]


HealthEveryOpt = Annotated[
    float,
    typer.Option(min=0.1, help="Seconds between health reports (forseti.models.health; rollouts are judged by them)."),
]
ReportKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--signing-key",
        envvar="FORSETI_SIGNING_KEY",
        help="Sign the health reports with this ed25519 private key (PEM), for workers that take only signed ones "
        "(--replica-keys) [<data-dir>/keys/signing.key if present].",
    ),
]


def _store(data_dir: Path, registry_url: str | None) -> RegistryStore:
    """The registry a command reads: `--registry-url`, else the data dir's SQLite file."""
    try:
        return create_store(WorkerSettings(data_dir=data_dir, registry_url=registry_url).registry)
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _settings(**values: Any) -> WorkerSettings:
    """Worker settings from the options and FORSETI_* variables; a bad value ends the command with
    its reason, not a traceback."""
    try:
        return WorkerSettings(**values)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise _fail(f"invalid settings: {reasons}") from exc


def _trusted(paths: list[Path] | None, data_dir: Path) -> TrustedKeys | None:
    """The keys a consumer checks announcements against: `--trusted-keys`, else the data dir's keys
    folder when it holds a public key; None (with a warning) when there are none."""
    try:
        trusted = configured_keys(paths or [], data_dir / "keys")
    except ForsetiError as exc:
        raise _fail(exc.message) from exc
    if trusted is None:
        err.print(
            "[yellow]warning:[/yellow] no --trusted-keys: announcements are acted on without checking who "
            "signed them (docs/security.md)"
        )
        return None
    err.print(f"announcements must be signed by: {', '.join(sorted(trusted.keys))}")
    return trusted


def _keyring(file: Path | None) -> Keyring | None:
    """The encryption keys of `--encryption-key-file` and FORSETI_ENCRYPTION_KEY."""
    try:
        return Keyring.load(value=os.environ.get("FORSETI_ENCRYPTION_KEY"), file=file)
    except ForsetiError as exc:
        raise _fail(exc.message) from exc


def _signer(path: Path | None, data_dir: Path) -> Signer | None:
    """The key a command signs announcements with: `--signing-key`, else the data dir's."""
    try:
        key = _settings(data_dir=data_dir, signing_key=path).signing_key_path
        return Signer.from_file(key) if key is not None else None
    except ForsetiError as exc:
        raise _fail(exc.message) from exc


def id_table(*columns: str, ids: tuple[str, ...] = ()) -> Table:
    """A table whose `ids` columns are never cut or wrapped: in a narrow terminal the others wrap, so an
    id can be copied from it whole."""
    table = Table()
    for name in columns:
        table.add_column(name, no_wrap=name in ids)
    return table


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _port_free(port: int | None, host: str, option: str) -> None:
    """Exit 1 with one line when `port` is taken, before anything starts: a second `forseti up` must
    not join the first one's bus and then die half-started."""
    if not port:
        return  # none, or any free port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as the server will: a port left in TIME_WAIT by a stopped one is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _fail(
                f"port {port} on {host} is busy ({exc.strerror}): is another `forseti up` or worker running? "
                f"Stop it, or pass {option} with a free port"
            ) from exc


async def _connected(url: str, *, wait: bool = False) -> Bus:
    """A connected bus; with `wait`, tried again (every 0.5 s, backing off to 30 s) until it answers."""
    delay = 0.5
    while True:
        bus = create_bus(url)
        try:
            await bus.connect()
            return bus
        except ForsetiError as exc:
            if not wait:
                raise _fail(f"{exc.message}\nstart the embedded stack with `forseti up`, or pass --bus") from exc
            err.print(f"{exc.message}; trying again in {delay:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


class _Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _serve(
    bus: str, make: Callable[[Bus], _Service], *, service: str, ready: str = "", wait_for_bus: bool = False
) -> None:
    """Connect (with `wait_for_bus`, however long the bus takes to answer), start the service `make`
    builds on the connection, and run it until SIGTERM or SIGINT; traced as `service` when
    FORSETI_OTLP_ENDPOINT is set."""
    tracing.configure_from_env(service)

    async def go() -> None:
        client = await _connected(bus, wait=wait_for_bus)
        try:
            service = make(client)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await service.start()
            if ready:
                err.print(ready)
            try:
                await stop.wait()
            finally:
                await service.stop()
        finally:
            await client.close()

    try:
        run_loop(go())
    finally:
        tracing.disable()


def _s3_store(url: str | None) -> S3ObjectStore | None:
    """The S3 store a consumer reads `s3://` announcements from; exit 1 on a URL that names none."""
    from forseti.adapters.objects import S3ObjectStore

    if not url:
        return None
    try:
        return S3ObjectStore(url)
    except ValueError as exc:
        raise _fail(f"invalid --object-store-url: {exc}") from exc


def _handlers(specs: list[str]) -> list[Handler]:
    try:
        return [load_handler(s) for s in specs] if specs else installed_handlers()
    except (ImportError, ValueError) as exc:
        raise _fail(f"cannot load handler: {exc}") from exc


@app.command("worker")
def worker_cmd(
    bus: BusOpt = DEFAULT_BUS_URL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    data_root: Annotated[
        Path | None, typer.Option(envvar="FORSETI_DATA_ROOT", help="Input files must lie here [<data-dir>/datasets].")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, envvar="FORSETI_CONCURRENCY", help="Jobs run at once.")] = 2,
    metrics_port: Annotated[
        int | None, typer.Option(envvar="FORSETI_METRICS_PORT", help="Serve /metrics and /healthz on this port.")
    ] = None,
    handler: Annotated[
        list[str],
        typer.Option(help="A handler as package.module:factory (repeatable); default: installed `forseti.handlers`."),
    ] = [],  # noqa: B006
    group: Annotated[
        str, typer.Option(envvar="FORSETI_GROUP", help="Workers of one group share tasks.")
    ] = "forseti-workers",
    worker_id: Annotated[
        str | None, typer.Option(envvar="FORSETI_WORKER_ID", help="Name in events and logs [host-pid].")
    ] = None,
    shutdown_grace: Annotated[
        float, typer.Option(envvar="FORSETI_SHUTDOWN_GRACE", help="Seconds running jobs get on SIGTERM.")
    ] = 30.0,
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty and nothing runs.")] = False,
    artifact_port: Annotated[
        int | None,
        typer.Option(envvar="FORSETI_ARTIFACT_PORT", help="Serve announced files over HTTP here (for Kafka)."),
    ] = None,
    artifact_host: Annotated[
        str, typer.Option(envvar="FORSETI_ARTIFACT_HOST", help="Address the artifact endpoint listens on.")
    ] = "127.0.0.1",
    artifact_advertise: Annotated[
        str | None,
        typer.Option(envvar="FORSETI_ARTIFACT_ADVERTISE", help="Host name others reach it by [artifact-host]."),
    ] = None,
    object_store_url: Annotated[
        str | None,
        typer.Option(
            envvar="FORSETI_OBJECT_STORE_URL",
            help="Share checkpoints here: s3://BUCKET/PREFIX?endpoint=URL, nats-object://BUCKET or none "
            "[the NATS bus's bucket forseti-checkpoints].",
        ),
    ] = None,
    signing_key: SigningKeyOpt = None,
    encryption_key_file: KeyFileOpt = None,
    operator_keys: Annotated[
        list[Path] | None,
        typer.Option(
            "--operator-keys",
            help="Public keys (PEM files or folders) of the operators whose signed privacy requests this worker "
            "serves (repeatable; FORSETI_OPERATOR_KEYS, comma-separated) [<data-dir>/keys when it holds a .pub].",
        ),
    ] = None,
    peer_keys: Annotated[
        list[Path] | None,
        typer.Option(
            "--peer-keys",
            help="Public keys (PEM files or folders) of other workers whose distributed jobs this worker joins, "
            "besides its own signing key's (repeatable; FORSETI_PEER_KEYS, comma-separated).",
        ),
    ] = None,
    replica_keys: Annotated[
        list[Path] | None,
        typer.Option(
            "--replica-keys",
            help="Public keys (PEM files or folders) of the llm-serve replicas and edge devices whose signed health "
            "reports judge rollouts; others are refused (repeatable; FORSETI_REPLICA_KEYS, comma-separated) "
            "[every report counts].",
        ),
    ] = None,
    rendezvous_host: Annotated[
        str,
        typer.Option(
            envvar="FORSETI_RENDEZVOUS_HOST",
            help="Address this worker's distributed jobs over several workers meet at: the host's address on the "
            "workers' own network.",
        ),
    ] = "127.0.0.1",
    log_json: LogJsonOpt = False,
) -> None:
    """Run a worker: take tasks for every installed handler, until SIGTERM."""
    setup_logging(json_lines=log_json)
    overrides: dict[str, Any] = {"worker_id": worker_id} if worker_id else {}
    settings = _settings(
        bus_url=bus,
        data_dir=data_dir,
        registry_url=registry_url,
        data_root=data_root,
        concurrency=concurrency,
        metrics_port=metrics_port,
        group=group,
        shutdown_grace=shutdown_grace,
        burst=burst,
        artifact_port=artifact_port,
        artifact_host=artifact_host,
        artifact_advertise=artifact_advertise,
        object_store_url=object_store_url,
        signing_key=signing_key,
        encryption_key_file=encryption_key_file,
        rendezvous_host=rendezvous_host,
        **overrides,
        **({"operator_keys": operator_keys} if operator_keys else {}),
        **({"peer_keys": peer_keys} if peer_keys else {}),
        **({"replica_keys": replica_keys} if replica_keys else {}),
    )
    _port_free(settings.metrics_port, settings.metrics_host, "--metrics-port")
    _port_free(settings.artifact_port, settings.artifact_host, "--artifact-port")
    try:
        run_loop(run_stack(settings, _handlers(handler)))
    except ForsetiError as exc:
        raise _fail(exc.message) from exc


def read_task_file(path: str, kind: TaskKind | None) -> TaskBase:
    """A task from a file (or `-`): a whole CloudEvent, or just its `data` with `--kind`."""
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _fail(f"{path}: a task is a JSON object, not {type(doc).__name__}")
    if "specversion" not in doc and kind is None:
        raise _fail(f"{path} holds a bare payload: say which kind with --kind")
    try:
        return as_task(doc, kind)[1]
    except InvalidTask as exc:
        raise _fail(f"{path}: {exc.message}") from exc


async def _client(url: str, user: str | None = None) -> Client:
    """A `forseti.client` Client on the connected bus, acting for `user`."""
    return Client(await _connected(url), user_id=user)


@app.command()
def submit(
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="Task JSON (a CloudEvent, or its data with --kind); - for stdin.")
    ],
    kind: Annotated[TaskKind | None, typer.Option(help="Task kind of a bare payload.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
    accept_timeout: Annotated[
        float,
        typer.Option(help="With --watch: give up (exit 3) when no worker takes the task within this many seconds."),
    ] = ACCEPT_TIMEOUT,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Publish a task and print its job id; with --watch, follow it: exit 0 completed, 1 failed, 2 cancelled,
    3 no worker took it, 5 refused."""
    task = read_task_file(file, kind)
    tracing.configure_from_env("forseti-client")

    async def go() -> int:
        async with await _client(bus, task.user_id) as forseti:
            job = await forseti.submit(task, accept_timeout=accept_timeout)
            print(job.job_id, flush=True)
            return int(await follow(job, console=err)) if watch else 0

    try:
        code = run_loop(go())
    finally:
        tracing.disable()  # sends the publish span before the command exits
    raise typer.Exit(code)


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job to follow.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
    accept_timeout: Annotated[
        float, typer.Option(help="Give up on a job no worker knows after this many seconds (exit 4).")
    ] = 10.0,
    user: UserOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Show a job's progress until it ends: exit 0 completed, 1 failed, 2 cancelled, 3 gave up, 4 no worker
    knows the job."""

    async def go() -> ExitCode:
        async with await _client(bus, user) as forseti:
            job = await forseti.job(job_id, accept_timeout=accept_timeout)
            return await follow(job, console=err, timeout=timeout)

    raise typer.Exit(int(run_loop(go())))


ENDED = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
"""The states a job does not leave."""


def _control(
    verb: Literal["cancel", "pause", "resume"],
    job_id: str,
    reason: str,
    user: str | None,
    bus: str,
    operator: Signer | None,
) -> None:
    """Send a control command for a job the workers know; say what happened and exit with the code that
    says it (0 sent to a live job, 1 it had ended, 3 no worker answered, 4 no worker knows it)."""

    async def go() -> ExitCode:
        async with await _client(bus, user) as forseti:
            send = {"cancel": forseti.cancel, "pause": forseti.pause, "resume": forseti.resume}[verb]
            try:
                status = await forseti.status(job_id)
            except UnknownJob:
                if verb != "cancel":
                    err.print(f"[red]unknown job[/red]: no worker knows job {job_id}; nothing to {verb}")
                    return ExitCode.UNKNOWN
                # workers remember a cancel for a job they have not taken: a task still queued is dropped
                await send(job_id, reason, operator=operator)
                err.print(
                    f"[yellow]unknown job[/yellow]: no worker knows job {job_id}; the cancel was sent, so a task "
                    "still queued under that id is dropped when a worker takes it"
                )
                return ExitCode.UNKNOWN
            except ClientTimeout as exc:
                await send(job_id, reason, operator=operator)
                err.print(f"[yellow]sent, unconfirmed[/yellow]: {exc.message}")
                return ExitCode.GAVE_UP
            if status.state in ENDED:
                err.print(f"job {job_id} already {status.state.value}: nothing to {verb}")
                return ExitCode.FAILED
            await send(job_id, reason, operator=operator)
            where = f" on {status.worker}" if status.worker else ""
            err.print(f"asked the workers to {verb} job {job_id} ({status.state.value}{where})")
            return ExitCode.COMPLETED

    raise typer.Exit(int(run_loop(go())))


# arguments carry an upper-case metavar: click's plain help shows them as {name} otherwise
JobArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job id.")]
ReasonOpt = Annotated[str, typer.Option(help="Why, for the job's history.")]
OperatorOpt = Annotated[
    bool,
    typer.Option(
        "--operator",
        help="Sign the command with the operator's key (--signing-key, else <data-dir>/keys/signing.key): workers "
        "that trust it obey it for any user's job.",
    ),
]


def _operator(asked: bool, signing_key: Path | None, data_dir: Path) -> Signer | None:
    """The operator's signer when `--operator` asks for one; an error when there is no key to sign with."""
    if not asked:
        return None
    signer = _signer(signing_key, data_dir)
    if signer is None:
        raise _fail("--operator needs a key to sign with: --signing-key, or forseti keys generate")
    return signer


@app.command()
def cancel(
    job_id: JobArg,
    reason: ReasonOpt = "cancelled from the command line",
    user: UserOpt = None,
    operator: OperatorOpt = False,
    signing_key: SigningKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Stop a job; it ends as cancelled (keeping its last checkpoint)."""
    _control("cancel", job_id, reason, user, bus, _operator(operator, signing_key, data_dir))


@app.command()
def pause(
    job_id: JobArg,
    reason: ReasonOpt = "",
    user: UserOpt = None,
    operator: OperatorOpt = False,
    signing_key: SigningKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Hold a running job at its next safe point."""
    _control("pause", job_id, reason, user, bus, _operator(operator, signing_key, data_dir))


@app.command()
def resume(
    job_id: JobArg,
    reason: ReasonOpt = "",
    user: UserOpt = None,
    operator: OperatorOpt = False,
    signing_key: SigningKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Let a paused job continue."""
    _control("resume", job_id, reason, user, bus, _operator(operator, signing_key, data_dir))


@app.command()
def jobs(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List the jobs in the registry (this machine's, or the shared one FORSETI_REGISTRY_URL names)."""

    async def go() -> None:
        store = _store(data_dir, registry_url)
        await store.open()
        try:
            rows = await store.list_jobs(state=state, limit=limit)
        finally:
            await store.close()
        if as_json:
            for row in rows:
                print(row.model_dump_json())
            return
        table = id_table("job", "kind", "state", "attempt", "worker", "error", "updated", ids=("job",))
        for row in rows:
            # a job whose worker died shows as such, not as running for ever
            shown = f"{row.state} (orphaned)" if row.orphaned() else row.state
            table.add_row(
                row.job_id, row.kind, shown, str(row.attempt), row.worker or "", row.error_code or "", row.updated_at
            )
        out.print(table)

    run_loop(go())


def capabilities_text(caps: Capabilities) -> str:
    """A worker's capabilities for people: who answered, what it runs, and each area's names on one line."""
    areas: dict[str, list[str]] = {}
    for cap in caps.capabilities:
        areas.setdefault(cap.area, []).append(cap.name)
    lines = [
        f"worker {caps.worker} (forseti {caps.version}) on {', '.join(caps.devices) or 'cpu'}: "
        f"running {caps.running_jobs} of {caps.concurrency} jobs",
        f"task kinds: {', '.join(k.value for k in caps.task_kinds) or 'none'}",
        *(f"{area}: {', '.join(names)}" for area, names in areas.items()),
    ]
    return "\n".join(lines)


@app.command()
def capabilities(
    kind: Annotated[TaskKind | None, typer.Option(help="Ask a worker that runs this task kind.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The worker's answer as JSON.")] = False,
    bus: BusOpt = DEFAULT_BUS_URL,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a worker.")] = 3.0,
) -> None:
    """Ask a worker what it can do (task kinds, algorithms, formats, devices)."""

    async def go() -> Capabilities:
        async with await _client(bus) as forseti:
            try:
                return await forseti.capabilities(kind, timeout=timeout)
            except ClientError as exc:
                raise _fail(exc.message) from exc

    caps = run_loop(go())
    if as_json:
        print(caps.model_dump_json(indent=2))
    else:
        out.print(capabilities_text(caps), highlight=False, soft_wrap=True)


@app.command()
def executor(
    env: Annotated[
        str,
        typer.Option(
            help="A gymnasium env id (forseti/EmailTriage-v0, CartPole-v1, ...), or a multi-agent one "
            "(forseti/TriageTeam-v0: each agent a sub-env)."
        ),
    ],
    executor_id: Annotated[str, typer.Option("--id", help="The executor's name: jobs send actions to it.")],
    num_envs: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="Sub-envs per session when the job does not ask (a multi-agent env: copies of the team).",
        ),
    ] = 1,
    max_sessions: Annotated[int, typer.Option(min=1, help="Sessions (RL jobs) served at once.")] = 64,
    max_sessions_per_client: Annotated[
        int | None, typer.Option(min=1, help="Sessions one client (worker) may hold [a quarter of --max-sessions].")
    ] = None,
    replica: Annotated[
        str | None,
        typer.Option(help="This replica's name among the executors of one --id (a random one by default)."),
    ] = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    log_json: LogJsonOpt = False,
) -> None:
    """Serve a gymnasium env to RL jobs: actions come in as events, observations go back, until SIGTERM.
    Executors started with one --id share its jobs: each session opens on one of them."""
    from forseti.envs.executor import EnvServer, gym_factory

    setup_logging(json_lines=log_json)

    def make(client: Bus) -> EnvServer:
        try:
            return EnvServer(
                client,
                executor_id,
                gym_factory(env),
                num_envs=num_envs,
                environment=env,
                max_sessions=max_sessions,
                max_sessions_per_client=max_sessions_per_client,
                replica=replica,
            )
        except Exception as exc:
            raise _fail(f"cannot make env {env!r}: {exc}") from exc

    _serve(bus, make, service="forseti-executor")


@app.command()
def up(
    bus: BusOpt = DEFAULT_BUS_URL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    concurrency: Annotated[int, typer.Option(min=1)] = 2,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics and /healthz on this port.")] = 9464,
    handler: Annotated[list[str], typer.Option(help="Extra handler package.module:factory.")] = [],  # noqa: B006
    executor_env: Annotated[str, typer.Option(help="Env the local executor 'local' serves ('' for none).")] = (
        "CartPole-v1"
    ),
    demo: Annotated[bool, typer.Option(help="Run the PPO demo job through the local executor.")] = True,
    registry: Annotated[
        EmbeddedRegistry,
        typer.Option(help="sqlite: a file under the data dir; postgres: a PostgreSQL server started under it."),
    ] = EmbeddedRegistry.SQLITE,
    nats_sync: Annotated[
        str | None,
        typer.Option(
            envvar="FORSETI_NATS_SYNC",
            help="How often the embedded nats-server fsyncs its store: 'always' (every write, before it is "
            "acknowledged) or a duration such as 30s; nats-server's default is 2m.",
        ),
    ] = None,
    log_json: LogJsonOpt = False,
) -> None:
    """Start the embedded stack: a local nats-server (when nothing answers at --bus), a worker, a local
    executor, and a PPO demo job through it."""
    from forseti.adapters import signing

    from .embedded import embedded_nats, embedded_registry

    setup_logging(json_lines=log_json)
    _port_free(metrics_port, WorkerSettings.model_fields["metrics_host"].default, "--metrics-port")
    handlers = _handlers(handler)
    # one host, one deployment key: the worker signs with it and consumers started with this data dir trust it
    signing.generate(data_dir / "keys")
    with ExitStack() as stack:
        try:
            registry_url = stack.enter_context(embedded_registry(registry, data_dir, console=err))
        except ForsetiError as exc:
            raise _fail(exc.message) from exc
        settings = _settings(
            bus_url=bus,
            data_dir=data_dir,
            concurrency=concurrency,
            metrics_port=metrics_port,
            registry_url=registry_url,
        )
        try:
            started = stack.enter_context(embedded_nats(bus, data_dir, sync=nats_sync))
        except ForsetiError as exc:
            raise _fail(exc.message) from exc
        where = "started" if started else "found"
        err.print(f"[bold]forseti {forseti_version()}[/bold]: {where} NATS at {bus}; data in {data_dir}")
        kinds = ", ".join(h.kind.value for h in handlers) or "none installed yet"
        err.print(f"worker task kinds: {kinds}")
        if metrics_port:
            err.print(f"metrics: http://127.0.0.1:{metrics_port}/metrics  health: /healthz")
        err.print(
            "next, in another terminal:\n"
            f"  forseti capabilities --bus {bus}\n"
            f"  forseti submit examples/dqn_email_triage.json --kind rl --watch --bus {bus}\n"
            "stop with Ctrl-C"
        )
        run_loop(run_stack(settings, handlers, executor_env=executor_env or None, demo=demo, console=err))


@app.command("demo-files")
def demo_files(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    data_root: Annotated[
        Path | None, typer.Option(envvar="FORSETI_DATA_ROOT", help="The worker's data root [<data-dir>/datasets].")
    ] = None,
    llm: Annotated[
        bool,
        typer.Option("--llm/--no-llm", help="Also build the tiny Llama that docs/llm.md fine-tunes (needs torch)."),
    ] = True,
) -> None:
    """Put the data the docs' examples use into the worker's data root: cancer.csv and new_patients.csv
    (docs/training.md), feedback/november.jsonl and a tiny Llama built locally as models/tiny-llama
    (docs/llm.md). Files already there are kept."""
    from ..demo import build_demo_llama, write_demo_files

    root = data_root or data_dir / "datasets"
    for path in write_demo_files(root):
        err.print(f"data: {path}")
    if llm:
        try:
            folder = build_demo_llama(root)
        except ImportError as exc:
            raise _fail(f"the tiny Llama needs the llm extra (torch, transformers, tokenizers): {exc}") from exc
        err.print(f"model: {folder} (a tiny random Llama: base_model file://{folder.relative_to(root)})")
    err.print(f"tasks name these files relative to the data root, e.g. file://cancer.csv ({root})")


keys_app = typer.Typer(
    help="The ed25519 keys that sign model announcements.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    folder: Annotated[Path | None, typer.Option("--dir", help="Where to write the pair [<data-dir>/keys].")] = None,
    name: Annotated[str, typer.Option(help="File name of the pair: NAME.key and NAME.pub.")] = "signing",
) -> None:
    """Make a signing key pair (kept when it exists): the worker signs with NAME.key, consumers trust NAME.pub."""
    from forseti.adapters import signing

    private, public = signing.generate(folder or data_dir / "keys", name)
    out.print(f"private key: {private}  (workers: --signing-key or FORSETI_SIGNING_KEY; keep it secret)")
    out.print(f"public key:  {public}  (edge, llm-serve: --trusted-keys or FORSETI_TRUSTED_KEYS)")
    out.print(f"key id: {Signer.from_file(private).key_id}")


@keys_app.command("data-key")
def keys_data_key(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="The key file: made with one key, or given a new first key.")
    ],
) -> None:
    """Make an AES-256 key for encryption at rest, as the first line of FILE (mode 0600): it encrypts from
    now on, and the keys already in FILE stay to decrypt what they encrypted (key rotation)."""
    from forseti.adapters.encryption import new_key

    old = file.read_text() if file.is_file() else ""
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(file.with_name(file.name + ".partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(new_key() + "\n" + old)
    file.with_name(file.name + ".partial").replace(file)
    keyring = _keyring(file)
    assert keyring is not None
    out.print(f"{file}: encrypting key {keyring.key_id}, {len(keyring.keys)} key(s) in all")


privacy_app = typer.Typer(
    rich_markup_mode=PLAIN_HELP,
    help="The GDPR rights for a user's data: export, erase, rectify (requests signed by an operator key).",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")
PrivacyUserOpt = Annotated[str, typer.Option("--user", help="Whose data: the user_id their tasks named.")]
QuietOpt = Annotated[
    float, typer.Option(help="Seconds to wait for more receipts after one arrives (each worker sends one).")
]
PrivacyTimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the first receipt.")]


def _run_privacy(
    request: PrivacyRequest,
    *,
    bus: str,
    signer: Signer | None,
    quiet: float,
    timeout: float,
    as_json: bool,
    after: Callable[[Bus, list[PrivacyReceipt]], Awaitable[None]] | None = None,
) -> None:
    """Send a privacy request, show the receipts, run `after` with them; exit 1 when no worker
    answered or one could not serve it."""
    from .privacy import ask

    if signer is None:
        raise _fail(
            "a privacy request must be signed by an operator key: --signing-key, or <data-dir>/keys/signing.key "
            "(forseti keys generate), whose public key the workers trust (FORSETI_OPERATOR_KEYS)"
        )

    async def go() -> list[PrivacyReceipt]:
        client = await _connected(bus)
        try:
            receipts = await ask(client, request, signer, quiet=quiet, timeout=timeout)
            if after is not None and receipts and not any(r.error for r in receipts):
                await after(client, receipts)
            return receipts
        except ForsetiError as exc:
            raise _fail(exc.message) from exc
        finally:
            await client.close()

    receipts = run_loop(go())
    if as_json:
        for receipt in receipts:
            out.print_json(receipt.model_dump_json())
    else:
        table = id_table("worker", "part", "found", "removed", "kept", "marked / retrains", "error", ids=("worker",))
        for r in receipts:
            table.add_row(
                r.worker, "shared + disk" if r.shared else "disk", _counts(r.found), _counts(r.removed),
                "\n".join(r.kept), " ".join(r.marked or r.retrains), r.error or "",
            )  # fmt: skip
        out.print(table)
    if not receipts:
        raise _fail(f"no worker answered privacy request {request.request_id} within {timeout:g}s")
    if any(r.error for r in receipts):
        raise typer.Exit(1)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{place} {n}" for place, n in sorted(counts.items())) or "-"


def _privacy_id() -> str:
    return f"privacy-{uuid.uuid4().hex[:12]}"


@privacy_app.command("export")
def privacy_export(
    user: PrivacyUserOpt,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="The archive to write [forseti-export-<request id>.tar.gz].")
    ] = None,
    requested_by: Annotated[str | None, typer.Option(help="Who asks, for the audit record.")] = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    signing_key: SigningKeyOpt = None,
    encryption_key_file: KeyFileOpt = None,
    object_store_url: ArtifactStoreOpt = None,
    quiet: QuietOpt = 3.0,
    timeout: PrivacyTimeoutOpt = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="The receipts as JSON.")] = False,
) -> None:
    """Gather everything held for a user (registry rows, datasets, checkpoints, artifacts, kept
    announcements) into one archive with a manifest."""
    from .privacy import gather_export

    request = PrivacyExport(request_id=_privacy_id(), user_id=user, requested_by=requested_by)
    target = out_file or Path(f"forseti-export-{request.request_id}.tar.gz")
    objects, keyring = _s3_store(object_store_url), _keyring(encryption_key_file)

    async def merge(client: Bus, receipts: list[PrivacyReceipt]) -> None:
        manifest = await gather_export(client, receipts, target, objects=objects, keyring=keyring)
        err.print(f"{target}: {len(manifest['parts'])} part(s), manifest.json inside")

    signer = _signer(signing_key, data_dir)
    _run_privacy(request, bus=bus, signer=signer, quiet=quiet, timeout=timeout, as_json=as_json, after=merge)


@privacy_app.command("erase")
def privacy_erase(
    user: PrivacyUserOpt,
    requested_by: Annotated[str | None, typer.Option(help="Who asks, for the audit record.")] = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    signing_key: SigningKeyOpt = None,
    quiet: QuietOpt = 3.0,
    timeout: PrivacyTimeoutOpt = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="The receipts as JSON.")] = False,
) -> None:
    """Delete everything held for a user on every worker's disk, in the registry, the object stores and the
    bus's kept history; mark other users' models trained on it."""
    request = PrivacyErase(request_id=_privacy_id(), user_id=user, requested_by=requested_by)
    signer = _signer(signing_key, data_dir)
    _run_privacy(request, bus=bus, signer=signer, quiet=quiet, timeout=timeout, as_json=as_json)


@privacy_app.command("rectify")
def privacy_rectify(
    user: PrivacyUserOpt,
    dataset: Annotated[str, typer.Option(help="The dataset to replace, as the user's tasks named it.")],
    replacement: Annotated[str, typer.Option("--with", help="The corrected file, under the data root.")],
    requested_by: Annotated[str | None, typer.Option(help="Who asks, for the audit record.")] = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    signing_key: SigningKeyOpt = None,
    quiet: QuietOpt = 3.0,
    timeout: PrivacyTimeoutOpt = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="The receipts as JSON.")] = False,
) -> None:
    """Put a corrected file in the place of a dataset the user's tasks named, and train each of those
    tasks again (new jobs); the models trained on the old data are marked."""
    request = PrivacyRectify(
        request_id=_privacy_id(), user_id=user, requested_by=requested_by, dataset=dataset, replacement=replacement
    )
    signer = _signer(signing_key, data_dir)
    _run_privacy(request, bus=bus, signer=signer, quiet=quiet, timeout=timeout, as_json=as_json)


@privacy_app.command("audit")
def privacy_audit(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
) -> None:
    """The audit records of privacy requests: what was asked, when, by whom, and the counts (never the data)."""

    async def work(store: Any, _: Any) -> None:
        table = id_table(
            "when", "request", "kind", "part", "user (sha256)", "requested by", "summary", ids=("request",)
        )
        for row in await store.list_privacy(limit=limit):
            summary = ", ".join(f"{k} {_counts(v) if isinstance(v, dict) else v}" for k, v in row.summary.items() if v)
            table.add_row(
                row.created_at, row.request_id, row.kind, row.part, row.user_hash[:16], row.requested_by or "", summary
            )
        out.print(table)

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), None, work))


@app.command()
def encrypt(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="The file to encrypt (a dataset to put in the data root).")
    ],
    encryption_key_file: KeyFileOpt = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here instead of replacing FILE.")] = None,
) -> None:
    """Encrypt a file under the data key (AES-256-GCM): a worker holding the key reads it as a dataset as
    if it were plain, one without it refuses it."""
    from forseti.adapters.encryption import encrypted

    keyring = _keyring(encryption_key_file)
    if keyring is None:
        raise _fail("no data key: --encryption-key-file, or FORSETI_ENCRYPTION_KEY (forseti keys data-key FILE)")
    if not file.is_file():
        raise _fail(f"no file {file}")
    if encrypted(file):
        raise _fail(f"{file} is encrypted already")
    target = out_file or file
    partial = target.with_name(target.name + ".partial")
    keyring.encrypt(file, partial)
    partial.replace(target)
    out.print(f"{target}: encrypted under key {keyring.key_id}")


models_app = typer.Typer(
    help="Registered model versions and their aliases.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
)
app.add_typer(models_app, name="models")
AliasOpt = Annotated[str, typer.Option(help="The alias to move (MLflow style: production, staging, ...).")]


async def _with_store_and_bus(store: RegistryStore, bus: str | None, work: Any) -> Any:
    await store.open()
    client = await _connected(bus) if bus is not None else None
    try:
        return await work(store, client)
    except ForsetiError as exc:
        raise _fail(exc.message) from exc
    finally:
        if client is not None:
            await client.close()
        await store.close()


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Only versions of this model name.")] = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
) -> None:
    """List model versions in this machine's registry, with their lineage."""
    from ..engine.models import version_label

    async def work(store: Any, _: Any) -> None:
        rows = await store.list_models(name=name, limit=limit)
        by_id = {row.id: row for row in rows}
        table = id_table("name", "version", "model id", "kind", "format", "parent", "created", ids=("model id",))
        for row in rows:
            parent = by_id.get(row.parent_id or "")
            parent_label = version_label(parent) if parent else (row.parent_id or "")
            table.add_row(
                row.name, version_label(row), row.id, row.model_type, row.export_format, parent_label, row.created_at
            )
        out.print(table)

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), None, work))


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="Version label (v1.1) or number.")],
    alias: AliasOpt = "production",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    artifact_url: Annotated[
        str | None,
        typer.Option(
            help="Without an object store (Kafka): the artifact endpoint of the worker that serves this data "
            "dir (http://HOST:PORT/artifacts/, its --artifact-port), so other hosts can fetch what is announced "
            "(an --object-store-url comes first)."
        ),
    ] = None,
    object_store_url: ArtifactStoreOpt = None,
    signing_key: SigningKeyOpt = None,
    encryption_key_file: KeyFileOpt = None,
) -> None:
    """Point an alias at a version and announce its artifacts (model.available with the alias)."""
    from ..engine.models import promote, version_label

    http = (data_dir / "artifacts", artifact_url.rstrip("/") + "/") if artifact_url else None
    objects = _s3_store(object_store_url)
    signer = _signer(signing_key, data_dir)
    keyring = _keyring(encryption_key_file)

    async def work(store: Any, client: Bus) -> None:
        model = await promote(
            store, client, name, version, alias=alias, objects=objects, http=http, signer=signer, keyring=keyring
        )
        err.print(f"{name} {alias} -> {version_label(model)} ({model.id})")

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), bus, work))


@models_app.command("compare")
def models_compare(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    first: Annotated[str, typer.Argument(metavar="A", help="A version (number or label).")],
    second: Annotated[str, typer.Argument(metavar="B", help="Another version.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
) -> None:
    """Two versions side by side: their registered metrics, and the evaluation gates that compared them
    (champion against challenger on the same held-out rows)."""
    from ..engine.models import find_version, version_label

    async def work(store: Any, _: Any) -> None:
        a, b = await find_version(store, name, first), await find_version(store, name, second)
        verdicts = [v for v in await store.list_evaluations([a.id, b.id]) if {v.model_id, v.against_id} == {a.id, b.id}]
        if as_json:
            doc = {
                "versions": [m.model_dump(mode="json", include={"id", "version", "label", "metrics"}) for m in (a, b)],
                "evaluations": [v.model_dump(mode="json") for v in verdicts],
            }
            out.print_json(orjson.dumps(doc).decode())
            return
        metrics = Table("metric", f"{name} {version_label(a)}", f"{name} {version_label(b)}")
        for key in sorted(set(a.metrics) | set(b.metrics)):
            metrics.add_row(key, *(f"{m.metrics[key]:.6g}" if key in m.metrics else "-" for m in (a, b)))
        out.print(metrics)
        gates = Table("alias", "challenger", "champion", "metric", "challenger score", "champion score", "verdict")
        label = {a.id: version_label(a), b.id: version_label(b)}
        for v in verdicts:
            gates.add_row(
                v.alias, label[v.model_id], label.get(v.against_id or "", "-"), v.metric, f"{v.value:.4f}",
                "-" if v.against_value is None else f"{v.against_value:.4f}",
                ("promoted: " if v.promoted else "kept out: ") + v.reason,
            )  # fmt: skip
        out.print(gates if verdicts else f"no evaluation gate compared {name} {first} and {second}")

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), None, work))


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    alias: AliasOpt = "production",
    reason: ReasonOpt = "rolled back from the command line",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    bus: BusOpt = DEFAULT_BUS_URL,
    signing_key: SigningKeyOpt = None,
) -> None:
    """Return an alias to the version it pointed at before, and announce it (model.rollback)."""
    from ..engine.models import rollback

    signer = _signer(signing_key, data_dir)

    async def work(store: Any, client: Bus) -> None:
        event = await rollback(store, client, name, alias=alias, reason=reason, signer=signer)
        err.print(f"{name} {alias}: {event.from_version} -> {event.to_version} ({event.model_id})")

    run_loop(_with_store_and_bus(_store(data_dir, registry_url), bus, work))


@app.command("llm-serve")
def llm_serve(
    name: Annotated[
        str, typer.Option(help="The model (adapter) name to serve; completions on forseti.llm.NAME.complete.")
    ],
    artifact: Annotated[
        str, typer.Option(help="Which export to load: f32, f16, q8_0, q4_0, q4_k_m, or lora (LoRA GGUF on its base).")
    ] = "f16",
    alias: Annotated[
        str | None, typer.Option(help="Only load versions promoted to this alias (default: every new version).")
    ] = None,
    consumer: Annotated[str | None, typer.Option(help="Name in model.loaded reports [llm-HOST-PID].")] = None,
    context: Annotated[int, typer.Option(min=16, help="Context length in tokens.")] = 512,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for llama.cpp.")] = 2,
    health_every: HealthEveryOpt = 10.0,
    signing_key: ReportKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bus: BusOpt = DEFAULT_BUS_URL,
    object_store_url: ArtifactStoreOpt = None,
    trusted_keys: TrustedKeysOpt = None,
    encryption_key_file: KeyFileOpt = None,
    log_json: LogJsonOpt = False,
) -> None:
    """Serve completions of a fine-tuned model with llama.cpp, hot-swapping announced versions, until SIGTERM.
    Files announced in the NATS object store (or, on Kafka, an S3 store) are downloaded under DATA_DIR/fetched."""
    from ..services.llm_serve import LlmService

    setup_logging(json_lines=log_json)
    objects = _s3_store(object_store_url)
    trusted = _trusted(trusted_keys, data_dir)
    keyring = _keyring(encryption_key_file)
    signer = _signer(signing_key, data_dir)

    def make(client: Bus) -> LlmService:
        try:
            return LlmService(
                client,
                name=name,
                consumer=consumer or f"llm-{socket.gethostname()}-{os.getpid()}",
                artifact=artifact,
                alias=alias,
                context=context,
                threads=threads,
                cache=data_dir / "fetched",
                objects=objects,
                trusted=trusted,
                keyring=keyring,
                health_every=health_every,
                signer=signer,
            )
        except ForsetiError as exc:
            raise _fail(exc.message) from exc

    _serve(
        bus,
        make,
        service="forseti-llm-serve",
        ready=f"llm-serve {name}: loads announced {artifact} versions; answers on {llm_channel(name)}",
    )


def _ask(bus: str, channel: str, request: Strict, *, timeout: float, service: str) -> Any:
    """One request to a service over the bus; the reply's data, or exit 1 when no service answers in time."""

    async def go() -> Any:
        client = await _connected(bus)
        try:
            return decode(await client.request(channel, encode(request), timeout=timeout)).data
        except RequestTimeout as exc:
            raise _fail(f"no {service} answered on {channel} ({bus}) within {timeout:g}s") from exc
        finally:
            await client.close()

    return run_loop(go())


@app.command("infer-serve")
def infer_serve(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    registry_url: RegistryOpt = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests per onnxruntime call at most.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a batch waits for more requests after its first (0: never).")
    ] = 0.0,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per model.")] = 1,
    bus: BusOpt = DEFAULT_BUS_URL,
    log_json: LogJsonOpt = False,
) -> None:
    """Serve streaming inference of registered ONNX models on forseti.infer.MODEL_ID, micro-batched, until SIGTERM."""
    from forseti.adapters.inference import ModelCache

    from ..services.infer_serve import InferenceService

    setup_logging(json_lines=log_json)
    store = _store(data_dir, registry_url)

    class WithStore:
        def __init__(self, service: InferenceService) -> None:
            self.service = service

        async def start(self) -> None:
            await store.open()
            await self.service.start()

        async def stop(self) -> None:
            await self.service.stop()
            await store.close()

    def make(client: Bus) -> WithStore:
        cache = ModelCache(threads=threads)
        return WithStore(InferenceService(client, store, cache=cache, max_batch=max_batch, max_wait_ms=max_wait_ms))

    _serve(
        bus,
        make,
        service="forseti-infer-serve",
        ready=f"infer-serve: answers on {infer_channel('MODEL_ID')} (batches of {max_batch} at most)",
    )


@app.command()
def edge(
    device_id: Annotated[str, typer.Option(help="This device's id: it serves on forseti.edge.DEVICE_ID.infer.")],
    tag: Annotated[
        list[str] | None,
        typer.Option(help="A tag of this device: take models announced for it (a task's device_tags; repeatable)."),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(help="Also take models of this kind announced for no device or tag (repeatable)."),
    ] = None,
    name: Annotated[
        list[str] | None,
        typer.Option(help="Also take models of this name announced for no device or tag (repeatable)."),
    ] = None,
    quantization: Annotated[
        str | None, typer.Option(help="Take the int8-quantised exports (int8) instead of the float ones.")
    ] = None,
    llm: Annotated[
        list[str] | None, typer.Option(help="Also serve this fine-tuned LLM's GGUF versions (repeatable).")
    ] = None,
    llm_artifact: Annotated[
        str, typer.Option(help="Which GGUF of an LLM to load: f32, f16, q8_0, q4_0, q4_k_m or lora.")
    ] = "q8_0",
    alias: Annotated[
        str | None,
        typer.Option(
            help="Only take versions promoted to this alias, and take part in its rolling rollouts across this "
            "device's tags (default: every version meant for the device)."
        ),
    ] = None,
    health_every: HealthEveryOpt = 10.0,
    signing_key: ReportKeyOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per model.")] = 1,
    bus: BusOpt = DEFAULT_BUS_URL,
    object_store_url: ArtifactStoreOpt = None,
    trusted_keys: TrustedKeysOpt = None,
    encryption_key_file: KeyFileOpt = None,
    log_json: LogJsonOpt = False,
) -> None:
    """The edge agent: fetch, verify, hot-swap and serve the ONNX models meant for this device, until SIGTERM."""
    from forseti.schemas.catalog import edge_channel

    from ..services.edge import EdgeAgent

    setup_logging(json_lines=log_json)
    objects = _s3_store(object_store_url)
    trusted = _trusted(trusted_keys, data_dir)
    keyring = _keyring(encryption_key_file)
    signer = _signer(signing_key, data_dir)

    def make(client: Bus) -> EdgeAgent:
        return EdgeAgent(
            client,
            device_id=device_id,
            data_dir=data_dir,
            tags=set(tag or ()),
            kinds=set(kind or ()),
            names=set(name or ()),
            quantization=quantization,
            threads=threads,
            llms=set(llm or ()),
            llm_artifact=llm_artifact,
            objects=objects,
            trusted=trusted,
            keyring=keyring,
            alias=alias,
            health_every=health_every,
            signer=signer,
        )

    # a device may boot before its network or its broker: it waits for the bus instead of exiting
    ready = f"edge {device_id}: follows forseti.models; answers on {edge_channel(device_id)}"
    _serve(bus, make, service="forseti-edge", ready=ready, wait_for_bus=True)


@app.command()
def infer(
    model_id: Annotated[str, typer.Argument(metavar="MODEL_ID", help="The registry id of the model.")],
    rows: Annotated[
        str, typer.Argument(metavar="ROWS", help='The rows as JSON, e.g. \'[{"f0": 1.5, "colour": "red"}]\'.')
    ],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an infer-serve.")] = 10.0,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Ask an infer-serve for predictions on a few rows and print them as JSON."""
    from forseti.schemas.inference import InferError, InferReply, InferRequest

    try:
        request = InferRequest.model_validate({"rows": orjson.loads(rows)})
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise _fail(f"rows must be a JSON list of objects: {exc}") from exc

    answer: InferReply | InferError = _ask(
        bus, infer_channel(model_id), request, timeout=timeout, service="infer-serve"
    )
    if isinstance(answer, InferError):
        raise _fail(f"{answer.code}: {answer.message}")
    print(orjson.dumps(answer.outputs).decode())


@app.command()
def complete(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The model name an llm-serve serves.")],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The text to continue.")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy.")] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service.")] = 30.0,
    bus: BusOpt = DEFAULT_BUS_URL,
) -> None:
    """Ask an llm-serve for a completion and print it."""
    from forseti.schemas.llm import CompleteReply, CompleteRequest, LlmError

    request = CompleteRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature)
    answer: CompleteReply | LlmError = _ask(bus, llm_channel(name), request, timeout=timeout, service="llm-serve")
    if isinstance(answer, LlmError):
        raise _fail(f"{answer.code}: {answer.message}")
    err.print(f"[dim]{name} {answer.version} ({answer.model_id}), {answer.completion_tokens} tokens[/dim]")
    print(answer.text)


def version_callback(value: bool) -> None:
    """Print the version and exit."""
    if value:
        print(forseti_version())
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Forseti: an event-driven ML / RL worker on NATS or Kafka."""


def main() -> None:
    """Entry point of the `forseti` command."""
    app()
