"""Signed events: who announced a model, proven with ed25519.

A worker signs each `forseti.model.available` / `rollback` it publishes with its deployment's
private key; `forseti edge` and `forseti llm-serve` check the signature against the public keys
they were configured to trust before they fetch anything. The signature travels in two CloudEvents
extension attributes, so any consumer can check it without Forseti's code:

- `signingkey`: the key's id, the first 16 hex digits of the sha256 of its 32 raw public bytes;
- `signature`: base64 of the ed25519 signature of the event without these two attributes,
  serialised as RFC 8785 (JSON Canonicalization Scheme) bytes.

Every other attribute is covered (`id`, `time`, `source`, `subject`, `type` and the whole `data`),
so nothing of a signed event can be changed, only replayed (docs/security.md says what that allows).
Keys are PEM files (PKCS #8 private, SubjectPublicKeyInfo public), the format `openssl genpkey
-algorithm ed25519` writes. `cryptography` does the ed25519, `rfc8785` the canonical JSON.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from forseti.schemas.errors import ErrorCode, ForsetiError

SIGNATURE = "signature"
"""CloudEvents extension attribute: base64 of the ed25519 signature."""
KEY_ID = "signingkey"
"""CloudEvents extension attribute: the id of the key that signed."""
PRIVATE_KEY = "signing.key"
"""File name of a deployment's private key in a keys folder (`forseti keys generate`)."""
PUBLIC_SUFFIX = ".pub"
"""Public key files end so; a folder of trusted keys is every such file in it."""


def key_id(public: Ed25519PublicKey) -> str:
    """A public key's id: 16 hex digits of the sha256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the event without its signature attributes, as RFC 8785 JSON."""
    return rfc8785.dumps({k: v for k, v in doc.items() if k not in (SIGNATURE, KEY_ID)})


@dataclass(frozen=True)
class Signer:
    """Signs events with one private key."""

    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        """The id consumers know this key's public half by."""
        return key_id(self.private.public_key())

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """The private key in a PEM file; a ForsetiError naming the file when it holds none."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ForsetiError(f"signing key {path}: {exc}", code=ErrorCode.INVALID_TASK) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ForsetiError(f"signing key {path}: not an ed25519 key", code=ErrorCode.INVALID_TASK)
        return cls(key)

    def sign(self, raw: bytes) -> bytes:
        """The encoded event `raw` with its `signingkey` and `signature` attributes set."""
        doc = orjson.loads(raw)
        signature = self.private.sign(canonical(doc))
        doc[KEY_ID] = self.key_id
        doc[SIGNATURE] = base64.b64encode(signature).decode("ascii")
        return orjson.dumps(doc)


class TrustedKeys:
    """The public keys a consumer accepts announcements from, by id."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def from_paths(cls, paths: list[Path]) -> TrustedKeys:
        """Keys from PEM files and from folders (each `*.pub` in them); a ForsetiError naming the path
        that holds no key."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            files = sorted(path.glob(f"*{PUBLIC_SUFFIX}")) if path.is_dir() else [path]
            if not files:
                raise ForsetiError(f"trusted keys {path}: no *{PUBLIC_SUFFIX} file in it", code=ErrorCode.INVALID_TASK)
            for file in files:
                try:
                    key = serialization.load_pem_public_key(file.read_bytes())
                except (OSError, ValueError) as exc:
                    raise ForsetiError(f"trusted key {file}: {exc}", code=ErrorCode.INVALID_TASK) from exc
                if not isinstance(key, Ed25519PublicKey):
                    raise ForsetiError(f"trusted key {file}: not an ed25519 key", code=ErrorCode.INVALID_TASK)
                keys.append(key)
        return cls(keys)

    def verify(self, raw: bytes) -> str:
        """The id of the trusted key that signed the event `raw`; invalid_model when it is unsigned,
        signed by a key not trusted here, or changed since it was signed."""
        try:
            doc = orjson.loads(raw)
            kid, signature = doc.get(KEY_ID), doc.get(SIGNATURE)
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise ForsetiError("not a JSON event", code=ErrorCode.INVALID_MODEL) from exc
        if not isinstance(kid, str) or not isinstance(signature, str):
            raise ForsetiError("the announcement is not signed", code=ErrorCode.INVALID_MODEL)
        key = self.keys.get(kid)
        if key is None:
            raise ForsetiError(
                f"the announcement is signed by key {kid!r}, which is not trusted here", code=ErrorCode.INVALID_MODEL
            )
        try:
            key.verify(base64.b64decode(signature, validate=True), canonical(doc))
        except (InvalidSignature, ValueError) as exc:
            raise ForsetiError(
                f"the announcement's signature by key {kid} does not match its content", code=ErrorCode.INVALID_MODEL
            ) from exc
        return kid


def configured_keys(paths: list[Path], default: Path) -> TrustedKeys | None:
    """The keys of `paths`; without any, those of the folder `default` when it holds a public key;
    None when there are neither."""
    if not paths and default.is_dir() and any(default.glob(f"*{PUBLIC_SUFFIX}")):
        paths = [default]
    return TrustedKeys.from_paths(paths) if paths else None


def generate(folder: Path, name: str = "signing") -> tuple[Path, Path]:
    """A new key pair in `folder`: `<name>.key` (private, readable by its owner only) and `<name>.pub`;
    an existing pair is kept. Returns both paths."""
    private, public = folder / f"{name}.key", folder / f"{name}{PUBLIC_SUFFIX}"
    if private.is_file():
        if not public.is_file():
            public.write_bytes(_public_pem(Signer.from_file(private).private.public_key()))
        return private, public
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public.write_bytes(_public_pem(key.public_key()))
    return private, public


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def seal(raw: bytes, signer: Signer | None) -> bytes:
    """`raw` signed by `signer`, or unchanged without one."""
    return signer.sign(raw) if signer is not None else raw


def refusal(trusted: TrustedKeys | None, raw: bytes) -> str | None:
    """Why a consumer that trusts `trusted` must not act on the event `raw`; None when it may (a
    consumer configured with no keys acts on every event, as before signatures)."""
    if trusted is None:
        return None
    try:
        trusted.verify(raw)
    except ForsetiError as exc:
        return exc.message
    return None
