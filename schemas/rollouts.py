"""Progressive rollouts: a candidate version takes a growing share of an alias's traffic.

A rollout moves in steps (`forseti.rollout.step.v1` on `forseti.models`, beside the announcements
the services already follow): step 0 loads the candidate beside the version the alias holds on
every replica that follows the alias, each later step gives it a share of the requests, and the
last, once healthy, moves the alias. Replicas report what they serve and how it goes
(`forseti.model.health.v1` on `forseti.models.health`); the workers judge each step from those
reports and move on, hold, or roll back on their own.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from .base import ID_PATTERN, Id, LongText, Name, ShortText, Strict
from .models import ModelAvailable

Strategy = Literal["canary", "blue_green", "rolling"]
RolloutState = Literal["progressing", "holding", "completed", "rolled_back", "aborted"]
ENDED: tuple[RolloutState, ...] = ("completed", "rolled_back", "aborted")
"""The states a rollout ends in."""
LatencyFigure = Literal["mean", "p50", "p90", "p95", "p99"]
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
"""Upper bounds of the latency buckets replicas count requests in (a last bucket takes the slower ones)."""


class RolloutBounds(Strict):
    """What a candidate must keep to within one step, else the rollout rolls back."""

    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    """Failed requests over requests answered by the candidate, at most."""
    max_latency_ratio: float = Field(default=1.5, gt=1.0)
    """The candidate's latency (the `latency` figure) over the version the alias holds (same step;
    else the last step the baseline had traffic in), at most."""
    min_requests: int = Field(default=20, ge=1)
    """Requests the candidate must have answered in a step before it is judged: fewer, and a step
    whose interval is over holds rather than moves on."""
    latency: LatencyFigure = "mean"
    """The latency figure `max_latency_ratio` bounds: the mean, or a percentile estimated from the
    replicas' latency buckets (linear within a bucket, as Prometheus's histogram_quantile does)."""
    max_hold_seconds: float | None = Field(default=None, gt=0)
    """How long a step may hold past its interval (too few requests, or replicas that do not load the
    candidate) before the rollout rolls back; None: it holds until it can be judged or is aborted."""


class RolloutSpec(Strict):
    """How a rollout goes."""

    strategy: Strategy = "canary"
    """canary: traffic shares grow along `steps`; blue_green: the candidate is loaded beside the
    serving version everywhere, then takes all traffic in one step, the old version kept warm;
    rolling: edge devices with `device_tag` switch to it, a growing share of them at each step."""
    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1, max_length=20)
    """The candidate's share at each step, in percent (of requests; rolling: of the tagged devices),
    growing, ending at 100."""
    device_tag: Annotated[str, StringConstraints(pattern=ID_PATTERN)] | None = None
    """rolling: the devices taking part (those started with this `--tag`)."""
    interval_seconds: float = Field(default=300.0, ge=0.1)
    """How long each step runs before it is judged for moving on (a breach rolls back at once)."""
    bounds: RolloutBounds = Field(default_factory=RolloutBounds)
    """What the candidate must keep to."""

    @field_validator("steps")
    @classmethod
    def _growing(cls, steps: list[int]) -> list[int]:
        if any(not 0 < share <= 100 for share in steps):
            raise ValueError("every step is a share in percent, 1 to 100")
        if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] != 100:
            raise ValueError("steps grow and end at 100 (e.g. 10,50,100)")
        return steps

    @model_validator(mode="after")
    def _tag_for_rolling(self) -> RolloutSpec:
        if (self.strategy == "rolling") != (self.device_tag is not None):
            raise ValueError("a rolling rollout names the device_tag it rolls across; the others name none")
        return self

    @model_validator(mode="before")
    @classmethod
    def _blue_green_is_one_step(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("strategy") == "blue_green":
            if data.get("steps", [100]) != [100]:
                raise ValueError("blue_green switches all traffic in one step: leave steps out (or give 100)")
            return {**data, "steps": [100]}
        return data


class StepEvidence(Strict):
    """What the replicas reported during a step, summed over them."""

    candidate_requests: int = Field(default=0, ge=0)
    """Requests the candidate answered (or failed)."""
    candidate_errors: int = Field(default=0, ge=0)
    """Of those, the failed ones."""
    candidate_latency_ms: float | None = Field(default=None, ge=0)
    """The candidate's mean latency (None: no requests)."""
    baseline_requests: int = Field(default=0, ge=0)
    """Requests the version the alias holds answered."""
    baseline_errors: int = Field(default=0, ge=0)
    """Of those, the failed ones."""
    baseline_latency_ms: float | None = Field(default=None, ge=0)
    """The baseline's mean latency (None: no requests)."""
    candidate_latency_buckets: list[int] = Field(default_factory=list, max_length=len(LATENCY_BUCKETS_MS) + 1)
    """The candidate's requests per latency bucket (`VersionHealth.latency_ms_buckets`), summed."""
    baseline_latency_buckets: list[int] = Field(default_factory=list, max_length=len(LATENCY_BUCKETS_MS) + 1)
    """The baseline's requests per latency bucket, summed."""
    replicas: int = Field(default=0, ge=0)
    """Replicas following the alias that reported."""


