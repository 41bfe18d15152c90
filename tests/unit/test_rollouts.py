"""Progressive rollouts: two llm-serve replicas following `production`, a worker judging the steps
from their health reports, and llama.cpp serving two tiny GGUF versions on the memory bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.llm.gguf import write_model
from forseti.adapters.llm.llama import LlamaRuntime
from forseti.adapters.registry import ModelRecord, RegistryStore, RolloutRecord, RolloutStepRecord, create_store
from forseti.adapters.signing import Signer, TrustedKeys, generate, seal
from forseti.schemas.catalog import HEALTH, LOADED, MODELS, edge_channel, llm_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferRequest
from forseti.schemas.llm import CompleteReply, CompleteRequest
from forseti.schemas.models import ModelAvailable
from forseti.schemas.rollouts import (
    RolloutBounds,
    RolloutSpec,
    RolloutStep,
    ServeHealth,
    VersionHealth,
    device_share,
)
from forseti.worker.engine.metrics import Metrics
from forseti.worker.engine.models import describe, promote
from forseti.worker.rollouts.controller import RolloutController
from forseti.worker.rollouts.fleet import Fleet
from forseti.worker.rollouts.judge import Report, judge, quantile
from forseti.worker.rollouts.steps import abort_rollout, start_rollout
from forseti.worker.services.edge import EdgeAgent
from forseti.worker.services.llm_serve import LlmService
from forseti.worker.services.traffic import Split
from forseti.worker.services.traffic import Traffic as Tallies

from ..helpers import Watcher, running_worker, tiny_classifier

NAME = "assistant"
FAST = RolloutBounds(min_requests=6, max_error_rate=0.1, max_latency_ratio=50)


@pytest.fixture(scope="module")
def versions(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two GGUF files of the tiny Llama (v1 and v2: same weights, different names, so different files)."""
    out = tmp_path_factory.mktemp("rollout-gguf")
    tensors = load_file(tiny_llama / "model.safetensors")
    return {v: write_model(out / f"{v}.gguf", tiny_llama, tensors, "f32", name=f"assistant {v}") for v in ("v1", "v2")}


async def register(store: RegistryStore, label: str, path: Path) -> ModelRecord:
    model = await store.add_model(
        ModelRecord(
            id=f"{NAME}-{label}",
            name=NAME,
            model_type="llm",
            export_path=str(path),
            export_format="gguf",
            label=label,
        )
    )
    for artifact in describe([("gguf", "f32", path)], model.id):
        await store.add_artifact(artifact)
    return model


class Replica(LlmService):
    """llm-serve following `production`; requests to the version `failing` (if any) raise in llama.cpp."""

    def __init__(self, bus: MemoryBus, consumer: str, failing: str | None = None) -> None:
        super().__init__(
            bus, name=NAME, consumer=consumer, artifact="f32", alias="production", context=128, health_every=0.1
        )
        self.failing = failing

    async def _open(self, event: ModelAvailable) -> LlamaRuntime:
        runtime = await super()._open(event)
        if event.model_id == self.failing:

            def broken(*_: Any, **__: Any) -> Any:
                raise RuntimeError("injected fault: this version cannot answer")

            runtime.complete = broken  # type: ignore[method-assign]
        return runtime


