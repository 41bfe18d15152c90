"""The registry contract, run against every store: SQLite and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from forseti.adapters.registry import (
    Artifact,
    CheckpointRecord,
    FederationRecord,
    JobRecord,
    ModelRecord,
    RegistryStore,
    RLAgent,
    RolloutRecord,
    RolloutStepRecord,
    TrainingRun,
    create_store,
)
from forseti.adapters.registry.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from forseti.adapters.registry.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from forseti.schemas.errors import StoreError
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TaskKind


@pytest.fixture
async def store(registry_url: str) -> AsyncIterator[RegistryStore]:
    store = create_store(registry_url)
    await store.open()
    yield store
    await store.close()


def model(model_id: str, name: str, **fields: object) -> ModelRecord:
    return ModelRecord(
        id=model_id, name=name, model_type="classifier", export_path=f"/m/{model_id}.onnx", export_format="onnx",
        **fields,
    )  # fmt: skip


def job(job_id: str) -> JobRecord:
    return JobRecord(job_id=job_id, kind=TaskKind.RL, task={"algorithm": "ppo"})


def test_both_stores_have_the_same_numbered_migrations() -> None:
    assert len(SQLITE_MIGRATIONS) == len(POSTGRES_MIGRATIONS)


async def test_migrations_apply_once(registry_url: str) -> None:
    for _ in range(2):
        store = create_store(registry_url)
        await store.open()
        assert await store.schema_version() == len(SQLITE_MIGRATIONS)
        await store.close()


async def test_jobs_round_trip_and_filter(store: RegistryStore) -> None:
    await store.put_job(job("a"))
    done = JobRecord(job_id="b", kind=TaskKind.TRAINING, state=JobState.COMPLETED, result={"summary": "ok"})
    await store.put_job(done)
    got = await store.get_job("b")
    assert got is not None
    assert got.result == {"summary": "ok"}
    assert got.state is JobState.COMPLETED
    assert got.created_at == done.created_at, "times come back as they were written"
    assert [j.job_id for j in await store.list_jobs(state=JobState.PENDING)] == ["a"]
    assert [j.job_id for j in await store.list_jobs(kind=TaskKind.TRAINING)] == ["b"]
    assert await store.get_job("missing") is None


async def test_model_versions_count_per_name(store: RegistryStore) -> None:
    versions = [(await store.add_model(model(i, n, metrics={"accuracy": 0.9}))).version for i, n in
                [("1", "a"), ("2", "a"), ("3", "b")]]  # fmt: skip
    assert versions == [1, 2, 1]
    assert [m.version for m in await store.list_models(name="a")] == [2, 1]
    fetched = await store.get_model("3")
    assert fetched is not None
    assert fetched.metrics == {"accuracy": 0.9}
    await store.add_artifact(
        Artifact(id="f1", model_id="1", format="onnx", uri="file:///m/1.onnx", sha256="0" * 64, size_bytes=10)
    )
    assert [a.id for a in await store.list_artifacts("1")] == ["f1"]


async def test_versions_registered_at_once_by_many_workers_are_all_distinct(store: RegistryStore) -> None:
    added = await asyncio.gather(*(store.add_model(model(f"m{i}", "busy")) for i in range(12)))
    assert sorted(m.version for m in added) == list(range(1, 13))


async def test_device_tags_round_trip(store: RegistryStore) -> None:
    tagged = await store.add_model(model("t", "m", device_tags=["pumps", "site-3"]))
    assert tagged.device_tags == ["pumps", "site-3"]


async def test_runs_and_agents(store: RegistryStore) -> None:
    await store.put_training_run(TrainingRun(id="r1", config={"epochs": 3}, progress=0.5))
    await store.put_training_run(TrainingRun(id="r1", config={"epochs": 3}, status=JobState.COMPLETED, progress=1))
    runs = await store.list_training_runs()
    assert [(r.id, r.status, r.progress) for r in runs] == [("r1", JobState.COMPLETED, 1.0)]
    agent = RLAgent(
        id="g1", name="cart", algorithm="ppo", environment="CartPole-v1", policy_path="/p.onnx",
        metrics={"mean_reward": 500},
    )  # fmt: skip
    await store.add_rl_agent(agent)
    assert [a.id for a in await store.list_rl_agents(algorithm="ppo")] == ["g1"]
    assert await store.list_rl_agents(algorithm="dqn") == []


async def test_aliases_move_and_roll_back_through_their_history(store: RegistryStore) -> None:
    for model_id in ("a1", "a2", "a3"):
        await store.add_model(model(model_id, "llm", label=model_id))
    assert await store.get_alias("llm", "production") is None
    assert await store.rollback_alias("llm", "production") is None
    for model_id in ("a1", "a3"):
        await store.set_alias("llm", "production", model_id)
    await store.set_alias("llm", "staging", "a2")
    current = await store.get_alias("llm", "production")
    assert current is not None
    assert current.id == "a3"
    moved = await store.rollback_alias("llm", "production")
    assert moved is not None
    assert [m.id for m in moved] == ["a3", "a1"]
    again = await store.get_alias("llm", "production")
    assert again is not None
    assert again.id == "a1"
    assert await store.rollback_alias("llm", "production") is None, "nothing before the first position"
    staging = await store.get_alias("llm", "staging")
    assert staging is not None
    assert staging.id == "a2"


async def test_a_live_lease_refuses_every_other_claim_and_its_owner_renews_it(store: RegistryStore) -> None:
    first = await store.claim_job(job("j"), owner="w1", ttl=30)
    assert first.won
    assert (first.job.attempt, first.job.state, first.job.lease_owner) == (1, JobState.RUNNING, "w1")
    for owner in ("w2", "w1"):  # the owner too: a second delivery on the same worker must not run beside the first
        again = await store.claim_job(job("j"), owner=owner, ttl=30)
        assert not again.won
        assert again.job.lease_owner == "w1"
        assert 25 < again.lease_left <= 30
    assert await store.renew_lease("j", owner="w1", ttl=30)
    assert not await store.renew_lease("j", owner="w2", ttl=30)
    stored = await store.get_job("j")
    assert stored is not None
    assert (stored.attempt, stored.orphaned()) == (1, False)


async def test_a_lapsed_lease_lets_the_next_claim_take_the_job_over(store: RegistryStore) -> None:
    assert (await store.claim_job(job("j"), owner="dead", ttl=0.2)).won
    await asyncio.sleep(0.4)
    lapsed = await store.get_job("j")
    assert lapsed is not None
    assert lapsed.orphaned(), "running with a lease nobody renewed"
    taken = await store.claim_job(job("j"), owner="w2", ttl=30)
    assert taken.won
    assert (taken.job.attempt, taken.job.lease_owner, taken.job.created_at) == (2, "w2", lapsed.created_at)
    # the dead worker, were it only slow, can no longer write the job, nor renew its lease
    assert not await store.update_held_job(
        taken.job.model_copy(update={"state": JobState.FAILED}), owner="dead", release=True
    )
    assert not await store.renew_lease("j", owner="dead", ttl=30)
    done = taken.job.model_copy(update={"state": JobState.COMPLETED, "result": {"summary": "ok"}})
    assert await store.update_held_job(done, owner="w2", release=True)
    stored = await store.get_job("j")
    assert stored is not None
    assert (stored.state, stored.result, stored.lease_owner, stored.orphaned()) == (
        JobState.COMPLETED, {"summary": "ok"}, None, False
    )  # fmt: skip
    after = await store.claim_job(job("j"), owner="w3", ttl=30)
    assert not after.won and after.job.state is JobState.COMPLETED, "an ended job is never claimed again"


async def test_claims_at_once_from_many_workers_have_one_winner(store: RegistryStore) -> None:
    claims = await asyncio.gather(*(store.claim_job(job("race"), owner=f"w{i}", ttl=30) for i in range(8)))
    winners = [c.job.lease_owner for c in claims if c.won]
    assert len(winners) == 1
    assert all(c.job.lease_owner == winners[0] for c in claims)


async def test_a_handed_back_job_is_claimed_at_once_and_counts_its_attempts(store: RegistryStore) -> None:
    first = await store.claim_job(job("j"), owner="w1", ttl=30)
    pending = first.job.model_copy(update={"state": JobState.PENDING})
    assert await store.update_held_job(pending, owner="w1", release=True)
    second = await store.claim_job(job("j"), owner="w2", ttl=30)
    assert second.won
    assert second.job.attempt == 2


async def test_workers_starting_at_once_on_a_new_postgres_database_migrate_it_once(postgres_url: str) -> None:
    stores = [create_store(postgres_url) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert [await s.schema_version() for s in stores] == [len(POSTGRES_MIGRATIONS)] * 6
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_postgres_registry_that_refuses_the_password_says_so_without_it(postgres_url: str) -> None:
    wrong = postgres_url.replace(postgres_url.split(":")[2].split("@")[0], "not-the-password-x9")
    store = create_store(wrong)
    with pytest.raises(StoreError) as refused:
        await store.open()
    assert "not-the-password-x9" not in refused.value.message
    assert "password authentication failed" in refused.value.message


async def test_checkpoints_are_listed_newest_first_and_pruned_once_their_job_ended(store: RegistryStore) -> None:
    for job_id in ("live", "done"):
        await store.put_job(JobRecord(job_id=job_id, kind=TaskKind.RL, state=JobState.RUNNING))
        for seq in (1_000_001, 2_000_001, 1_000_002):
            record = CheckpointRecord(
                job_id=job_id, seq=seq, uri=f"s3://b/{job_id}/{seq}", sha256="ab" * 32, size_bytes=10, step=seq % 100
            )
            await store.add_checkpoint(record)
            await store.add_checkpoint(record)  # recorded twice (a retried write): one row
    assert [c.seq for c in await store.list_checkpoints("live")] == [2_000_001, 1_000_002, 1_000_001]
    assert await store.ended_checkpoints() == []
    await store.put_job(JobRecord(job_id="done", kind=TaskKind.RL, state=JobState.COMPLETED))
    assert {(c.job_id, c.seq) for c in await store.ended_checkpoints()} == {
        ("done", 1_000_001), ("done", 2_000_001), ("done", 1_000_002)
    }  # fmt: skip
    await store.delete_checkpoint("done", 2_000_001)
    assert [c.seq for c in await store.list_checkpoints("done")] == [1_000_002, 1_000_001]


async def test_one_coordinator_holds_a_federation_and_another_takes_over_when_its_lease_lapses(
    store: RegistryStore,
) -> None:
    fresh = FederationRecord(name="digits", config={"name": "digits"})
    first = await store.claim_federation(fresh, owner="host-a", ttl=30)
    assert first.won and first.federation.round == 0
    assert await store.save_federation(
        first.federation.model_copy(update={"round": 3, "snapshot": {"round": 3}}), owner="host-a", ttl=0.2
    )
    blocked = await store.claim_federation(fresh, owner="host-b", ttl=30)
    assert not blocked.won and blocked.federation.lease_owner == "host-a" and blocked.lease_left <= 0.2
    assert not await store.save_federation(fresh, owner="host-b", ttl=30)
    await asyncio.sleep(0.3)
    taken = await store.claim_federation(fresh, owner="host-b", ttl=30)
    assert taken.won and taken.federation.round == 3 and taken.federation.snapshot == {"round": 3}
    assert not await store.save_federation(taken.federation, owner="host-a", ttl=30)  # the old owner lost it
    await store.release_federation("digits", owner="host-b")
    again = await store.claim_federation(fresh, owner="host-c", ttl=30)
    assert again.won and again.federation.snapshot == {"round": 3}
    stored = await store.get_federation("digits")
    assert stored is not None and stored.lease_owner == "host-c"


async def test_coordinators_claiming_a_federation_at_once_have_one_winner(store: RegistryStore) -> None:
    fresh = FederationRecord(name="race", config={})
    claims = await asyncio.gather(*(store.claim_federation(fresh, owner=f"c{i}", ttl=30) for i in range(6)))
    assert sum(c.won for c in claims) == 1


async def test_one_rollout_per_name_and_alias_goes_on_and_each_move_is_stored_once(store: RegistryStore) -> None:
    def rollout(rollout_id: str, alias: str = "production") -> RolloutRecord:
        return RolloutRecord(
            id=rollout_id, name="llm", alias=alias, model_id="b", baseline_id="a",
            spec={"steps": [50, 100]}, candidates=[{"model_id": "b"}],
        )  # fmt: skip

    def move(rollout_id: str, seq: int, state: str = "progressing") -> RolloutStepRecord:
        return RolloutStepRecord(rollout_id=rollout_id, seq=seq, step=seq, share=50, state=state)

    assert await store.put_rollout(rollout("r1"), move("r1", 0))
    assert not await store.put_rollout(rollout("r2"), move("r2", 0))  # r1 goes on
    assert await store.put_rollout(rollout("s1", alias="staging"), move("s1", 0))
    assert {r.id for r in await store.list_rollouts(name="llm", active=True)} == {"s1", "r1"}
    raced = await asyncio.gather(*(store.claim_rollout_step(move("r1", 1)) for _ in range(5)))
    assert sum(raced) == 1
    ending = move("r1", 2, "rolled_back").model_copy(update={"evidence": {"candidate_errors": 3}})
    assert await store.claim_rollout_step(ending)
    assert not await store.put_rollout(rollout("r2"), move("r2", 0))  # ended, but not announced yet
    await store.published_rollout_step("r1", 2)
    await store.end_rollout("r1")
    assert await store.put_rollout(rollout("r2"), move("r2", 0))
    steps = await store.list_rollout_steps("r1")
    assert [(s.seq, s.state, s.published_at is not None) for s in steps] == [
        (0, "progressing", False), (1, "progressing", False), (2, "rolled_back", True)
    ]  # fmt: skip
    assert steps[2].evidence == {"candidate_errors": 3}
    stored = await store.get_rollout("r1")
    assert stored is not None and stored.ended and stored.candidates == [{"model_id": "b"}]
    assert {r.id for r in await store.list_rollouts(active=True)} == {"r2", "s1"}