class RolloutStep(Strict):
    """`forseti.rollout.step.v1`: a rollout moved (or held, or ended); what replicas act on."""

    rollout_id: Id
    """The rollout."""
    seq: int = Field(ge=0)
    """This event's place in the rollout (0, 1, ...): a replica acts on the highest it has seen."""
    name: Name
    """The model name."""
    alias: ShortText
    """The alias rolled out: replicas following it take part."""
    strategy: Strategy
    """canary, blue_green or rolling."""
    device_tag: ShortText | None = None
    """rolling: the devices with this tag take part, each once its share includes it."""
    step: int = Field(ge=0)
    """0: load the candidate, no traffic; n: the n-th share of `RolloutSpec.steps`."""
    share: int = Field(ge=0, le=100)
    """The candidate's share now, in percent: of requests (rolling: of the tagged devices, each device
    in it when `device_share(rollout_id, device_id)` is below it)."""
    state: RolloutState
    """progressing, holding (interval over, not enough evidence yet), or how it ended."""
    reason: LongText = ""
    """Why it moved, held or ended, for people."""
    candidate_id: Id
    """Registry id of the version rolled out."""
    candidate_version: ShortText
    """Its version label."""
    baseline_id: Id
    """Registry id of the version the alias held when the rollout started."""
    baseline_version: ShortText
    """Its version label."""
    candidates: list[ModelAvailable] = Field(default_factory=list, max_length=16)
    """The candidate's announcements (one per artifact), so a replica can load the one it serves."""
    evidence: StepEvidence | None = None
    """What the step before this event was judged on (None for the first event and an abort)."""


class VersionHealth(Strict):
    """One served version's requests since the replica's previous report."""

    model_id: Id
    """Registry id of the version."""
    version: ShortText
    """Its version label."""
    requests: int = Field(ge=0)
    """Requests it answered or failed."""
    errors: int = Field(ge=0)
    """Of those, the failed ones."""
    latency_ms_sum: float = Field(ge=0)
    """Sum of their latencies (queueing for the model included)."""
    latency_ms_max: float = Field(ge=0)
    """The slowest of them."""
    latency_ms_buckets: list[int] = Field(default_factory=list)
    """Of those, how many took at most each of `LATENCY_BUCKETS_MS` (and more than the bound before),
    the last entry the slower ones; empty from a replica that does not count them."""

    @field_validator("latency_ms_buckets")
    @classmethod
    def _one_per_bucket(cls, counts: list[int]) -> list[int]:
        if counts and (len(counts) != len(LATENCY_BUCKETS_MS) + 1 or min(counts) < 0):
            raise ValueError(f"{len(LATENCY_BUCKETS_MS) + 1} counts, one per latency bucket, none negative")
        return counts


class ServeHealth(Strict):
    """`forseti.model.health.v1`: a replica's periodic report of what it serves and how it goes."""

    consumer: ShortText
    """The replica (its model.loaded consumer name)."""
    name: Name
    """The model name it serves."""
    alias: ShortText | None = None
    """The alias it follows (None: every new version; an edge device taking part in a rolling rollout:
    that rollout's alias)."""
    serving: Id | None = None
    """Registry id of the version answering by default (None: nothing loaded)."""
    every_seconds: float = Field(gt=0)
    """How often it reports: a replica silent for three periods is taken to be gone."""
    rollout_id: Id | None = None
    """The rollout it takes part in, if any."""
    candidate: Id | None = None
    """That rollout's candidate, when loaded here."""
    candidate_error: LongText | None = None
    """Why the rollout's candidate could not be loaded here, if it could not."""
    share: int = Field(default=0, ge=0, le=100)
    """The share of requests it gives the candidate now, in percent."""
    versions: list[VersionHealth] = Field(default_factory=list, max_length=16)
    """Requests per version since the previous report."""


def device_share(rollout_id: str, device_id: str) -> int:
    """Where a device stands in a rolling rollout, 0 to 99: it takes the candidate once the step's share
    is above it. Derived from both ids, so every party computes it alike and a growing share only adds
    devices."""
    digest = hashlib.sha256(f"{rollout_id}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100
