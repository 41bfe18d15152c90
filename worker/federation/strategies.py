"""How a coordinator turns agents' updates into the next global weights.

One step, two halves. `mean_of` combines a round's updates into one change: weighted by the agents'
example counts (FedAvg's rule); for FedBuff also by staleness, `1 / sqrt(1 + versions behind)`
(Nguyen et al. 2022); with differential privacy clipped, summed, noised and divided by the number of
updates (equal weights, so one agent's influence is bounded). `apply` then takes the server step:
FedAvg and FedProx add the mean (FedProx differs on the agents, by its proximal term); FedAdam keeps
Adam's moments of the mean and steps by them (Reddi et al. 2021, as Flower's `FedAdam`: no bias
correction); FedBuff adds the mean times the server learning rate. Torch-free, on flat float64 vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forseti.schemas.federation import ServerOptimizer, Strategy

from .privacy import clip


@dataclass(frozen=True)
class Contribution:
    """One accepted update, decoded."""

    agent_id: str
    """Who sent it."""
    delta: np.ndarray
    """The change, as one vector."""
    examples: int
    """Rows it was trained on."""
    staleness: int = 0
    """FedBuff: global versions published since the one it started from."""


@dataclass
class Moments:
    """FedAdam's running moments (kept with the federation's state)."""

    m: np.ndarray | None = None
    """First moment of the aggregated change."""
    v: np.ndarray | None = None
    """Second moment."""


def staleness_weight(staleness: int) -> float:
    """FedBuff's down-weighting of an update that started from an older global model."""
    return 1.0 / float(np.sqrt(1.0 + staleness))


def mean_of(
    updates: list[Contribution],
    *,
    strategy: Strategy,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The round's combined change (see the module docstring)."""
    deltas = [u.delta if clip_norm is None else clip(u.delta, clip_norm) for u in updates]
    if noise_std > 0:
        assert rng is not None
        total = np.stack(deltas).sum(axis=0)
        return np.asarray((total + rng.normal(0.0, noise_std, size=total.shape)) / len(updates))
    weights = np.array(
        [u.examples * (staleness_weight(u.staleness) if strategy == "fedbuff" else 1.0) for u in updates]
    )
    return np.asarray(np.tensordot(weights / weights.sum(), np.stack(deltas), axes=1))


def server_rate(strategy: Strategy, server: ServerOptimizer) -> float:
    """The server learning rate in force (Flower's defaults where none is set: 0.1 for FedAdam, else 1)."""
    if server.learning_rate is not None:
        return server.learning_rate
    return 0.1 if strategy == "fedadam" else 1.0


def apply(
    strategy: Strategy, weights: np.ndarray, mean: np.ndarray, server: ServerOptimizer, moments: Moments
) -> np.ndarray:
    """The next global weights after one server step."""
    rate = server_rate(strategy, server)
    if strategy != "fedadam":
        return weights + rate * mean
    m = np.zeros_like(mean) if moments.m is None else moments.m
    v = np.zeros_like(mean) if moments.v is None else moments.v
    moments.m = server.beta1 * m + (1 - server.beta1) * mean
    moments.v = server.beta2 * v + (1 - server.beta2) * mean * mean
    return np.asarray(weights + rate * moments.m / (np.sqrt(moments.v) + server.tau))
