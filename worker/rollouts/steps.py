"""Starting, ending and announcing rollouts: what `forseti models rollout` and the workers share.

A rollout and each of its moves are registry rows; a move is made by whoever stores its `seq` first,
then announced as `forseti.rollout.step.v1` on `forseti.models`. The move that completes a rollout
also points the alias at the candidate and announces the candidate's artifacts with the alias, as
`forseti models promote` would.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

from forseti.adapters.bus import Bus
from forseti.adapters.encryption import Keyring
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import RegistryStore, RolloutRecord, RolloutStepRecord
from forseti.adapters.signing import Signer, seal
from forseti.schemas.catalog import MODELS
from forseti.schemas.envelope import encode
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.models import ModelAvailable
from forseti.schemas.rollouts import ENDED, RolloutSpec, RolloutStep, StepEvidence

from ..engine.models import find_version, shared_announcements, version_label


def rollout_id(name: str, version: str) -> str:
    """A new rollout's id: the name, the version and the start time, readable in lists and logs."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{name}-{version}-{stamp}-{secrets.token_hex(2)}"[-128:].lstrip("-._")


async def start_rollout(
    store: RegistryStore,
    bus: Bus,
    name: str,
    version: str,
    spec: RolloutSpec,
    *,
    alias: str = "production",
    objects: ObjectStore | None = None,
    http: tuple[Path, str] | None = None,
    signer: Signer | None = None,
    keyring: Keyring | None = None,
) -> tuple[RolloutRecord, RolloutStepRecord]:
    """Store a rollout of `version` to `alias` and announce its first move (replicas load the candidate,
    no traffic yet); its artifacts are shared as `promote` shares them. invalid_model when the alias
    holds nothing, already holds the version, or another rollout of it is going on."""
    candidate = await find_version(store, name, version)
    baseline = await store.get_alias(name, alias)
    if baseline is None:
        raise ForsetiError(
            f"{name} {alias} points at no version: promote a first one, then roll out the next",
            code=ErrorCode.INVALID_MODEL,
        )
    if baseline.id == candidate.id:
        raise ForsetiError(f"{name} {alias} already points at {version}", code=ErrorCode.INVALID_MODEL)
    shared = await shared_announcements(store, bus, candidate, objects=objects, http=http, keyring=keyring)
    record = RolloutRecord(
        id=rollout_id(name, version_label(candidate)),
        name=name,
        alias=alias,
        model_id=candidate.id,
        baseline_id=baseline.id,
        spec=spec.model_dump(mode="json"),
        candidates=[event.model_dump(mode="json") for event in shared],
    )
    first = RolloutStepRecord(
        rollout_id=record.id,
        seq=0,
        step=0,
        share=0,
        state="progressing",
        reason=f"{spec.strategy}: loading {version_label(candidate)} beside {version_label(baseline)}",
    )
    if not await store.put_rollout(record, first):
        going = await store.list_rollouts(name=name, active=True)
        ids = ", ".join(r.id for r in going if r.alias == alias)
        raise ForsetiError(
            f"a rollout of {name} {alias} is going on ({ids}): wait for it or abort it", code=ErrorCode.INVALID_MODEL
        )
    await publish_step(store, bus, record, first, signer=signer)
    return record, first


async def abort_rollout(
    store: RegistryStore, bus: Bus, name: str, *, alias: str = "production", reason: str, signer: Signer | None = None
) -> tuple[RolloutRecord, RolloutStepRecord]:
    """End the rollout of `name` `alias` going on: every replica drops the candidate, the alias stays."""
    going = [r for r in await store.list_rollouts(name=name, active=True) if r.alias == alias]
    if not going:
        raise ForsetiError(f"no rollout of {name} {alias} is going on", code=ErrorCode.INVALID_MODEL)
    rollout = going[0]
    for _ in range(10):  # a worker may store a move meanwhile: take the next seq again
        last = (await store.list_rollout_steps(rollout.id))[-1]
        if last.state in ENDED:
            raise ForsetiError(f"rollout {rollout.id} already ended: {last.state}", code=ErrorCode.INVALID_MODEL)
        move = RolloutStepRecord(
            rollout_id=rollout.id, seq=last.seq + 1, step=last.step, share=0, state="aborted", reason=reason
        )
        if await store.claim_rollout_step(move):
            await publish_step(store, bus, rollout, move, signer=signer)
            return rollout, move
    raise ForsetiError(f"rollout {rollout.id} kept moving; try again", code=ErrorCode.INVALID_MODEL)


def step_event(rollout: RolloutRecord, move: RolloutStepRecord, versions: dict[str, str]) -> RolloutStep:
    """The event of one move; `versions`: version labels by model id."""
    spec = RolloutSpec.model_validate(rollout.spec)
    return RolloutStep(
        rollout_id=rollout.id,
        seq=move.seq,
        name=rollout.name,
        alias=rollout.alias,
        strategy=spec.strategy,
        device_tag=spec.device_tag,
        step=move.step,
        share=move.share,
        state=move.state,
        reason=move.reason[:4096],
        candidate_id=rollout.model_id,
        candidate_version=versions.get(rollout.model_id, rollout.model_id),
        baseline_id=rollout.baseline_id,
        baseline_version=versions.get(rollout.baseline_id, rollout.baseline_id),
        candidates=[ModelAvailable.model_validate(c) for c in rollout.candidates],
        evidence=StepEvidence.model_validate(move.evidence) if move.evidence is not None else None,
    )


async def publish_step(
    store: RegistryStore, bus: Bus, rollout: RolloutRecord, move: RolloutStepRecord, *, signer: Signer | None
) -> None:
    """Announce a stored move (a completing one also points the alias at the candidate and announces the
    candidate with the alias), then stamp it published. Safe to repeat: a move whose publisher died
    before the stamp is published again by another worker."""
    versions = {}
    for model_id in (rollout.model_id, rollout.baseline_id):
        model = await store.get_model(model_id)
        versions[model_id] = version_label(model) if model is not None else model_id
    if move.state == "completed":
        holder = await store.get_alias(rollout.name, rollout.alias)
        if holder is None or holder.id != rollout.model_id:
            await store.set_alias(rollout.name, rollout.alias, rollout.model_id)
    await bus.publish(MODELS, seal(encode(step_event(rollout, move, versions), subject=rollout.id), signer))
    if move.state == "completed":
        for document in rollout.candidates:
            event = ModelAvailable.model_validate({**document, "alias": rollout.alias})
            await bus.publish(MODELS, seal(encode(event, subject=event.model_id), signer))
    await store.published_rollout_step(rollout.id, move.seq)
    if move.state in ENDED:
        await store.end_rollout(rollout.id)
