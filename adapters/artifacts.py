"""Artifacts that cross hosts: what a `model.available` URI names, and how a consumer gets the file.

On NATS the worker stores each announced file in the JetStream object store bucket
`forseti-artifacts` under `<model_id>/<file name>` and announces `nats-object://forseti-artifacts/...`,
so a consumer on another host needs nothing but its bus connection. On Kafka a worker with an S3
object store (`FORSETI_OBJECT_STORE_URL=s3://...`) uploads them under `artifacts/<model_id>/` there
and announces `s3://bucket/key`, which a consumer started with an S3 store of that bucket fetches
with its own credentials, whether the worker is up or not; without one, a worker with an artifact
endpoint (`worker/engine/artifact_server.py`) announces `http://host:port/artifacts/...`, fetched with
resumable range requests. Otherwise the URI stays `file://` (one host). `fetch` turns any of them
into a verified local file: size and sha256 must match the announcement, or the file is refused
with `invalid_model`. Torch-free.

With an encryption keyring (`adapters/encryption.py`) what `share` puts in an object store is the
file's AES-GCM ciphertext, and `fetch` decrypts what it downloads before the checks, so the size
and sha256 of the announcement stay the plaintext's; `file://` and worker-served `http://` files
are the worker's own disk and stay as they are.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import ParseResult, quote, unquote, urlparse

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.models import ModelAvailable

from .encryption import Keyring, decrypt_in_place
from .exporters import sha256_of

if TYPE_CHECKING:
    from .objects import ObjectStore

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


async def share(
    bus: object,
    event: ModelAvailable,
    *,
    objects: ObjectStore | None = None,
    http: tuple[Path, str] | None = None,
    keyring: Keyring | None = None,
) -> ModelAvailable:
    """The announcement with its files where other hosts can fetch them: put into the bus's object store
    when it has one; else into `objects` (the worker's S3 store) under `artifacts/<model_id>/`; else,
    with `http` (a folder and the URL that serves it), named by their URL under it; else unchanged.
    With `keyring`, what goes into a store is encrypted."""
    update: dict[str, str] = {}
    for field, digest in (
        ("uri", event.sha256),
        ("base_uri", event.base_sha256),
        ("config_uri", event.config_sha256),
    ):
        uri = getattr(event, field)
        if uri is None or not uri.startswith("file://") or digest is None:
            continue
        path = local_path(uri)
        name = f"{event.model_id}/{path.name}"
        stored = await put_file(bus, objects, BUCKET, "artifacts", name, path, digest, keyring=keyring)
        if stored is not None:
            update[field] = stored
        elif http is not None and path.resolve().is_relative_to(http[0].resolve()):
            update[field] = http[1] + quote(str(path.resolve().relative_to(http[0].resolve())))
    return event.model_copy(update=update)


def stored_uri(bus: object, objects: ObjectStore | None, bucket: str, folder: str, name: str) -> str | None:
    """Where `put_file` puts `name`: in `bucket` of the bus's object store, else `<folder>/<name>` in
    `objects`; None with neither."""
    if isinstance(bus, ObjectBus):
        return object_uri(bucket, name)
    return objects.uri(f"{folder}/{name}") if objects is not None else None


async def put_file(
    bus: object,
    objects: ObjectStore | None,
    bucket: str,
    folder: str,
    name: str,
    path: Path,
    sha256: str,
    *,
    keyring: Keyring | None = None,
) -> str | None:
    """Put a file where other hosts can fetch it (see `stored_uri`), encrypted under `keyring` when
    given; its URI, or None when there is nowhere to put it."""
    if not isinstance(bus, ObjectBus) and objects is None:
        return None
    async with _stored_form(path, sha256, keyring) as (stored, stored_digest):
        if isinstance(bus, ObjectBus):
            await bus.put_object(bucket, name, stored, stored_digest)
            return object_uri(bucket, name)
        assert objects is not None
        return await objects.put(f"{folder}/{name}", stored, stored_digest)


async def delete_file(bus: object, objects: ObjectStore | None, uri: str) -> None:
    """Remove a file `put_file` stored (nothing when it is gone already)."""
    parsed = urlparse(uri)
    if parsed.scheme == SCHEME and isinstance(bus, ObjectBus):
        await bus.delete_object(parsed.netloc, unquote(parsed.path.lstrip("/")))
    elif objects is not None:
        await objects.delete(uri)


@asynccontextmanager
async def _stored_form(path: Path, sha256: str, keyring: Keyring | None) -> AsyncIterator[tuple[Path, str]]:
    """The file to put in a store and its digest: `path` itself, or its ciphertext (removed after)."""
    if keyring is None:
        yield path, sha256
        return
    sealed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.fse")
    try:
        await asyncio.to_thread(keyring.encrypt, path, sealed)
        yield sealed, await asyncio.to_thread(sha256_of, sealed)
    finally:
        sealed.unlink(missing_ok=True)


async def fetch(
    bus: object,
    uri: str,
    *,
    sha256: str,
    size: int | None,
    cache: Path,
    objects: ObjectStore | None = None,
    keyring: Keyring | None = None,
) -> Path:
    """A verified local copy of `uri`: a `file://` file checked in place, or an object downloaded into
    `cache` (once: a verified copy there is reused) and decrypted with `keyring` when it was stored
    encrypted; `s3://` objects through `objects`, this consumer's own S3 store. invalid_model when it
    cannot be had (or decrypted) or its size or digest differ from the announcement."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = local_path(uri)
    else:
        path = _cached(parsed, sha256, cache)
        if not (path.is_file() and await asyncio.to_thread(_matches, path, sha256, size)):  # else fetched before
            path.parent.mkdir(parents=True, exist_ok=True)
            await download(bus, objects, uri, path)
            await asyncio.to_thread(_decrypt_in_place, path, keyring, uri)
    if not path.is_file():
        raise ForsetiError(f"{uri} names no file", code=ErrorCode.INVALID_MODEL)
    if size is not None and path.stat().st_size != size:
        raise ForsetiError(f"{uri} has {path.stat().st_size} bytes, announced {size}", code=ErrorCode.INVALID_MODEL)
    if await asyncio.to_thread(sha256_of, path) != sha256:
        raise ForsetiError(f"{uri} fails its sha256 check", code=ErrorCode.INVALID_MODEL)
    return path


def _decrypt_in_place(path: Path, keyring: Keyring | None, uri: str) -> None:
    """`decrypt_in_place`, its refusal named as an announcement's (invalid_model)."""
    try:
        decrypt_in_place(path, keyring)
    except ForsetiError as exc:
        raise ForsetiError(f"{uri}: {exc.message}", code=ErrorCode.INVALID_MODEL) from exc


def _cached(parsed: ParseResult, sha256: str, cache: Path) -> Path:
    """Where the downloaded copy of an object is kept under `cache`: never outside it, whatever the
    URI says (an announcement is anyone's to publish)."""
    if parsed.scheme == SCHEME:
        return _confined(cache, parsed.netloc, unquote(parsed.path.lstrip("/")), parsed)
    if parsed.scheme in ("http", "https"):
        return _confined(cache, parsed.netloc.replace(":", "_"), unquote(parsed.path.lstrip("/")), parsed)
    if parsed.scheme == "s3":
        # named by its digest (checked by the announcement's schema), never by the key it came under
        leaf = PurePosixPath(unquote(parsed.path)).name
        return cache / "s3" / sha256 / (leaf if leaf not in ("", ".", "..") else "object")
    raise ForsetiError(
        f"cannot fetch {parsed.geturl()!r}: unknown scheme {parsed.scheme!r}", code=ErrorCode.INVALID_MODEL
    )


def _confined(cache: Path, folder: str, name: str, parsed: ParseResult) -> Path:
    """`cache / folder / name`, refused (invalid_model) when a part of it is empty, `.`, `..`, absolute
    or holds a backslash or NUL: such a name would climb out of the cache."""
    parts = [folder, *name.split("/")]
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise ForsetiError(
            f"refused {parsed.geturl()!r}: its name would be written outside this consumer's cache",
            code=ErrorCode.INVALID_MODEL,
        )
    path = cache.joinpath(*parts)
    if not path.resolve().is_relative_to(cache.resolve()):  # a symlink planted in the cache
        raise ForsetiError(
            f"refused {parsed.geturl()!r}: its name leads outside this consumer's cache", code=ErrorCode.INVALID_MODEL
        )
    return path


async def download(bus: object, objects: ObjectStore | None, uri: str, path: Path) -> None:
    """Download what `uri` names (the bus's object store, `objects`, or HTTP) into `path` as it is
    stored, through a `.partial` file beside it; invalid_model when it cannot be had."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        await asyncio.to_thread(_download, uri, path)
        return
    partial = path.with_name(path.name + ".partial")
    if parsed.scheme == SCHEME:
        if not isinstance(bus, ObjectBus):
            raise ForsetiError(f"cannot fetch {uri}: this bus has no object store", code=ErrorCode.INVALID_MODEL)
        download = bus.get_object(parsed.netloc, unquote(parsed.path.lstrip("/")), partial)
    elif objects is not None:
        download = objects.get(uri, partial)
    else:
        raise ForsetiError(
            f"cannot fetch {uri}: start this consumer with --object-store-url s3://{parsed.netloc}?endpoint=... "
            "(and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) to read the workers' S3 store",
            code=ErrorCode.INVALID_MODEL,
        )
    try:
        await download
    except ForsetiError as exc:  # BusError, StoreError: the announcement cannot be had
        raise ForsetiError(f"cannot fetch {uri}: {exc.message}", code=ErrorCode.INVALID_MODEL) from exc
    partial.replace(path)


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