class Traffic:
    """Clients asking the replicas all along (one worker of the queue group answers each request)."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.answers: list[Any] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        # stopped by the event, not by cancelling: on 3.11 a cancel that lands as a reply arrives is
        # lost inside asyncio.wait_for, and the loop would go on
        request = encode(CompleteRequest(prompt="Sensor 3 reads", max_tokens=2))
        while not self.stop.is_set():
            self.answers.append(decode(await self.bus.request(llm_channel(NAME), request, timeout=30)).data)
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def stage(
    broker: MemoryBroker, tmp_path: Path, versions: dict[str, Path], failing: str | None = None
) -> AsyncIterator[tuple[Any, MemoryBus, list[Replica], Watcher, Traffic]]:
    """A worker with v1 promoted to production and v2 registered, two replicas serving v1, traffic."""
    client = MemoryBus(broker)
    await client.connect()
    events = Watcher()
    await client.subscribe(MODELS, events.on_message)
    await client.subscribe(LOADED, events.on_message)
    async with running_worker(MemoryBus(broker), [], tmp_path, rollout_poll=0.05) as worker:
        for label, path in versions.items():
            await register(worker.store, label, path)
        await promote(worker.store, client, NAME, "v1", alias="production")
        replicas = [Replica(MemoryBus(broker), c, failing) for c in ("replica-a", "replica-b")]
        for replica in replicas:
            await replica.bus.connect()
            await replica.start()
        await events.wait_until(lambda es: [e for e in es if e.type.endswith("loaded.v1") and e.data.ok], 2)
        traffic = Traffic(client)
        load = asyncio.create_task(traffic.run())
        try:
            yield worker, client, replicas, events, traffic
        finally:
            traffic.stop.set()
            await asyncio.wait_for(load, 60)
            for replica in replicas:
                await replica.stop()
                await replica.bus.close()
            await client.close()


def moves(events: Watcher) -> list[RolloutStep]:
    return [e.data for e in events.events if isinstance(e.data, RolloutStep)]


async def ended(events: Watcher, timeout: float = 60) -> RolloutStep:
    found = await events.wait_until(
        lambda es: [e for e in es if isinstance(e.data, RolloutStep) and e.data.state in ("completed", "rolled_back")],
        timeout=timeout,
    )
    end: RolloutStep = found[0].data
    return end


async def test_a_canary_that_fails_is_rolled_back_on_its_own(
    broker: MemoryBroker, tmp_path: Path, versions: dict[str, Path]
) -> None:
    async with stage(broker, tmp_path, versions, failing=f"{NAME}-v2") as (worker, client, replicas, events, traffic):
        spec = RolloutSpec(steps=[50, 100], interval_seconds=1.0, bounds=FAST)
        rollout, _ = await start_rollout(worker.store, client, NAME, "v2", spec)
        end = await ended(events)
        assert end.state == "rolled_back", end.reason
        assert "error rate 100.0%" in end.reason
        assert end.evidence is not None and end.evidence.candidate_errors >= FAST.min_requests
        assert [(m.seq, m.step, m.share, m.state) for m in moves(events)] == [
            (0, 0, 0, "progressing"), (1, 1, 50, "progressing"), (2, 1, 0, "rolled_back")
        ]  # fmt: skip
        # both replicas loaded the candidate beside v1 and reported it
        loaded = {(e.data.consumer, e.data.ok) for e in events.events if e.type.endswith("loaded.v1")}
        assert loaded >= {("replica-a", True), ("replica-b", True)}
        await asyncio.sleep(0.3)  # requests in flight at the rollback finish on the version they started on
        after = len(traffic.answers)
        await asyncio.sleep(0.5)
        tail = traffic.answers[after:]
        assert tail and all(isinstance(a, CompleteReply) and a.version == "v1" for a in tail)
        assert all(r.current is not None and r.current.version == "v1" and r.rollout is None for r in replicas)
        holder = await worker.store.get_alias(NAME, "production")
        assert holder is not None and holder.label == "v1"
        rows = await worker.store.list_rollout_steps(rollout.id)
        assert [r.state for r in rows] == ["progressing", "progressing", "rolled_back"]
        assert all(r.published_at is not None for r in rows)
        assert (await worker.store.get_rollout(rollout.id)) == rollout.model_copy(update={"ended": True})
        # v1 answered during the canary too: the failures are the candidate's alone
        assert any(isinstance(a, CompleteReply) and a.version == "v1" for a in traffic.answers)


async def test_a_healthy_canary_moves_on_step_by_step_and_takes_the_alias(
    broker: MemoryBroker, tmp_path: Path, versions: dict[str, Path]
) -> None:
    async with stage(broker, tmp_path, versions) as (worker, client, replicas, events, traffic):
        spec = RolloutSpec(steps=[25, 100], interval_seconds=0.6, bounds=FAST)
        await start_rollout(worker.store, client, NAME, "v2", spec)
        second = await start_rollout_again(worker.store, client, spec)
        assert "is going on" in second
        end = await ended(events)
        assert end.state == "completed", end.reason
        assert [(m.step, m.share, m.state) for m in moves(events)] == [
            (0, 0, "progressing"), (1, 25, "progressing"), (2, 100, "progressing"), (2, 100, "completed")
        ]  # fmt: skip
        step_one = moves(events)[2].evidence
        assert step_one is not None and step_one.candidate_errors == 0 and step_one.baseline_requests > 0
        # about a quarter of the requests at 25%: the split is exact per replica
        share = step_one.candidate_requests / (step_one.candidate_requests + step_one.baseline_requests)
        assert 0.15 < share < 0.35, step_one
        # every request the replicas timed is in one latency bucket
        assert sum(step_one.candidate_latency_buckets) == step_one.candidate_requests
        assert sum(step_one.baseline_latency_buckets) == step_one.baseline_requests
        # the completion moved the alias and announced v2 with it; the replicas serve v2 without reloading
        announced = await events.wait_until(
            lambda es: [e for e in es if e.type.endswith("available.v1") and e.data.alias and e.data.version == "v2"]
        )
        assert announced[0].data.model_id == f"{NAME}-v2"
        holder = await worker.store.get_alias(NAME, "production")
        assert holder is not None and holder.label == "v2"
        await asyncio.sleep(0.3)
        after = len(traffic.answers)
        await asyncio.sleep(0.4)
        assert all(isinstance(a, CompleteReply) and a.version == "v2" for a in traffic.answers[after:])
        assert all(r.current is not None and r.current.version == "v2" for r in replicas)
        assert all([s.version for s in r.previous] == ["v1"] for r in replicas)  # kept warm for a rollback
        assert worker.metrics.rollout_share.labels(NAME, "production")._value.get() == 0


async def start_rollout_again(store: RegistryStore, client: MemoryBus, spec: RolloutSpec) -> str:
    try:
        await start_rollout(store, client, NAME, "v2", spec)
    except Exception as exc:
        return str(exc)
    raise AssertionError("a second rollout of the same alias was started")


async def test_a_candidate_a_replica_cannot_load_is_rolled_back_and_an_abort_ends_one(
    broker: MemoryBroker, tmp_path: Path, versions: dict[str, Path]
) -> None:
    async with stage(broker, tmp_path, versions) as (worker, client, replicas, events, _):
        # v3's file does not match its registered digest
        broken = tmp_path / "v3.gguf"
        broken.write_bytes(versions["v2"].read_bytes())
        model = await register(worker.store, "v3", broken)
        with broken.open("r+b") as f:
            f.seek(-8, 2)
            f.write(b"\x00" * 8)
        spec = RolloutSpec(strategy="blue_green", interval_seconds=30, bounds=FAST)
        assert spec.steps == [100]
        await start_rollout(worker.store, client, NAME, "v3", spec)
        end = await ended(events)
        assert (end.state, end.step) == ("rolled_back", 0)
        assert "could not load it" in end.reason and "sha256" in end.reason
        assert all(r.current is not None and r.current.version == "v1" and r.rollout is None for r in replicas)
        refused = [e.data for e in events.events if e.type.endswith("loaded.v1") and e.data.model_id == model.id]
        assert refused and not any(r.ok for r in refused)

        # an abort while v2 loads or runs: the replicas drop it, the alias stays
        rollout, _ = await start_rollout(worker.store, client, NAME, "v2", RolloutSpec(interval_seconds=30))
        await events.wait_until(lambda es: [e for e in es if isinstance(e.data, RolloutStep) and e.data.step == 1])
        _, abort = await abort_rollout(worker.store, client, NAME, reason="changed my mind")
        assert abort.state == "aborted"
        await events.wait_until(lambda es: [e for e in es if getattr(e.data, "state", None) == "aborted"])
        await asyncio.sleep(0.2)
        assert all(r.rollout is None and r.current is not None and r.current.version == "v1" for r in replicas)
        assert [r.state for r in await worker.store.list_rollout_steps(rollout.id)][-1] == "aborted"


async def test_a_rolling_rollout_across_tagged_devices_rolls_back_a_broken_version_and_completes_a_good_one(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    client = MemoryBus(broker)
    await client.connect()
    events = Watcher()
    await client.subscribe(MODELS, events.on_message)
    await client.subscribe(LOADED, events.on_message)
    async with running_worker(MemoryBus(broker), [], tmp_path / "worker", rollout_poll=0.05) as worker:
        # v3 was trained on other columns: every request the devices get fails on it
        for label, columns in (("v1", ("a", "b")), ("v2", ("a", "b")), ("v3", ("x", "y"))):
            path = tiny_classifier(tmp_path / label / "model.onnx", columns)
            model = await worker.store.add_model(
                ModelRecord(id=f"cls-{label}", name="cls", model_type="classifier", export_path=str(path),
                            export_format="onnx", label=label, device_tags=["pumps"])
            )  # fmt: skip
            for artifact in describe([("onnx", None, path)], model.id):
                await worker.store.add_artifact(artifact)
        await promote(worker.store, client, "cls", "v1", alias="production")
        devices = [
            EdgeAgent(MemoryBus(broker), device_id=f"pump-{i}", data_dir=tmp_path / f"pump-{i}", tags={"pumps"},
                      alias="production", health_every=0.1)
            for i in range(4)
        ]  # fmt: skip
        for device in devices:
            await device.bus.connect()
            await device.start()

        def serving(version: str) -> bool:
            return all(d.current.get("cls") is not None and d.current["cls"].version == version for d in devices)

        stop = asyncio.Event()

        async def ask_all() -> None:
            rows = encode(InferRequest.model_validate({"rows": [{"a": 1.0, "b": 2.0}], "name": "cls"}))
            while not stop.is_set():  # not cancelled: see Traffic.run
                for device in devices:
                    await client.request(edge_channel(device.device_id), rows, timeout=10)
                await asyncio.sleep(0.005)

        await until(lambda: serving("v1"))
        asking = asyncio.create_task(ask_all())
        try:
            spec = RolloutSpec(strategy="rolling", device_tag="pumps", steps=[50, 100], interval_seconds=0.5,
                               bounds=FAST.model_copy(update={"min_requests": 4}))  # fmt: skip
            broken, _ = await start_rollout(worker.store, client, "cls", "v3", spec)
            end = await ended(events)
            assert end.state == "rolled_back" and "error rate" in end.reason, end.reason
            await until(lambda: serving("v1") and all(not d.rollouts for d in devices))
            # the devices that switched were the ones the 50% step took, by their place in the rollout
            # (had it taken none, the step would have moved on to 100% and all of them)
            firsts = {d.device_id for d in devices if device_share(broken.id, d.device_id) < 50}
            assert switched(events, "cls-v3") == (firsts or {d.device_id for d in devices})
            assert all(m.device_tag == "pumps" for m in moves(events))

            events.events.clear()
            good, _ = await start_rollout(worker.store, client, "cls", "v2", spec)
            end = await ended(events)
            assert end.state == "completed", end.reason
            await until(lambda: serving("v2"))
            firsts = {d.device_id for d in devices if device_share(good.id, d.device_id) < 50}
            assert switched(events, "cls-v2", "at 50%") == firsts
            assert switched(events, "cls-v2") == {d.device_id for d in devices}
            holder = await worker.store.get_alias("cls", "production")
            assert holder is not None and holder.label == "v2"
        finally:
            stop.set()
            await asyncio.wait_for(asking, 30)
            for device in devices:
                await device.stop()
                await device.bus.close()
            await client.close()
    assert broken.id != good.id


def switched(events: Watcher, model_id: str, at: str = "") -> set[str]:
    """The devices that reported switching to `model_id` (at a given share, when `at` names one)."""
    return {
        e.data.consumer
        for e in events.events
        if e.type.endswith("loaded.v1") and e.data.model_id == model_id and e.data.ok and at in e.data.message
    }


async def until(condition: Any, timeout: float = 20) -> None:
    """Return once `condition()` holds; fail after `timeout` seconds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not so within {timeout:g}s")


