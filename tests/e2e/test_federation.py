"""Federated learning over a real nats-server: an experience federation of short-lived agents, an updates
federation on a non-IID split whose version an edge agent loads, contributions that must change nothing
but the counters (an agent gone mid-round, a duplicate, NaN), secure aggregation and differential
privacy, and a coordinator killed between rounds that another one resumes from the registry."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from forseti.adapters.bus import Bus, Message, create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.registry import RegistryStore, create_store
from forseti.client import Client, Job
from forseti.schemas.catalog import DEADLETTER, federation_channel
from forseti.schemas.envelope import decode
from forseti.schemas.federation import (
    FederatedModel,
    FederationConfig,
    FederationPull,
    FederationReceipt,
    FederationRound,
    FederationTask,
    FederationUpdate,
)
from forseti.schemas.jobs import JobCompleted, JobProgress, TrainingResult
from forseti.worker.federation.agent import ExperienceAgent, UpdateAgent, ask
from forseti.worker.federation.coordinator import Coordinator
from forseti.worker.federation.model import accuracy, features, initial
from forseti.worker.federation.tensors import to_wire
from forseti.worker.services.edge import EdgeAgent

from .test_cli import REPO, WorkerProcess, run
from .test_examples import demo_files

COLUMNS = [f"p{i}" for i in range(64)]
MODEL = FederatedModel(columns=COLUMNS, classes=list(range(10)), scales=[16.0] * 64, hidden=[16])


def digits() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Digits rows (pixels p0..p63, label), shuffled, as (train, test)."""
    data = load_digits()
    rows = [
        dict(zip(COLUMNS, map(float, x), strict=True), label=int(y))
        for x, y in zip(data.data, data.target, strict=True)
    ]
    np.random.default_rng(0).shuffle(rows)
    return rows[300:], rows[:300]


async def collect(job: Job, into: list[Any]) -> list[Any]:
    """Every event of a followed job up to its end."""
    async for update in job.events():
        into.append(update)
    return into


def non_iid(rows: list[dict[str, Any]], agents: int) -> list[list[dict[str, Any]]]:
    """Each agent gets mostly a few labels: rows sorted by label, dealt in contiguous blocks."""
    ordered = sorted(rows, key=lambda r: r["label"])
    size = len(ordered) // agents
    return [ordered[i * size : (i + 1) * size] for i in range(agents)]


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[Callable[[], Any]]:
    """Connects clients of the test's nats-server and closes them at the end."""
    opened: list[Bus] = []

    async def connect() -> Bus:
        bus = create_bus(nats_server.url)
        await bus.connect()
        opened.append(bus)
        return bus

    yield connect
    for bus in reversed(opened):
        await bus.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistryStore]:
    registry = create_store(str(tmp_path / "registry.db"))
    await registry.open()
    yield registry
    await registry.close()


def config(**overrides: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "name": "digits",
        "model": MODEL,
        "rounds": 3,
        "min_participants": 3,
        "round_deadline": 20,
        "gather_seconds": 0.3,
        "local": {"epochs": 2, "learning_rate": 0.1},
    }
    return FederationConfig.model_validate({**base, **overrides})


async def run_federation(
    buses: Callable[[], Any],
    store: RegistryStore,
    tmp_path: Path,
    cfg: FederationConfig,
    shares: list[list[dict[str, Any]]],
) -> Coordinator:
    coordinator = Coordinator(await buses(), store, cfg, data_dir=tmp_path / "coordinator", owner="c1")
    await coordinator.start()
    agents = [UpdateAgent(await buses(), cfg.name, f"a{i}", rows, seed=i) for i, rows in enumerate(shares)]
    reports = await asyncio.wait_for(asyncio.gather(*(a.run() for a in agents)), 120)
    assert all(r.finished for r in reports)
    await coordinator.stop()
    return coordinator


