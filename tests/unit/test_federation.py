"""The federation's parts in isolation: update checks, strategies, privacy, config validation, and the
coordinator's refusals on an in-process bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import RegistryStore, create_store
from forseti.adapters.signing import Signer, TrustedKeys, generate
from forseti.schemas.catalog import federation_channel
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.federation import (
    FederatedModel,
    FederationConfig,
    FederationPull,
    FederationReceipt,
    FederationTask,
    FederationUpdate,
    ServerOptimizer,
)
from forseti.worker.federation.agent import ExperienceAgent, UpdateAgent, ask
from forseti.worker.federation.coordinator import Coordinator
from forseti.worker.federation.model import features, initial
from forseti.worker.federation.privacy import Accountant, MaskingKey, from_ring, mask_context, masked, ring_sum
from forseti.worker.federation.strategies import Contribution, Moments, apply, mean_of, staleness_weight
from forseti.worker.federation.tensors import BadUpdate, Layout, check_update, from_wire, to_wire

MODEL = FederatedModel(columns=["a", "b"], classes=[0, 1], hidden=[3])


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.normal(size=2)
        out.append({"a": float(a), "b": float(b), "label": int(a + b > 0)})
    return out


# -- tensors ---------------------------------------------------------------------------------------


def test_parameters_cross_the_wire_unchanged_and_bad_ones_are_refused_with_the_check_they_failed() -> None:
    layout, params = initial(MODEL)
    back = from_wire(to_wire(layout, params), layout)
    assert all(np.array_equal(a.astype(np.float32), b) for a, b in zip(params, back, strict=True))
    other = Layout(["0.weight"], [(3, 2)])
    with pytest.raises(BadUpdate, match="wrong shapes") as shape:
        from_wire(to_wire(other, params[:1]), layout)
    assert shape.value.kind == "shape" and shape.value.code == ErrorCode.INVALID_DATA
    poisoned = [p.copy() for p in params]
    poisoned[1][0] = np.inf
    with pytest.raises(BadUpdate, match="1 NaN or infinite") as nan:
        check_update(poisoned, layout, 1e3)
    assert nan.value.kind == "non_finite"
    with pytest.raises(BadUpdate, match=r"above the federation.s bound 0\.1") as norm:
        check_update(params, layout, 0.1)
    assert norm.value.kind == "norm"
    short = to_wire(layout, params).model_copy(update={"data": "AAAA"})
    with pytest.raises(BadUpdate, match="3 bytes of parameters"):
        from_wire(short, layout)


def test_labels_read_from_a_csv_as_floats_are_their_classes() -> None:
    model = FederatedModel(columns=["a"], classes=[0, 1, "x"])
    _, y = features(model, [{"a": 1.0, "label": 1.0}, {"a": 2.0, "label": 0}, {"a": 0.5, "label": "x"}])
    assert y.tolist() == [1, 0, 2]
    with pytest.raises(ForsetiError, match="no 'label' among the classes"):
        features(model, [{"a": 1.0, "label": 2.0}])


# -- strategies ------------------------------------------------------------------------------------


def test_fedavg_weights_by_examples_and_fedbuff_also_by_staleness() -> None:
    a, b = Contribution("a", np.array([1.0, 0.0]), 30), Contribution("b", np.array([0.0, 1.0]), 10, staleness=3)
    assert mean_of([a, b], strategy="fedavg") == pytest.approx([0.75, 0.25])
    wb = 10 * staleness_weight(3)
    assert staleness_weight(3) == pytest.approx(0.5)
    assert mean_of([a, b], strategy="fedbuff") == pytest.approx([30 / (30 + wb), wb / (30 + wb)])
    assert mean_of([a, b], strategy="fedavg", clip_norm=0.5) == pytest.approx([0.375, 0.125])


def test_fedadam_steps_by_its_moments_as_flower_does() -> None:
    server, moments = ServerOptimizer(learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-9), Moments()
    mean = np.array([0.2, -0.4])
    weights = apply("fedadam", np.zeros(2), mean, server, moments)
    m, v = 0.1 * mean, 0.01 * mean**2
    assert weights == pytest.approx(0.1 * m / (np.sqrt(v) + 1e-9))
    assert apply("fedavg", np.zeros(2), mean, ServerOptimizer(), Moments()) == pytest.approx(mean)


# -- privacy ---------------------------------------------------------------------------------------


def test_pairwise_masks_hide_each_update_and_cancel_in_the_sum() -> None:
    keys = {agent: MaskingKey() for agent in ("a", "b", "c")}
    peers = {agent: key.public for agent, key in keys.items()}
    updates = {agent: np.random.default_rng(i).normal(size=50) for i, agent in enumerate(keys)}
    context = mask_context("f", 3, 1)
    parts = {agent: masked(updates[agent], keys[agent], agent, peers, context) for agent in keys}
    assert np.allclose(from_ring(ring_sum(list(parts.values()))), sum(updates.values()), atol=1e-6)
    alone = from_ring(parts["a"])
    assert not np.allclose(alone, updates["a"], atol=1.0)  # one masked update says nothing of itself
    again = masked(updates["a"], keys["a"], "a", peers, mask_context("f", 3, 2))
    assert not np.array_equal(again, parts["a"])  # a new attempt, new masks
    missing = from_ring(ring_sum([parts["a"], parts["b"]]))
    assert not np.allclose(missing, updates["a"] + updates["b"], atol=1.0)  # without c the masks stay


def test_the_accountant_spends_epsilon_with_each_round_and_finds_the_multiplier_for_a_target() -> None:
    z = Accountant.multiplier_for(8.0, 1e-5, 30)
    accountant = Accountant(z, 1e-5)
    spent = [accountant.epsilon(r) for r in (0, 1, 10, 30)]
    assert spent[0] == 0 and spent[1] < spent[2] < spent[3] == pytest.approx(8.0, abs=0.1)
    assert Accountant(0.0, 1e-5).epsilon(1) == float("inf")


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy": {"noise_multiplier": 1.0}}, "needs clip_norm"),
        ({"privacy": {"secure_aggregation": True, "clip_norm": 1.0}, "strategy": "fedbuff"}, "synchronous rounds"),
        ({"privacy": {"secure_aggregation": True}}, "agents clip"),
        ({"min_participants": 5, "max_participants": 2}, "above max_participants"),
        ({"model": None}, "needs `model`"),
        ({"model": {"columns": ["a"], "classes": [0, 1], "means": [0.0, 1.0]}}, "means has 2 values for 1 columns"),
    ],
)
def test_a_config_that_cannot_work_is_refused_with_the_reason(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FederationConfig.model_validate({"name": "f", "model": MODEL.model_dump(), **overrides})


# -- the coordinator on an in-process bus ----------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistryStore]:
    registry = create_store(str(tmp_path / "registry.db"))
    await registry.open()
    yield registry
    await registry.close()


async def connected(broker: MemoryBroker) -> MemoryBus:
    bus = MemoryBus(broker)
    await bus.connect()
    return bus


async def test_fedbuff_aggregates_every_k_arrivals_and_refuses_stale_updates(
    broker: MemoryBroker, store: RegistryStore, tmp_path: Path
) -> None:
    cfg = FederationConfig(
        name="buff", model=MODEL, strategy="fedbuff", rounds=4, buffer_size=2, max_staleness=1, min_participants=1
    )
    coordinator = Coordinator(await connected(broker), store, cfg, data_dir=tmp_path, owner="c")
    await coordinator.start()
    agents = [UpdateAgent(await connected(broker), "buff", f"a{i}", rows(20, i), seed=i) for i in range(3)]
    reports = await asyncio.wait_for(asyncio.gather(*(a.run() for a in agents)), 60)
    assert coordinator.state.round == 4 and coordinator.state.done
    assert coordinator.state.counters["rounds"] == 4 and all(r.finished for r in reports)
    assert all(h["participants"] == 2 for h in coordinator.state.history), coordinator.state.history
    layout, params = initial(MODEL)
    stale = FederationUpdate(agent_id="late", round=1, examples=5, delta=to_wire(layout, params))
    client = await connected(broker)
    coordinator.state.done = False  # as if still running, two versions on
    receipt = await ask(client, federation_channel("buff", "update"), stale, FederationReceipt, timeout=5)
    assert not receipt.accepted and "at most 1 versions old" in receipt.reason
    assert coordinator.state.counters["refused_stale"] == 1
    await coordinator.stop()


async def test_with_agent_keys_an_unsigned_or_strangers_contribution_is_refused(
    broker: MemoryBroker, store: RegistryStore, tmp_path: Path
) -> None:
    private, public = generate(tmp_path / "keys", "agents")
    stranger, _ = generate(tmp_path / "other", "stranger")
    cfg = FederationConfig(name="closed", model=MODEL, rounds=1, min_participants=1, gather_seconds=0)
    coordinator = Coordinator(
        await connected(broker),
        store,
        cfg,
        data_dir=tmp_path,
        owner="c",
        trusted=TrustedKeys.from_paths([public]),
    )
    await coordinator.start()
    client = await connected(broker)
    pull = FederationPull(agent_id="x", examples=3)
    for signer in (None, Signer.from_file(stranger)):
        with pytest.raises(ForsetiError, match="pull refused") as refused:
            await ask(client, federation_channel("closed", "pull"), pull, FederationTask, timeout=5, signer=signer)
        assert refused.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(ForsetiError, match="not signed"):
        await ExperienceAgent(client, "closed", "e1").send()
    assert coordinator.state.counters["refused_forbidden"] == 3
    agent = UpdateAgent(client, "closed", "trusted", rows(10, 0), signer=Signer.from_file(private))
    report = await asyncio.wait_for(agent.run(), 30)
    assert report.finished and [r.accepted for r in report.receipts] == [True]
    await coordinator.stop()


async def test_an_update_from_outside_the_round_is_refused(
    broker: MemoryBroker, store: RegistryStore, tmp_path: Path
) -> None:
    cfg = FederationConfig(name="r", model=MODEL, rounds=2, min_participants=1, gather_seconds=0, round_deadline=30)
    coordinator = Coordinator(await connected(broker), store, cfg, data_dir=tmp_path, owner="c")
    await coordinator.start()
    client = await connected(broker)
    channel = federation_channel("r", "pull")
    task = FederationTask(federation="r", status="wait")
    while task.status != "train":
        task = await ask(client, channel, FederationPull(agent_id="in", examples=3), FederationTask, timeout=5)
    layout, params = initial(MODEL)
    outsider = FederationUpdate(agent_id="out", round=task.round, examples=3, delta=to_wire(layout, params))
    receipt = await ask(client, federation_channel("r", "update"), outsider, FederationReceipt, timeout=5)
    assert not receipt.accepted and "not a participant of round 0" in receipt.reason
    wrong_round = outsider.model_copy(update={"agent_id": "in", "round": 7})
    receipt = await ask(client, federation_channel("r", "update"), wrong_round, FederationReceipt, timeout=5)
    assert not receipt.accepted and "round 7 attempt 1 is not open (round 0 attempt 1 is)" in receipt.reason
    assert coordinator.state.round == 0
    await coordinator.stop()


async def test_a_coordinator_with_another_config_under_a_stored_name_is_refused(
    broker: MemoryBroker, store: RegistryStore, tmp_path: Path
) -> None:
    cfg = FederationConfig(name="same", model=MODEL, rounds=2)
    first = Coordinator(await connected(broker), store, cfg, data_dir=tmp_path, owner="c1")
    await first.start()
    await first.stop()
    changed = Coordinator(
        await connected(broker), store, cfg.model_copy(update={"rounds": 9}), data_dir=tmp_path, owner="c2"
    )
    with pytest.raises(ForsetiError, match="exists in the registry with another config"):
        await changed.start()


async def test_a_coordinator_whose_round_loop_breaks_says_so_instead_of_hanging(
    broker: MemoryBroker, store: RegistryStore, tmp_path: Path
) -> None:
    class Broken(Coordinator):
        async def _apply(self, mean: np.ndarray, **_: Any) -> None:
            raise RuntimeError("aggregation defect")

    cfg = FederationConfig(name="broken", model=MODEL, rounds=2, min_participants=1, gather_seconds=0)
    coordinator = Broken(await connected(broker), store, cfg, data_dir=tmp_path, owner="c")
    await coordinator.start()
    agent = UpdateAgent(await connected(broker), "broken", "a", rows(10, 0), patience=5)
    running = asyncio.create_task(agent.run())
    await asyncio.wait_for(coordinator.done.wait(), 30)
    assert isinstance(coordinator.error, RuntimeError) and not coordinator.state.done
    running.cancel()
    await coordinator.stop()
