"""What a coordinator keeps in the registry between rounds, so another host can resume the federation."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forseti.schemas.federation import RoutePattern, Tensors


class Contributor(BaseModel):
    """One agent's contribution record (the seed's AgentContribution, for both forms)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    contributions: int = 0
    """Updates or exports accepted from it."""
    examples: int = 0
    """Rows it trained on, over its updates."""
    last_round: int = 0
    """The last round it counted in."""
    trajectories: int = 0
    """Experience: trajectories it sent."""
    accepted: int = 0
    """Experience: those at or above the quality threshold."""
    avg_quality: float = 0.0
    """Experience: its own mean quality."""
    session_duration_ms: int = 0
    """Experience: how long it lived."""


class FederationState(BaseModel):
    """A federation's progress: saved after every round (and every experience export)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    round: int = 0
    """Rounds completed (FedBuff: the global version; experience: consolidations)."""
    weights: Tensors | None = None
    """The global weights."""
    moment1: Tensors | None = None
    """FedAdam's first moment."""
    moment2: Tensors | None = None
    """FedAdam's second moment."""
    counters: Counter[str] = Field(default_factory=Counter)
    """Accepted, duplicate, refused-by-reason, dropped, failed rounds."""
    contributors: dict[str, Contributor] = Field(default_factory=dict)
    """Per-agent records."""
    noise_multiplier: float | None = None
    """The noise multiplier in force (derived from a target epsilon once)."""
    noisy_rounds: int = 0
    """Rounds that added noise (what the accountant composes)."""
    seen: list[str] = Field(default_factory=list)
    """FedBuff: `version:agent` keys of updates counted within the staleness window (de-duplication
    survives a restart)."""
    buffer: list[tuple[int, float, list[float]]] = Field(default_factory=list)
    """Experience: accepted trajectories with a known route, as (route index, quality, embedding)."""
    since_consolidation: int = 0
    """Experience: contributing agents since the last consolidation."""
    patterns: list[RoutePattern] = Field(default_factory=list)
    """Experience: per-route patterns at the last consolidation."""
    quality_sum: float = 0.0
    """Experience: sum of accepted trajectories' quality (for the mean)."""
    versions: list[str] = Field(default_factory=list)
    """Registry ids of the versions announced, oldest first."""
    history: list[dict[str, float]] = Field(default_factory=list)
    """Figures of every closed round, in order."""
    done: bool = False
    """The federation has run all its rounds."""
    started_at: float = Field(default_factory=time.time)
    """When the federation started (seconds since the epoch), for its duration."""

    def count(self, what: str, n: int = 1) -> None:
        """Add to a counter."""
        self.counters[what] += n

    def dump(self) -> dict[str, Any]:
        """The state as the registry stores it."""
        return self.model_dump(mode="json")
