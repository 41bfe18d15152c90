"""Firing schedules from every worker, once per slot.

Each worker runs a `Scheduler`. On each tick it reads the schedules from the shared registry and, for
each slot that has come, stores its decision (`claim_fire`: one INSERT keyed by schedule and slot,
so of N workers exactly one decides) and moves the schedule's `last_slot` forward, so a restarted
worker starts after it. The winner publishes the task under the job id `<schedule>-<slot>` with that
id as the bus's dedupe id (JetStream's `Nats-Msg-Id`); a worker that died between deciding and
publishing leaves its fire unstamped, and the next tick of any worker publishes it again under the
same ids, which the bus and the registry's job ids turn into one job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from forseti.adapters.bus import Bus
from forseti.adapters.registry import FireRecord, RegistryStore, ScheduleRecord
from forseti.schemas.catalog import CONTROL, SCHEDULES_FIRED
from forseti.schemas.control import CancelJob
from forseti.schemas.envelope import encode
from forseti.schemas.errors import BusError, ForsetiError
from forseti.schemas.jobs import JobState
from forseti.schemas.schedules import Overlap, ScheduleFire, ScheduleFired, ScheduleSpec
from forseti.schemas.tasks import TASK_MODELS, task_channel
from forseti.worker.engine.metrics import Metrics

from ..rollouts.fleet import Fleet, epoch
from .clock import (
    DRIFTED,
    GROWN,
    count_lines,
    due_slots,
    jitter_offset,
    next_due,
    slot_name,
    slot_time,
    trigger_count,
    trigger_slot,
)

log = logging.getLogger(__name__)

REPUBLISH_AFTER = 5.0
"""Seconds a decided fire may stay unpublished before another worker publishes it (its decider died)."""
RECENT_FIRES = 20
"""Fires read per schedule and tick: enough for the overlap and failure checks."""
LAUNCHED = ("fired", "cancelled_other")
"""Actions that publish a task."""


def fire_job_id(schedule_id: str, slot: str) -> str:
    """The job id a fire publishes under: the same on every worker, so the slot becomes one job."""
    return f"{schedule_id}-{slot}"


class Scheduler:
    """Fires the registry's schedules from this worker, alongside the other workers."""

    def __init__(
        self, *, bus: Bus, store: RegistryStore, metrics: Metrics, source: str, poll: float, fleet: Fleet | None = None
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        """The serving fleet's health reports, which drift triggers watch (None: they never fire)."""
        self.store = store
        self.metrics = metrics
        self.source = source
        self.poll = poll
        """Seconds between reads of the schedules; a known next slot wakes the loop sooner."""
        self._wake = asyncio.Event()
        self._lines: dict[Path, tuple[tuple[int, int], int]] = {}
        """Line counts of watched datasets by path, with the (size, mtime) they were counted at: a file
        that did not change is not read again each tick."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick until `stopping` is set; a tick that fails (registry or bus away) is logged and retried."""
        while not stopping.is_set():
            try:
                wait = await self.tick()
            except (ForsetiError, OSError) as exc:
                log.warning("schedules not fired this tick: %s", exc)
                wait = self.poll
            waits = [asyncio.create_task(stopping.wait()), asyncio.create_task(self._wake.wait())]
            try:
                timeout = max(0.0, min(wait, self.poll))
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the worker cancels this loop
                for waiting in waits:
                    waiting.cancel()
            self._wake.clear()

    def wake(self) -> None:
        """Read the schedules now (one was created or resumed here), not at the next poll: its first
        slot may come sooner than that."""
        self._wake.set()

    async def tick(self) -> float:
        """Decide every slot that has come; seconds until the next one is due."""
        wait = self.poll
        for record in await self.store.list_schedules():
            if record.paused:
                continue
            try:
                spec = ScheduleSpec.model_validate(record.spec)
            except ValidationError as exc:  # stored by an older version; the desk refuses such specs now
                log.warning("schedule %s has an invalid spec and is not fired: %s", record.id, exc)
                continue
            fires = await self.store.list_fires(record.id, limit=RECENT_FIRES)
            if await self._paused_for_failures(record, spec, fires):
                continue
            await self._follow_up(record, spec, fires)
            if spec.when_grown is not None:
                await self._grown(record, spec, fires)
            elif spec.when_drifts is not None:
                await self._drifted(record, spec, fires)
            else:
                wait = min(wait, await self._clock(record, spec, fires))
        return wait

    # -- deciding slots --------------------------------------------------------------------------

    async def _clock(self, record: ScheduleRecord, spec: ScheduleSpec, fires: list[FireRecord]) -> float:
        now = datetime.now(UTC)
        anchor = datetime.fromisoformat(record.created_at)
        after = slot_time(record.last_slot) if record.last_slot else anchor
        window = now - timedelta(seconds=spec.catchup_window_seconds)
        slots = due_slots(spec, record.id, after=after, anchor=anchor, now=now)
        missed = [s for s in slots if s < window]
        if missed:
            log.warning(
                "schedule %s: %d slot(s) from %s to %s fell outside the %.0fs catch-up window and are left out",
                record.id, len(missed), slot_name(missed[0]), slot_name(missed[-1]), spec.catchup_window_seconds,
            )  # fmt: skip
            self.metrics.schedule_fires.labels(action="missed").inc(len(missed))
            await self.store.advance_schedule(record.id, slot_name(missed[-1]))
        for slot in slots[len(missed) :]:
            name = slot_name(slot)
            due = slot + timedelta(seconds=jitter_offset(record.id, name, spec.jitter_seconds))
            await self._decide(record, spec, name, fires, late=(datetime.now(UTC) - due).total_seconds())
            fires = await self.store.list_fires(record.id, limit=RECENT_FIRES)
        last = slots[-1] if slots else after
        return (next_due(spec, record.id, last, anchor) - datetime.now(UTC)).total_seconds()

    async def _grown(self, record: ScheduleRecord, spec: ScheduleSpec, fires: list[FireRecord]) -> None:
        assert spec.when_grown is not None
        lines = await self._count(Path(spec.when_grown.path))
        if lines < record.baseline + spec.when_grown.lines:
            return
        slot = trigger_slot(GROWN, trigger_count(GROWN, record.last_slot) + 1)
        await self._decide(record, spec, slot, fires, late=0.0)
        await self.store.change_schedule(record.id, baseline=lines)

    async def _drifted(self, record: ScheduleRecord, spec: ScheduleSpec, fires: list[FireRecord]) -> None:
        drift = spec.when_drifts
        assert drift is not None
        if self.fleet is None:
            return
        now = time.time()
        # one decision per window: the window after a fire holds only what came after it
        last = epoch(fires[0].created_at) if fires else epoch(record.created_at)
        if now - last < drift.window_seconds:
            return
        totals = self.fleet.measure(drift.name, drift.alias, now - drift.window_seconds)
        if totals.requests < drift.min_requests:
            return
        value = totals.errors / totals.requests if drift.metric == "error_rate" else totals.latency(drift.latency)
        if value is None or value <= drift.above:  # None: no replica counts latency buckets
            return
        watched = (
            drift.metric if drift.metric == "error_rate" or drift.latency == "mean" else f"{drift.latency} latency"
        )
        log.info(
            "schedule %s: %s of %s is %.4g over %d requests (bound %g)",
            record.id, watched, drift.name, value, totals.requests, drift.above,
        )  # fmt: skip
        slot = trigger_slot(DRIFTED, trigger_count(DRIFTED, record.last_slot) + 1)
        await self._decide(record, spec, slot, fires, late=0.0)

    async def _count(self, path: Path) -> int:
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            return 0
        seen = (stat.st_size, stat.st_mtime_ns)
        counted = self._lines.get(path)
        if counted is None or counted[0] != seen:
            counted = (seen, await asyncio.to_thread(count_lines, path))
            self._lines[path] = counted
        return counted[1]

    async def _decide(
        self, record: ScheduleRecord, spec: ScheduleSpec, slot: str, fires: list[FireRecord], *, late: float
    ) -> None:
        running = await self._running(fires)
        if running is None or spec.overlap is Overlap.ALLOW_ALL:
            action = "fired"
        elif spec.overlap is Overlap.BUFFER_ONE and record.buffered is None:
            action = "buffered"
        elif spec.overlap is Overlap.CANCEL_OTHER:
            action = "cancelled_other"
        else:
            action = "skipped"
        fire = FireRecord(schedule_id=record.id, slot=slot, job_id=fire_job_id(record.id, slot), action=action)
        won = await self.store.claim_fire(fire)
        await self.store.advance_schedule(record.id, slot)
        if not won:
            return  # another worker decided this slot
        self.metrics.schedule_fires.labels(action=action).inc()
        self.metrics.schedule_lateness.observe(max(late, 0.0))
        if action == "buffered":
            await self.store.change_schedule(record.id, buffered=slot)
            record.buffered = slot
        if action == "cancelled_other" and running is not None:
            reason = f"schedule {record.id} fired {slot} (overlap cancel_other)"
            cancel = CancelJob(job_id=running, reason=reason, user_id=record.owner)
            await self.bus.publish(CONTROL, encode(cancel, source=self.source))
        if action in LAUNCHED:
            await self._publish(record, spec, fire)
        await self._announce(record.id, fire, late)

    async def _publish(self, record: ScheduleRecord, spec: ScheduleSpec, fire: FireRecord) -> None:
        task = TASK_MODELS[spec.kind].model_validate({**spec.task, "request_id": fire.job_id, "user_id": record.owner})
        raw = encode(task, source=self.source, subject=fire.job_id)
        await self.bus.publish(task_channel(spec.kind), raw, key=fire.job_id, dedup_id=fire.job_id)
        await self.store.change_fire(record.id, fire.slot, published=True)

    async def _announce(self, schedule_id: str, fire: FireRecord, late: float) -> None:
        event = ScheduleFired(
            schedule_id=schedule_id,
            fire=ScheduleFire(slot=fire.slot, job_id=fire.job_id, action=fire.action, at=fire.created_at),
            late_seconds=round(max(late, 0.0), 6),
        )
        try:
            await self.bus.publish(SCHEDULES_FIRED, encode(event, source=self.source))
        except BusError as exc:  # the fire itself stands; only its notice is lost
            log.warning("schedule %s: the notice of %s was not published: %s", schedule_id, fire.slot, exc)

    # -- after the decision ----------------------------------------------------------------------

    async def _running(self, fires: list[FireRecord]) -> str | None:
        """The job of the schedule's latest launched fire while it has not ended (also while it still
        waits on the bus: no worker has stored it yet)."""
        latest = next((f for f in fires if f.action in LAUNCHED), None)
        if latest is None:
            return None
        job = await self.store.get_job(latest.job_id)
        return latest.job_id if job is None or not job.state.terminal else None

    async def _follow_up(self, record: ScheduleRecord, spec: ScheduleSpec, fires: list[FireRecord]) -> None:
        """Publish fires whose decider died before publishing, and a buffered slot once the job ended."""
        stale = time.time() - REPUBLISH_AFTER
        for fire in fires:
            if (
                fire.action in LAUNCHED
                and fire.published_at is None
                and datetime.fromisoformat(fire.created_at).timestamp() < stale
            ):
                log.info("schedule %s: publishing %s again (its worker did not)", record.id, fire.slot)
                await self._publish(record, spec, fire)
        if record.buffered is None or await self._running(fires) is not None:
            return
        slot = record.buffered
        if await self.store.change_fire(record.id, slot, action="fired", expect="buffered"):
            fire = FireRecord(schedule_id=record.id, slot=slot, job_id=fire_job_id(record.id, slot), action="fired")
            await self._publish(record, spec, fire)
            await self._announce(record.id, fire, late=0.0)
        await self.store.change_schedule(record.id, buffered=None)
        record.buffered = None

    async def _paused_for_failures(self, record: ScheduleRecord, spec: ScheduleSpec, fires: list[FireRecord]) -> bool:
        """Pause a schedule whose last `pause_after_failures` launched jobs all failed."""
        needed = spec.pause_after_failures
        launched = [f for f in fires if f.action in LAUNCHED][:needed]
        if needed == 0 or len(launched) < needed:
            return False
        for fire in launched:
            job = await self.store.get_job(fire.job_id)
            if job is None or job.state is not JobState.FAILED:
                return False
        reason = f"paused after {needed} failed job(s) in a row (last: {launched[0].job_id})"
        await self.store.change_schedule(record.id, paused=True, pause_reason=reason)
        log.warning("schedule %s %s", record.id, reason)
        self.metrics.schedule_fires.labels(action="paused").inc()
        return True
