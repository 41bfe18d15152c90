"""What `forseti privacy` does on the client side: send a signed request, gather the workers' receipts,
and, for an export, fetch every worker's part and merge them into one archive with one manifest."""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from forseti.adapters.artifacts import delete_file, fetch, local_path
from forseti.adapters.bus import Bus, Message
from forseti.adapters.encryption import Keyring
from forseti.adapters.objects import ObjectStore
from forseti.adapters.signing import Signer, seal
from forseti.schemas.catalog import PRIVACY, receipts_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ForsetiError, InvalidTask
from forseti.schemas.privacy import PrivacyReceipt, PrivacyRequest


async def ask(
    bus: Bus, request: PrivacyRequest, signer: Signer | None, *, quiet: float, timeout: float
) -> list[PrivacyReceipt]:
    """Publish `request` signed by `signer` (unsigned, every worker refuses it) and gather the
    receipts: until `quiet` seconds pass without a new one (after the first), or `timeout` seconds
    without any."""
    receipts: list[PrivacyReceipt] = []
    arrived = asyncio.Event()

    async def on_receipt(msg: Message) -> None:
        try:
            receipts.append(decode(msg.data, expect=PrivacyReceipt).data)
        except InvalidTask:
            return
        arrived.set()

    sub = await bus.subscribe(receipts_channel(request.request_id), on_receipt)
    try:
        await bus.publish(PRIVACY, seal(encode(request, subject=request.request_id), signer))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            arrived.clear()
            wait = quiet if receipts else deadline - loop.time()
            try:
                await asyncio.wait_for(arrived.wait(), max(0.0, wait))
            except TimeoutError:
                return receipts
    finally:
        await sub.unsubscribe()


async def gather_export(
    bus: Bus,
    receipts: list[PrivacyReceipt],
    out: Path,
    *,
    objects: ObjectStore | None = None,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """Fetch each worker's part of an export, check it, merge them into `out` (a tar.gz holding
    `manifest.json` and each part under `<worker>/`), and remove the parts from where they were
    put; the manifest."""
    parts = [r for r in receipts if r.archive_uri and r.archive_sha256]
    manifest: dict[str, Any] = {
        "request_id": receipts[0].request_id if receipts else None,
        "user_id": receipts[0].user_id if receipts else None,
        "parts": [],
    }
    with tempfile.TemporaryDirectory(prefix="forseti-export-") as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        for receipt in parts:
            assert receipt.archive_uri is not None and receipt.archive_sha256 is not None
            path = await fetch(
                bus,
                receipt.archive_uri,
                sha256=receipt.archive_sha256,
                size=receipt.archive_bytes,
                cache=Path(tmp) / "parts",
                objects=objects,
                keyring=keyring,
            )
            folder = staging / receipt.worker
            await asyncio.to_thread(_unpack, path, folder)
            manifest["parts"].append(
                {"worker": receipt.worker, "shared": receipt.shared, "found": receipt.found, "items": receipt.items}
            )
            await _discard(bus, objects, receipt.archive_uri)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        await asyncio.to_thread(_pack, staging, out)
    return manifest


async def _discard(bus: Bus, objects: ObjectStore | None, uri: str) -> None:
    """Remove a fetched part: it holds the user's data and has served its purpose."""
    try:
        if uri.startswith("file://"):
            local_path(uri).unlink(missing_ok=True)
        else:
            await delete_file(bus, objects, uri)
    except ForsetiError:  # left behind, not lost: the next erase of the user removes it
        return


def _unpack(archive: Path, folder: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")


def _pack(staging: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for item in sorted(staging.iterdir()):
            tar.add(item, arcname=item.name)
