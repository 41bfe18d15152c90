"""Encryption at rest: files put into shared stores are AES-256-GCM ciphertext.

What a worker puts where other hosts can read it (announced artifacts in the bus's object store or
S3, job checkpoints in the checkpoint store) is encrypted when the worker holds a key, and decrypted
by whoever fetches it with the same key; the sha256 an announcement carries stays the plaintext's.
Files are encrypted in 1 MiB chunks (the STREAM construction: one AES-GCM message per chunk, its
nonce a random per-file prefix, the chunk's number and a last-chunk flag, the file header as
associated data), so a file of any size goes through in flat memory, and a reordered, truncated
or extended file fails like a changed one.

    header  FSE1 | key id (8 bytes) | nonce prefix (7 bytes) | chunk size (4 bytes, big-endian)
    chunks  AES-GCM(key, prefix | chunk number (4 bytes) | last (1 byte), plaintext chunk, header)

Keys are 32 random bytes, written as base64: `FORSETI_ENCRYPTION_KEY` (one, or several separated by
commas) or a key file (`FORSETI_ENCRYPTION_KEY_FILE`, one per line). The first key encrypts; every
key decrypts what was encrypted under it (its id, the first 8 bytes of its sha256, is in the
header), which is how keys are rotated. `cryptography` (pyca) does the AES-GCM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from forseti.schemas.errors import ErrorCode, ForsetiError

MAGIC = b"FSE1"
CHUNK = 1 << 20
HEADER = struct.Struct("!4s8s7sI")
TAG = 16
"""Bytes AES-GCM adds to each chunk."""


def new_key() -> str:
    """A fresh 256-bit key, as base64."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def encrypted(path: Path) -> bool:
    """Whether the file at `path` starts like a file this module encrypted."""
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


class Keyring:
    """The keys of a deployment: the first encrypts, all of them decrypt."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ForsetiError("an encryption keyring needs at least one key", code=ErrorCode.INVALID_TASK)
        for key in keys:
            if len(key) != 32:
                raise ForsetiError(
                    f"an encryption key is 32 bytes (base64 of them), not {len(key)}", code=ErrorCode.INVALID_TASK
                )
        self.keys = {hashlib.sha256(key).digest()[:8]: key for key in keys}
        self.current = hashlib.sha256(keys[0]).digest()[:8]

    @classmethod
    def parse(cls, text: str, *, where: str) -> Keyring:
        """Keys written as base64, separated by commas or lines (`#` starts a comment line)."""
        keys = []
        for item in text.replace(",", "\n").splitlines():
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            try:
                keys.append(base64.b64decode(item, validate=True))
            except binascii.Error as exc:
                raise ForsetiError(f"{where}: a key is not base64: {exc}", code=ErrorCode.INVALID_TASK) from exc
        return cls(keys)

    @classmethod
    def load(cls, *, value: str | None = None, file: Path | None = None) -> Keyring | None:
        """The keyring of a setting's value or a key file (the value's keys first); None with neither."""
        text = ""
        if file is not None:
            try:
                text = file.read_text()
            except OSError as exc:
                raise ForsetiError(f"encryption key file {file}: {exc}", code=ErrorCode.INVALID_TASK) from exc
        if value:
            text = value + "\n" + text
        return cls.parse(text, where=str(file or "FORSETI_ENCRYPTION_KEY")) if text.strip() else None

    @property
    def key_id(self) -> str:
        """The id of the key that encrypts, as hex (for logs)."""
        return self.current.hex()

    def encrypt(self, src: Path, dest: Path) -> None:
        """Write `src` encrypted under the current key into `dest`."""
        prefix = os.urandom(7)
        header = HEADER.pack(MAGIC, self.current, prefix, CHUNK)
        cipher = AESGCM(self.keys[self.current])
        with src.open("rb") as plain, dest.open("wb") as out:
            out.write(header)
            chunk, number = plain.read(CHUNK), 0
            while True:
                following = plain.read(CHUNK)
                last = not following
                out.write(cipher.encrypt(_nonce(prefix, number, last), chunk, header))
                if last:
                    return
                chunk, number = following, number + 1

    def decrypt(self, src: Path, dest: Path) -> None:
        """Write the plaintext of `src` into `dest`; invalid_data when it was not encrypted by this
        module, under a key held here, or was changed since."""
        with src.open("rb") as sealed, dest.open("wb") as out:
            header = sealed.read(HEADER.size)
            try:
                magic, key_id, prefix, size = HEADER.unpack(header)
            except struct.error as exc:
                raise _refused(src, "too short to be encrypted") from exc
            if magic != MAGIC:
                raise _refused(src, "not encrypted by Forseti")
            key = self.keys.get(key_id)
            if key is None:
                raise _refused(src, f"encrypted under key {key_id.hex()}, which this keyring does not hold")
            if not 0 < size <= 64 * CHUNK:
                raise _refused(src, f"a chunk size of {size} bytes")
            cipher, number = AESGCM(key), 0
            chunk = sealed.read(size + TAG)
            while True:
                following = sealed.read(size + TAG)
                last = not following
                try:
                    out.write(cipher.decrypt(_nonce(prefix, number, last), chunk, header))
                except InvalidTag as exc:
                    raise _refused(src, f"chunk {number} fails its authentication (changed, cut or reordered)") from exc
                if last:
                    return
                chunk, number = following, number + 1


def _nonce(prefix: bytes, number: int, last: bool) -> bytes:
    return prefix + struct.pack("!I?", number, last)


def _refused(path: Path, why: str) -> ForsetiError:
    return ForsetiError(f"cannot decrypt {path.name}: {why}", code=ErrorCode.INVALID_DATA)


def decrypt_in_place(path: Path, keyring: Keyring | None) -> None:
    """Replace a file this module encrypted by its plaintext (any other file stays as it is);
    invalid_data when it cannot be decrypted, or there is no keyring to do it with."""
    if not encrypted(path):
        return
    plain = path.with_name(path.name + ".plain")
    try:
        if keyring is None:
            raise _refused(
                path,
                "it is encrypted: start with the deployment's key (--encryption-key-file, "
                "FORSETI_ENCRYPTION_KEY or FORSETI_ENCRYPTION_KEY_FILE)",
            )
        keyring.decrypt(path, plain)
    except ForsetiError:
        plain.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    plain.replace(path)
