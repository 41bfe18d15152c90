"""The agents' side of a federation: `UpdateAgent` trains on its own rows and sends weight changes;
`ExperienceAgent` collects trajectories during its session and exports them before it ends.

`UpdateAgent` needs torch (`forseti[federated]`); `ExperienceAgent` needs nothing beyond the bus
client. Both sign what they send when given a key (a federation that trusts agent keys refuses the
rest). An update agent's rows never leave it: only the change to the weights does, masked under
secure aggregation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from forseti.adapters.bus import Bus, Message
from forseti.adapters.signing import Signer, seal
from forseti.schemas.base import Strict
from forseti.schemas.catalog import federation_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, RequestTimeout
from forseti.schemas.federation import (
    AgentStats,
    ExperienceExport,
    FederationError,
    FederationPull,
    FederationReceipt,
    FederationRound,
    FederationTask,
    FederationUpdate,
    Trajectory,
    WarmStart,
    WarmStartQuery,
)

from . import woken
from .model import LocalTrainer, features
from .privacy import MaskingKey, clip, mask_context, masked
from .tensors import Layout, from_wire, to_wire

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Strict)


async def ask(
    bus: Bus, channel: str, request: Strict, reply: type[R], *, timeout: float, signer: Signer | None = None
) -> R:
    """One request to the coordinator; its reply, or the coordinator's refusal as a ForsetiError."""
    raw = await bus.request(channel, seal(encode(request), signer), timeout=timeout)
    answer: Strict = decode(raw).data
    if isinstance(answer, FederationError):
        raise ForsetiError(answer.reason, code=answer.code)
    if not isinstance(answer, reply):
        raise ForsetiError(f"unexpected answer {type(answer).__name__} on {channel}", code=ErrorCode.INVALID_DATA)
    return answer


@dataclass
class AgentReport:
    """What an update agent did."""

    rounds: list[int] = field(default_factory=list)
    """The rounds (FedBuff: versions) it sent updates for."""
    receipts: list[FederationReceipt] = field(default_factory=list)
    """The coordinator's answers."""
    finished: bool = False
    """True when the federation told it it is done."""


