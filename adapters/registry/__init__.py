"""Registry stores behind one protocol: SQLite on one host (the default), PostgreSQL for many."""

from __future__ import annotations

from pathlib import Path

from forseti.adapters.urls import redact

from .base import (
    Artifact,
    CheckpointRecord,
    Claim,
    EvaluationRecord,
    FederationClaim,
    FederationRecord,
    FireRecord,
    JobRecord,
    ModelRecord,
    PrivacyRecord,
    RegistryStore,
    RLAgent,
    RolloutRecord,
    RolloutStepRecord,
    ScheduleRecord,
    TrainingRun,
)
from .sqlite import SqliteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
"""URL schemes that select the PostgreSQL store."""


def create_store(url: str) -> RegistryStore:
    """A store for a URL: `sqlite:///path/registry.db` (or a plain path), or `postgresql://user:pass@host/db`."""
    if url.startswith(POSTGRES_SCHEMES):
        from .postgres import PostgresStore  # asyncpg: only where a PostgreSQL registry is used

        return PostgresStore(url)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        raise ValueError(f"unsupported registry URL {redact(url)!r}: use sqlite:///PATH or postgresql://HOST/DB")
    return SqliteStore(Path(path))


__all__ = [
    "Artifact",
    "CheckpointRecord",
    "Claim",
    "EvaluationRecord",
    "FederationClaim",
    "FederationRecord",
    "FireRecord",
    "JobRecord",
    "ModelRecord",
    "PrivacyRecord",
    "RLAgent",
    "RegistryStore",
    "RolloutRecord",
    "RolloutStepRecord",
    "ScheduleRecord",
    "SqliteStore",
    "TrainingRun",
    "create_store",
]
