"""Worker settings: keyword arguments, `FORSETI_*` environment variables, or CLI flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forseti.adapters.encryption import Keyring
from forseti.adapters.signing import PRIVATE_KEY, Signer, TrustedKeys, configured_keys, key_id

DEFAULT_BUS_URL = "nats://127.0.0.1:4222"
"""The embedded default: the nats-server that `forseti up` starts."""


def default_data_dir() -> Path:
    """`~/.forseti`, where the embedded stack keeps its registry, checkpoints and NATS store."""
    return Path.home() / ".forseti"


class WorkerSettings(BaseSettings):
    """How one worker runs."""

    model_config = SettingsConfigDict(env_prefix="FORSETI_", extra="forbid", use_attribute_docstrings=True)

    bus_url: str = DEFAULT_BUS_URL
    """memory://, nats://host:4222 or kafka://host:9092 (query parameters set transport knobs)."""
    data_dir: Path = Field(default_factory=default_data_dir)
    """Registry, checkpoints and job work folders live here."""
    data_root: Path | None = None
    """Input files (`file://` URIs) are confined to this folder; `<data_dir>/datasets` when unset."""
    registry_url: str | None = None
    """Registry store: `sqlite:///PATH`, or `postgresql://user:password@host:5432/db` for workers on many
    hosts sharing one job state; `<data_dir>/registry.db` (SQLite) when unset."""
    object_store_url: str | None = None
    """Where checkpoints are shared so another worker can resume a job: `s3://bucket/prefix?endpoint=URL`
    (credentials from the AWS_* variables), `nats-object://BUCKET`, or `none` (local disk only); on NATS
    the bus's own object store (bucket `forseti-checkpoints`) when unset."""
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Name in job events and logs."""
    group: str = "forseti-workers"
    """Consumer group: workers of one group share tasks."""
    concurrency: int = Field(default=2, ge=1, le=1024)
    """Jobs run at once."""
    max_task_bytes: int = Field(default=512 * 1024, ge=1024, le=700 * 1024)
    """Larger task messages are refused to the dead-letter channel. At most 700 KiB: the dead-letter
    record carries the original base64-encoded and must fit the brokers' default 1 MB message."""
    poll_interval: float = Field(default=1.0, gt=0)
    """Seconds one intake poll waits for a task."""
    heartbeat_interval: float = Field(default=10.0, gt=0)
    """Seconds between 'still working' signals for a running task (keep under the bus's ack_wait); each
    also renews the job's lease in the registry."""
    lease_ttl: float = Field(default=30.0, gt=0)
    """Seconds a job's lease lasts unless renewed: once a worker dies, its job waits this long before
    another delivery may take it over. At least twice `heartbeat_interval`."""
    retry_delay: float = Field(default=5.0, ge=0)
    """Seconds before a task that failed with a retriable error is delivered again."""
    max_attempts: int = Field(default=5, ge=1)
    """Deliveries before a retriable failure becomes final."""
    stray_sweep_interval: float = Field(default=30.0, gt=0)
    """Seconds between sweeps that dead-letter tasks stored on channels no kind owns (a typo such as
    `forseti.tasks.trainig`), which the bus would otherwise keep for ever."""
    otlp_endpoint: str | None = None
    """Trace jobs with OpenTelemetry: the OTLP/HTTP collector's base URL (`http://collector:4318`); spans
    go to `<url>/v1/traces` and every event carries its W3C `traceparent`. Unset: no tracing, at no cost."""
    trace_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """With tracing on: the share of the jobs whose tasks came without a trace that are traced (a task
    that carries a `traceparent` follows its sender's choice)."""
    schedules: bool = True
    """Fire the registry's schedules from this worker (with every other worker that does; each slot
    fires once) and answer schedule requests on `forseti.schedules`."""
    schedule_poll: float = Field(default=1.0, gt=0)
    """Seconds between reads of the schedules; a slot known to be due sooner wakes the scheduler then."""
    rollouts: bool = True
    """Judge and move the registry's rollouts from this worker (with every other worker that does; each
    move is made once), from the health reports of the replicas serving them."""
    rollout_poll: float = Field(default=1.0, gt=0)
    """Seconds between two looks at the rollouts going on."""
    max_duration: float | None = Field(default=None, gt=0)
    """Seconds a job may take from its first start, across attempts, before it is stopped at its next
    safe point and failed as `timeout` (a task's own `max_duration` may lower it); unset: no limit."""
    max_job_memory_mb: int | None = Field(default=None, ge=1)
    """MiB one job may plan for its network and buffers (checked before they exist, refused as
    `resource_exhausted`); unset: half this host's memory."""
    isolation: Literal["process", "thread"] = "process"
    """Where jobs' heavy work runs: `process`, in warm child processes of the worker (spawned, reused),
    so a segfault, an out-of-memory kill or a runaway job ends that job alone; `thread`, in threads
    of the worker itself (no start-up cost, no isolation)."""
    job_threads: int | None = Field(default=None, ge=1, le=1024)
    """Torch CPU threads per job in a child process; unset: this host's cores over `concurrency`."""
    stop_grace: float = Field(default=2.0, gt=0)
    """Seconds a job asked to cancel or past its max_duration may take to reach a safe point before
    its child process is killed."""
    max_crashes: int = Field(default=3, ge=1)
    """Attempts that may end with their worker gone (killed, out of memory, crashed) before the task is
    taken for poison: dead-lettered and failed as `retries_exhausted`, not run on another worker."""
    shutdown_grace: float = Field(default=30.0, ge=0)
    """On SIGTERM, seconds running jobs may take to finish before they are stopped and handed back."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve /metrics and /healthz on this port (0 picks a free one)."""
    metrics_host: str = "127.0.0.1"
    """Address for /metrics and /healthz."""
    artifact_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve announced files over HTTP on this port (0 picks a free one), for buses without an object
    store (Kafka): announcements then carry http:// URIs other hosts can fetch."""
    artifact_host: str = "127.0.0.1"
    """Address the artifact endpoint listens on."""
    artifact_advertise: str | None = None
    """Host name other machines reach the artifact endpoint by (default: `artifact_host`)."""
    signing_key: Path | None = None
    """The ed25519 private key (PEM) that signs this worker's model announcements; unset:
    `<data_dir>/keys/signing.key` when that file exists (`forseti keys generate`, `forseti up`), else
    announcements go out unsigned."""
    operator_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """ed25519 public keys (PEM files, or folders of `*.pub`) of the operators: a privacy request, or a
    control event or status query for another user's job, is honoured when one of them signed it;
    unset: `<data_dir>/keys` when it holds a public key, else none (privacy requests are refused).
    In the environment: paths separated by commas."""
    peer_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """ed25519 public keys (PEM files, or folders of `*.pub`) of the other workers whose distributed
    jobs this worker joins, besides its own signing key's (workers sharing one key need none). In the
    environment: paths separated by commas."""
    replica_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """ed25519 public keys (PEM files, or folders of `*.pub`) of the llm-serve replicas and edge devices
    whose health reports judge rollouts: reports not signed by one of them are refused; unset: every
    report counts (anyone on the bus can sway a rollout). In the environment: paths separated by commas."""
    rendezvous_host: str = "127.0.0.1"
    """Address this worker's distributed jobs spread over several workers meet at: their rendezvous
    store listens there, and the other workers (and their ranks) must reach it. Give the host's
    address on the workers' own network: torch's store takes anyone who connects."""
    encryption_key: SecretStr | None = None
    """Base64 AES-256 key(s), comma-separated, the first of which encrypts: announced artifacts and
    shared checkpoints are then stored encrypted (docs/security.md); unset: stored as they are."""
    encryption_key_file: Path | None = None
    """A file of such keys, one per line (after `encryption_key`'s, when both are set)."""
    burst: bool = False
    """Exit once no task arrives within one poll and nothing is running (for tests and batch runs)."""

    @field_validator("operator_keys", "peer_keys", "replica_keys", mode="before")
    @classmethod
    def _paths_separated_by_commas(cls, value: object) -> object:
        return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> WorkerSettings:
        if self.lease_ttl < 2 * self.heartbeat_interval:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl:g}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval:g}s), or one late renewal would hand a live job to another worker"
            )
        return self

    @model_validator(mode="after")
    def _object_store_url_is_known(self) -> WorkerSettings:
        url = self.object_store_url
        if url and url != "none":
            if url.startswith("s3://"):
                from forseti.adapters.objects import S3ObjectStore

                S3ObjectStore(url)  # raises on a malformed URL, before the worker connects anywhere
            elif not url.startswith("nats-object://"):
                raise ValueError(
                    f"unsupported object store URL {url!r}: "
                    "use s3://BUCKET/PREFIX?endpoint=URL, nats-object://BUCKET or none"
                )
        return self

    @property
    def registry(self) -> str:
        """The registry store URL in force."""
        return self.registry_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def signing_key_path(self) -> Path | None:
        """The signing key in force: `signing_key`, else the data dir's when it has one."""
        default = self.data_dir / "keys" / PRIVATE_KEY
        return self.signing_key or (default if default.is_file() else None)

    def operators(self) -> TrustedKeys | None:
        """The operators' keys in force (None: there are none)."""
        return configured_keys(self.operator_keys, self.data_dir / "keys")

    def peers(self) -> TrustedKeys | None:
        """The keys whose signed join requests this worker acts on: its own signing key's and
        `peer_keys` (None: it has neither, and joins no other worker's job)."""
        keys = TrustedKeys.from_paths(self.peer_keys) if self.peer_keys else TrustedKeys([])
        own = self.signing_key_path
        if own is not None:
            public = Signer.from_file(own).private.public_key()
            keys.keys[key_id(public)] = public
        return keys if keys.keys else None

    def replicas(self) -> TrustedKeys | None:
        """The keys health reports must be signed by (None: `replica_keys` unset, every report counts)."""
        return TrustedKeys.from_paths(self.replica_keys) if self.replica_keys else None

    def keyring(self) -> Keyring | None:
        """The encryption keys in force (None: nothing is encrypted)."""
        value = self.encryption_key.get_secret_value() if self.encryption_key else None
        return Keyring.load(value=value, file=self.encryption_key_file)

    @property
    def threads_per_job(self) -> int:
        """Torch CPU threads a job's child process gets: `job_threads`, or the cores shared out."""
        return self.job_threads or max(1, (os.cpu_count() or 1) // self.concurrency)

    @property
    def inputs_root(self) -> Path:
        """The folder input URIs are confined to."""
        return self.data_root or self.data_dir / "datasets"
