"""Input files named by tasks: `file://` URIs (or bare relative paths) confined to the data root.

A task comes from the bus, so its paths are hostile until shown otherwise: anything that resolves
outside the worker's data root (absolute paths elsewhere, `..`, symlinks out) is refused with
invalid_path before it is opened.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

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
