"""The worker's artifact endpoint for deployments without an object store (Kafka): GET
`/artifacts/<model_id>/<file>` serves a file under the artifacts folder, in 1 MiB chunks, honouring
`Range: bytes=START-[END]` so an interrupted download resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PREFIX = "/artifacts/"


class ArtifactServer:
    """Serves the files under `root` over HTTP."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, advertise: str | None = None) -> None:
        self.root, self.host, self.port = root.resolve(), host, port
        self.advertise = advertise or host
        """The host name other machines reach this server by."""
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        """The URL prefix announced artifacts get."""
        return f"http://{self.advertise}:{self.port}{PREFIX}"

    async def start(self) -> None:
        """Listen; with port 0 the chosen port is stored in `port`."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("artifacts on %s", self.base_url)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _file(self, path: str) -> Path | None:
        if not path.startswith(PREFIX):
            return None
        candidate = (self.root / unquote(path[len(PREFIX) :])).resolve()
        return candidate if candidate.is_relative_to(self.root) and candidate.is_file() else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1").split()
            headers: dict[str, str] = {}
            while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            method, path = (request[0], request[1].split("?")[0]) if len(request) >= 2 else ("", "")
            found = self._file(path) if method == "GET" else None
            if found is None:
                body = b"no such artifact\n" if method == "GET" else b"only GET\n"
                status = "404 Not Found" if method == "GET" else "405 Method Not Allowed"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
                await writer.drain()
                return
            await self._send(writer, found, headers.get("range"))
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, path: Path, wanted: str | None) -> None:
        size = (await asyncio.to_thread(path.stat)).st_size
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start > end:
                writer.write(
                    f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                return
        status = "206 Partial Content" if match else "200 OK"
        extra = f"Content-Range: bytes {start}-{end}/{size}\r\n" if match else ""
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {end - start + 1}\r\n"
            f"Accept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        with path.open("rb") as handle:
            handle.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = await asyncio.to_thread(handle.read, min(CHUNK, left))
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()  # one chunk in flight at a time: memory stays flat
                left -= len(chunk)
