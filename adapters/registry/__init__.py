"""Registry stores behind one protocol: SQLite by default."""

from __future__ import annotations

from pathlib import Path

from .base import Artifact, JobRecord, ModelRecord, RegistryStore, RLAgent, TrainingRun
from .sqlite import SqliteStore


def create_store(url: str) -> RegistryStore:
    """A store for a URL: `sqlite:///path/registry.db` or a plain path."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        raise ValueError(f"unsupported registry URL {url!r}: use sqlite:///PATH")
    return SqliteStore(Path(path))


__all__ = [
    "Artifact",
    "JobRecord",
    "ModelRecord",
    "RLAgent",
    "RegistryStore",
    "SqliteStore",
    "TrainingRun",
    "create_store",
]
