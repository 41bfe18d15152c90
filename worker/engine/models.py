"""Model aliases (MLflow style): `promote` points an alias at a version and announces its artifacts;
`rollback` returns the alias to where it pointed before and announces that. Behind
`forseti models promote / rollback`, usable from any process that reaches the registry and the bus."""

from __future__ import annotations

from pathlib import Path

from forseti.adapters.artifacts import share
from forseti.adapters.bus import Bus
from forseti.adapters.encryption import Keyring
from forseti.adapters.exporters import sha256_of
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import Artifact, ModelRecord, RegistryStore
from forseti.adapters.signing import Signer, seal
from forseti.schemas.catalog import MODELS
from forseti.schemas.envelope import encode
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.models import ModelAvailable, ModelRollback

BASE_FORMAT = "gguf-base"
"""Registry-only format of the base-model GGUF that a version's `gguf-lora` applies to."""
PEFT_CONFIG_FORMAT = "peft-config"
"""Registry-only format of a `peft` adapter's adapter_config.json, announced with the adapter."""
ANNOUNCED_FORMATS = ("onnx", "safetensors", "gguf", "gguf-lora", "peft")


def describe(files: list[tuple[str, str | None, Path]], model_id: str) -> list[Artifact]:
    """Registry rows, with size and sha256, for a version's (format, quantization, path) files."""
    return [
        Artifact(
            id=f"{model_id}.{fmt}.{quantization or ''}".rstrip("."),
            model_id=model_id,
            format=fmt,
            uri=path.resolve().as_uri(),
            sha256=sha256_of(path),
            size_bytes=path.stat().st_size,
            quantization=quantization,
        )
        for fmt, quantization, path in files
    ]


def version_label(model: ModelRecord) -> str:
    """The version as people and events name it: the producer's label, else the number."""
    return model.label or str(model.version)


async def find_version(store: RegistryStore, name: str, version: str) -> ModelRecord:
    """A version of `name` by label (v1.1) or number (2); invalid_model when there is none."""
    for model in await store.list_models(name=name, limit=10_000):
        if version in (model.label, str(model.version)):
            return model
    raise ForsetiError(f"model {name!r} has no version {version!r}", code=ErrorCode.INVALID_MODEL)


def announcements(
    model: ModelRecord, artifacts: list[Artifact], *, parent_version: str | None = None, alias: str | None = None
) -> list[ModelAvailable]:
    """One model.available per announced artifact of a version (a gguf-lora carries its base GGUF, a
    peft adapter its adapter_config.json)."""
    base = next((a for a in artifacts if a.format == BASE_FORMAT), None)
    config = next((a for a in artifacts if a.format == PEFT_CONFIG_FORMAT), None)
    events = []
    for artifact in artifacts:
        if artifact.format not in ANNOUNCED_FORMATS:
            continue
        with_base = artifact.format == "gguf-lora" and base is not None
        with_config = artifact.format == "peft" and config is not None
        events.append(
            ModelAvailable.model_validate(
                {
                    "model_id": model.id,
                    "name": model.name,
                    "version": version_label(model),
                    "format": artifact.format,
                    "uri": artifact.uri,
                    "sha256": artifact.sha256,
                    "size_bytes": artifact.size_bytes,
                    "base_model": model.base_model,
                    "quantization": artifact.quantization,
                    "kind": model.model_type,
                    "metrics": model.metrics,
                    "job_id": model.job_id,
                    "created_at": model.created_at,
                    "base_uri": base.uri if with_base and base else None,
                    "base_sha256": base.sha256 if with_base and base else None,
                    "config_uri": config.uri if with_config and config else None,
                    "config_sha256": config.sha256 if with_config and config else None,
                    "parent_version": parent_version,
                    "alias": alias,
                    "device_id": model.device_id,
                    "device_tags": model.device_tags,
                }
            )
        )
    return events


async def promote(
    store: RegistryStore,
    bus: Bus,
    name: str,
    version: str,
    *,
    alias: str,
    objects: ObjectStore | None = None,
    http: tuple[Path, str] | None = None,
    signer: Signer | None = None,
    keyring: Keyring | None = None,
) -> ModelRecord:
    """Point `alias` of `name` at `version` and announce that version's artifacts with the alias set,
    shared as a worker shares them (`objects`: its S3 store; `http`: an artifacts folder and the URL a
    worker serves it at), signed by `signer` and stored encrypted under `keyring` when given."""
    model = await find_version(store, name, version)
    await store.set_alias(name, alias, model.id)
    for event in await shared_announcements(
        store, bus, model, alias=alias, objects=objects, http=http, keyring=keyring
    ):
        await bus.publish(MODELS, seal(encode(event, subject=model.id), signer))
    return model


async def shared_announcements(
    store: RegistryStore,
    bus: Bus,
    model: ModelRecord,
    *,
    alias: str | None = None,
    objects: ObjectStore | None = None,
    http: tuple[Path, str] | None = None,
    keyring: Keyring | None = None,
) -> list[ModelAvailable]:
    """A version's announcements (with `alias` set), its files shared where other hosts can fetch them
    (`objects`: an S3 store; `http`: an artifacts folder and its URL; else the bus's object store)."""
    parent = await store.get_model(model.parent_id) if model.parent_id else None
    artifacts = await store.list_artifacts(model.id)
    return [
        await share(bus, event, objects=objects, http=http, keyring=keyring)
        for event in announcements(
            model, artifacts, parent_version=version_label(parent) if parent else None, alias=alias
        )
    ]


async def rollback(
    store: RegistryStore, bus: Bus, name: str, *, alias: str, reason: str = "", signer: Signer | None = None
) -> ModelRollback:
    """Return `alias` of `name` to where it pointed before its last move, and announce the rollback
    (signed by `signer` when given)."""
    moved = await store.rollback_alias(name, alias)
    if moved is None:
        raise ForsetiError(
            f"{name} {alias} has no earlier version to return to (promote one first)", code=ErrorCode.INVALID_MODEL
        )
    left, now = moved
    event = ModelRollback(
        name=name,
        from_version=version_label(left),
        to_version=version_label(now),
        model_id=now.id,
        reason=reason,
        alias=alias,
    )
    await bus.publish(MODELS, seal(encode(event, subject=now.id), signer))
    return event
