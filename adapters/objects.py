"""Shared file storage for what several workers must all reach: a job's checkpoints.

Two engines behind one small interface, chosen by `FORSETI_OBJECT_STORE_URL`:

- the JetStream object store of the worker's own NATS bus (`nats-object://BUCKET`), the default on
  NATS, with the bucket `forseti-checkpoints`: a deployment needs nothing beyond its bus;
- an S3-compatible store (`s3://bucket/prefix?endpoint=http://host:9000&region=eu-west-1`) through
  boto3, for Kafka deployments and for users who already run one (AWS S3, MinIO, SeaweedFS, Ceph).
  Credentials come from boto3's own chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`,
  `~/.aws`, an instance role), never from the URL, so the URL can be logged as it is.

Objects are addressed by URI (`nats-object://bucket/name`, `s3://bucket/key`); the registry keeps
each one's URI and sha256, and whoever downloads one checks it against that record.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlparse

from forseti.schemas.errors import BusError, StoreError

from .artifacts import SCHEME as NATS_SCHEME
from .artifacts import ObjectBus, object_uri

CHECKPOINT_BUCKET = "forseti-checkpoints"
"""The bucket (NATS) checkpoints go to when no object store URL names another place."""


class ObjectStore(Protocol):
    """Files shared between workers, by URI."""

    @property
    def location(self) -> str:
        """Where objects go, for logs, `/healthz` and capabilities (no secrets in it)."""

    def uri(self, name: str) -> str:
        """The URI an object put as `name` is found under."""

    async def put(self, name: str, path: Path, sha256: str) -> str:
        """Store a local file as `name`; the URI it is found under."""

    async def get(self, uri: str, dest: Path) -> None:
        """Stream the object at `uri` into `dest`; StoreError when it cannot be had."""

    async def delete(self, uri: str) -> None:
        """Remove the object at `uri` (nothing when it is already gone)."""


class BusObjectStore:
    """A bucket of the NATS bus's JetStream object store."""

    def __init__(self, bus: ObjectBus, bucket: str = CHECKPOINT_BUCKET) -> None:
        self.bus, self.bucket = bus, bucket

    @property
    def location(self) -> str:
        """The bucket's URI."""
        return f"{NATS_SCHEME}://{self.bucket}"

    def uri(self, name: str) -> str:
        """`nats-object://<bucket>/<name>`."""
        return object_uri(self.bucket, name)

    async def put(self, name: str, path: Path, sha256: str) -> str:
        """Store a file in the bucket (made on first use)."""
        try:
            await self.bus.put_object(self.bucket, name, path, sha256)
        except BusError as exc:
            raise StoreError(exc.message) from exc
        return self.uri(name)

    async def get(self, uri: str, dest: Path) -> None:
        """Download an object of this bus."""
        bucket, name = self._parse(uri)
        try:
            await self.bus.get_object(bucket, name, dest)
        except BusError as exc:
            raise StoreError(exc.message) from exc

    async def delete(self, uri: str) -> None:
        """Remove an object of this bus."""
        bucket, name = self._parse(uri)
        try:
            await self.bus.delete_object(bucket, name)
        except BusError as exc:
            raise StoreError(exc.message) from exc

    @staticmethod
    def _parse(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != NATS_SCHEME:
            raise StoreError(f"{uri} is not in the NATS object store")
        return parsed.netloc, unquote(parsed.path.lstrip("/"))


class S3ObjectStore:
    """A bucket (and key prefix) of an S3-compatible server, through boto3 in worker threads."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an S3 URL: {url!r} (use s3://bucket/prefix?endpoint=http://host:port)")
        if parsed.username or parsed.password:
            raise ValueError("put S3 credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, not in the URL")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"unknown S3 URL parameter(s) {sorted(unknown)}: endpoint and region are known")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = query.get("endpoint")
        self.region = query.get("region")
        self._client: Any = None
        self._bucket_ready = False

    @property
    def location(self) -> str:
        """The bucket, prefix and endpoint."""
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else where

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _parse(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            raise StoreError(f"{uri} is not in s3://{self.bucket}")
        return unquote(parsed.path.lstrip("/"))

    def client(self) -> Any:
        """The boto3 client, made on first use (importing boto3 only where S3 is used)."""
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise StoreError("an s3:// object store needs boto3: pip install boto3") from exc
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region or "us-east-1",
                # path-style addressing: self-hosted servers rarely have a DNS name per bucket
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
            )
        return self._client

    def uri(self, name: str) -> str:
        """`s3://<bucket>/<prefix>/<name>`."""
        return f"s3://{self.bucket}/{quote(self._key(name))}"

    async def put(self, name: str, path: Path, sha256: str) -> str:
        """Upload a file (multipart for large ones), making the bucket on first use if it is missing."""
        await self._call(self._put, self._key(name), path, sha256)
        return self.uri(name)

    def _put(self, key: str, path: Path, sha256: str) -> None:
        client = self.client()
        if not self._bucket_ready:
            from botocore.exceptions import ClientError

            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                client.create_bucket(Bucket=self.bucket)
            self._bucket_ready = True
        client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})

    async def get(self, uri: str, dest: Path) -> None:
        """Download an object."""
        await self._call(self.client().download_file, self.bucket, self._parse(uri), str(dest))

    async def delete(self, uri: str) -> None:
        """Remove an object (S3 answers a missing key with success)."""
        await self._call(self.client().delete_object, Bucket=self.bucket, Key=self._parse(uri))

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            await asyncio.to_thread(fn, *args, **kwargs)
        except (Boto3Error, BotoCoreError, ClientError, OSError) as exc:
            raise StoreError(f"object store {self.location}: {exc}") from exc


def open_object_store(url: str | None, bus: object) -> ObjectStore | None:
    """The store a URL names (`s3://...`, `nats-object://BUCKET`, or `none`); without one, the NATS
    bus's bucket `forseti-checkpoints` when the bus has an object store, else None (local disk only)."""
    if url == "none":
        return None
    if url is None or url == "":
        return BusObjectStore(bus) if isinstance(bus, ObjectBus) else None
    if url.startswith("s3://"):
        return S3ObjectStore(url)
    if url.startswith(f"{NATS_SCHEME}://"):
        if not isinstance(bus, ObjectBus):
            raise ValueError(f"{url} needs a NATS bus with JetStream; use s3://... with this bus")
        return BusObjectStore(bus, urlparse(url).netloc or CHECKPOINT_BUCKET)
    raise ValueError(
        f"unsupported object store URL {url!r}: use s3://bucket/prefix?endpoint=... or nats-object://BUCKET"
    )
