"""Server processes on free loopback ports, for `forseti up`, the test fixtures and the benchmarks:
the brokers (`bus/servers.py`) and the registry's PostgreSQL (`registry/server.py`) build on this."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from forseti.schemas.errors import BusError, ForsetiError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ServerProcess:
    """A server process on a port; a context manager that stops it."""

    name = "server"
    ready_timeout = 20.0
    error: type[ForsetiError] = BusError
    """What a server that does not start raises."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"forseti-{self.name}-", suffix=".log")[1])

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start and wait until the port accepts connections."""
        with self.log_path.open("ab") as log:
            # a session of its own: Ctrl-C in a terminal reaches `forseti up`, which stops the server
            # only after its worker has shut down against it
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self.popen_options()
            )
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise self.error(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def popen_options(self) -> dict[str, Any]:
        """Extra `subprocess.Popen` arguments (a server that refuses to run as root sets `user`)."""
        return {}

    def ready(self) -> bool:
        """True once the server serves clients: by default, once its port accepts connections."""
        return port_open("127.0.0.1", self.port)

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


class Cable:
    """A TCP forwarder in front of a server, which a test or a fault bench unplugs (dropping every
    connection and refusing new ones) and plugs in again, as a host's network would come and go."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def plug(self) -> None:
        """Accept connections (again), each forwarded to the target port."""
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def unplug(self) -> None:
        """Drop every connection and refuse new ones until the next plug."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the server behind is down too: the client sees its connection close
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