async def test_experience_federation_keeps_good_trajectories_and_warm_starts_a_new_agent(
    buses: Callable[[], Any], store: RegistryStore, tmp_path: Path
) -> None:
    """Five short-lived agents, two of them below the quality threshold, then a sixth asks for a warm start."""
    cfg = FederationConfig.model_validate(
        {
            "name": "routes",
            "form": "experience",
            "experience": {"embedding_dim": 4, "routes": ["code", "chat"], "consolidation_interval": 5, "epochs": 50},
        }
    )
    coordinator = Coordinator(await buses(), store, cfg, data_dir=tmp_path / "c", owner="c1")
    await coordinator.start()
    rng = np.random.default_rng(1)
    receipts = []
    for i in range(5):
        agent = ExperienceAgent(await buses(), "routes", f"agent-{i}")
        poor = i in (1, 3)
        for _ in range(10):
            route = "code" if rng.random() < 0.5 else "chat"
            centre = [1.0, 1.0, 0.0, 0.0] if route == "code" else [0.0, 0.0, 1.0, 1.0]
            embedding = [c + float(rng.normal(0, 0.1)) for c in centre]
            agent.record(embedding, quality=0.2 if poor else 0.8, route=route, context=[f"file:{i}"])
        receipts.append(await agent.send())
    assert [r.accepted_trajectories for r in receipts] == [10, 0, 10, 0, 10]
    assert [r.rejected_trajectories for r in receipts] == [0, 10, 0, 10, 0]
    assert [r.consolidated for r in receipts] == [False] * 4 + [True]

    again = await ExperienceAgent(await buses(), "routes", "agent-0").send()  # a redelivered export
    assert again.duplicate and again.accepted

    sixth = await ExperienceAgent(await buses(), "routes", "agent-5").warm_start()
    assert sixth.round == 1 and sixth.total_agents == 5 and sixth.total_trajectories == 30
    assert sixth.quality_threshold == pytest.approx(0.4) and sixth.avg_quality == pytest.approx(0.8)
    centroids = {p.route: p.centroid for p in sixth.patterns}
    assert centroids["code"][0] > 0.8 and centroids["chat"][2] > 0.8
    assert sixth.weights is not None and sixth.model_version == coordinator.state.versions[-1]
    # the consolidated route model tells the two routes apart
    layout, _ = initial(coordinator.model)
    from forseti.worker.federation.tensors import from_wire

    weights = from_wire(sixth.weights, layout)
    x = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float32)
    assert accuracy(coordinator.model, layout, weights, x, np.array([0, 1])) == 1.0
    assert coordinator.state.counters["duplicate"] == 1
    await coordinator.stop()


async def test_update_federation_trains_on_a_non_iid_split_and_an_edge_agent_loads_the_version(
    buses: Callable[[], Any], store: RegistryStore, tmp_path: Path
) -> None:
    train, test = digits()
    cfg = config(rounds=5, min_participants=4, device_tags=["phones"])
    edge = EdgeAgent(await buses(), device_id="phone-1", data_dir=tmp_path / "edge", tags={"phones"})
    await edge.start()
    layout, start = initial(MODEL)
    x, y = features(MODEL, test)
    before = accuracy(MODEL, layout, start, x, y)
    job = await Client(await buses()).job("federation-digits", accept_timeout=None)  # `forseti watch`'s follower
    seen: list[Any] = []
    followed = asyncio.create_task(collect(job, seen))
    coordinator = await run_federation(buses, store, tmp_path, cfg, non_iid(train, 4))
    try:
        updates = await asyncio.wait_for(followed, 30)
    except TimeoutError:
        raise AssertionError(seen) from None
    assert [u.step for u in updates if isinstance(u, JobProgress)][-5:] == [1, 2, 3, 4, 5]
    ending = updates[-1]
    assert isinstance(ending, JobCompleted) and isinstance(ending.result, TrainingResult)
    assert ending.result.model_id == coordinator.state.versions[-1] and ending.result.metrics.total_epochs == 5
    after = accuracy(MODEL, coordinator.layout, coordinator.layout.split(coordinator.weights), x, y)
    assert after > before + 0.25, (before, after)  # labels dealt in blocks: slow, but learning
    versions = await store.list_models(name="digits")
    assert len(versions) == 5 and versions[0].id == coordinator.state.versions[-1]
    for _ in range(100):  # the edge agent fetches and loads the last announcement
        served = edge.current.get("digits")
        if served is not None and served.model_id == versions[0].id:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the edge agent serves {edge.current}")
    predictions = served.model.predict(test[:50])  # type: ignore[union-attr]
    hits = sum(p["label"] == row["label"] for p, row in zip(predictions, test[:50], strict=True))
    assert hits / 50 == pytest.approx(
        accuracy(MODEL, coordinator.layout, coordinator.layout.split(coordinator.weights), x[:50], y[:50])
    )
    assert coordinator.state.counters["accepted"] == 20
    await edge.stop()


