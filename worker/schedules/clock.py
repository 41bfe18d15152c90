"""When a schedule's slots fall: cron or interval slots in its time zone, their jitter, their names."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from croniter import croniter

from forseti.schemas.schedules import ScheduleSpec

SLOT_FORMAT = "%Y%m%dT%H%M%S"
GROWN = "grown-"
"""The slot prefix of a dataset trigger's fires."""
DRIFTED = "drifted-"
"""The slot prefix of a metric drift trigger's fires."""
MAX_SLOTS_PER_TICK = 1000
"""Slots one tick decides at most; a longer backlog (a tiny interval after downtime) goes on next tick."""


def slot_name(at: datetime) -> str:
    """A clock slot's name: its UTC time with milliseconds (`20261206T130000.000Z`), which sorts as text."""
    at = at.astimezone(UTC)
    return f"{at.strftime(SLOT_FORMAT)}.{at.microsecond // 1000:03d}Z"


def slot_time(name: str) -> datetime:
    """The time a clock slot's name stands for."""
    return datetime.strptime(name, SLOT_FORMAT + ".%fZ").replace(tzinfo=UTC)


def trigger_slot(prefix: str, n: int) -> str:
    """The name of a trigger's n-th fire (`grown-000000000003`): zero-padded, so it sorts as text."""
    return f"{prefix}{n:012d}"


def trigger_count(prefix: str, name: str) -> int:
    """How many fires a trigger's slot name counts (0 before the first)."""
    return int(name.removeprefix(prefix)) if name.startswith(prefix) else 0


def jitter_offset(schedule_id: str, slot: str, jitter: float) -> float:
    """Seconds after its slot a fire is due: drawn from the slot's name, so every worker agrees."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(f"{schedule_id}/{slot}".encode()).digest()
    return jitter * int.from_bytes(digest[:8], "big") / 2**64


def next_slot(spec: ScheduleSpec, after: datetime, anchor: datetime) -> datetime:
    """The first clock slot strictly after `after`: cron in the spec's time zone, or `anchor` plus a
    whole number of intervals."""
    if spec.cron is not None:
        local = after.astimezone(ZoneInfo(spec.timezone))
        following: datetime = croniter(spec.cron, local).get_next(datetime)
        return following.astimezone(UTC)
    assert spec.every_seconds is not None, "a clock schedule has cron or every_seconds"
    every = timedelta(seconds=spec.every_seconds)
    if after < anchor:
        return anchor
    # whole intervals in integer microseconds: floats drift over thousands of slots
    steps = (after - anchor) // every + 1
    return anchor + steps * every


def next_due(spec: ScheduleSpec, schedule_id: str, after: datetime, anchor: datetime) -> datetime:
    """When the first slot after `after` is due (its time plus its jitter offset)."""
    slot = next_slot(spec, after, anchor)
    return slot + timedelta(seconds=jitter_offset(schedule_id, slot_name(slot), spec.jitter_seconds))


def due_slots(
    spec: ScheduleSpec, schedule_id: str, *, after: datetime, anchor: datetime, now: datetime
) -> list[datetime]:
    """The slots after `after` whose fire time (slot plus its jitter offset) has come by `now`, oldest
    first, at most MAX_SLOTS_PER_TICK."""
    slots: list[datetime] = []
    slot = next_slot(spec, after, anchor)
    while len(slots) < MAX_SLOTS_PER_TICK:
        due = slot + timedelta(seconds=jitter_offset(schedule_id, slot_name(slot), spec.jitter_seconds))
        if due > now:
            break
        slots.append(slot)
        slot = next_slot(spec, slot, anchor)
    return slots


def count_lines(path: Path) -> int:
    """Records in a line-per-record dataset (0 when it does not exist yet), read in blocks."""
    try:
        with path.open("rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
