"""A job's checkpoints on shared storage, so that any worker can resume a job another one began.

A handler writes its checkpoints into `ctx.checkpoint_dir` as before (atomically, on local disk),
then calls `ctx.checkpointed(step)`. That call packs the folder into one tar in the handler's own
thread (a consistent snapshot: the handler writes nothing while it packs) and hands it to the
event loop, which uploads one snapshot at a time to the object store (`adapters/objects.py`) while
the handler goes on. Once uploaded, the snapshot is recorded in the registry with its sha256, and
the job's snapshots older than the newest `KEEP` are removed.

A handler that checkpoints again while the previous snapshot still uploads waits for that upload
(at most `wait` seconds) before it hands the new one over: what is shared is then never more than
one checkpoint behind the job, so a worker that takes it over loses at most one checkpoint interval
of work however fast the job checkpoints (async checkpointing as `torch.distributed.checkpoint`'s
`async_save` does it: one save in flight). A store slower than `wait`, or away, does not hold the
job longer: the newest snapshot then replaces any that waits, and the next upload tries again.

A worker that takes a job over (attempt > 1) reads the job's newest snapshot from the registry; when
it is newer than what its own disk holds (the marker file in the folder names the snapshot it came
from), it downloads it, checks its size and sha256 against the registry's record, unpacks it
(members confined to the folder by `tarfile`'s data filter) and swaps it in. Handlers then resume
exactly as they do from a local checkpoint.

Retention: a job's snapshots live while it has no outcome. When it ends (completed, failed or
cancelled) its worker removes them; a worker that starts removes those that a worker which died
after a job's end left behind (`prune_ended`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import tarfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from forseti.adapters.encryption import Keyring, decrypt_in_place
from forseti.adapters.exporters import sha256_of
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import CheckpointRecord, RegistryStore
from forseti.schemas.errors import ForsetiError, StoreError

log = logging.getLogger(__name__)

MARKER = ".forseti-snapshot.json"
"""In a checkpoint folder: which snapshot (seq, step) the folder was last packed as or restored from."""
KEEP = 2
"""Snapshots kept per running job: the newest, and one before it in case the newest cannot be read."""
SEQ_PER_ATTEMPT = 1_000_000
"""Snapshot numbers count within an attempt; attempts count across hosts, so a later attempt's win."""


@dataclass(frozen=True)
class Snapshot:
    """A packed checkpoint folder waiting to be uploaded."""

    seq: int
    """Its number (see `CheckpointRecord.seq`)."""
    step: int
    """How far the job had got."""
    path: Path
    """The tar on local disk."""
    sha256: str
    """The tar's digest."""
    size: int
    """The tar's size in bytes."""


