"""The experience form (the seed's federated coordinator): trajectories in, a route model and patterns out.

An ending agent exports its trajectories (embedding, quality, route, context). The coordinator keeps
those at or above the quality threshold, records the agent's contribution, and every
`consolidation_interval` agents consolidates: it trains the route model (an MLP from embedding to
route, continuing from the last consolidation) on the accepted trajectories, and recomputes each
route's pattern (the quality-weighted mean embedding of its good trajectories). New agents ask for a
warm start and get both. One export counts per agent id: a redelivered export changes nothing.
"""

from __future__ import annotations

import numpy as np

from forseti.schemas.errors import ErrorCode
from forseti.schemas.federation import (
    ExperienceExport,
    ExperienceOptions,
    FederatedModel,
    FederationReceipt,
    LocalTraining,
    RoutePattern,
)

from .model import LocalTrainer, accuracy
from .state import Contributor, FederationState
from .tensors import Layout, Params

CONSOLIDATION_BATCH = 64


def route_model(options: ExperienceOptions, seed: int = 0) -> FederatedModel:
    """The model an experience federation consolidates: embedding columns in, route probabilities out."""
    return FederatedModel(
        columns=[f"e{i}" for i in range(options.embedding_dim)], target="route", classes=list(options.routes), seed=seed
    )


def take(state: FederationState, options: ExperienceOptions, export: ExperienceExport) -> FederationReceipt:
    """Record one agent's export: keep its trajectories at or above the threshold (those with a known
    route go into the training buffer), count the rest; a second export of the agent is a duplicate."""
    if export.agent_id in state.contributors:
        return FederationReceipt(accepted=True, duplicate=True, round=state.round, reason="counted before")
    wrong = [i for i, t in enumerate(export.trajectories) if len(t.embedding) != options.embedding_dim]
    if wrong:
        return FederationReceipt(
            accepted=False,
            code=ErrorCode.INVALID_DATA,
            reason=f"trajectory {wrong[0]} has an embedding of {len(export.trajectories[wrong[0]].embedding)} "
            f"values; this federation's have {options.embedding_dim}",
            round=state.round,
        )
    routes = {route: i for i, route in enumerate(options.routes)}
    good = [t for t in export.trajectories if t.quality >= options.quality_threshold]
    for t in good:
        if t.route in routes:
            state.buffer.append((routes[t.route], t.quality, list(t.embedding)))
    del state.buffer[: max(0, len(state.buffer) - options.buffer)]
    state.quality_sum += sum(t.quality for t in good)
    state.contributors[export.agent_id] = Contributor(
        contributions=1,
        last_round=state.round,
        trajectories=len(export.trajectories),
        accepted=len(good),
        avg_quality=export.stats.avg_quality,
        session_duration_ms=export.session_duration_ms,
    )
    state.count("trajectories_accepted", len(good))
    state.count("trajectories_rejected", len(export.trajectories) - len(good))
    state.since_consolidation += 1
    return FederationReceipt(
        accepted=True,
        accepted_trajectories=len(good),
        rejected_trajectories=len(export.trajectories) - len(good),
        round=state.round,
    )


def due(state: FederationState, options: ExperienceOptions) -> bool:
    """Whether enough agents contributed since the last consolidation."""
    return state.since_consolidation >= options.consolidation_interval


def consolidate(
    state: FederationState, options: ExperienceOptions, model: FederatedModel, layout: Layout, weights: Params
) -> tuple[Params, dict[str, float]]:
    """Train the route model on the buffer from `weights` and recompute the patterns (blocking: run it in a
    thread); the new weights and the consolidation's figures."""
    state.patterns = patterns(state, options)
    state.since_consolidation = 0
    if not state.buffer:
        return weights, {"trajectories": 0.0}
    y = np.array([route for route, _, _ in state.buffer], dtype=np.int64)
    x = np.array([embedding for _, _, embedding in state.buffer], dtype=np.float32)
    trainer = LocalTrainer(model, x, y, seed=state.round)
    local = LocalTraining(epochs=options.epochs, batch_size=CONSOLIDATION_BATCH, learning_rate=0.1)
    delta, figures = trainer.train(layout, weights, local)
    trained = [w + d for w, d in zip(weights, delta, strict=True)]
    return trained, {
        "trajectories": float(len(y)),
        "loss": figures["loss"],
        "route_accuracy": accuracy(model, layout, trained, x, y),
    }


def patterns(state: FederationState, options: ExperienceOptions) -> list[RoutePattern]:
    """Per route: the quality-weighted mean embedding of its accepted trajectories, their mean quality
    and their count."""
    out = []
    for index, route in enumerate(options.routes):
        mine = [(q, e) for r, q, e in state.buffer if r == index]
        if not mine:
            continue
        quality = np.array([q for q, _ in mine])
        centroid = np.average(np.array([e for _, e in mine]), axis=0, weights=np.maximum(quality, 1e-9))
        out.append(
            RoutePattern(
                route=route,
                centroid=[float(v) for v in centroid],
                avg_quality=float(quality.mean()),
                count=len(mine),
            )
        )
    return out
