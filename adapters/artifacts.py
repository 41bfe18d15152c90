"""Artifacts that cross hosts: what a `model.available` URI names, and how a consumer gets the file.

On NATS the worker stores each announced file in the JetStream object store bucket
`forseti-artifacts` under `<model_id>/<file name>` and announces `nats-object://forseti-artifacts/...`,
so a consumer on another host needs nothing but its bus connection. On Kafka a worker with an
artifact endpoint (`worker/artifact_server.py`) announces `http://host:port/artifacts/...`, fetched
with resumable range requests. Otherwise the URI stays `file://` (one host). `fetch` turns any of
them into a verified local file: size and sha256 must match the announcement, or the file is
refused with `invalid_model`. Torch-free.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlparse

from forseti.schemas.errors import BusError, ErrorCode, ForsetiError
from forseti.schemas.models import ModelAvailable

from .exporters import sha256_of

SCHEME = "nats-object"
BUCKET = "forseti-artifacts"
"""The object store bucket announced artifacts go to."""


@runtime_checkable
class ObjectBus(Protocol):
    """A bus that can hold files (NATS with JetStream)."""

    async def put_object(self, bucket: str, name: str, path: Path, sha256: str) -> None:
        """Store a file, chunk by chunk."""

    async def get_object(self, bucket: str, name: str, dest: Path) -> None:
        """Stream a stored file into `dest`."""

    async def delete_object(self, bucket: str, name: str) -> None:
        """Remove a stored file (nothing when it is not there)."""


def object_uri(bucket: str, name: str) -> str:
    """The URI of an object in a bucket."""
    return f"{SCHEME}://{bucket}/{quote(name)}"


def local_path(uri: str) -> Path:
    """The file a `file://` URI names."""
    return Path(unquote(urlparse(uri).path))


async def share(bus: object, event: ModelAvailable, *, http: tuple[Path, str] | None = None) -> ModelAvailable:
    """The announcement with its files where other hosts can fetch them: put into the object store when
    the bus has one; else, with `http` (a folder and the URL that serves it), named by their URL under
    it; else unchanged."""
    update: dict[str, str] = {}
    for field, digest in (("uri", event.sha256), ("base_uri", event.base_sha256)):
        uri = getattr(event, field)
        if uri is None or not uri.startswith("file://") or digest is None:
            continue
        path = local_path(uri)
        if isinstance(bus, ObjectBus):
            name = f"{event.model_id}/{path.name}"
            await bus.put_object(BUCKET, name, path, digest)
            update[field] = object_uri(BUCKET, name)
        elif http is not None and path.resolve().is_relative_to(http[0].resolve()):
            update[field] = http[1] + quote(str(path.resolve().relative_to(http[0].resolve())))
    return event.model_copy(update=update)


async def fetch(bus: object, uri: str, *, sha256: str, size: int | None, cache: Path) -> Path:
    """A verified local copy of `uri`: a `file://` file checked in place, or an object downloaded into
    `cache` (once: a verified copy there is reused). invalid_model when it cannot be had or its size
    or digest differ from the announcement."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = local_path(uri)
    elif parsed.scheme == SCHEME:
        if not isinstance(bus, ObjectBus):
            raise ForsetiError(f"cannot fetch {uri}: this bus has no object store", code=ErrorCode.INVALID_MODEL)
        name = unquote(parsed.path.lstrip("/"))
        path = cache / parsed.netloc / name
        if path.is_file() and await asyncio.to_thread(_matches, path, sha256, size):
            return path  # fetched before
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            await bus.get_object(parsed.netloc, name, partial)
        except BusError as exc:
            raise ForsetiError(f"cannot fetch {uri}: {exc.message}", code=ErrorCode.INVALID_MODEL) from exc
        partial.replace(path)
    elif parsed.scheme in ("http", "https"):
        path = cache / parsed.netloc.replace(":", "_") / unquote(parsed.path.lstrip("/"))
        if path.is_file() and await asyncio.to_thread(_matches, path, sha256, size):
            return path  # fetched before
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_download, uri, path)
    else:
        raise ForsetiError(f"cannot fetch {uri!r}: unknown scheme {parsed.scheme!r}", code=ErrorCode.INVALID_MODEL)
    if not path.is_file():
        raise ForsetiError(f"{uri} names no file", code=ErrorCode.INVALID_MODEL)
    if size is not None and path.stat().st_size != size:
        raise ForsetiError(f"{uri} has {path.stat().st_size} bytes, announced {size}", code=ErrorCode.INVALID_MODEL)
    if await asyncio.to_thread(sha256_of, path) != sha256:
        raise ForsetiError(f"{uri} fails its sha256 check", code=ErrorCode.INVALID_MODEL)
    return path


def _matches(path: Path, sha256: str, size: int | None) -> bool:
    return (size is None or path.stat().st_size == size) and sha256_of(path) == sha256


def _download(url: str, path: Path, attempts: int = 3) -> None:
    """Stream `url` into `path`, resuming a partial download with a Range request."""
    import urllib.error
    import urllib.request

    partial = path.with_name(path.name + ".partial")
    for attempt in range(attempts):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                resumed = response.status == 206
                with partial.open("ab" if resumed else "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            partial.replace(path)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # asked past the end: the partial file is whole (or wrong); start again
                partial.unlink(missing_ok=True)
                continue
            raise ForsetiError(f"cannot fetch {url}: HTTP {exc.code}", code=ErrorCode.INVALID_MODEL) from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt == attempts - 1:
                raise ForsetiError(f"cannot fetch {url}: {exc}", code=ErrorCode.INVALID_MODEL) from exc
