"""Privacy requests on `forseti.privacy` (the GDPR rights of access, portability, erasure and
rectification) and the receipts workers answer them with on `forseti.privacy.receipts.<request_id>`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .base import Id, LongText, ShortText, Strict

Counts = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], int], Field(max_length=64)]
Items = Annotated[list[Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=10_000)]


class PrivacyRequest(Strict):
    """Fields every privacy request carries."""

    request_id: Id
    """The request's id, chosen by the client: receipts come back on `forseti.privacy.receipts.<it>`."""
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    """Whose data: the `user_id` their tasks named."""
    requested_by: ShortText | None = None
    """Who asks (for the audit record); the user themselves when unset."""


class PrivacyExport(PrivacyRequest):
    """`forseti.privacy.export.v1`: gather everything held for the user (access, portability)."""


class PrivacyErase(PrivacyRequest):
    """`forseti.privacy.erase.v1`: delete everything held for the user, everywhere it lives."""


class PrivacyRectify(PrivacyRequest):
    """`forseti.privacy.rectify.v1`: replace a dataset the user's tasks named, and train again."""

    dataset: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """The dataset to replace, as the tasks named it (a path or `file://` URI under the data root)."""
    replacement: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """The corrected file, under the data root as well; it takes the dataset's place."""


class PrivacyReceipt(Strict):
    """`forseti.privacy.receipt.v1`: what one worker found, removed, kept and did for a request."""

    request_id: Id
    """The request answered."""
    kind: Literal["export", "erase", "rectify"]
    """Which right was exercised."""
    user_id: ShortText
    """Whose data."""
    worker: ShortText
    """The worker answering: each answers for its own disk, one of them also for the shared stores."""
    shared: bool
    """Whether this receipt covers the shared stores (the registry, object stores, the bus's history)."""
    found: Counts = Field(default_factory=dict)
    """What was held, by place: `registry.jobs`, `objects.checkpoints`, `disk.datasets`, ..."""
    removed: Counts = Field(default_factory=dict)
    """What was deleted, by place (erase)."""
    items: Items = Field(default_factory=list)
    """Each thing found, as `<place>: <name>` (job ids, model ids, file paths, object URIs)."""
    kept: Items = Field(default_factory=list)
    """What could not be removed, and why (a bus that keeps records until its retention, ...)."""
    marked: Items = Field(default_factory=list)
    """Models of other users trained on the erased data or derived from an erased model, now marked so."""
    archive_uri: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """Export: where this worker's part of the archive is (an object store URI)."""
    archive_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    """Export: the digest of that part."""
    archive_bytes: int | None = Field(default=None, ge=0)
    """Export: its size."""
    retrains: Items = Field(default_factory=list)
    """Rectify: the job ids of the retrains scheduled."""
    error: LongText | None = None
    """Why the request could not be served (in whole or part), if it could not."""