async def test_two_workers_make_and_announce_each_move_once_and_take_only_signed_health_reports(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    store = create_store(str(tmp_path / "registry.db"))
    await store.open()
    for label in ("v1", "v2"):
        await store.add_model(
            ModelRecord(id=f"{NAME}-{label}", name=NAME, model_type="llm", export_path="-", export_format="gguf",
                        label=label)
        )  # fmt: skip
    await store.set_alias(NAME, "production", f"{NAME}-v1")
    private, public = generate(tmp_path / "keys", "replica")
    buses = [MemoryBus(broker) for _ in range(3)]
    for bus in buses:
        await bus.connect()
    client = buses[0]
    events = Watcher()
    await client.subscribe(MODELS, events.on_message)
    metrics = [Metrics(), Metrics()]
    fleets = [Fleet(metrics=m, trusted=TrustedKeys.from_paths([public])) for m in metrics]
    for bus, fleet in zip(buses[1:], fleets, strict=True):
        await fleet.follow(bus)
    controllers = [
        RolloutController(bus, store, fleet, metrics=m, poll=0.01)
        for bus, fleet, m in zip(buses[1:], fleets, metrics, strict=True)
    ]
    stopping = asyncio.Event()
    running = [asyncio.create_task(c.run(stopping)) for c in controllers]
    try:
        spec = RolloutSpec(steps=[50, 100], interval_seconds=0.2, bounds=FAST)
        rollout, _ = await start_rollout(store, client, NAME, "v2", spec)

        def health(candidate_requests: int) -> ServeHealth:
            versions = [VersionHealth(model_id=f"{NAME}-v2", version="v2", requests=candidate_requests, errors=0,
                                      latency_ms_sum=candidate_requests * 5.0, latency_ms_max=5.0)]  # fmt: skip
            return ServeHealth(consumer="replica-a", name=NAME, alias="production", every_seconds=0.05,
                               rollout_id=rollout.id, candidate=f"{NAME}-v2", versions=versions)  # fmt: skip

        # anyone on the bus can publish a report; unsigned, it sways nothing
        for _ in range(10):
            await client.publish(HEALTH, encode(health(10)))
            await asyncio.sleep(0.05)
        # with no replica's report to go by, step 0 holds
        held = await store.list_rollout_steps(rollout.id)
        assert [(r.step, r.state) for r in held] == [(0, "progressing"), (0, "holding")]
        assert sum(m.refused.labels("health")._value.get() for m in metrics) == 20  # both workers refused each
        signer = Signer.from_file(private)
        for _ in range(200):
            await client.publish(HEALTH, seal(encode(health(10)), signer))
            await asyncio.sleep(0.05)
            if events.types.count("step") and moves(events)[-1].state == "completed":
                break
        rows = await store.list_rollout_steps(rollout.id)
        assert [(r.step, r.state) for r in rows] == [
            (0, "progressing"), (0, "holding"), (1, "progressing"), (2, "progressing"), (2, "completed")
        ]  # fmt: skip
        assert [m.seq for m in moves(events)] == [0, 1, 2, 3, 4]  # each move announced once, by one worker
        states = ("holding", "progressing", "completed")
        assert sum(m.rollout_moves.labels(state=s)._value.get() for m in metrics for s in states) == 4
        holder = await store.get_alias(NAME, "production")
        assert holder is not None and holder.label == "v2"

        # a move stored by a worker that died before announcing it is announced by another
        await store.set_alias(NAME, "production", f"{NAME}-v1")
        again, _ = await start_rollout(store, client, NAME, "v2", spec.model_copy(update={"interval_seconds": 60}))
        stale = RolloutStepRecord(rollout_id=again.id, seq=1, step=0, share=0, state="aborted", reason="died",
                                  created_at="2026-01-01T00:00:00.000Z")  # fmt: skip
        assert await store.claim_rollout_step(stale)
        await events.wait_until(lambda es: [e for e in es if getattr(e.data, "reason", "") == "died"])
        await asyncio.sleep(0.2)
        # (each worker that sees it unannounced announces it: replicas act on a seq once)
        assert {m.seq for m in moves(events) if m.rollout_id == again.id} == {0, 1}
        assert (await store.get_rollout(again.id)) == again.model_copy(update={"ended": True})
        assert all(r.published_at is not None for r in await store.list_rollout_steps(again.id))
    finally:
        stopping.set()
        await asyncio.gather(*running)
        for bus in buses:
            await bus.close()
        await store.close()


# -- the rules, on made-up reports ----------------------------------------------------------------


def rollout_record(**spec: Any) -> RolloutRecord:
    return RolloutRecord(
        id="r1",
        name=NAME,
        alias="production",
        model_id="new",
        baseline_id="old",
        spec=RolloutSpec.model_validate({"interval_seconds": 10, "bounds": FAST, **spec}).model_dump(mode="json"),
    )


def row(seq: int, step: int, share: int, state: str = "progressing", **fields: Any) -> RolloutStepRecord:
    return RolloutStepRecord(rollout_id="r1", seq=seq, step=step, share=share, state=state, **fields)


def report(at: float, consumer: str, **traffic: tuple[int, int, float]) -> Report:
    """A report of `consumer` at `at`: per version id, (requests, errors, mean latency ms)."""
    versions = [
        VersionHealth(model_id=m, version=m, requests=n, errors=e, latency_ms_sum=n * ms, latency_ms_max=ms)
        for m, (n, e, ms) in traffic.items()
    ]
    health = ServeHealth(
        consumer=consumer, name=NAME, alias="production", serving="old", every_seconds=1.0,
        rollout_id="r1", candidate="new", versions=versions,
    )  # fmt: skip
    return Report(at, health)


def test_judge_waits_for_the_interval_then_moves_on_holds_or_rolls_back() -> None:
    r = rollout_record(steps=[10, 100])
    rows = [row(0, 0, 0), row(1, 1, 10)]
    healthy = [report(101, "a", new=(6, 0, 10.0), old=(50, 0, 10.0)), report(108, "b", new=(3, 0, 12.0))]
    assert judge(r, rows, healthy, started=100, now=109) is None  # interval not over
    move = judge(r, rows, healthy, started=100, now=110.5)
    assert move is not None and (move.state, move.step, move.share) == ("progressing", 2, 100)
    assert (move.evidence.candidate_requests, move.evidence.baseline_requests, move.evidence.replicas) == (9, 50, 1)
    # too little traffic reached the candidate: hold once, then wait
    thin = [report(109, "a", new=(2, 0, 10.0))]
    held = judge(r, rows, thin, started=100, now=110.5)
    assert held is not None and (held.state, held.share) == ("holding", 10)
    assert judge(r, [*rows, row(2, 1, 10, "holding")], thin, started=100, now=111) is None
    # errors past the bound roll back at once, interval or not
    failing = [report(101, "a", new=(10, 2, 10.0), old=(50, 0, 10.0))]
    move = judge(r, rows, failing, started=100, now=102)
    assert move is not None and move.state == "rolled_back" and "error rate 20.0%" in move.reason
    # reports from before the step do not count
    assert judge(r, rows, [report(99, "a", new=(10, 10, 10.0))], started=100, now=102) is None
    # the last step, healthy: completed
    move = judge(r, [*rows, row(2, 2, 100)], [report(112, "a", new=(8, 0, 10.0))], started=111, now=121.5)
    assert move is not None and (move.state, move.share) == ("completed", 100)


def test_judge_rolls_back_a_step_that_holds_past_max_hold() -> None:
    """A hold had no time limit: a candidate that too little traffic reached, or that a replica never
    loaded, held its share until someone aborted it."""
    r = rollout_record(steps=[10, 100], bounds=FAST.model_copy(update={"max_hold_seconds": 30}))
    rows = [row(0, 0, 0), row(1, 1, 10), row(2, 1, 10, "holding")]
    thin = [report(109, "a", new=(2, 0, 10.0))]
    assert judge(r, rows, thin, started=100, now=139) is None, "within its interval and max hold: it waits"
    move = judge(r, rows, thin, started=100, now=140.5)
    assert move is not None and (move.state, move.step, move.share) == ("rolled_back", 1, 0)
    assert "max hold of 30s" in move.reason and "2 request(s)" in move.reason
    enough = [report(139, "a", new=(8, 0, 10.0))]
    move = judge(r, rows, enough, started=100, now=140.5)
    assert move is not None and move.state == "progressing", "traffic that came in time moves it on"
    # step 0: a replica that never loads the candidate
    waiting = report(139, "b", old=(5, 0, 10.0))
    waiting = Report(waiting.at, waiting.health.model_copy(update={"candidate": None}))
    loading = [row(0, 0, 0), row(1, 0, 0, "holding")]
    assert judge(r, loading, [report(139, "a"), waiting], started=100, now=139) is None
    move = judge(r, loading, [report(140, "a"), Report(140, waiting.health)], started=100, now=141)
    assert move is not None and move.state == "rolled_back" and "waiting for b" in move.reason
    # without a max hold it holds on
    unbounded = rollout_record(steps=[10, 100])
    assert judge(unbounded, rows, thin, started=100, now=10_000) is None


def test_judge_compares_latency_with_the_baseline_or_its_last_known_figure() -> None:
    r = rollout_record(steps=[50, 100], bounds=FAST.model_copy(update={"max_latency_ratio": 1.5}))
    rows = [row(0, 0, 0), row(1, 1, 50)]
    slow = [report(101, "a", new=(8, 0, 40.0), old=(8, 0, 20.0))]
    move = judge(r, rows, slow, started=100, now=102)
    assert move is not None and move.state == "rolled_back" and "40.0 ms" in move.reason and "20.0 ms" in move.reason
    assert judge(r, rows, [report(101, "a", new=(8, 0, 29.0), old=(8, 0, 20.0))], started=100, now=102) is None
    # at 100% the baseline has no traffic: the figure from the step before is the reference
    earlier = {"baseline_requests": 40, "baseline_latency_ms": 20.0, "candidate_requests": 8}
    rows = [row(0, 0, 0), row(1, 1, 50), row(2, 2, 100, evidence=earlier)]
    move = judge(r, rows, [report(112, "a", new=(8, 0, 35.0))], started=111, now=112)
    assert move is not None and move.state == "rolled_back"


def timed(at: float, **latencies: list[float]) -> Report:
    """A report of replica "a" at `at` whose versions answered requests that took `latencies` ms,
    counted as a replica counts them."""
    tallies = Tallies()
    for model_id, taken in latencies.items():
        for ms in taken:
            tallies.record(model_id, model_id, ms, ok=True)
    plain = report(at, "a")
    return Report(at, plain.health.model_copy(update={"versions": tallies.drain()}))


def test_a_latency_percentile_bound_catches_a_slow_tail_the_mean_hides() -> None:
    """The latency bound was on the mean only: a candidate whose slowest 2% took 400 ms passed, its
    mean barely moved."""
    counted = timed(0, new=[8.0] * 90 + [400.0] * 10 + [90_000.0]).health.versions[0]
    assert sum(counted.latency_ms_buckets) == counted.requests == 101
    assert counted.latency_ms_buckets[3] == 90 and counted.latency_ms_buckets[8] == 10  # (5, 10] and (250, 500]
    assert counted.latency_ms_buckets[-1] == 1, "past the last bound: the overflow bucket"
    buckets = [*counted.latency_ms_buckets[:-1], 0]
    assert quantile(buckets, 0.5) == pytest.approx(5 + 5 * 50 / 90)
    assert quantile(buckets, 0.95) == pytest.approx(375.0)
    assert quantile(counted.latency_ms_buckets, 1.0) == 60_000, "the overflow reads as the highest bound"
    assert quantile([], 0.5) is None

    tail = [timed(101, new=[10.0] * 98 + [400.0] * 2, old=[15.0] * 100)]
    rows = [row(0, 0, 0), row(1, 1, 50)]
    by_mean = rollout_record(steps=[50, 100], bounds=FAST.model_copy(update={"max_latency_ratio": 1.5}))
    assert judge(by_mean, rows, tail, started=100, now=102) is None, "mean 17.8 ms against 15 ms: within 1.5x"
    p99 = FAST.model_copy(update={"max_latency_ratio": 1.5, "latency": "p99"})
    by_p99 = rollout_record(steps=[50, 100], bounds=p99)
    move = judge(by_p99, rows, tail, started=100, now=102)
    assert move is not None and move.state == "rolled_back"
    baseline = f"{10 + (25 - 10) * 99.0 / 100:.1f} ms"  # 99% of the way through the (10, 25] bucket
    assert move.reason.startswith(f"p99 latency 375.0 ms against the baseline's {baseline}"), move.reason
    assert sum(move.evidence.candidate_latency_buckets) == 100
    # at 100% the baseline's percentile comes from the last step it had traffic in
    rows = [row(0, 0, 0), row(1, 1, 50, evidence=move.evidence.model_dump()), row(2, 2, 100)]
    move = judge(by_p99, rows, [timed(112, new=[10.0] * 98 + [400.0] * 2)], started=111, now=112)
    assert move is not None and move.state == "rolled_back" and baseline in move.reason


def test_judge_loads_everywhere_before_any_traffic() -> None:
    r = rollout_record()
    rows = [row(0, 0, 0)]
    loading = report(101, "b", old=(5, 0, 10.0))
    loading = Report(loading.at, loading.health.model_copy(update={"candidate": None}))
    assert judge(r, rows, [report(101, "a"), loading], started=100, now=102) is None
    held = judge(r, rows, [report(109, "a"), Report(109, loading.health)], started=100, now=111)
    assert held is not None and held.state == "holding" and "waiting for b" in held.reason
    move = judge(r, rows, [report(101, "a"), report(101.5, "b")], started=100, now=102)
    assert move is not None and (move.state, move.step, move.share) == ("progressing", 1, 10)
    # a replica silent for three periods is gone and not waited for
    assert judge(r, rows, [report(101, "a"), Report(90, loading.health)], started=100, now=102) is not None
    failed = report(101, "a")
    failed = Report(failed.at, failed.health.model_copy(update={"candidate": None, "candidate_error": "no space"}))
    move = judge(r, rows, [failed], started=100, now=101)
    assert move is not None and move.state == "rolled_back" and "a could not load it: no space" in move.reason


def test_spec_checks_steps_and_the_split_is_exact() -> None:
    for steps in ([50, 20, 100], [10, 50], [0, 100], [10, 10, 100]):
        with pytest.raises(ValueError, match=r"steps|share"):
            RolloutSpec(steps=steps)
    with pytest.raises(ValueError, match="one step"):
        RolloutSpec.model_validate({"strategy": "blue_green", "steps": [10, 100]})
    split = Split()
    assert sum(split.candidate(10) for _ in range(1000)) == 100
    split = Split()
    assert sum(split.candidate(33) for _ in range(300)) == 99