async def test_a_vanished_agent_a_duplicate_and_a_poisoned_update_change_only_the_counters(
    buses: Callable[[], Any], store: RegistryStore, tmp_path: Path
) -> None:
    train, _ = digits()
    shares = non_iid(train, 3)
    clean = await run_federation(buses, store, tmp_path / "clean", config(name="clean", rounds=2), shares)

    cfg = config(name="dirty", rounds=2, round_deadline=3, gather_seconds=1.0)
    coordinator = Coordinator(await buses(), store, cfg, data_dir=tmp_path / "dirty", owner="c2")
    await coordinator.start()
    dead_letters: list[bytes] = []

    async def on_dead(msg: Message) -> None:
        dead_letters.append(msg.data)

    watcher = await buses()
    await watcher.subscribe(DEADLETTER, on_dead)

    async def take_work(bus: Bus, agent: str) -> FederationTask:
        pull = FederationPull(agent_id=agent, examples=100)
        while True:
            task = await ask(bus, federation_channel("dirty", "pull"), pull, FederationTask, timeout=5)
            if task.status == "train":
                return task
            await asyncio.sleep(0.1)

    async def vanish() -> None:
        """Takes its share of round 0 and is gone (its process killed): it never reports."""
        bus = await buses()
        await take_work(bus, "vanishing")
        await bus.close()

    async def poison() -> FederationReceipt:
        bus = await buses()
        task = await take_work(bus, "poisoner")
        layout, params = initial(MODEL)
        params[0][0, 0] = float("nan")
        update = FederationUpdate(agent_id="poisoner", round=task.round, examples=100, delta=to_wire(layout, params))
        return await ask(bus, federation_channel("dirty", "update"), update, FederationReceipt, timeout=5)

    class Resending(UpdateAgent):
        """Sends each update twice, as an at-least-once redelivery would."""

        async def _train_and_send(self, task: FederationTask) -> None:
            await super()._train_and_send(task)
            self._trained = {}
            await super()._train_and_send(task)

    honest = [
        (Resending if i == 0 else UpdateAgent)(await buses(), "dirty", f"a{i}", rows, seed=i)
        for i, rows in enumerate(shares)
    ]
    results = await asyncio.wait_for(asyncio.gather(vanish(), poison(), *(a.run() for a in honest)), 120)
    poisoned = results[1]
    assert isinstance(poisoned, FederationReceipt)
    assert not poisoned.accepted and "NaN" in poisoned.reason
    assert [r.duplicate for r in honest[0].report.receipts] == [False, True, False, True]
    await coordinator.stop()

    assert np.allclose(coordinator.weights, clean.weights, atol=1e-6)
    counters = coordinator.state.counters
    assert counters["accepted"] == 6 and counters["duplicate"] == 2
    assert counters["refused_non_finite"] == 1 and counters["dropped"] >= 1
    assert coordinator.state.history[0]["participants"] == 3
    assert any(decode(raw).data.channel == federation_channel("dirty", "update") for raw in dead_letters)


async def test_secure_aggregation_equals_plain_fedavg_and_dp_reports_epsilon(
    buses: Callable[[], Any], store: RegistryStore, tmp_path: Path
) -> None:
    """Masked updates sum to what plain FedAvg sees (clipping aside), and noisy rounds spend epsilon."""
    train, _ = digits()
    shares = non_iid(train, 3)
    plain = await run_federation(
        buses, store, tmp_path / "p", config(name="plain", rounds=2, privacy={"clip_norm": 100.0}), shares
    )
    secure = await run_federation(
        buses,
        store,
        tmp_path / "s",
        config(name="secure", rounds=2, privacy={"clip_norm": 100.0, "secure_aggregation": True}),
        shares,
    )
    assert np.allclose(secure.weights, plain.weights, atol=1e-5)
    noisy = await run_federation(
        buses,
        store,
        tmp_path / "n",
        config(name="noisy", rounds=2, privacy={"clip_norm": 1.0, "target_epsilon": 8.0}),
        shares,
    )
    spent = [h["epsilon"] for h in noisy.state.history]
    assert 0 < spent[0] < spent[1] <= 8.0 + 0.1
    assert not np.allclose(noisy.weights, plain.weights, atol=1e-3)
    # with noise, the mean gives every agent equal weight, masked or not (noise tiny enough to compare)
    whisper = {"clip_norm": 1.0, "noise_multiplier": 1e-7}
    noisy_plain = await run_federation(
        buses, store, tmp_path / "np", config(name="noisy-plain", rounds=2, privacy=whisper), shares
    )
    noisy_secure = await run_federation(
        buses,
        store,
        tmp_path / "ns",
        config(name="noisy-secure", rounds=2, privacy={**whisper, "secure_aggregation": True}),
        shares,
    )
    assert np.allclose(noisy_secure.weights, noisy_plain.weights, atol=1e-5)


