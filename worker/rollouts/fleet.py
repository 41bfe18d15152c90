"""The serving fleet's health reports as one worker hears them: what rollouts are judged by
(`judge.py`) and what a schedule's drift trigger watches (`worker/schedules/firing.py`).

Every llm-serve replica and edge device reports on `forseti.models.health` every few seconds; every
worker keeps the reports of the last hour in memory. A worker restarted mid-step sees fewer of them,
which can only make it wait longer (a step needs a minimum of requests to be judged).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from datetime import datetime

from forseti.adapters.bus import Bus, Message, Subscription
from forseti.adapters.signing import TrustedKeys, refusal
from forseti.schemas.catalog import HEALTH
from forseti.schemas.envelope import decode
from forseti.schemas.errors import InvalidTask
from forseti.schemas.rollouts import LATENCY_BUCKETS_MS, ServeHealth

from ..engine.metrics import Metrics
from .judge import Report, Totals

log = logging.getLogger(__name__)

KEEP_REPORTS = 3600.0
"""Seconds of health reports kept in memory (a step or drift window longer than this sees its last hour)."""


def epoch(stamp: str) -> float:
    """A registry time (ISO 8601) in seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


class Fleet:
    """The health reports this worker received, oldest first."""

    def __init__(self, *, metrics: Metrics | None = None, trusted: TrustedKeys | None = None) -> None:
        self.metrics = metrics
        self.trusted = trusted
        """The keys reports must be signed by (None: every report counts)."""
        self.reports: deque[Report] = deque()
        """Reports received in the last `KEEP_REPORTS` seconds, oldest first."""

    async def follow(self, bus: Bus) -> Subscription:
        """Hear every report on the bus (each worker hears them all)."""
        return await bus.subscribe(HEALTH, self.on_health)

    async def on_health(self, msg: Message) -> None:
        """Keep one replica's report (refused unless signed by a trusted key, when keys are set)."""
        reason = refusal(self.trusted, msg.data)
        if reason is not None:
            log.warning("health report refused: %s", reason)
            if self.metrics is not None:
                self.metrics.refused.labels("health").inc()
            return
        try:
            health = decode(msg.data, expect=ServeHealth).data
        except InvalidTask as exc:
            log.warning("ignoring an unreadable health report: %s", exc.message)
            return
        self.add(Report(time.time(), health))

    def add(self, report: Report) -> None:
        """Keep a report received at `report.at`; forget those older than an hour."""
        self.reports.append(report)
        while self.reports and self.reports[0].at < report.at - KEEP_REPORTS:
            self.reports.popleft()
        if self.metrics is not None:
            h = report.health
            for v in h.versions:
                self.metrics.served_requests.labels(h.name, v.version, "ok").inc(v.requests - v.errors)
                self.metrics.served_requests.labels(h.name, v.version, "error").inc(v.errors)
                self.metrics.served_latency.labels(h.name, v.version).inc(v.latency_ms_sum / 1000)
                below = 0
                for bound, count in zip((*LATENCY_BUCKETS_MS, math.inf), v.latency_ms_buckets, strict=False):
                    below += count  # cumulative, as Prometheus's buckets are
                    le = "+Inf" if bound == math.inf else f"{bound / 1000:g}"
                    self.metrics.served_latency_buckets.labels(h.name, v.version, le).inc(below)

    def measure(self, name: str, alias: str | None, since: float) -> Totals:
        """What the replicas of model `name` (those following `alias`, when given) reported since
        `since`, over every version."""
        totals = Totals()
        for report in self.reports:
            h = report.health
            if report.at < since or h.name != name or (alias is not None and h.alias != alias):
                continue
            for v in h.versions:
                totals.add(v)
        return totals
