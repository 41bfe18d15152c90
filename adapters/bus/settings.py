"""Transport settings, read from the bus URL's query string (`nats://host:4222?ack_wait=5`)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from forseti.adapters.urls import redact
from forseti.schemas.errors import BusError


@dataclass(frozen=True, kw_only=True)
class BusSettings:
    """Knobs shared by the transports; each ignores the ones it has no use for."""

    ack_wait: float = 30.0
    """Seconds a taken task may go without an ack or a heartbeat before it is delivered again."""
    max_deliver: int = 10
    """Deliveries of one task before the server gives up on it (NATS)."""
    partitions: int = 8
    """Partitions for topics Forseti creates (Kafka)."""
    session_timeout_ms: int = 10_000
    """Consumer-group session timeout (Kafka)."""
    heartbeat_interval_ms: int = 1_000
    """Consumer-group heartbeat (Kafka)."""
    idempotence: bool = False
    """Idempotent producing (Kafka): a retried send is stored once. Off by default because Tansu, the
    embedded broker, does not answer InitProducerId; turn it on (`?idempotence=true`) on a Kafka cluster."""
    fetch_max_wait_ms: int = 20
    """How long the broker may hold a fetch open when it has no data (Kafka), on the hot request-reply
    paths: reply topics and the env, LLM and inference request channels. It bounds their latency, at
    the cost of more idle fetches (aiokafka's default, 500, adds up to half a second)."""
    background_fetch_max_wait_ms: int = 100
    """The same for every other consumer (tasks, progress, control, models, capabilities, status):
    their latency matters less than the broker CPU that a dozen consumers polling every few
    milliseconds would take from the hot paths."""
    tasks_max_bytes: int = 1 << 30
    """Bytes of tasks the task stream holds (NATS): a publish beyond it is refused with an error the
    publisher sees (back-pressure), rather than the oldest untaken tasks being dropped."""
    tasks_max_age_days: float = 7.0
    """Days a task nobody took stays stored (NATS) before the server drops it."""
    history_days: float = 30.0
    """Days a recorded channel (`forseti.models`) keeps its messages for followers that were away
    (NATS; a Kafka topic keeps them for the broker's retention)."""
    connect_timeout: float = 5.0
    """Seconds to wait for the server at start."""
    creds: str | None = None
    """Path of a NATS `.creds` file (a user JWT and its nkey seed) to authenticate with (NATS)."""
    nkey_seed: str | None = None
    """Path of a file holding a NATS user nkey seed (`SU...`) to authenticate with (NATS)."""
    tls_ca: str | None = None
    """Path of the PEM CA bundle that the server's certificate must chain to (NATS, Kafka; without it
    the system's CAs)."""
    tls_cert: str | None = None
    """Path of this client's PEM certificate, for servers that verify clients (NATS, Kafka)."""
    tls_key: str | None = None
    """Path of the private key of `tls_cert` (NATS, Kafka)."""
    tls: bool = False
    """Connect over TLS (Kafka; NATS uses `tls://`); also implied by `tls_ca` or `tls_cert`."""
    sasl_mechanism: str = "SCRAM-SHA-512"
    """How a Kafka client with a user in its URL authenticates: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."""
    cloudevents_mode: str = "structured"
    """How a Kafka client writes events: structured (the whole CloudEvent as JSON in the record's value)
    or binary (the CloudEvents Kafka binding: the data as the value, the attributes as ce_* headers);
    every reader takes both. NATS is always structured."""

    def check_files(self) -> None:
        """A BusError naming the setting whose file does not exist, or TLS files that do not pair up:
        a clear error at start rather than a refused connection."""
        for setting in ("creds", "nkey_seed", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, setting)
            if path is not None and not Path(path).is_file():
                raise BusError(f"bus setting {setting}: no file {path}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BusError("bus settings tls_cert and tls_key go together")

    def tls_context(self, *, required: bool = False) -> ssl.SSLContext | None:
        """The TLS context the settings ask for: the CA to trust and this client's certificate; None
        when nothing asks for TLS (`required`: the URL's scheme already does)."""
        if not (required or self.tls or self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    @classmethod
    def from_url(cls, url: str) -> tuple[str, BusSettings]:
        """The URL without its query, and the settings the query names; unknown names are an error."""
        parts = urlsplit(url)
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int | bool | str] = {}
        for name, raw in parse_qsl(parts.query, strict_parsing=False):
            if name not in known:
                raise ValueError(f"unknown bus setting {name!r} in {redact(url)!r}; known: {', '.join(known)}")
            if known[name] in ("str | None", "str"):
                values[name] = raw
            elif known[name] == "bool":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"bus setting {name} is true or false, not {raw!r}")
                values[name] = raw.lower() in ("true", "1")
            else:
                values[name] = float(raw) if known[name] == "float" else int(raw)
        return urlunsplit(parts._replace(query="")), cls(**values)  # type: ignore[arg-type]
