"""`forseti coordinator`: runs one federation over the bus (see `schemas/federation.py` for the protocol).

The coordinator holds the federation's lease in the registry while it runs and saves the federation's
state there after every round, so a coordinator started on another host (same registry, same bus)
waits for the lease to run out and resumes at the round the first one finished; a round in progress
when it died is run again. Agents pull their work, train, and send updates; synchronous strategies
gather a round's participants among the agents waiting, close the round when all reported or at its
deadline (those missing are left out), and aggregate; FedBuff aggregates every `buffer_size` arrivals.
Each contribution counts once per (federation, round, agent); one that fails its checks is refused with
a reason, counted, and dead-lettered. Every `announce_every` rounds the global model is registered as a
version of `model_name`, exported to ONNX and announced with `model.available`; progress goes out as
`forseti.job.progress.v1` on `forseti.jobs.federation-<name>`, so `forseti watch` follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

from forseti.adapters.bus import Bus, Message, Subscription
from forseti.adapters.encryption import Keyring
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import FederationRecord, RegistryStore
from forseti.adapters.signing import Signer, TrustedKeys, refusal
from forseti.schemas.base import Strict
from forseti.schemas.catalog import federation_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.federation import (
    ExperienceExport,
    FederatedModel,
    FederationConfig,
    FederationError,
    FederationPull,
    FederationReceipt,
    FederationRound,
    FederationTask,
    FederationUpdate,
    Peer,
    WarmStart,
    WarmStartQuery,
)

from . import experience, woken
from .model import initial
from .outbox import CoordinatorMetrics, Outbox
from .privacy import Accountant, from_ring, ring_sum
from .state import Contributor, FederationState
from .strategies import Contribution, Moments, apply, mean_of
from .tensors import BadUpdate, Layout, check_update, from_wire, to_wire

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Strict)

RETRY_AFTER = 2.0
"""Longest a waiting agent goes between pulls (how fast a vanished waiting agent is noticed)."""


@dataclass
class Waiting:
    """An agent that pulled and waits for a round."""

    public_key: str
    """Its X25519 key (empty without secure aggregation)."""
    seen: float
    """When it last pulled (loop time)."""


@dataclass
class OpenRound:
    """The round in progress (synchronous strategies)."""

    number: int
    attempt: int
    peers: dict[str, str]
    """Participants and their public keys (empty strings without secure aggregation)."""
    deadline: float
    """Loop time at which it closes."""
    updates: dict[str, Contribution] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    """Secure aggregation: each participant's masked update (in the ring)."""
    examples: dict[str, int] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def reported(self) -> set[str]:
        """Who has sent an update."""
        return set(self.updates) | set(self.masked)


