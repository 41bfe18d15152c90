"""What Forseti holds for a user, and the three things a privacy request does with it: export,
erase, rectify (the request handling is `privacy.py`).

Held for a user: the registry rows of their jobs and models (and the runs, agents, artifacts,
aliases and checkpoints of those), the copies of their checkpoints and announced artifacts in the
object stores, the messages the bus keeps about them, and on each worker's disk their jobs' folders
and the datasets their tasks named.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forseti.adapters.artifacts import BUCKET, delete_file, download, local_path, put_file, stored_uri
from forseti.adapters.bus import Bus
from forseti.adapters.bus.base import KeptHistory
from forseti.adapters.encryption import Keyring, decrypt_in_place, encrypted
from forseti.adapters.exporters import sha256_of
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import JobRecord, ModelRecord, RegistryStore
from forseti.schemas.envelope import encode
from forseti.schemas.errors import ForsetiError
from forseti.schemas.privacy import PrivacyRectify, PrivacyRequest
from forseti.schemas.tasks import TASK_MODELS, TaskKind, task_channel

from .inputs import resolve_input
from .settings import WorkerSettings

ARCHIVES = "forseti-privacy"
"""The object store bucket (NATS) or folder (S3) export archives go to."""


def datasets_of(task: dict[str, Any]) -> list[str]:
    """The input files a stored task named (training data sources, a fine-tune's dataset, an
    inference file)."""
    named = [source.get("uri") for source in task.get("data_sources") or [] if isinstance(source, dict)]
    named += [task.get("dataset"), task.get("uri")]
    return [uri for uri in named if isinstance(uri, str) and uri]


@dataclass
class Found:
    """What one part of a request found and did, as the receipt reports it."""

    found: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def note(self, place: str, item: str) -> None:
        """Count one thing found at `place`."""
        self.found[place] = self.found.get(place, 0) + 1
        self.items.append(f"{place}: {item}")

    def gone(self, place: str, count: int = 1) -> None:
        """Count things removed at `place`."""
        self.removed[place] = self.removed.get(place, 0) + count


@dataclass
class Held:
    """What is held for one user, as one worker sees it."""

    jobs: list[JobRecord]
    models: list[ModelRecord]
    shared: bool
    """Whether this worker answers for the shared stores too (else for its own disk only)."""
    disk: list[tuple[str, Path, str]] = field(default_factory=list)
    """This worker's files: (place, path, name in an export)."""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Registry rows by table (shared part)."""
    objects: list[str] = field(default_factory=list)
    """Object store URIs (shared part)."""
    done: Found = field(default_factory=Found)
    """What was found and done, for the receipt."""