def local_seq(folder: Path) -> int:
    """The snapshot a checkpoint folder holds (0 when it holds none this worker knows of)."""
    try:
        return int(json.loads((folder / MARKER).read_text())["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class SharedCheckpoints:
    """One job's checkpoint snapshots: packed in the handler's thread, uploaded on the event loop."""

    def __init__(
        self,
        objects: ObjectStore,
        store: RegistryStore,
        *,
        job_id: str,
        attempt: int,
        folder: Path,
        spool: Path,
        loop: asyncio.AbstractEventLoop,
        keyring: Keyring | None = None,
        wait: float = 30.0,
    ) -> None:
        self.objects, self.store, self.job_id, self.attempt = objects, store, job_id, attempt
        self.folder, self.spool, self._loop = folder, spool, loop
        self.keyring = keyring
        """Encrypts snapshots before they go up (None: they go up as tars)."""
        self.wait = wait
        """Seconds a handler waits for the previous snapshot's upload before it hands over the next."""
        self._count = 0
        self._waiting: Snapshot | None = None
        self._uploader: asyncio.Task[None] | None = None
        self.shared: CheckpointRecord | None = None
        """The newest snapshot this worker recorded in the registry."""

    # -- sharing ---------------------------------------------------------------------------------

    def snapshot(self, step: int) -> None:
        """Pack the checkpoint folder and queue its upload once the previous one is up (see the
        module's doc); call right after a whole checkpoint was written, from the handler's thread. A
        snapshot that cannot be packed is logged and skipped: the local checkpoint still stands."""
        self._count += 1
        seq = self.attempt * SEQ_PER_ATTEMPT + self._count
        try:
            (self.folder / MARKER).write_text(json.dumps({"seq": seq, "step": step}))
            self.spool.mkdir(parents=True, exist_ok=True)
            path = self.spool / f"{seq}.tar"
            with tarfile.open(path, "w") as tar:
                for item in sorted(self.folder.rglob("*")):
                    if not item.name.startswith("partial-"):  # a write in progress, never whole
                        tar.add(item, arcname=str(item.relative_to(self.folder)), recursive=False)
            if self.keyring is not None:  # the registry records the stored (encrypted) bytes' digest
                sealed = path.with_suffix(".tar.fse")
                self.keyring.encrypt(path, sealed)
                path.unlink()
                path = sealed
            snapshot = Snapshot(seq, step, path, sha256_of(path), path.stat().st_size)
        except OSError as exc:
            log.warning("checkpoint at step %d not packed for sharing: %s", step, exc)
            return
        self._wait_for_upload()
        self._loop.call_soon_threadsafe(self._offer, snapshot)

    def _wait_for_upload(self) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # a caller on the uploading loop itself cannot be held: it would hold the upload
            return
        # a loop that is closing or stuck holds no one: the job's own outcome decides what comes next
        with suppress(RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            asyncio.run_coroutine_threadsafe(self.flush(self.wait), self._loop).result(self.wait + 5)

    def _offer(self, snapshot: Snapshot) -> None:
        if self._waiting is not None:  # superseded before it could go up
            self._waiting.path.unlink(missing_ok=True)
        self._waiting = snapshot
        if self._uploader is None or self._uploader.done():
            self._uploader = asyncio.create_task(self._drain(), name=f"checkpoints-{self.job_id}")

    async def _drain(self) -> None:
        while self._waiting is not None:
            snapshot, self._waiting = self._waiting, None
            try:
                await self._upload(snapshot)
            except ForsetiError as exc:  # the store is away: the next checkpoint tries again
                log.warning("checkpoint %d not shared: %s", snapshot.seq, exc.message)
            finally:
                snapshot.path.unlink(missing_ok=True)

    async def _upload(self, snapshot: Snapshot) -> None:
        uri = await self.objects.put(f"{self.job_id}/{snapshot.seq:016d}.tar", snapshot.path, snapshot.sha256)
        record = CheckpointRecord(
            job_id=self.job_id,
            seq=snapshot.seq,
            uri=uri,
            sha256=snapshot.sha256,
            size_bytes=snapshot.size,
            step=snapshot.step,
        )
        await self.store.add_checkpoint(record)
        self.shared = record
        log.info("checkpoint at step %d shared as %s", snapshot.step, uri)
        for old in (await self.store.list_checkpoints(self.job_id))[KEEP:]:
            await remove(self.objects, self.store, old)

    async def flush(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until the newest snapshot is shared: a job handed back
        should be found where this worker left it."""
        if self._uploader is not None and not self._uploader.done():
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._uploader), timeout)

    async def close(self, timeout: float) -> None:
        """Flush, then give up what is still uploading and remove what waits on local disk."""
        await self.flush(timeout)
        if self._uploader is not None and not self._uploader.done():
            self._uploader.cancel()
            with suppress(asyncio.CancelledError):
                await self._uploader
        if self._waiting is not None:
            self._waiting.path.unlink(missing_ok=True)
            self._waiting = None

    # -- resuming --------------------------------------------------------------------------------

    async def restore(self) -> CheckpointRecord | None:
        """The job's newest shared snapshot unpacked in place of the local folder, when it is newer than
        what the folder holds; None when there is nothing newer (or nothing newer could be had: each
        snapshot that fails its download or its digest is logged and the next older one tried)."""
        have = local_seq(self.folder)
        for record in await self.store.list_checkpoints(self.job_id):
            if record.seq <= have:
                return None
            try:
                await self._fetch(record)
            except ForsetiError as exc:
                log.warning("shared checkpoint %s not used: %s", record.uri, exc.message)
                continue
            log.info("resuming from shared checkpoint %s (step %d)", record.uri, record.step)
            return record
        return None

    async def _fetch(self, record: CheckpointRecord) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"restore-{record.seq}.tar"
        try:
            await self.objects.get(record.uri, path)
            size = path.stat().st_size
            if size != record.size_bytes:
                raise StoreError(f"{record.uri} has {size} bytes, the registry says {record.size_bytes}")
            if await asyncio.to_thread(sha256_of, path) != record.sha256:
                raise StoreError(f"{record.uri} fails its sha256 check against the registry")
            await asyncio.to_thread(self._decrypt, path, record.uri)
            await asyncio.to_thread(_unpack, path, self.folder)
        except (OSError, tarfile.TarError) as exc:
            raise StoreError(f"{record.uri} cannot be unpacked: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)

    def _decrypt(self, path: Path, uri: str) -> None:
        """An encrypted snapshot replaced by its plaintext tar (a StoreError when it cannot be)."""
        try:
            decrypt_in_place(path, self.keyring)
        except ForsetiError as exc:
            raise StoreError(f"{uri}: {exc.message}") from exc


def _unpack(tar: Path, folder: Path) -> None:
    """Unpack beside the folder, then swap it in: a worker killed half way keeps a whole folder."""
    staging = folder.with_name(folder.name + ".restoring")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tar) as archive:
        archive.extractall(staging, filter="data")  # no absolute paths, no `..`, no links out, no devices
    old = folder.with_name(folder.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


async def remove(objects: ObjectStore, store: RegistryStore, record: CheckpointRecord) -> bool:
    """Remove one snapshot: its object, then its row (kept when the object could not be removed, so a
    later prune tries again). True when both are gone."""
    try:
        await objects.delete(record.uri)
        await store.delete_checkpoint(record.job_id, record.seq)
    except ForsetiError as exc:
        log.warning("checkpoint %s not removed yet: %s", record.uri, exc.message)
        return False
    return True


async def forget(objects: ObjectStore, store: RegistryStore, job_id: str) -> None:
    """Remove every snapshot of a job that has ended."""
    for record in await store.list_checkpoints(job_id):
        await remove(objects, store, record)


async def prune_ended(objects: ObjectStore, store: RegistryStore, *, batch: int = 100) -> int:
    """Remove the snapshots of jobs that have ended (left by workers that died before removing
    them); the number removed."""
    removed = 0
    while records := await store.ended_checkpoints(batch):
        done = [await remove(objects, store, record) for record in records]
        removed += sum(done)
        if not all(done):  # the store refuses: try again at the next start, not in a tight loop
            break
    return removed