class Coordinator:
    """Runs one federation: its rounds, its participants, its state in the registry."""

    def __init__(
        self,
        bus: Bus,
        store: RegistryStore,
        config: FederationConfig,
        *,
        data_dir: Path,
        owner: str,
        lease_ttl: float = 30.0,
        objects: ObjectStore | None = None,
        signer: Signer | None = None,
        trusted: TrustedKeys | None = None,
        keyring: Keyring | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus, self.store, self.config = bus, store, config
        self.name = config.name
        self.owner, self.lease_ttl = owner, lease_ttl
        self.trusted = trusted
        """Contributions must be signed by one of `trusted` (None: anyone's are taken, checked)."""
        self.outbox = Outbox(
            bus, store, config, data_dir / "federations" / config.name, owner, objects, signer, keyring
        )
        self.metrics = CoordinatorMetrics(registry)
        self.state = FederationState()
        self.model: FederatedModel = _model_of(config)
        self.layout, self.weights = Layout([], []), np.zeros(0)
        self.moments = Moments()
        self.waiting: dict[str, Waiting] = {}
        self.open: OpenRound | None = None
        self.done = asyncio.Event()
        """Set when the federation has run all its rounds, or the coordinator broke (`error`)."""
        self.error: BaseException | None = None
        """What stopped the coordinator's rounds, when something did."""
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = np.random.default_rng(secrets.randbits(128))  # DP noise must not be predictable
        self._buffered: list[Contribution] = []
        """FedBuff: updates waiting for the next aggregation."""
        self._losses: dict[str, float] = {}
        self._first_buffered = 0.0

    @property
    def job_id(self) -> str:
        """The id progress events go out under."""
        return self.outbox.job_id

    @property
    def accountant(self) -> Accountant | None:
        """The privacy accountant, when rounds add noise."""
        if self.state.noise_multiplier is None:
            return None
        return Accountant(self.state.noise_multiplier, self.config.privacy.delta)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the federation's lease (waiting while another coordinator holds it), load or create its
        state, and serve its channels."""
        record = await self._claim()
        if record.snapshot:
            self.state = FederationState.model_validate(record.snapshot)
        self._load_weights()
        if self.state.noise_multiplier is None and self.config.privacy.noisy:
            privacy = self.config.privacy
            self.state.noise_multiplier = privacy.noise_multiplier or Accountant.multiplier_for(
                privacy.target_epsilon or 0.0, privacy.delta, self.config.rounds
            )
        await self._save()
        log.info("federation %s: %s at round %d (%s)", self.name, self.owner, self.state.round, self.config.strategy)
        if self.state.done:
            self.done.set()
        for verb, handler in (
            ("pull", self._on_pull),
            ("update", self._on_update),
            ("experience", self._on_experience),
            ("warmstart", self._on_warmstart),
        ):
            self._subs.append(await self.bus.subscribe(federation_channel(self.name, verb), handler))
        self._tasks.append(asyncio.create_task(self._guarded(self._renew)))
        if self.config.form == "updates":
            rounds = self._flush_late if self.config.strategy == "fedbuff" else self._rounds
            self._tasks.append(asyncio.create_task(self._guarded(rounds)))
        await self.outbox.progress(self.state, "coordinator started")

    async def stop(self) -> None:
        """Stop serving and give the lease up (the state is saved after every round)."""
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        async with self._lock:  # a round being closed is saved, announced and reported before we stop
            for task in self._tasks:
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(ForsetiError):
            await self.store.release_federation(self.name, owner=self.owner)

    async def _claim(self) -> FederationRecord:
        stored = await self.store.get_federation(self.name)
        if stored is not None and stored.config != self.config.model_dump(mode="json"):
            raise ForsetiError(
                f"federation {self.name!r} exists in the registry with another config; run it with the stored "
                "config (forseti coordinator --name NAME, no --config) or choose another name",
                code=ErrorCode.INVALID_TASK,
            )
        fresh = FederationRecord(name=self.name, config=self.config.model_dump(mode="json"))
        while True:
            claim = await self.store.claim_federation(fresh, owner=self.owner, ttl=self.lease_ttl)
            if claim.won:
                return claim.federation
            log.info(
                "federation %s is run by %s; taking over if its lease (%.1fs left) runs out",
                self.name,
                claim.federation.lease_owner,
                claim.lease_left,
            )
            await asyncio.sleep(min(max(claim.lease_left, 0.2), 5.0))

    def _load_weights(self) -> None:
        layout, params = initial(self.model)
        self.layout = layout
        if self.state.weights is not None:
            params = from_wire(self.state.weights, layout)
        self.weights = _f32(layout.flat(params))
        for name in ("moment1", "moment2"):
            saved = getattr(self.state, name)
            if saved is not None:
                setattr(self.moments, "m" if name == "moment1" else "v", layout.flat(from_wire(saved, layout)))

    async def _save(self) -> None:
        self.state.weights = to_wire(self.layout, self.layout.split(self.weights))
        if self.moments.m is not None and self.moments.v is not None:
            self.state.moment1 = to_wire(self.layout, self.layout.split(self.moments.m))
            self.state.moment2 = to_wire(self.layout, self.layout.split(self.moments.v))
        record = FederationRecord(
            name=self.name,
            config=self.config.model_dump(mode="json"),
            snapshot=self.state.dump(),
            round=self.state.round,
        )
        if not await self.store.save_federation(record, owner=self.owner, ttl=self.lease_ttl):
            raise ForsetiError(
                f"federation {self.name}: another coordinator took it over; this one stops",
                code=ErrorCode.STORE_ERROR,
            )

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                async with self._lock:
                    await self._save()
            except ForsetiError as exc:
                log.error("%s", exc.message)
                await self.stop_serving()
                return

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run one of the coordinator's loops; a failure is logged, kept in `error` and ends the wait on
        `done`, instead of dying unseen in a task nobody awaits."""
        try:
            await work()
        except Exception as exc:  # any defect: the federation cannot go on, and its operator must see why
            log.exception("federation %s: the coordinator stopped", self.name)
            self.error = exc
            self.done.set()

    async def stop_serving(self) -> None:
        """Unsubscribe without touching the lease (it was lost)."""
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    # -- requests --------------------------------------------------------------------------------

    async def _on_pull(self, msg: Message) -> None:
        pull = await self._read(msg, FederationPull, "pull")
        if pull is None:
            return
        if self.config.privacy.secure_aggregation and not pull.public_key:
            await self._refuse(msg, "pull", ErrorCode.INVALID_TASK, "secure aggregation: send your X25519 public key")
            return
        await msg.respond(encode(self._task_for(pull), subject=self.name))

    def _task_for(self, pull: FederationPull) -> FederationTask:
        base = {"federation": self.name, "model": self.model, "local": self.config.local}
        if self.state.done:
            return FederationTask(federation=self.name, status="done", round=self.state.round)
        if self.config.form != "updates":
            return FederationTask(federation=self.name, status="wait", retry_after=RETRY_AFTER)
        weights = to_wire(self.layout, self.layout.split(self.weights))
        now = time.monotonic()
        if self.config.strategy == "fedbuff":
            if self._buffered_key(self.state.round, pull.agent_id):  # one update per agent per global version
                return FederationTask(
                    federation=self.name, status="wait", round=self.state.round, retry_after=RETRY_AFTER
                )
            return FederationTask(status="train", round=self.state.round, weights=weights, **base)
        live = self.open
        if (
            live is not None
            and live.peers.get(pull.agent_id) == (pull.public_key or "")
            and (pull.agent_id not in live.reported)
        ):
            secure = self.config.privacy.secure_aggregation
            return FederationTask(
                status="train",
                round=live.number,
                attempt=live.attempt,
                weights=weights,
                clip_norm=self.config.privacy.clip_norm if secure else None,
                weighted=not self.config.privacy.noisy,
                peers=[Peer(agent_id=a, public_key=k) for a, k in sorted(live.peers.items())] if secure else [],
                deadline_seconds=max(0.0, live.deadline - now),
                **base,
            )
        self.waiting[pull.agent_id] = Waiting(pull.public_key or "", now)
        self._changed.set()
        return FederationTask(federation=self.name, status="wait", round=self.state.round, retry_after=RETRY_AFTER)

    async def _on_update(self, msg: Message) -> None:
        update = await self._read(msg, FederationUpdate, "update")
        if update is None:
            return
        async with self._lock:
            try:
                receipt = await self._take_update(update)
            except BadUpdate as exc:
                self._counted(f"refused_{exc.kind}")
                await self._refuse(msg, "update", exc.code, f"update from {update.agent_id} refused: {exc.message}")
                return
        outcome = "duplicate" if receipt.duplicate else "accepted" if receipt.accepted else "refused_round"
        self._counted("late" if receipt.finished else outcome)
        await msg.respond(encode(receipt, subject=self.name))
        self._changed.set()

    async def _take_update(self, update: FederationUpdate) -> FederationReceipt:
        if self.config.form != "updates":
            return FederationReceipt(
                accepted=False, code=ErrorCode.INVALID_TASK, reason="this is an experience federation: send exports"
            )
        if self._counted_before(update):  # a redelivery, also once the federation is done
            return FederationReceipt(accepted=True, duplicate=True, round=self.state.round, reason="counted before")
        if self.state.done:
            return FederationReceipt(
                accepted=False, finished=True, code=ErrorCode.INVALID_TASK, reason="the federation is done"
            )
        if self.config.strategy == "fedbuff":
            return await self._buffer(update)
        live, agent = self.open, update.agent_id
        if live is None or live.number != update.round or live.attempt != update.attempt:
            at = f"round {live.number} attempt {live.attempt}" if live else "no round"
            return FederationReceipt(
                accepted=False,
                code=ErrorCode.INVALID_DATA,
                reason=f"round {update.round} attempt {update.attempt} is not open ({at} is)",
                round=self.state.round,
            )
        if agent not in live.peers:
            raise BadUpdate(f"{agent} is not a participant of round {live.number}", kind="participant")
        if agent in live.reported:
            return FederationReceipt(accepted=True, duplicate=True, round=self.state.round, reason="counted before")
        if self.config.privacy.secure_aggregation:
            live.masked[agent] = self.layout.flat(from_wire(update.delta, self.layout, encoding="ring64"))
        else:
            delta = from_wire(update.delta, self.layout)
            check_update(delta, self.layout, self.config.max_update_norm)
            live.updates[agent] = Contribution(agent, self.layout.flat(delta), update.examples)
        live.examples[agent] = update.examples
        live.losses[agent] = update.metrics.get("loss", 0.0)
        return FederationReceipt(accepted=True, round=self.state.round)

    def _credit(self, examples: list[tuple[str, int]]) -> None:
        """Record the contributions that counted in the round now closing."""
        for agent, n in examples:
            record = self.state.contributors.setdefault(agent, Contributor())
            record.contributions += 1
            record.examples += n
            record.last_round = self.state.round + 1

    def _counted_before(self, update: FederationUpdate) -> bool:
        """Whether this agent's update for this round (FedBuff: version) counted already."""
        if self.config.strategy == "fedbuff":
            return self._buffered_key(update.round, update.agent_id)
        counted = self.state.contributors.get(update.agent_id)
        live = self.open
        in_closed_round = live is None or live.number > update.round
        return counted is not None and counted.last_round == update.round + 1 and in_closed_round

    async def _buffer(self, update: FederationUpdate) -> FederationReceipt:
        staleness = self.state.round - update.round
        if staleness < 0 or staleness > self.config.max_staleness:
            raise BadUpdate(
                f"trained on version {update.round}; the federation is at {self.state.round} and takes updates "
                f"at most {self.config.max_staleness} versions old",
                kind="stale",
            )
        delta = from_wire(update.delta, self.layout)
        check_update(delta, self.layout, self.config.max_update_norm)
        self._buffered.append(Contribution(update.agent_id, self.layout.flat(delta), update.examples, staleness))
        self._losses[update.agent_id] = update.metrics.get("loss", 0.0)
        if len(self._buffered) == 1:
            self._first_buffered = time.monotonic()
        if len(self._buffered) >= self.config.buffer_size:
            await self._flush()
        return FederationReceipt(accepted=True, round=self.state.round)

    def _buffered_key(self, version: int, agent: str) -> bool:
        """Whether an update of `agent` trained on `version` was counted (or waits in the buffer)."""
        key = f"{version}:{agent}"
        return key in self.state.seen or any(
            f"{self.state.round - c.staleness}:{c.agent_id}" == key for c in self._buffered
        )

    async def _flush(self) -> None:
        """FedBuff: aggregate what the buffer holds."""
        buffered, self._buffered = self._buffered, []
        self.state.seen += [f"{self.state.round - c.staleness}:{c.agent_id}" for c in buffered]
        losses, self._losses = self._losses, {}
        await self._step(buffered, losses=losses)

    async def _flush_late(self) -> None:
        """FedBuff: a buffer that has waited `round_deadline` with at least `min_participants` updates is
        aggregated short of `buffer_size`, so fewer agents than the buffer holds cannot stall the federation."""
        while not self.state.done:
            await asyncio.sleep(min(1.0, self.config.round_deadline / 4))
            waited = time.monotonic() - self._first_buffered
            if len(self._buffered) >= self.config.min_participants and waited >= self.config.round_deadline:
                async with self._lock:
                    if self._buffered:
                        await self._flush()

    async def _on_experience(self, msg: Message) -> None:
        export = await self._read(msg, ExperienceExport, "experience")
        if export is None:
            return
        options = self.config.experience
        if options is None:
            await self._refuse(msg, "experience", ErrorCode.INVALID_TASK, "this is an updates federation")
            return
        async with self._lock:
            receipt = experience.take(self.state, options, export)
            if receipt.accepted and not receipt.duplicate and experience.due(self.state, options):
                params, figures = await asyncio.to_thread(
                    experience.consolidate,
                    self.state,
                    options,
                    self.model,
                    self.layout,
                    self.layout.split(self.weights),
                )
                self.weights = _f32(self.layout.flat(params))
                await self._closed(figures, participants=[])
                receipt = receipt.model_copy(update={"consolidated": True, "round": self.state.round})
            else:
                await self._save()
        outcome = "duplicate" if receipt.duplicate else "accepted" if receipt.accepted else "refused_shape"
        self._counted(outcome)
        if not receipt.accepted:
            await self.outbox.dead_letter(
                msg.data, "experience", receipt.code or ErrorCode.INVALID_DATA, receipt.reason
            )
        await msg.respond(encode(receipt, subject=self.name))

    async def _on_warmstart(self, msg: Message) -> None:
        query = await self._read(msg, WarmStartQuery, "warmstart")
        if query is None:
            return
        accepted = self.state.counters["trajectories_accepted"]
        threshold = self.config.experience.quality_threshold if self.config.experience else 0.0
        reply = WarmStart(
            federation=self.name,
            round=self.state.round,
            model_version=self.state.versions[-1] if self.state.versions else None,
            weights=to_wire(self.layout, self.layout.split(self.weights)) if self.state.round else None,
            patterns=self.state.patterns,
            total_agents=len(self.state.contributors),
            total_trajectories=accepted,
            avg_quality=self.state.quality_sum / accepted if accepted else 0.0,
            quality_threshold=threshold,
        )
        await msg.respond(encode(reply, subject=self.name))

    # -- synchronous rounds ----------------------------------------------------------------------

    async def _rounds(self) -> None:
        """Open a round when enough agents wait, close it when all reported or at its deadline."""
        while not self.state.done:
            live = self.open
            if live is None:
                ready = self._ready()
                if len(ready) < self.config.min_participants:
                    await self._next_change(1.0)
                    continue
                if self.config.gather_seconds and len(ready) < self.config.max_participants:
                    await asyncio.sleep(self.config.gather_seconds)
                    ready = self._ready()
                    if len(ready) < self.config.min_participants:
                        continue
                chosen = sorted(ready)[: self.config.max_participants]
                await self._open({a: self.waiting[a].public_key for a in chosen}, attempt=1)
                continue
            left = live.deadline - time.monotonic()
            if live.reported >= set(live.peers) or left <= 0:
                async with self._lock:
                    await self._close(live)
                continue
            await self._next_change(left)

    def _ready(self) -> list[str]:
        """Agents that pulled lately and wait for a round."""
        horizon = time.monotonic() - 3 * RETRY_AFTER
        for agent in [a for a, w in self.waiting.items() if w.seen < horizon]:
            del self.waiting[agent]
        return list(self.waiting)

    async def _next_change(self, timeout: float) -> None:
        self._changed.clear()
        await woken(self._changed, timeout)

    async def _open(self, peers: dict[str, str], *, attempt: int) -> None:
        number = self.state.round
        self.open = OpenRound(number, attempt, peers, time.monotonic() + self.config.round_deadline)
        for agent in peers:
            self.waiting.pop(agent, None)
        log.info("federation %s: round %d attempt %d open to %d agents", self.name, number, attempt, len(peers))
        await self.outbox.broadcast(
            FederationRound(
                federation=self.name, round=number, attempt=attempt, state="open", participants=sorted(peers)
            )
        )

    async def _close(self, live: OpenRound) -> None:
        reported = live.reported
        dropped = set(live.peers) - reported
        if dropped:
            self.state.count("dropped", len(dropped))
            log.info("federation %s: round %d left out %s", self.name, live.number, ", ".join(sorted(dropped)))
        enough = len(reported) >= self.config.min_participants
        if self.config.privacy.secure_aggregation and dropped:
            self.open = None
            if enough:  # the masks of those who reported no longer cancel: run the round again without the missing
                await self._open({a: live.peers[a] for a in sorted(reported)}, attempt=live.attempt + 1)
                return
        if not enough:
            self.open = None
            self.state.count("failed_rounds")
            await self._save()
            await self.outbox.broadcast(
                FederationRound(
                    federation=self.name,
                    round=live.number,
                    attempt=live.attempt,
                    state="failed",
                    participants=sorted(reported),
                )
            )
            return
        self.open = None
        if self.config.privacy.secure_aggregation:
            await self._step_masked(live)
        else:
            await self._step(list(live.updates.values()), losses=live.losses)

    async def _step_masked(self, live: OpenRound) -> None:
        """Aggregate a secure round from the sum of its masked updates."""
        total = from_ring(ring_sum(list(live.masked.values())))
        noisy = self.config.privacy.noisy
        # agents weight their own update by their examples (by 1 under noise: equal weights bound the sensitivity)
        weight = len(live.masked) if noisy else sum(live.examples.values())
        if noisy:
            total = total + self._rng.normal(0.0, self._noise_std(), size=total.shape)
        mean = total / weight
        if not np.all(np.isfinite(mean)) or float(np.linalg.norm(mean)) > self.config.max_update_norm:
            self.state.count("refused_sum")
            await self._save()
            await self.outbox.broadcast(
                FederationRound(
                    federation=self.name,
                    round=live.number,
                    attempt=live.attempt,
                    state="failed",
                    participants=sorted(live.masked),
                )
            )
            return
        await self._apply(mean, examples=sorted(live.examples.items()), losses=live.losses)

    def _noise_std(self) -> float:
        return (self.state.noise_multiplier or 0.0) * (self.config.privacy.clip_norm or 0.0)

    async def _step(self, updates: list[Contribution], *, losses: dict[str, float]) -> None:
        """Aggregate plain updates and take the server step."""
        privacy = self.config.privacy
        mean = mean_of(
            updates,
            strategy=self.config.strategy,
            clip_norm=privacy.clip_norm,
            noise_std=self._noise_std() if privacy.noisy else 0.0,
            rng=self._rng,
        )
        await self._apply(mean, examples=[(u.agent_id, u.examples) for u in updates], losses=losses)

    async def _apply(self, mean: np.ndarray, *, examples: list[tuple[str, int]], losses: dict[str, float]) -> None:
        """Take the server step with a round's combined change, and close the round."""
        participants = [agent for agent, _ in examples]  # FedBuff: an agent may count twice (two versions)
        self._credit(examples)
        self.weights = _f32(apply(self.config.strategy, self.weights, mean, self.config.server, self.moments))
        if self.moments.m is not None and self.moments.v is not None:
            self.moments.m, self.moments.v = _f32(self.moments.m), _f32(self.moments.v)
        if self.config.privacy.noisy:
            self.state.noisy_rounds += 1
        figures: dict[str, float] = {
            "participants": float(len(participants)),
            "update_norm": float(np.linalg.norm(mean)),
        }
        if losses:
            figures["loss"] = float(np.mean(list(losses.values())))
        if self.accountant is not None:
            figures["epsilon"] = self.accountant.epsilon(self.state.noisy_rounds)
        self.state.count("rounds")
        await self._closed(figures, participants=participants)

    async def _closed(self, figures: dict[str, float], *, participants: list[str]) -> None:
        """A round (or a consolidation) is done: save, announce when due, tell agents and followers."""
        self.state.round += 1
        final = self.config.form == "updates" and self.state.round >= self.config.rounds
        self.state.history.append({"round": float(self.state.round), **figures})
        if self.config.strategy == "fedbuff":
            oldest = self.state.round - self.config.max_staleness
            self.state.seen = [k for k in self.state.seen if int(k.split(":", 1)[0]) >= oldest]
        if final:
            self.state.done = True
        if final or self.state.round % self.config.announce_every == 0 or self.config.form == "experience":
            await self.outbox.announce(self.state, self.model, self.layout, self.layout.split(self.weights), figures)
        await self._save()
        self.metrics.round.labels(self.name).set(self.state.round)
        if "epsilon" in figures:
            self.metrics.epsilon.labels(self.name).set(figures["epsilon"])
        await self.outbox.broadcast(
            FederationRound(
                federation=self.name,
                round=self.state.round,
                state="done" if final else "closed",
                participants=sorted(participants),
                metrics=figures,
            )
        )
        await self.outbox.progress(
            self.state, f"round {self.state.round} closed with {len(participants)} participants", figures
        )
        if final:
            log.info("federation %s: done after %d rounds", self.name, self.state.round)
            await self.outbox.completed(self.state, figures)
            self.done.set()

    # -- refusals --------------------------------------------------------------------------------

    async def _read(self, msg: Message, model: type[M], verb: str) -> M | None:
        """The request's payload; None after refusing it (untrusted signer, or not a valid event)."""
        distrust = refusal(self.trusted, msg.data)
        if distrust is not None:
            self._counted("refused_forbidden")
            await self._refuse(msg, verb, ErrorCode.FORBIDDEN, f"{verb} refused: {distrust}")
            return None
        try:
            return decode(msg.data, model).data
        except ForsetiError as exc:
            self._counted("refused_invalid")
            await self._refuse(msg, verb, exc.code, f"{verb} refused: {exc.message}")
            return None

    async def _refuse(self, msg: Message, verb: str, code: ErrorCode, reason: str) -> None:
        log.warning("federation %s: %s", self.name, reason)
        await self.outbox.dead_letter(msg.data, verb, code, reason)
        if verb == "update":
            await msg.respond(encode(FederationReceipt(accepted=False, code=code, reason=reason[:4096])))
        else:
            await msg.respond(encode(FederationError(code=code, reason=reason[:4096])))

    def _counted(self, outcome: str) -> None:
        self.metrics.contributions.labels(self.name, outcome).inc()
        self.state.count(outcome)


def _model_of(config: FederationConfig) -> FederatedModel:
    """The model a federation trains: its own (updates), or the route model (experience)."""
    if config.experience is not None:
        return experience.route_model(config.experience)
    assert config.model is not None  # FederationConfig checks it for the updates form
    return config.model


def _f32(vector: np.ndarray) -> np.ndarray:
    """Rounded to float32 (what the wire and the saved state carry), so a resumed federation continues
    from exactly the weights it saved."""
    return vector.astype(np.float32).astype(np.float64)