class UpdateAgent:
    """Takes part in an updates federation: pull, train locally, send the change, until done."""

    def __init__(
        self,
        bus: Bus,
        federation: str,
        agent_id: str,
        rows: list[dict[str, Any]],
        *,
        signer: Signer | None = None,
        seed: int = 0,
        timeout: float = 10.0,
        patience: float = 120.0,
    ) -> None:
        self.bus, self.federation, self.agent_id, self.rows = bus, federation, agent_id, rows
        self.signer, self.seed, self.timeout = signer, seed, timeout
        self.patience = patience
        """Seconds without an answer from any coordinator before giving up."""
        self.key = MaskingKey()
        self.report = AgentReport()
        self._trainer: LocalTrainer | None = None
        self._trained: dict[int, tuple[list[np.ndarray], dict[str, float]]] = {}
        self._woken = asyncio.Event()
        self._done = False

    async def run(self, *, stop: asyncio.Event | None = None) -> AgentReport:
        """Take part until the federation is done (or `stop` is set)."""
        sub = await self.bus.subscribe(federation_channel(self.federation, "rounds"), self._on_round)
        quiet_since = time.monotonic()
        try:
            while not (stop and stop.is_set()):
                if self._done:
                    self.report.finished = True
                    break
                pull = FederationPull(agent_id=self.agent_id, examples=len(self.rows), public_key=self.key.public)
                try:
                    task = await ask(
                        self.bus, self._channel("pull"), pull, FederationTask, timeout=self.timeout, signer=self.signer
                    )
                except RequestTimeout as exc:
                    if time.monotonic() - quiet_since > self.patience:
                        raise ForsetiError(
                            f"no coordinator of {self.federation} answered for {self.patience:g}s",
                            code=ErrorCode.TIMEOUT,
                        ) from exc
                    await asyncio.sleep(0.5)
                    continue
                quiet_since = time.monotonic()
                if task.status == "done":
                    self.report.finished = True
                    break
                if task.status == "train":
                    await self._train_and_send(task)
                    continue
                self._woken.clear()
                await woken(self._woken, task.retry_after)
        finally:
            await sub.unsubscribe()
        return self.report

    async def _on_round(self, msg: Message) -> None:
        """A round opened or closed: pull now; a federation announced done ends the agent (its coordinator
        may have exited already)."""
        with contextlib.suppress(ForsetiError):
            event: Strict = decode(msg.data).data
            if isinstance(event, FederationRound) and event.state == "done":
                self._done = True
        self._woken.set()

    def _channel(self, verb: str) -> str:
        return federation_channel(self.federation, verb)

    async def _train_and_send(self, task: FederationTask) -> None:
        assert task.weights is not None and task.model is not None and task.local is not None
        if self._trainer is None:
            x, y = features(task.model, self.rows)
            self._trainer = LocalTrainer(task.model, x, y, seed=self.seed)
        layout = Layout(list(task.weights.names), [tuple(s) for s in task.weights.shapes])
        weights = from_wire(task.weights, layout)
        if task.round not in self._trained:  # a secure round tried again re-masks the same change
            self._trained = {task.round: await asyncio.to_thread(self._trainer.train, layout, weights, task.local)}
        delta, figures = self._trained[task.round]
        if task.peers:
            weight = len(self.rows) if task.weighted else 1
            vector = clip(layout.flat(delta), task.clip_norm or float("inf")) * weight
            peers = {p.agent_id: p.public_key for p in task.peers}
            ring = masked(
                vector, self.key, self.agent_id, peers, mask_context(self.federation, task.round, task.attempt)
            )
            wire = to_wire(layout, layout.split(ring), encoding="ring64")
        else:
            wire = to_wire(layout, delta)
        update = FederationUpdate(
            agent_id=self.agent_id,
            round=task.round,
            attempt=task.attempt,
            examples=len(self.rows),
            delta=wire,
            metrics=figures,
        )
        receipt = await ask(
            self.bus, self._channel("update"), update, FederationReceipt, timeout=self.timeout, signer=self.signer
        )
        self.report.rounds.append(task.round)
        self.report.receipts.append(receipt)
        if receipt.finished:
            self._done = True  # the last round closed while this update was on its way
        elif not receipt.accepted:
            log.warning("%s: update for round %d refused: %s", self.agent_id, task.round, receipt.reason)


class ExperienceAgent:
    """An ephemeral agent of an experience federation (the seed's EphemeralAgent): it records
    trajectories during its session and exports them before it ends. Torch-free."""

    def __init__(self, bus: Bus, federation: str, agent_id: str, *, signer: Signer | None = None) -> None:
        self.bus, self.federation, self.agent_id, self.signer = bus, federation, agent_id, signer
        self.trajectories: list[Trajectory] = []
        self.started = time.time()

    async def warm_start(self, *, timeout: float = 10.0) -> WarmStart:
        """What the federation has learned so far (patterns and the route model)."""
        return await ask(
            self.bus,
            federation_channel(self.federation, "warmstart"),
            WarmStartQuery(agent_id=self.agent_id),
            WarmStart,
            timeout=timeout,
            signer=self.signer,
        )

    def record(
        self, embedding: list[float], quality: float, route: str | None = None, context: list[str] | None = None
    ) -> None:
        """Keep one trajectory of the session."""
        self.trajectories.append(
            Trajectory(
                embedding=embedding,
                quality=quality,
                route=route,
                context=context or [],
                timestamp=int(time.time() * 1000),
            )
        )

    def export(self) -> ExperienceExport:
        """The session's export (call before the agent ends)."""
        qualities = [t.quality for t in self.trajectories]
        now = time.time()
        return ExperienceExport(
            agent_id=self.agent_id,
            trajectories=self.trajectories,
            stats=AgentStats(
                total_trajectories=len(qualities), avg_quality=float(np.mean(qualities)) if qualities else 0.0
            ),
            session_duration_ms=int((now - self.started) * 1000),
            timestamp=int(now * 1000),
        )

    async def send(self, *, timeout: float = 30.0) -> FederationReceipt:
        """Export to the coordinator; its receipt (accepted and rejected trajectories)."""
        return await ask(
            self.bus,
            federation_channel(self.federation, "experience"),
            self.export(),
            FederationReceipt,
            timeout=timeout,
            signer=self.signer,
        )
