"""Answering the schedule requests on `forseti.schedules`: create, pause, resume, delete, query.

One worker of the group answers each request (a queue subscription); what it changes is in the
shared registry, so every worker's scheduler sees it on its next tick. A schedule belongs to the
`user_id` that created it: only that user, or a request signed by an operator key, may change it,
and its fired tasks run as that user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from forseti.adapters.bus import Message
from forseti.adapters.registry import RegistryStore, ScheduleRecord
from forseti.schemas.base import Strict
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import InvalidTask, validation_summary
from forseti.schemas.schedules import (
    ScheduleCreate,
    ScheduleDelete,
    ScheduleError,
    ScheduleFire,
    ScheduleInfo,
    SchedulePause,
    ScheduleRequest,
    ScheduleResume,
    SchedulesList,
    ScheduleSpec,
    SchedulesQuery,
)
from forseti.schemas.tasks import TASK_MODELS

from .clock import count_lines, next_due, slot_name, slot_time
from .firing import fire_job_id

log = logging.getLogger(__name__)

MAX_SCHEDULE_ID = 80
"""A schedule id's length at most, so that `<id>-<slot>` stays a valid job id (128)."""


class ScheduleDesk:
    """Serves schedule requests against the registry."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        source: str,
        by_operator: Callable[[bytes], bool],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.source = source
        self.by_operator = by_operator
        """Whether a request's bytes carry an operator key's signature."""
        self.changed = changed
        """Called after a schedule was created or resumed (this worker's scheduler reads them at once)."""

    async def on_request(self, msg: Message) -> None:
        """Check, serve and answer one request."""
        try:
            request = decode(msg.data, expect=ScheduleRequest).data
        except InvalidTask as exc:
            await self._answer(msg, ScheduleError(code="invalid", message=exc.message))
            return
        operator = self.by_operator(msg.data)
        try:
            answer = await self._serve(request, operator=operator)
        except ValidationError as exc:
            answer = ScheduleError(code="invalid", message=validation_summary(exc, limit=1))
        await self._answer(msg, answer)

    async def _serve(self, request: ScheduleRequest, *, operator: bool) -> Strict:
        if isinstance(request, SchedulesQuery):
            return await self._query(request, operator=operator)
        assert isinstance(request, ScheduleCreate | SchedulePause | ScheduleResume | ScheduleDelete)
        stored = await self.store.get_schedule(request.id)
        if stored is not None and not (operator or stored.owner is None or stored.owner == request.user_id):
            return ScheduleError(code="forbidden", message=f"schedule {request.id} belongs to another user")
        if isinstance(request, ScheduleCreate):
            return await self._create(request, operator=operator)
        if stored is None:
            return ScheduleError(code="not_found", message=f"no schedule {request.id}")
        if isinstance(request, ScheduleDelete):
            await self.store.delete_schedule(request.id)
            log.info("schedule %s deleted", request.id)
            return SchedulesList(schedules=[await self._info(stored, fires=False)])
        if isinstance(request, SchedulePause):
            await self.store.change_schedule(request.id, paused=True, pause_reason="paused by request")
        else:
            # slots that passed while paused are not caught up: resuming starts from now
            await self.store.advance_schedule(request.id, slot_name(datetime.now(UTC)))
            await self.store.change_schedule(request.id, paused=False, pause_reason=None)
            self.changed()
        changed = await self.store.get_schedule(request.id)
        assert changed is not None
        return SchedulesList(schedules=[await self._info(changed, fires=False)])

    async def _create(self, request: ScheduleCreate, *, operator: bool) -> Strict:
        if len(request.id) > MAX_SCHEDULE_ID:
            return ScheduleError(code="invalid", message=f"a schedule id has at most {MAX_SCHEDULE_ID} characters")
        spec = request.spec
        named = spec.task.get("user_id")
        if named is not None and named != request.user_id and not operator:
            return ScheduleError(code="forbidden", message="a schedule's tasks run as its creator; drop task.user_id")
        # the template must make a valid task now, not fail at 3 a.m.
        TASK_MODELS[spec.kind].model_validate({**spec.task, "request_id": fire_job_id(request.id, "check")})
        now = datetime.now(UTC)
        record = ScheduleRecord(
            id=request.id,
            spec=spec.model_dump(mode="json", exclude_none=True),
            owner=request.user_id,
            # a new schedule starts now: it does not catch up slots from before it existed
            last_slot="" if spec.triggered else slot_name(now),
            baseline=count_lines(Path(spec.when_grown.path)) if spec.when_grown is not None else 0,
            # the same instant as last_slot: interval slots count from created_at, and a creation time
            # read from the clock again could fall a millisecond later and make "now" a slot to fire
            created_at=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        await self.store.put_schedule(record)
        self.changed()
        log.info("schedule %s stored for %s", request.id, request.user_id or "no user")
        return SchedulesList(schedules=[await self._info(record, fires=False)])

    async def _query(self, query: SchedulesQuery, *, operator: bool) -> Strict:
        if query.id is not None:
            record = await self.store.get_schedule(query.id)
            if record is None or not (operator or record.owner is None or record.owner == query.user_id):
                return ScheduleError(code="not_found", message=f"no schedule {query.id}")
            return SchedulesList(schedules=[await self._info(record, fires=True)])
        records = [
            r for r in await self.store.list_schedules() if operator or r.owner is None or r.owner == query.user_id
        ]
        return SchedulesList(schedules=[await self._info(r, fires=False) for r in records])

    async def _info(self, record: ScheduleRecord, *, fires: bool) -> ScheduleInfo:
        spec = ScheduleSpec.model_validate(record.spec)
        next_fire = None
        if not spec.triggered and not record.paused:
            anchor = datetime.fromisoformat(record.created_at)
            after = slot_time(record.last_slot) if record.last_slot else anchor
            next_fire = next_due(spec, record.id, after, anchor).isoformat().replace("+00:00", "Z")
        recent = await self.store.list_fires(record.id) if fires else []
        return ScheduleInfo(
            id=record.id,
            spec=spec,
            owner=record.owner,
            paused=record.paused,
            pause_reason=record.pause_reason,
            next_fire=next_fire,
            fires=[ScheduleFire(slot=f.slot, job_id=f.job_id, action=f.action, at=f.created_at) for f in recent],
        )

    async def _answer(self, msg: Message, answer: Strict) -> None:
        if isinstance(answer, ScheduleError):
            log.warning("schedule request refused (%s): %s", answer.code, answer.message)
        await msg.respond(encode(answer, source=self.source))