async def test_a_coordinator_killed_between_rounds_is_resumed_by_another(
    buses: Callable[[], Any], nats_server: NatsServer, postgres_url: str, tmp_path: Path
) -> None:
    """Two `forseti coordinator` processes with data dirs of their own on one PostgreSQL registry: the
    first is killed after its second round; the second takes the lease over and finishes the rounds."""
    train, _ = digits()
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(config(rounds=4, min_participants=3).model_dump(mode="json")))
    closed: list[int] = []
    second_closed = asyncio.Event()

    async def on_round(msg: Message) -> None:
        event = decode(msg.data, FederationRound).data
        if event.state in ("closed", "done"):
            closed.append(event.round)
            if event.round == 2:
                second_closed.set()

    watcher = await buses()
    await watcher.subscribe(federation_channel("digits", "rounds"), on_round)

    def coordinator(folder: str, *extra: str) -> WorkerProcess:
        return WorkerProcess(
            nats_server.url,
            tmp_path / folder,
            "--registry-url",
            postgres_url,
            "--lease-ttl",
            "2",
            *extra,
            handlers=[],
            command=("coordinator", "--name", "digits"),
            ready="coordinator digits: round",
        )

    first = await asyncio.to_thread(coordinator, "host-a", "--config", str(path))
    agents = [UpdateAgent(await buses(), "digits", f"a{i}", rows, seed=i) for i, rows in enumerate(non_iid(train, 3))]
    running = asyncio.gather(*(a.run() for a in agents))
    await asyncio.wait_for(second_closed.wait(), 60)
    first.stop(signal.SIGKILL)
    second = await asyncio.to_thread(coordinator, "host-b")
    try:
        reports = await asyncio.wait_for(running, 90)
    except TimeoutError:
        raise AssertionError("".join(second.lines)) from None
    assert all(r.finished for r in reports)
    assert second.proc.wait(30) == 0
    second.stop()
    assert "round 2" in "".join(second.lines)
    assert sorted(set(closed)) == [1, 2, 3, 4] and closed.count(1) == 1 and closed.count(2) == 1
    registry = create_store(postgres_url)
    await registry.open()
    try:
        stored = await registry.get_federation("digits")
        assert stored is not None and stored.round == 4 and stored.snapshot["done"]
        assert len(await registry.list_models(name="digits")) == 4
    finally:
        await registry.close()


async def test_the_documented_federation_runs_as_written_with_the_command_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """docs/federated.md's commands: the demo files, `forseti coordinator` with examples/federation_cancer.yaml,
    two `forseti federate` agents; the coordinator exits when its 10 rounds are done."""
    demo_files(tmp_path, "--no-llm")
    data = tmp_path / "datasets" / "cancer.csv"
    config = REPO / "examples" / "federation_cancer.yaml"
    coordinator = await asyncio.to_thread(
        WorkerProcess,
        nats_server.url,
        tmp_path / "coordinator",
        handlers=[],
        command=("coordinator", "--name", "cancer", "--config", str(config)),
        ready="coordinator cancer: round",
    )
    agents = await asyncio.gather(
        *(
            asyncio.to_thread(
                run, nats_server.url, "federate", "--name", "cancer", "--data", str(data), "--agent-id", a
            )
            for a in ("hospital-a", "hospital-b")
        )
    )
    for agent in agents:
        assert agent.returncode == 0, agent.stderr.decode()[-2000:]
        assert b"sent 10 updates (0 refused); federation done" in agent.stderr
    assert coordinator.proc.wait(60) == 0
    coordinator.stop()
    log = "".join(coordinator.lines)
    assert "federation cancer: done after 10 rounds; last version cancer-r10-" in log
