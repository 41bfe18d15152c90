"""What a serving replica counts for its health reports, and how it splits requests during a rollout."""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from forseti.schemas.errors import BusError
from forseti.schemas.rollouts import LATENCY_BUCKETS_MS, VersionHealth

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """One version's requests since the last report."""

    version: str
    requests: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))


class Traffic:
    """Requests per served version, drained into each health report."""

    def __init__(self) -> None:
        self._tallies: dict[str, Tally] = {}

    def record(self, model_id: str, version: str, latency_ms: float, *, ok: bool) -> None:
        """Count one request a version answered (`ok`) or failed, and how long it took."""
        tally = self._tallies.setdefault(model_id, Tally(version))
        tally.requests += 1
        tally.errors += 0 if ok else 1
        tally.latency_ms_sum += latency_ms
        tally.latency_ms_max = max(tally.latency_ms_max, latency_ms)
        tally.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1

    def drain(self) -> list[VersionHealth]:
        """The counts since the last drain, per version; counting starts again from zero."""
        tallies, self._tallies = self._tallies, {}
        return [
            VersionHealth(
                model_id=model_id,
                version=t.version,
                requests=t.requests,
                errors=t.errors,
                latency_ms_sum=t.latency_ms_sum,
                latency_ms_max=t.latency_ms_max,
                latency_ms_buckets=t.buckets,
            )
            for model_id, t in tallies.items()
        ]


class Split:
    """Sends an exact share of requests one way: after n requests, floor(n * share / 100) went to the
    candidate (no randomness, so two replicas at 10% each send 10% of theirs)."""

    def __init__(self) -> None:
        self.seen = 0

    def candidate(self, share: int) -> bool:
        """Whether the next request goes to the candidate at `share` percent."""
        self.seen += 1
        return (self.seen * share) // 100 > ((self.seen - 1) * share) // 100


async def report_every(seconds: float, stopped: asyncio.Event, send: Callable[[], Awaitable[None]], who: str) -> None:
    """Call `send` every `seconds` until `stopped` is set (ended by the event, not by cancelling: a
    cancel that lands as a bus call completes can be lost in asyncio.wait_for on Python 3.11). While
    the bus is away, a period's report is skipped and its counts go in the next one."""
    while True:
        try:
            await asyncio.wait_for(stopped.wait(), seconds)
            return
        except TimeoutError:
            pass
        try:
            await send()
        except BusError as exc:
            log.warning("%s: health report not sent: %s", who, exc)
