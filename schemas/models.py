"""Model events on `forseti.models`: a new artifact, a rollback, a load report."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .base import Id, LongText, MetricMap, Name, ShortText, Strict, Tags
from .errors import ErrorCode

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ArtifactFormat = Literal["gguf", "gguf-lora", "onnx", "safetensors", "peft"]


class ModelAvailable(Strict):
    """`forseti.model.available.v1`: a new artifact is ready to fetch."""

    model_id: Id
    """Registry id of the model version."""
    name: Name
    """Model name; versions are kept per name."""
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """Version of this name."""
    format: ArtifactFormat
    """File format."""
    uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """Where to fetch it."""
    sha256: Sha256
    """Digest of the file, checked by whoever loads it."""
    size_bytes: int = Field(ge=0)
    """File size."""
    base_model: ShortText | None = None
    """The model this one was derived from, if any."""
    quantization: ShortText | None = None
    """Quantization type, if any (f16, q8_0, int8, ...)."""
    kind: ShortText
    """What the model is: llm, policy, classifier, regressor, ..."""
    metrics: MetricMap = Field(default_factory=dict)
    """Quality and parity figures."""
    job_id: Id | None = None
    """The job that produced it."""
    created_at: ShortText
    """When it was registered (ISO 8601)."""
    parent_version: ShortText | None = None
    """The version this one continued from (lineage), if any."""
    base_uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    """For `gguf-lora`: the base-model GGUF the adapter applies to."""
    base_sha256: Sha256 | None = None
    """Digest of `base_uri`."""
    config_uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    """For `peft`: the adapter's `adapter_config.json`, which `PeftModel.from_pretrained` reads from the
    folder that holds the weights (fetch both into one folder)."""
    config_sha256: Sha256 | None = None
    """Digest of `config_uri`."""
    alias: ShortText | None = None
    """Set when a promote moved an alias (production, staging) to this version."""
    device_id: ShortText | None = None
    """The device the model is for (the task's `device_id`); None: any consumer that follows it."""
    device_tags: Tags = Field(default_factory=list)
    """The device tags the model is for (the task's `device_tags`): an edge agent with one of them
    takes it; empty: not addressed by tag."""


class ModelRollback(Strict):
    """`forseti.model.rollback.v1`: go back to an earlier version of a name."""

    name: Name
    """Model name."""
    from_version: ShortText
    """The version being left."""
    to_version: ShortText
    """The version to serve again."""
    model_id: Id
    """Registry id of the version to serve."""
    reason: LongText = ""
    """Why."""
    alias: ShortText | None = None
    """The alias that moved back (production, staging), if the rollback was of an alias."""


class ModelLoaded(Strict):
    """`forseti.model.loaded.v1`: a consumer reports loading (or failing to load) a version."""

    model_id: Id
    """Registry id of the version."""
    name: Name
    """Model name."""
    version: ShortText
    """Version that was tried."""
    consumer: ShortText
    """Who loaded it: an LLM service or edge device id."""
    ok: bool
    """Whether it is now serving."""
    message: LongText = ""
    """The error when not ok."""


class ModelsQuery(Strict):
    """`forseti.models.query.v1`: ask a worker for the model versions in its registry (request)."""

    name: Name | None = None
    """Only versions of this model name."""
    limit: int = Field(default=50, ge=1, le=1000)
    """At most this many, newest first."""


class ModelSummary(Strict):
    """One registered model version, as its announcement describes it."""

    model_id: Id
    """Registry id of the version."""
    name: Name
    """Model name."""
    version: ShortText
    """Its version label (the registry number, or the producer's label)."""
    kind: ShortText
    """What the model is: llm, policy, classifier, regressor, ..."""
    format: ShortText
    """Its exported file format."""
    metrics: MetricMap = Field(default_factory=dict)
    """Quality figures."""
    parent_id: Id | None = None
    """The version it continued from (lineage), if any."""
    created_at: ShortText
    """When it was registered (ISO 8601)."""


class ModelsList(Strict):
    """`forseti.models.list.v1`: the model versions in one worker's registry, newest first (reply)."""

    worker: ShortText
    """The worker that answered."""
    models: list[ModelSummary] = Field(default_factory=list, max_length=1000)
    """The versions."""


class ModelsQueryError(Strict):
    """`forseti.models.query.error.v1`: why a models query was not answered (reply)."""

    code: ErrorCode
    """malformed_json or invalid_task: not a valid models query."""
    message: LongText
    """What was wrong, for people."""
