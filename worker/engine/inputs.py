"""Input files named by tasks: `file://` URIs (or bare relative paths) confined to the data root.

A task comes from the bus, so its paths are hostile until shown otherwise: anything that resolves
outside the worker's data root (absolute paths elsewhere, `..`, symlinks out) is refused with
invalid_path before it is opened.

A dataset may lie in the data root encrypted (`forseti encrypt`, `adapters/encryption.py`): a job
reads it through `Inputs.resolve`, which hands back a decrypted copy in the job's own folder, made
with the worker's data key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from forseti.adapters.encryption import Keyring, encrypted
from forseti.schemas.errors import ErrorCode, ForsetiError


def resolve_input(uri: str, root: Path, *, what: str, missing: ErrorCode = ErrorCode.INVALID_PATH) -> Path:
    """The path `uri` names under `root`: `file:///abs/path` (inside root), `file://rel/path` or
    `rel/path` (relative to root). invalid_path when it leaves the root or is not a file URI; `missing`
    when nothing is there."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ForsetiError(f"{what} {uri!r}: only file:// URIs are read", code=ErrorCode.INVALID_PATH)
    raw = unquote(parsed.netloc + parsed.path) if parsed.scheme == "file" else uri
    base = root.resolve()
    path = (base / raw).resolve() if not raw.startswith("/") else Path(raw).resolve()
    if not path.is_relative_to(base):
        raise ForsetiError(f"{what} {uri!r} lies outside the data root {base}", code=ErrorCode.INVALID_PATH)
    if not path.exists():
        raise ForsetiError(f"{what} {uri!r}: nothing at {path}", code=missing)
    return path


@dataclass(frozen=True)
class Inputs:
    """Where a job's input files lie, and how it reads those stored encrypted."""

    root: Path
    """Input files must lie under this folder."""
    keyring: Keyring | None = None
    """Decrypts inputs stored encrypted (None: such inputs are refused)."""
    scratch: Path | None = None
    """The job's folder for decrypted copies (None: encrypted inputs are refused)."""

    def resolve(self, uri: str, *, what: str, missing: ErrorCode = ErrorCode.INVALID_PATH) -> Path:
        """The file (or folder) `uri` names under the root, as `resolve_input` finds it; a decrypted
        copy in the job's folder when it is stored encrypted (invalid_data when it cannot be)."""
        path = resolve_input(uri, self.root, what=what, missing=missing)
        if not (path.is_file() and encrypted(path)):
            return path
        if self.keyring is None or self.scratch is None:
            raise ForsetiError(
                f"{what} {uri!r} is encrypted: give the worker the data key (FORSETI_ENCRYPTION_KEY or _FILE)",
                code=ErrorCode.INVALID_DATA,
            )
        # named by its place, and kept with its suffix: readers tell the format by it
        copy = self.scratch / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}-{path.name}"
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            partial = copy.with_name(copy.name + ".partial")
            try:
                self.keyring.decrypt(path, partial)
            except ForsetiError as exc:
                partial.unlink(missing_ok=True)
                raise ForsetiError(f"{what} {uri!r}: {exc.message}", code=ErrorCode.INVALID_DATA) from exc
            partial.replace(copy)
        return copy


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; invalid_data naming the line
    when one is not a JSON object, or the file is not UTF-8."""
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise ForsetiError(
                        f"{path.name} line {number}: not valid JSON ({exc})", code=ErrorCode.INVALID_DATA
                    ) from exc
                if not isinstance(value, dict):
                    raise ForsetiError(
                        f"{path.name} line {number}: expected a JSON object", code=ErrorCode.INVALID_DATA
                    )
                yield number, value
        except UnicodeDecodeError as exc:
            raise ForsetiError(f"{path.name} is not UTF-8 text: {exc}", code=ErrorCode.INVALID_DATA) from exc