class UserData:
    """Finds, exports, erases and rectifies a user's data, for one worker."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        store: RegistryStore,
        bus: Bus,
        transport: object,
        objects: ObjectStore | None,
        keyring: Keyring | None,
    ) -> None:
        self.settings, self.store, self.bus, self.transport = settings, store, bus, transport
        self.objects, self.keyring = objects, keyring

    @property
    def _source(self) -> str:
        return f"forseti/worker/{self.settings.worker_id}"

    async def find(self, request: PrivacyRequest, *, shared: bool) -> Held:
        """What is held for the user on this worker's disk, and in the shared stores when `shared`."""
        jobs = await self.store.jobs_of_user(request.user_id)
        job_ids = [job.job_id for job in jobs]
        models = await self.store.models_of(request.user_id, job_ids)
        held = Held(jobs=jobs, models=models, shared=shared)
        held.disk = self._disk(jobs, held.done)
        if shared:
            held.rows = await self.store.user_rows(request.user_id, job_ids, [m.id for m in models])
            for table, found in held.rows.items():
                for row in found:
                    held.done.note(f"registry.{table}", str(row.get("job_id") or row.get("id") or row.get("model_id")))
            held.objects = await self._objects(jobs, models, held.done)
        return held

    def _disk(self, jobs: list[JobRecord], done: Found) -> list[tuple[str, Path, str]]:
        """This worker's files of the user's jobs: their folders, and the datasets their tasks named;
        each with its place and its name in an export."""
        root = self.settings.data_dir
        held: list[tuple[str, Path, str]] = []
        for job in jobs:
            for folder in ("jobs", "artifacts"):
                path = root / folder / job.job_id
                if path.exists():
                    held.append((f"disk.{folder}", path, f"disk/{folder}/{job.job_id}"))
        inputs = self.settings.inputs_root.resolve()
        for path in sorted(set(self._datasets(jobs))):
            held.append(("disk.datasets", path, f"disk/datasets/{path.relative_to(inputs)}"))
        for place, path, _ in held:
            done.note(place, str(path))
        return held

    def _datasets(self, jobs: list[JobRecord]) -> list[Path]:
        """The datasets the jobs' tasks named that lie on this worker's disk."""
        found = []
        for job in jobs:
            for uri in datasets_of(job.task):
                try:
                    found.append(resolve_input(uri, self.settings.inputs_root, what="dataset"))
                except ForsetiError:  # not on this worker's disk (or never was)
                    continue
        return found

    async def _objects(self, jobs: list[JobRecord], models: list[ModelRecord], done: Found) -> list[str]:
        """The URIs of the user's checkpoints and shared artifact copies in the object stores."""
        uris: list[str] = []
        for job in jobs:
            for record in await self.store.list_checkpoints(job.job_id):
                uris.append(record.uri)
                done.note("objects.checkpoints", record.uri)
        for model in models:
            for artifact in await self.store.list_artifacts(model.id):
                name = f"{model.id}/{local_path(artifact.uri).name}"
                uri = stored_uri(self.transport, self.objects, BUCKET, "artifacts", name)
                if uri is not None:
                    uris.append(uri)
                    done.note("objects.artifacts", uri)
        return uris

    async def export(self, request: PrivacyRequest, held: Held) -> dict[str, Any]:
        """Pack what was found into this part's archive and put it where the requester fetches it;
        the receipt's archive fields."""
        disk, rows, objects, done = held.disk, held.rows, held.objects, held.done
        worker = self.settings.worker_id
        folder = self.settings.data_dir / "privacy" / request.request_id
        staging, archive = folder / worker, folder / f"{worker}.tar.gz"
        shutil.rmtree(folder, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for uri in objects:
                dest = staging / "objects" / uri.split("://", 1)[1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    await self._download(uri, dest)
                except ForsetiError as exc:
                    done.kept.append(f"{uri}: not exported: {exc.message}")
            plain = folder / "plain"  # datasets stored encrypted go into the archive decrypted
            disk = [
                (place, await asyncio.to_thread(_readable, path, plain, self.keyring), name)
                for place, path, name in disk
            ]
            manifest = {"request_id": request.request_id, "user_id": request.user_id, "worker": worker}
            await asyncio.to_thread(_pack, archive, staging, disk, rows, {**manifest, "items": done.items})
            digest, size = await asyncio.to_thread(sha256_of, archive), archive.stat().st_size
            name = f"{request.request_id}/{worker}.tar.gz"
            stored = await put_file(
                self.transport, self.objects, ARCHIVES, ARCHIVES, name, archive, digest, keyring=self.keyring
            )
            if stored is None:  # no shared store (the memory bus): the archive stays on this host
                kept = folder.with_name(f"{request.request_id}-{worker}.tar.gz")
                archive.replace(kept)
                stored = kept.resolve().as_uri()
            return {"archive_uri": stored, "archive_sha256": digest, "archive_bytes": size}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def _download(self, uri: str, dest: Path) -> None:
        """An object of the shared stores into `dest`, decrypted."""
        await download(self.transport, self.objects, uri, dest)
        await asyncio.to_thread(decrypt_in_place, dest, self.keyring)

    async def erase(self, request: PrivacyRequest, held: Held) -> dict[str, Any]:
        """Delete what was found; mark the versions of others derived from it (shared part); the
        receipt's `marked`."""
        jobs, models, done, shared = held.jobs, held.models, held.done, held.shared
        marked = await self._mark_derived(request, jobs, models) if shared else []
        for place, path, _ in held.disk:
            await asyncio.to_thread(_remove, path)
            done.gone(place)
        if not shared:
            return {}
        for uri in held.objects:
            try:
                await delete_file(self.transport, self.objects, uri)
                done.gone("objects")
            except ForsetiError as exc:
                done.kept.append(f"{uri}: {exc.message}")
        await self._erase_history(request, jobs, models, done)
        erased = await self.store.erase_rows(request.user_id, [j.job_id for j in jobs], [m.id for m in models])
        for table, count in erased.items():
            if count:
                done.gone(f"registry.{table}", count)
        return {"marked": marked}

    async def _erase_history(
        self, request: PrivacyRequest, jobs: list[JobRecord], models: list[ModelRecord], done: Found
    ) -> None:
        """Delete the messages the bus keeps about the user: announcements of their versions, their stored tasks."""
        if not isinstance(self.transport, KeptHistory):
            done.kept.append(
                f"the messages {type(self.transport).__name__} keeps (announcements, tasks) stay until its retention"
            )
            return
        job_ids, model_ids = {j.job_id for j in jobs}, {m.id for m in models}

        def about_user(channel: str, raw: bytes) -> bool:
            try:
                data = json.loads(raw).get("data") or {}
            except (ValueError, AttributeError):
                return False
            return bool(
                data.get("user_id") == request.user_id
                or data.get("request_id") in job_ids
                or data.get("job_id") in job_ids
                or data.get("model_id") in model_ids
            )

        count = await self.transport.erase_kept(about_user)
        if count:
            done.gone("bus.history", count)
            done.note("bus.history", f"{count} kept message(s)")

    async def _mark_derived(
        self, request: PrivacyRequest, jobs: list[JobRecord], models: list[ModelRecord]
    ) -> list[str]:
        """Mark the versions (of other users) trained on a dataset the user's tasks named, or derived
        from an erased version, following lineage to its end; their ids."""
        erased, own_jobs = {m.id for m in models}, {j.job_id for j in jobs}
        named = {uri for job in jobs for uri in datasets_of(job.task)}
        # datasets compared as the tasks named them: the file may lie on another worker's disk
        readers = {
            job.job_id
            for job in await self.store.list_jobs(limit=1_000_000)
            if job.job_id not in own_jobs and named & set(datasets_of(job.task))
        }
        others = [m for m in await self.store.list_models(limit=1_000_000) if m.id not in erased]
        marked: set[str] = set()
        while grew := [
            m.id
            for m in others
            if m.id not in marked and (m.job_id in readers or m.parent_id in erased or m.parent_id in marked)
        ]:
            marked.update(grew)
        reason = f"privacy erase {request.request_id}: trained on, or derived from, erased data"
        await self.store.mark_erased_lineage(sorted(marked), reason)
        return sorted(marked)

    async def rectify(self, request: PrivacyRectify, held: Held) -> dict[str, Any]:
        """Put the replacement in the dataset's place on this disk; schedule the retrains (shared
        part); the receipt's `retrains`."""
        jobs, models, done, shared = held.jobs, held.models, held.done, held.shared
        root = self.settings.inputs_root
        try:
            dataset = resolve_input(request.dataset, root, what="dataset")
            replacement = resolve_input(request.replacement, root, what="replacement")
        except ForsetiError as exc:
            if not shared:
                return {}  # this worker does not hold the dataset
            raise ForsetiError(f"cannot rectify: {exc.message}", code=exc.code) from exc
        partial = dataset.with_name(f".{dataset.name}.rectified")
        await asyncio.to_thread(shutil.copyfile, replacement, partial)
        partial.replace(dataset)
        done.note("disk.datasets", f"{dataset} replaced by {replacement}")
        if not shared:
            return {}
        readers = [j for j in jobs if dataset in self._datasets([j])]
        retrains = [await self._retrain(job, request) for job in readers]
        reason = f"privacy rectify {request.request_id}: trained on {request.dataset} before it was rectified"
        await self.store.mark_erased_lineage([m.id for m in models if m.job_id in {j.job_id for j in readers}], reason)
        return {"retrains": retrains}

    async def _retrain(self, job: JobRecord, request: PrivacyRectify) -> str:
        """Publish the job's task again under a new id; that id."""
        job_id = f"{job.job_id[:96]}.rectified-{request.request_id[:24]}"
        task = TASK_MODELS[TaskKind(job.kind)].model_validate({**job.task, "request_id": job_id})
        await self.bus.publish(task_channel(TaskKind(job.kind)), encode(task, source=self._source, subject=job_id))
        return job_id


def _pack(
    archive: Path,
    staging: Path,
    disk: list[tuple[str, Path, str]],
    rows: dict[str, list[dict[str, Any]]],
    manifest: dict[str, Any],
) -> None:
    """The part's tar.gz: manifest.json, registry.json, the objects downloaded into `staging`, and
    the disk's files under `disk/`."""
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    (staging / "registry.json").write_text(json.dumps(rows, indent=1, default=str))
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(staging.iterdir()):
            tar.add(item, arcname=item.name)
        for _, path, name in disk:
            tar.add(path, arcname=name)


def _readable(path: Path, folder: Path, keyring: Keyring | None) -> Path:
    """A file as its owner can read it: one stored encrypted, decrypted into `folder`."""
    if not (path.is_file() and encrypted(path)):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    plain = folder / f"{len(list(folder.iterdir()))}-{path.name}"
    shutil.copyfile(path, plain)
    decrypt_in_place(plain, keyring)
    return plain


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
