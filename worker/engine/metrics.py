"""Prometheus metrics of one worker, on a registry the caller injects, and a bus wrapper that times it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from forseti.adapters.bus import Bus, Delivery, MessageHandler, Subscription, TaskIntake

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


OUTCOMES = ("completed", "failed", "cancelled", "requeued", "replayed", "deferred", "lost")
"""How a job can end on a worker (the `outcome` label of forseti_jobs_total)."""
FIRE_ACTIONS = ("fired", "skipped", "buffered", "cancelled_other", "missed", "paused")
"""What a scheduler can do with a slot (the `action` label of forseti_schedule_fires_total)."""
ROLLOUT_MOVES = ("progressing", "holding", "completed", "rolled_back")
"""The rollout moves a worker's controller decides (the `state` label of forseti_rollout_moves_total)."""
REFUSED = ("control", "status", "privacy", "ranks", "health")
"""The requests a worker may refuse (the `request` label of forseti_refused_requests_total)."""


class Metrics:
    """Every metric a worker exports, named after Prometheus conventions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_received = Counter(
            "forseti_tasks_received", "Task messages taken from intake.", ["kind"], registry=r
        )
        self.jobs = Counter(
            "forseti_jobs",
            "Jobs that ended, by outcome (completed, failed, cancelled, requeued, replayed).",
            ["kind", "outcome"],
            registry=r,
        )
        self.jobs_running = Gauge("forseti_jobs_running", "Jobs running now.", ["kind"], registry=r)
        self.job_duration = Histogram(
            "forseti_job_duration_seconds",
            "Wall time of jobs from start to end.",
            ["kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_steps = Counter(
            "forseti_job_steps",
            "Steps running jobs reported in their progress, by kind, in each handler's unit (RL: environment "
            "timesteps; training: epochs; fine-tunes: optimizer steps).",
            ["kind"],
            registry=r,
        )
        self.schedule_fires = Counter(
            "forseti_schedule_fires",
            "Schedule slots this worker decided, by action (fired, skipped, buffered, cancelled_other, missed, "
            "paused).",
            ["action"],
            registry=r,
        )
        self.schedule_lateness = Histogram(
            "forseti_schedule_lateness_seconds",
            "How long after a slot (plus its jitter offset) this worker decided it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rollout_moves = Counter(
            "forseti_rollout_moves",
            "Rollout moves this worker decided, by state (progressing: a step onward; holding; completed; "
            "rolled_back; aborted is decided by whoever aborts).",
            ["state"],
            registry=r,
        )
        self.rollout_share = Gauge(
            "forseti_rollout_share",
            "The share of requests, in percent, a rollout going on gives its candidate, by model name and alias "
            "(0 once it ended).",
            ["name", "alias"],
            registry=r,
        )
        self.served_requests = Counter(
            "forseti_served_requests",
            "Requests llm-serve replicas and edge devices answered (outcome ok) or failed (error), by model name "
            "and version, from their health reports. Every worker hears every report: aggregate with max over "
            "workers, not sum.",
            ["name", "version", "outcome"],
            registry=r,
        )
        self.served_latency = Counter(
            "forseti_served_latency_seconds",
            "Total latency of those requests, by model name and version (divide its rate by the requests' rate "
            "for the mean); every worker counts the same reports.",
            ["name", "version"],
            registry=r,
        )
        self.served_latency_buckets = Counter(
            "forseti_served_requests_by_latency",
            "Those requests that took at most `le` seconds, by model name and version (cumulative, `+Inf` "
            "included, as a histogram's buckets: histogram_quantile over max by (name, version, le) of its rate).",
            ["name", "version", "le"],
            registry=r,
        )
        self.replicas_reporting = Gauge(
            "forseti_replicas_reporting",
            "Replicas and devices whose health reports keep coming, by model name and the alias they follow "
            "(empty: none).",
            ["name", "alias"],
            registry=r,
        )
        self.refused = Counter(
            "forseti_refused_requests",
            "Requests refused: control events and status replies withheld because the asker is not the job's "
            "owner nor an operator, privacy requests not signed by an operator key, join requests for a "
            "distributed job not signed by a trusted worker key.",
            ["request"],
            registry=r,
        )
        self.deadletters = Counter(
            "forseti_deadletters", "Messages sent to the dead-letter channel.", ["reason"], registry=r
        )
        self.bus_publish = Histogram(
            "forseti_bus_publish_duration_seconds",
            "Time to publish one message.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bus_request = Histogram(
            "forseti_bus_request_duration_seconds",
            "Round trip of one request-reply.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def start_at_zero(self, kinds: Collection[str]) -> None:
        """Export every labelled series this worker can count, at 0, from the start: a series that
        appears only on its first event makes `rate()` and `increase()` (dashboards, alerts) miss that
        event and return nothing at all before it."""
        for kind in kinds:
            self.tasks_received.labels(kind)
            self.jobs_running.labels(kind)
            self.job_steps.labels(kind)
            for outcome in OUTCOMES:
                self.jobs.labels(kind, outcome)
        for action in FIRE_ACTIONS:
            self.schedule_fires.labels(action=action)
        for state in ROLLOUT_MOVES:
            self.rollout_moves.labels(state=state)
        for request in REFUSED:
            self.refused.labels(request)


class MeteredBus:
    """A Bus that records publish and request latency; everything else passes through."""

    def __init__(self, inner: Bus, metrics: Metrics) -> None:
        self.inner = inner
        self.url = inner.url
        self.transport = inner.transport
        self._publish = metrics.bus_publish.labels(inner.transport)
        self._request = metrics.bus_request.labels(inner.transport)

    async def connect(self) -> None:
        """Connect the inner bus."""
        await self.inner.connect()

    async def close(self) -> None:
        """Close the inner bus."""
        await self.inner.close()

    async def publish(self, channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        """Publish, timed."""
        start = time.perf_counter()
        await self.inner.publish(channel, data, key=key, dedup_id=dedup_id)
        self._publish.observe(time.perf_counter() - start)

    async def subscribe(self, channel: str, handler: MessageHandler, *, queue: str | None = None) -> Subscription:
        """Subscribe on the inner bus."""
        return await self.inner.subscribe(channel, handler, queue=queue)

    async def follow(self, channel: str, handler: MessageHandler, *, durable: str | None) -> Subscription:
        """Follow on the inner bus."""
        return await self.inner.follow(channel, handler, durable=durable)

    async def request(self, channel: str, data: bytes, *, timeout: float) -> bytes:
        """Request, timed (successful round trips only)."""
        start = time.perf_counter()
        reply = await self.inner.request(channel, data, timeout=timeout)
        self._request.observe(time.perf_counter() - start)
        return reply

    async def intake(self, channel: str, *, group: str) -> TaskIntake:
        """Task intake on the inner bus."""
        return await self.inner.intake(channel, group=group)

    async def reachable(self) -> bool:
        """Whether the inner bus's server answers now."""
        return await self.inner.reachable()

    async def on_given_up(self, handler: Callable[[Delivery], Awaitable[None]], *, group: str) -> Subscription:
        """Tasks the inner bus gave up on."""
        return await self.inner.on_given_up(handler, group=group)

    async def take_strays(self, owned: Collection[str], limit: int) -> list[Delivery]:
        """Stray tasks of the inner bus."""
        return await self.inner.take_strays(owned, limit)
