"""A real PostgreSQL server on a loopback port, for `forseti up --registry postgres`, the tests and the benchmarks.

The binaries come from `$FORSETI_POSTGRES_BIN`, else the `postgres` on PATH (Debian's packages).
PostgreSQL refuses to run as root, so under root the server runs as
the system user `postgres` (or `$FORSETI_POSTGRES_OS_USER`), which must be able to reach the data dir.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Self

from forseti.adapters.processes import ServerProcess, port_open
from forseti.schemas.errors import StoreError


def postgres_bin_dir() -> Path:
    """The folder holding `postgres`, `initdb`, `pg_isready` and `createdb`."""
    configured = os.environ.get("FORSETI_POSTGRES_BIN")
    if configured:
        return Path(configured)
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent  # Debian links /usr/local/bin/postgres into /usr/lib/postgresql/N/bin
    raise StoreError(
        "no PostgreSQL server found on PATH: apt-get install postgresql, or point FORSETI_POSTGRES_BIN at "
        "a folder holding postgres, initdb, pg_isready and createdb"
    )


def server_os_user() -> pwd.struct_passwd | None:
    """The system user the server runs as: None (this one) unless this process is root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FORSETI_POSTGRES_OS_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise StoreError(
            f"PostgreSQL does not run as root and there is no user {name!r} to run it as: "
            "create one, or set FORSETI_POSTGRES_OS_USER"
        ) from exc


class PostgresServer(ServerProcess):
    """PostgreSQL with its cluster under `data_dir` (made on first start), password authentication on
    127.0.0.1 only, and one database for the registry."""

    name = "postgres"
    ready_timeout = 60.0
    error = StoreError

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        user: str = "forseti",
        database: str = "forseti",
        durable: bool = True,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.user, self.database, self.durable = data_dir, user, database, durable
        self.bin = postgres_bin_dir()
        self.os_user = server_os_user()
        self.password_file = data_dir.with_name(f"{data_dir.name}.password")
        """Where the generated password is kept (0600), so a restarted stack reconnects."""

    @property
    def password(self) -> str:
        """The password of `user`, generated with the cluster."""
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        """The registry URL, password included: give it to workers, never to a log."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Self:
        """Make the cluster on first use, start the server, and make the database unless it exists."""
        self._initdb()
        super().start()
        self._createdb()
        return self

    def command(self) -> list[str]:
        """postgres on 127.0.0.1 only, no Unix socket."""
        cmd = [str(self.bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-h", "127.0.0.1", "-k", ""]
        if not self.durable:  # tests: a crash loses the cluster anyway, so skip the fsyncs
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return cmd

    def popen_options(self) -> dict[str, Any]:
        """Under root, the server's own user and group."""
        if self.os_user is None:
            return {}
        return {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid, "extra_groups": []}

    def ready(self) -> bool:
        """True once the server accepts sessions (its port opens a moment before)."""
        if not port_open("127.0.0.1", self.port):
            return False
        probe = [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(probe, check=False).returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT: PostgreSQL's SIGTERM waits for every client to leave)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        super().stop()

    def _run(self, cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, capture_output=True, text=True, check=False, env={**os.environ, **env}, **self.popen_options()
        )

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.password_file.write_text(secrets.token_urlsafe(24))
        self.password_file.chmod(0o600)
        with tempfile.TemporaryDirectory() as scratch:
            pwfile = Path(scratch) / "pw"
            pwfile.write_text(self.password)
            if self.os_user is not None:
                for path in (Path(scratch), pwfile, self.data_dir):
                    os.chown(path, self.os_user.pw_uid, self.os_user.pw_gid)
                if self._run(["test", "-w", str(self.data_dir)]).returncode != 0:
                    raise StoreError(
                        f"the PostgreSQL user {self.os_user.pw_name!r} cannot reach {self.data_dir}: give a "
                        "data dir whose every parent folder it may enter (--data-dir; not under /root)"
                    )
            done = self._run(
                [
                    str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
                    "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions",
                ]
            )  # fmt: skip
        if done.returncode != 0:
            raise StoreError(f"initdb failed for {self.data_dir}:\n{done.stderr[-2000:]}")

    def _createdb(self) -> None:
        cmd = [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database]
        done = self._run(cmd, PGPASSWORD=self.password)
        if done.returncode != 0 and "already exists" not in done.stderr:
            self.stop()
            raise StoreError(f"cannot create database {self.database}:\n{done.stderr[-2000:]}")
