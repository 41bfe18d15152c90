"""Announced artifacts cross hosts: on NATS through the JetStream object store, elsewhere as file:// URIs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from forseti.adapters.artifacts import BUCKET, fetch, object_uri, share
from forseti.adapters.bus import MemoryBus, create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.encryption import Keyring, encrypted, new_key
from forseti.adapters.exporters import sha256_of
from forseti.adapters.objects import S3ObjectStore
from forseti.adapters.registry import ModelRecord, SqliteStore
from forseti.schemas.catalog import MODELS
from forseti.schemas.envelope import decode
from forseti.schemas.errors import ForsetiError
from forseti.schemas.models import ModelAvailable
from forseti.worker.engine.artifact_server import ArtifactServer
from forseti.worker.engine.models import describe, promote

from ..helpers import Inbox


def announcement(path: Path, **fields: object) -> ModelAvailable:
    return ModelAvailable.model_validate(
        {
            "model_id": f"m-{uuid.uuid4().hex[:8]}",
            "name": "artifact-test",
            "version": "1",
            "format": "onnx",
            "uri": path.resolve().as_uri(),
            "sha256": sha256_of(path),
            "size_bytes": path.stat().st_size,
            "kind": "classifier",
            "created_at": "2026-11-22T00:00:00Z",
            **fields,
        }
    )


async def test_an_artifact_goes_through_the_object_store_to_another_host(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    worker_side, device_side = create_bus(nats_server.url), create_bus(nats_server.url)
    await worker_side.connect()
    await device_side.connect()
    try:
        original = tmp_path / "worker" / "model.onnx"
        original.parent.mkdir()
        original.write_bytes(os.urandom(3 * 2**20 + 17))  # many 128 KiB chunks and a ragged end
        event = await share(worker_side, announcement(original))
        assert event.uri == object_uri(BUCKET, f"{event.model_id}/model.onnx")
        assert await share(worker_side, announcement(original, model_id=event.model_id)) == event, "stored once"

        cache = tmp_path / "device"
        fetched = await fetch(device_side, event.uri, sha256=event.sha256, size=event.size_bytes, cache=cache)
        assert fetched.is_relative_to(cache)
        assert fetched.read_bytes() == original.read_bytes()
        stamp = fetched.stat().st_mtime_ns
        again = await fetch(device_side, event.uri, sha256=event.sha256, size=event.size_bytes, cache=cache)
        assert again == fetched and again.stat().st_mtime_ns == stamp, "a verified copy is reused"

        with pytest.raises(ForsetiError, match="sha256") as wrong:
            await fetch(device_side, event.uri, sha256="0" * 64, size=event.size_bytes, cache=tmp_path / "other")
        assert wrong.value.code == "invalid_model"
        with pytest.raises(ForsetiError, match="cannot fetch") as missing:
            await fetch(device_side, object_uri(BUCKET, "nope/model.onnx"), sha256="0" * 64, size=None, cache=cache)
        assert missing.value.code == "invalid_model"
    finally:
        await worker_side.close()
        await device_side.close()


async def test_without_an_object_store_the_uri_stays_a_checked_local_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"weights")
    bus = MemoryBus()
    event = await share(bus, announcement(path))
    assert event.uri.startswith("file://")
    assert await fetch(bus, event.uri, sha256=event.sha256, size=7, cache=tmp_path / "cache") == path
    with pytest.raises(ForsetiError, match="announced 8"):
        await fetch(bus, event.uri, sha256=event.sha256, size=8, cache=tmp_path / "cache")
    with pytest.raises(ForsetiError, match="no object store"):
        await fetch(bus, object_uri(BUCKET, "x/model.onnx"), sha256=event.sha256, size=None, cache=tmp_path)


async def test_without_an_object_store_a_worker_serves_its_artifacts_over_http_with_resume(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    original = root / "job-1" / "model.onnx"
    original.parent.mkdir(parents=True)
    original.write_bytes(os.urandom(3 * 2**20 + 5))
    server = ArtifactServer(root)
    await server.start()
    try:
        event = await share(MemoryBus(), announcement(original), http=(root, server.base_url))
        assert event.uri == f"{server.base_url}job-1/model.onnx"

        cache = tmp_path / "device"
        # a download cut off after 1 MiB resumes from there (a wrong prefix would fail the digest)
        target = cache / f"127.0.0.1_{server.port}" / "artifacts" / "job-1" / "model.onnx"
        target.parent.mkdir(parents=True)
        target.with_name("model.onnx.partial").write_bytes(original.read_bytes()[: 2**20])
        fetched = await fetch(MemoryBus(), event.uri, sha256=event.sha256, size=event.size_bytes, cache=cache)
        assert fetched == target and fetched.read_bytes() == original.read_bytes()

        for hostile, refusal in (
            ("../secrets.txt", "refused"),
            ("%2e%2e/secrets.txt", "refused"),
            ("job-1/missing.onnx", "HTTP 404"),
        ):
            (tmp_path / "secrets.txt").write_text("no")
            with pytest.raises(ForsetiError, match=refusal):
                await fetch(MemoryBus(), server.base_url + hostile, sha256="0" * 64, size=None, cache=tmp_path / "x")
    finally:
        await server.close()


async def test_a_promote_without_an_object_store_announces_the_worker_endpoint(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    original = root / "job-2" / "model.onnx"
    original.parent.mkdir(parents=True)
    original.write_bytes(os.urandom(4096))
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    model = await store.add_model(
        ModelRecord(
            id="job-2", name="promoted", model_type="classifier", export_path=str(original), export_format="onnx"
        )
    )
    for artifact in describe([("onnx", None, original)], model.id):
        await store.add_artifact(artifact)
    bus, inbox = MemoryBus(), Inbox()
    await bus.connect()
    await bus.subscribe(MODELS, inbox.on_message)
    server = ArtifactServer(root)
    await server.start()
    try:
        await promote(store, bus, "promoted", "1", alias="production", http=(root, server.base_url))
        event: Any = decode((await inbox.wait_count(1))[0]).data
        assert isinstance(event, ModelAvailable) and event.alias == "production"
        assert event.uri == f"{server.base_url}job-2/model.onnx", "another host can fetch it"
        fetched = await fetch(bus, event.uri, sha256=event.sha256, size=event.size_bytes, cache=tmp_path / "device")
        assert fetched.read_bytes() == original.read_bytes()
    finally:
        await server.close()
        await store.close()
        await bus.close()


async def test_without_a_bus_object_store_artifacts_go_to_s3_and_come_back_from_it(tmp_path: Path, s3_url: str) -> None:
    original = tmp_path / "worker" / "model.onnx"
    original.parent.mkdir()
    original.write_bytes(os.urandom(2**20 + 3))
    # the worker's S3 store (Kafka has no object store of its own), and a device's store of that bucket
    worker_store, device_store = S3ObjectStore(s3_url), S3ObjectStore(s3_url)
    bus = MemoryBus()
    event = await share(bus, announcement(original), objects=worker_store, http=(tmp_path, "http://unused/"))
    assert event.uri.startswith("s3://forseti-tests/") and event.uri.endswith(f"artifacts/{event.model_id}/model.onnx")

    cache = tmp_path / "device"
    fetched = await fetch(bus, event.uri, sha256=event.sha256, size=event.size_bytes, cache=cache, objects=device_store)
    assert fetched.is_relative_to(cache) and fetched.read_bytes() == original.read_bytes()
    stamp = fetched.stat().st_mtime_ns
    again = await fetch(bus, event.uri, sha256=event.sha256, size=event.size_bytes, cache=cache, objects=device_store)
    assert again == fetched and again.stat().st_mtime_ns == stamp, "a verified copy is reused"

    with pytest.raises(ForsetiError, match="--object-store-url") as unreadable:
        await fetch(bus, event.uri, sha256=event.sha256, size=event.size_bytes, cache=tmp_path / "bare")
    assert unreadable.value.code == "invalid_model"
    with pytest.raises(ForsetiError, match="sha256") as wrong:
        await fetch(bus, event.uri, sha256="0" * 64, size=event.size_bytes, cache=tmp_path / "o", objects=device_store)
    assert wrong.value.code == "invalid_model"
    missing = event.uri.replace("model.onnx", "missing.onnx")
    with pytest.raises(ForsetiError, match="cannot fetch") as absent:
        await fetch(bus, missing, sha256=event.sha256, size=None, cache=tmp_path / "o", objects=device_store)
    assert absent.value.code == "invalid_model"
    # a key that climbs out of its folder is stored under its digest, inside the cache
    hostile = f"s3://forseti-tests/{'%2e%2e/' * 6}etc/model.onnx"
    with pytest.raises(ForsetiError, match="cannot fetch"):
        await fetch(bus, hostile, sha256="1" * 64, size=None, cache=tmp_path / "h", objects=device_store)
    assert not list(tmp_path.glob("etc")) and not (tmp_path.parent / "etc").exists()


@pytest.mark.parametrize(
    "name", ["../../escaped.onnx", "/ESCAPE/escaped.onnx", "a/../../../escaped.onnx"], ids=["up", "absolute", "deep"]
)
async def test_an_object_named_outside_the_cache_is_refused_and_nothing_is_written(
    nats_server: NatsServer, tmp_path: Path, name: str
) -> None:
    """An attacker on the bus stores an object whose name climbs out of a device's cache and
    announces it with its own digest: the device refuses it and writes nothing anywhere."""
    attacker, device = create_bus(nats_server.url), create_bus(nats_server.url)
    await attacker.connect()
    await device.connect()
    try:
        payload = tmp_path / "payload"
        payload.write_bytes(b"#!/bin/sh\necho owned\n")
        name = name.replace("/ESCAPE", str(tmp_path))  # an absolute path inside this test's folder
        await attacker.put_object(BUCKET, name, payload, sha256_of(payload))  # type: ignore[attr-defined]
        cache = tmp_path / "device" / "cache"
        before = set(tmp_path.rglob("*"))
        uri = f"nats-object://{BUCKET}/{quote(name, safe='')}"  # as an attacker writes it: slashes escaped
        with pytest.raises(ForsetiError, match="refused") as refused:
            await fetch(device, uri, sha256=sha256_of(payload), size=None, cache=cache)
        assert refused.value.code == "invalid_model"
        assert set(tmp_path.rglob("*")) - before <= {cache, cache.parent}, "nothing written but the cache folder"
    finally:
        await attacker.close()
        await device.close()


async def test_a_symlink_planted_in_the_cache_leads_nowhere(nats_server: NatsServer, tmp_path: Path) -> None:
    """A name that is clean but goes through a link someone placed in the cache is refused too."""
    bus = create_bus(nats_server.url)
    await bus.connect()
    try:
        cache, outside = tmp_path / "cache", tmp_path / "outside"
        cache.mkdir()
        outside.mkdir()
        (cache / BUCKET).symlink_to(outside, target_is_directory=True)
        payload = tmp_path / "payload"
        payload.write_bytes(b"weights")
        await bus.put_object(BUCKET, "m1/model.onnx", payload, sha256_of(payload))  # type: ignore[attr-defined]
        with pytest.raises(ForsetiError, match="refused"):
            await fetch(bus, object_uri(BUCKET, "m1/model.onnx"), sha256=sha256_of(payload), size=None, cache=cache)
        assert not any(outside.iterdir())
    finally:
        await bus.close()


@pytest.mark.parametrize("store", ["nats", "s3"])
async def test_an_artifact_is_stored_encrypted_and_a_holder_of_the_key_gets_the_plaintext(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    """What a worker put in the object store was the model file itself, readable by anyone with
    access to the bucket (issue 14)."""
    ring = Keyring.parse(new_key(), where="test")
    original = tmp_path / "worker" / "model.onnx"
    original.parent.mkdir()
    original.write_bytes(os.urandom(2**20 + 99))
    objects: S3ObjectStore | None = None
    if store == "nats":
        bus: Any = create_bus(request.getfixturevalue("nats_server").url)
        await bus.connect()
    else:
        bus, objects = MemoryBus(), S3ObjectStore(request.getfixturevalue("s3_url"))
    try:
        event = await share(bus, announcement(original), objects=objects, keyring=ring)
        assert event.sha256 == sha256_of(original), "the announcement carries the plaintext's digest"
        assert not list(original.parent.glob(".*")), "the ciphertext made for the upload is gone"
        stored = tmp_path / "as-stored"
        if store == "nats":
            await bus.get_object(BUCKET, f"{event.model_id}/model.onnx", stored)
        else:
            assert objects is not None
            await objects.get(event.uri, stored)
        assert encrypted(stored) and original.read_bytes()[:4096] not in stored.read_bytes()

        fetched = await fetch(
            bus,
            event.uri,
            sha256=event.sha256,
            size=event.size_bytes,
            cache=tmp_path / "d",
            objects=objects,
            keyring=ring,
        )
        assert fetched.read_bytes() == original.read_bytes()
        with pytest.raises(ForsetiError, match="is encrypted: start with the deployment's key") as keyless:
            await fetch(
                bus, event.uri, sha256=event.sha256, size=event.size_bytes, cache=tmp_path / "e", objects=objects
            )
        assert keyless.value.code == "invalid_model"
        other = Keyring.parse(new_key(), where="test")
        with pytest.raises(ForsetiError, match="does not hold") as wrong:
            await fetch(
                bus,
                event.uri,
                sha256=event.sha256,
                size=event.size_bytes,
                cache=tmp_path / "f",
                objects=objects,
                keyring=other,
            )
        assert wrong.value.code == "invalid_model"
        assert not list((tmp_path / "e").rglob("*.onnx*")) and not list((tmp_path / "f").rglob("*.onnx*"))
    finally:
        await bus.close()
