"""Privacy requests: the GDPR rights of access and portability (export), erasure and rectification.

Every worker follows `forseti.privacy` (not as a queue group: each hears every request) and answers
on `forseti.privacy.receipts.<request_id>`. A request is honoured only when it is signed by one of
the operator keys the worker trusts (`adapters/signing.py`), is at most `FRESH` old, and has not
been answered before: erasing someone's data is no request to take from whoever is on the bus.

Each worker does two parts, each recorded once in the registry's audit table (`privacy_requests`,
which keeps the user's hash and counts, never the data):

- its own disk, always: the folders of the user's jobs (`<data dir>/jobs/<job>`, `artifacts/<job>`)
  and the datasets under its data root that the user's tasks named;
- the shared stores, when it is the first to claim them: the registry rows, the checkpoints and
  announced artifacts in the object stores, and the messages the bus keeps (announcements and
  stored tasks; a Kafka topic keeps its records until its retention, which the receipt says).

Export packs what a part found into a tar.gz with a manifest, put where the requester fetches it
(the bus's object store, the S3 store, or the data dir on one host); erase deletes it and marks the
versions of other users that were trained on an erased dataset or derived from an erased version;
rectify puts the replacement in the dataset's place and publishes each of the user's tasks that
named it again, as a new job.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from forseti.adapters.bus import Message
from forseti.adapters.registry import PrivacyRecord
from forseti.adapters.signing import TrustedKeys, refusal
from forseti.schemas.catalog import receipts_channel
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import ForsetiError, InvalidTask
from forseti.schemas.privacy import PrivacyErase, PrivacyExport, PrivacyReceipt, PrivacyRectify, PrivacyRequest

from .holdings import UserData

log = logging.getLogger(__name__)

FRESH = timedelta(minutes=10)
"""How old a signed request may be: a recorded one cannot be played again later."""
KINDS: dict[type[PrivacyRequest], str] = {PrivacyExport: "export", PrivacyErase: "erase", PrivacyRectify: "rectify"}


def user_hash(user_id: str) -> str:
    """How the audit table names a user: the sha256 of the id."""
    return hashlib.sha256(user_id.encode()).hexdigest()


class PrivacyDesk:
    """Answers privacy requests for one worker: its disk, and the shared stores when it claims them."""

    def __init__(self, data: UserData, *, operators: TrustedKeys | None, refused: Any) -> None:
        self.data = data
        """Finds and handles the users' data on this worker and in the shared stores."""
        self.settings, self.store, self.bus = data.settings, data.store, data.bus
        self.operators = operators
        """The keys a request must be signed by (None: every request is refused)."""
        self.refused = refused
        """The refused-requests counter to count refusals in."""

    @property
    def _source(self) -> str:
        return f"forseti/worker/{self.settings.worker_id}"

    async def on_request(self, msg: Message) -> None:
        """Check, serve and answer one request."""
        try:
            event: Event[PrivacyRequest] = decode(msg.data, expect=PrivacyRequest)
        except InvalidTask as exc:
            log.warning("refused a privacy request: %s", exc.message)
            return
        request, kind = event.data, KINDS[type(event.data)]
        why = self._unauthorised(msg.data, event)
        if why is not None:
            log.warning("privacy %s %s refused: %s", kind, request.request_id, why)
            self.refused.labels("privacy").inc()
            await self._answer(self._receipt(request, kind, shared=False, error=f"forbidden: {why}"))
            return
        audit = PrivacyRecord(
            request_id=request.request_id,
            part=self.settings.worker_id,
            kind=kind,
            user_hash=user_hash(request.user_id),
            requested_by=request.requested_by,
            worker=self.settings.worker_id,
        )
        if not await self.store.claim_privacy(audit):  # a request played again: answered, not served
            error = f"forbidden: request {request.request_id} was answered already"
            await self._answer(self._receipt(request, kind, shared=False, error=error))
            return
        shared = await self.store.claim_privacy(audit.model_copy(update={"part": "shared"}))
        try:
            receipt = await self.serve(request, kind, shared=shared)
        except (ForsetiError, OSError) as exc:
            log.exception("privacy %s %s failed", kind, request.request_id)
            message = exc.message if isinstance(exc, ForsetiError) else str(exc)
            receipt = self._receipt(request, kind, shared=shared, error=message[:4096])
        counts = {"found": receipt.found, "removed": receipt.removed, "error": receipt.error}
        for part in (audit.part, "shared") if shared else (audit.part,):
            await self.store.finish_privacy(request.request_id, part, counts)
        await self._answer(receipt)

    def _unauthorised(self, raw: bytes, event: Event[PrivacyRequest]) -> str | None:
        """Why a request may not be served: not signed by an operator key, or not fresh."""
        if self.operators is None:
            return "this worker trusts no operator key (FORSETI_OPERATOR_KEYS), so it serves no privacy request"
        reason = refusal(self.operators, raw)
        if reason is not None:
            return reason.replace("announcement", "request").replace("trusted here", "an operator key here")
        now = datetime.now(UTC)
        if event.time is None or not now - FRESH <= event.time <= now + FRESH:
            return f"the request's time {event.time} is not within {FRESH} of now"
        return None

    def _receipt(self, request: PrivacyRequest, kind: str, *, shared: bool, **fields: Any) -> PrivacyReceipt:
        return PrivacyReceipt.model_validate(
            {
                "request_id": request.request_id,
                "kind": kind,
                "user_id": request.user_id,
                "worker": self.settings.worker_id,
                "shared": shared,
                **fields,
            }
        )

    async def _answer(self, receipt: PrivacyReceipt) -> None:
        channel = receipts_channel(receipt.request_id)
        await self.bus.publish(channel, encode(receipt, source=self._source, subject=receipt.request_id))

    async def serve(self, request: PrivacyRequest, kind: str, *, shared: bool) -> PrivacyReceipt:
        """Find what is held for the user here (and in the shared stores when `shared`), then do what
        the request asks with it; the receipt."""
        held = await self.data.find(request, shared=shared)
        fields: dict[str, Any] = {}
        if isinstance(request, PrivacyExport):
            fields = await self.data.export(request, held)
        elif isinstance(request, PrivacyErase):
            fields = await self.data.erase(request, held)
        elif isinstance(request, PrivacyRectify):
            fields = await self.data.rectify(request, held)
        done = held.done
        return self._receipt(
            request, kind, shared=shared, found=done.found, removed=done.removed, items=done.items,
            kept=done.kept, **fields,
        )  # fmt: skip
