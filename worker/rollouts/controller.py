"""The rollout controller every worker runs: it hears the replicas' health and moves rollouts on.

No single process owns a rollout. Every worker keeps the health reports of the last hour (`fleet.py`),
reads the rollouts going on from the shared registry each `poll`, judges each one's step (`judge.py`), and
tries to store the move; the registry lets one worker store each `seq`, and that worker announces it.
A move stored but not announced (its worker died in between) is announced again by the next tick
of the workers once `REPUBLISH_AFTER` has passed (by each that sees it so: replicas act on a move's
`seq` once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from forseti.adapters.bus import Bus
from forseti.adapters.registry import RegistryStore, RolloutRecord, RolloutStepRecord
from forseti.adapters.signing import Signer
from forseti.schemas.rollouts import ENDED

from ..engine.metrics import Metrics
from .fleet import Fleet, epoch
from .judge import judge, live
from .steps import publish_step

log = logging.getLogger(__name__)

REPUBLISH_AFTER = 5.0
"""Seconds after which a stored move not yet stamped published is published again."""


class RolloutController:
    """Moves every rollout going on, as one of many workers doing the same."""

    def __init__(
        self,
        bus: Bus,
        store: RegistryStore,
        fleet: Fleet,
        *,
        metrics: Metrics | None = None,
        signer: Signer | None = None,
        poll: float = 1.0,
    ) -> None:
        self.bus, self.store = bus, store
        self.metrics = metrics
        self.signer = signer
        """Signs the moves this worker announces."""
        self.fleet = fleet
        """The health reports this worker heard (someone else subscribes it to the bus)."""
        self.poll = poll
        """Seconds between two looks at the rollouts going on."""
        self._shown: set[tuple[str, str]] = set()
        self._reporting: set[tuple[str, str | None]] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick every `poll` until `stopping` is set."""
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception:  # a registry hiccup must not end the controller: the next tick retries
                log.exception("rollout tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.poll)

    async def tick(self) -> None:
        """Look at every rollout going on once."""
        going = await self.store.list_rollouts(active=True)
        for rollout in going:
            await self.advance(rollout)
        if self.metrics is not None:
            for name, alias in self._shown - {(r.name, r.alias) for r in going}:
                self.metrics.rollout_share.labels(name, alias).set(0)
            reporting = live(self.fleet.reports, time.time())
            for key in self._reporting - set(reporting):
                self.metrics.replicas_reporting.labels(key[0], key[1] or "").set(0)
            for (model, followed), found in reporting.items():
                self.metrics.replicas_reporting.labels(model, followed or "").set(len(found))
            self._reporting |= set(reporting)

    async def advance(self, rollout: RolloutRecord) -> None:
        """Publish what is stored but unpublished, then judge the rollout's step and store its move."""
        rows = await self.store.list_rollout_steps(rollout.id)
        now = time.time()
        for row in rows:
            if row.published_at is None and now - epoch(row.created_at) >= REPUBLISH_AFTER:
                log.warning("rollout %s move %d was not announced; announcing it", rollout.id, row.seq)
                await publish_step(self.store, self.bus, rollout, row, signer=self.signer)
        if not rows:  # its starter died between storing it and its first move
            rows = [RolloutStepRecord(rollout_id=rollout.id, seq=0, step=0, share=0, state="progressing")]
            if await self.store.claim_rollout_step(rows[0]):
                await publish_step(self.store, self.bus, rollout, rows[0], signer=self.signer)
            return
        last = rows[-1]
        self._show(rollout, last)
        if last.state in ENDED:
            if last.published_at is not None:  # announced, but its worker died before marking it ended
                await self.store.end_rollout(rollout.id)
            return
        started = epoch(next(r.created_at for r in rows if r.step == last.step))
        move = judge(rollout, rows, list(self.fleet.reports), started=started, now=now)
        if move is None:
            return
        row = RolloutStepRecord(
            rollout_id=rollout.id,
            seq=last.seq + 1,
            step=move.step,
            share=move.share,
            state=move.state,
            reason=move.reason,
            evidence=move.evidence.model_dump(mode="json"),
        )
        if not await self.store.claim_rollout_step(row):
            return  # another worker made this move
        log.info("rollout %s: %s at step %d (%d%%): %s", rollout.id, move.state, move.step, move.share, move.reason)
        if self.metrics is not None:
            self.metrics.rollout_moves.labels(state=move.state).inc()
        self._show(rollout, row)
        await publish_step(self.store, self.bus, rollout, row, signer=self.signer)

    def _show(self, rollout: RolloutRecord, row: RolloutStepRecord) -> None:
        if self.metrics is not None:
            self.metrics.rollout_share.labels(rollout.name, rollout.alias).set(0 if row.state in ENDED else row.share)
            self._shown.add((rollout.name, rollout.alias))
