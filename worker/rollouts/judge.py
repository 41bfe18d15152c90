"""Judging a rollout's step from the replicas' health reports: move on, hold, roll back, or wait.

Pure: the controller gives it the reports it received and the clock, so the rules read (and are
tested) apart from the bus and the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from forseti.adapters.registry import RolloutRecord, RolloutStepRecord
from forseti.schemas.rollouts import (
    LATENCY_BUCKETS_MS,
    LatencyFigure,
    RolloutBounds,
    RolloutSpec,
    RolloutState,
    ServeHealth,
    StepEvidence,
    VersionHealth,
)

SILENT_PERIODS = 3
"""A replica that has not reported for this many of its periods is taken to be gone."""


@dataclass(frozen=True)
class Report:
    """A health report and when it was received (seconds since the epoch)."""

    at: float
    health: ServeHealth


@dataclass(frozen=True)
class Move:
    """What a step comes to: the rollout's next row."""

    state: RolloutState
    step: int
    share: int
    reason: str
    evidence: StepEvidence


def live(reports: Iterable[Report], now: float) -> dict[tuple[str, str | None], dict[str, ServeHealth]]:
    """The latest report of every replica still reporting, by (model name, alias) and replica."""
    latest: dict[tuple[str, str | None, str], Report] = {}
    for report in reports:
        h = report.health
        key = (h.name, h.alias, h.consumer)
        if key not in latest or latest[key].at <= report.at:
            latest[key] = report
    found: dict[tuple[str, str | None], dict[str, ServeHealth]] = {}
    for (name, alias, consumer), r in latest.items():
        if now - r.at <= SILENT_PERIODS * r.health.every_seconds:
            found.setdefault((name, alias), {})[consumer] = r.health
    return found


def replicas(rollout: RolloutRecord, reports: Iterable[Report], now: float) -> dict[str, ServeHealth]:
    """The latest report of each replica of the rollout's name and alias that is still reporting."""
    return live(reports, now).get((rollout.name, rollout.alias), {})


@dataclass
class Totals:
    """Versions' health reports added up: requests, failures, summed latency and latency buckets."""

    requests: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(self, version: VersionHealth) -> None:
        """Count one version's report in."""
        self.requests += version.requests
        self.errors += version.errors
        self.latency_ms_sum += version.latency_ms_sum
        for i, count in enumerate(version.latency_ms_buckets):
            self.buckets[i] += count

    def latency(self, figure: LatencyFigure) -> float | None:
        """The mean latency, or a percentile of the buckets (None: no requests, or none bucketed)."""
        return latency_figure(figure, self.latency_ms_sum / self.requests if self.requests else None, self.buckets)

    def bucketed(self) -> list[int]:
        """The buckets, empty when no replica counted any."""
        return self.buckets if any(self.buckets) else []


def evidence(rollout: RolloutRecord, reports: Iterable[Report], since: float, now: float) -> StepEvidence:
    """The candidate's and the baseline's requests reported since `since`, summed over replicas."""
    totals = {rollout.model_id: Totals(), rollout.baseline_id: Totals()}
    for report in reports:
        h = report.health
        if report.at < since or h.name != rollout.name or h.alias != rollout.alias:
            continue
        for v in h.versions:
            if v.model_id in totals:
                totals[v.model_id].add(v)
    cand, base = totals[rollout.model_id], totals[rollout.baseline_id]
    return StepEvidence(
        candidate_requests=cand.requests,
        candidate_errors=cand.errors,
        candidate_latency_ms=cand.latency("mean"),
        baseline_requests=base.requests,
        baseline_errors=base.errors,
        baseline_latency_ms=base.latency("mean"),
        candidate_latency_buckets=cand.bucketed(),
        baseline_latency_buckets=base.bucketed(),
        replicas=len(replicas(rollout, reports, now)),
    )


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The `q`-quantile (0-1] of latencies counted per `LATENCY_BUCKETS_MS` bucket, linear within its
    bucket; the highest bound when it falls among the slower ones; None: nothing counted."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS_MS):
                break
            low = LATENCY_BUCKETS_MS[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS_MS[i] - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS_MS[-1]


def latency_figure(figure: LatencyFigure, mean: float | None, buckets: Sequence[int]) -> float | None:
    """The `figure` of latencies known by their mean and buckets: the mean, or the buckets' percentile."""
    return mean if figure == "mean" else quantile(buckets, int(figure[1:]) / 100)


def latency(ev: StepEvidence, side: Literal["candidate", "baseline"], figure: LatencyFigure) -> float | None:
    """One side's latency in a step's evidence: its mean, or a percentile of its buckets (None: no data)."""
    if side == "candidate":
        return latency_figure(figure, ev.candidate_latency_ms, ev.candidate_latency_buckets)
    return latency_figure(figure, ev.baseline_latency_ms, ev.baseline_latency_buckets)


def reference_latency(rows: list[RolloutStepRecord], min_requests: int, figure: LatencyFigure) -> float | None:
    """The baseline's latency `figure` in the latest step it had enough traffic in (None: none had)."""
    for row in reversed(rows):
        if row.evidence is None:
            continue
        ev = StepEvidence.model_validate(row.evidence)
        found = latency(ev, "baseline", figure)
        if ev.baseline_requests >= min_requests and found is not None:
            return found
    return None


def judge(
    rollout: RolloutRecord,
    rows: list[RolloutStepRecord],
    reports: list[Report],
    *,
    started: float,
    now: float,
) -> Move | None:
    """The rollout's next move given its rows (the last is where it stands; its step began at
    `started`) and the reports received; None: keep waiting."""
    spec = RolloutSpec.model_validate(rollout.spec)
    bounds = spec.bounds
    last = rows[-1]
    live = replicas(rollout, reports, now)
    ev = evidence(rollout, reports, started, now)
    breach = _breach(rollout, rows, live, ev, bounds)
    if breach is not None:
        return Move("rolled_back", last.step, 0, breach, ev)

    elapsed = now - started
    if last.step == 0:
        return _loaded(rollout, spec, last, live, ev, elapsed)
    if elapsed < spec.interval_seconds:
        return None
    nobody = not any(h.candidate == rollout.model_id for h in live.values())
    if spec.strategy == "rolling" and last.step < len(spec.steps) and nobody:
        share = spec.steps[last.step]
        why = f"no device tagged {spec.device_tag} falls in {last.share}% yet; {share}% next"
        return Move("progressing", last.step + 1, share, why, ev)
    if ev.candidate_requests < bounds.min_requests:
        why = f"{ev.candidate_requests} request(s) reached it in this step; {bounds.min_requests} needed to judge"
        if last.state == "holding":
            return _held_too_long(spec, last, ev, elapsed, why)
        return Move("holding", last.step, last.share, why, ev)
    healthy = f"{ev.candidate_requests} requests, {ev.candidate_errors} failed"
    if ev.candidate_latency_ms is not None:
        healthy += f", {ev.candidate_latency_ms:.1f} ms mean"
    if last.step == len(spec.steps):
        return Move("completed", last.step, 100, f"healthy at 100% ({healthy}); {rollout.alias} moved", ev)
    share = spec.steps[last.step]
    return Move("progressing", last.step + 1, share, f"healthy at {last.share}% ({healthy}); {share}% next", ev)


def _loaded(
    rollout: RolloutRecord,
    spec: RolloutSpec,
    last: RolloutStepRecord,
    live: dict[str, ServeHealth],
    ev: StepEvidence,
    elapsed: float,
) -> Move | None:
    """Step 0: traffic goes to the candidate once every replica following the alias holds it (a rolling
    rollout's devices load it when their share comes: nothing to wait for)."""
    share = spec.steps[0]
    if spec.strategy == "rolling":
        return Move("progressing", 1, share, f"{share}% of the devices tagged {spec.device_tag}", ev)
    waiting = sorted(c for c, h in live.items() if h.rollout_id != rollout.id or h.candidate != rollout.model_id)
    if live and not waiting:
        return Move("progressing", 1, share, f"loaded on {len(live)} replica(s); {share}% of requests", ev)
    if elapsed < spec.interval_seconds:
        return None
    held = f"waiting for {', '.join(waiting)} to load it" if waiting else "no replica following the alias reports"
    if last.state == "holding":
        return _held_too_long(spec, last, ev, elapsed, held)
    return Move("holding", 0, 0, held, ev)


def _held_too_long(
    spec: RolloutSpec, last: RolloutStepRecord, ev: StepEvidence, elapsed: float, why: str
) -> Move | None:
    """A step that still holds: a rollback once it has held `max_hold_seconds` past its interval; None:
    it waits on."""
    limit = spec.bounds.max_hold_seconds
    if limit is None or elapsed < spec.interval_seconds + limit:
        return None
    return Move("rolled_back", last.step, 0, f"held past the max hold of {limit:g}s: {why}", ev)


def _breach(
    rollout: RolloutRecord,
    rows: list[RolloutStepRecord],
    live: dict[str, ServeHealth],
    ev: StepEvidence,
    bounds: RolloutBounds,
) -> str | None:
    """Why the candidate must go now (a replica could not load it, or a bound is past); None: it may stay."""
    for consumer, health in sorted(live.items()):
        if health.rollout_id == rollout.id and health.candidate_error:
            return f"{consumer} could not load it: {health.candidate_error}"
    if ev.candidate_requests < bounds.min_requests:
        return None
    rate = ev.candidate_errors / ev.candidate_requests
    if rate > bounds.max_error_rate:
        return (
            f"error rate {rate:.1%} ({ev.candidate_errors} of {ev.candidate_requests} requests) "
            f"past the bound {bounds.max_error_rate:.1%}"
        )
    figure = bounds.latency
    reference = (
        latency(ev, "baseline", figure)
        if ev.baseline_requests >= bounds.min_requests
        else reference_latency(rows, bounds.min_requests, figure)
    )
    measured = latency(ev, "candidate", figure)
    if reference and measured is not None and measured > reference * bounds.max_latency_ratio:
        ratio = bounds.max_latency_ratio
        return f"{figure} latency {measured:.1f} ms against the baseline's {reference:.1f} ms: past {ratio:g}x"
    return None
