"""Spaces on the wire, the checks on what executors send, Forseti's own envs, executor failures."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.envs import ENV_IDS, register_envs
from forseti.envs.executor import EnvServer, gym_factory
from forseti.envs.remote import RemoteVecEnv, spread
from forseti.envs.spaces import check_batch, check_infos, check_rewards, space_to_spec, spec_to_space
from forseti.schemas.catalog import env_channel
from forseti.schemas.env import EnvClose, EnvError, EnvOpen, EnvStep
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(low=np.array([-np.inf, -1.0], dtype=np.float32), high=np.array([np.inf, 2.0], dtype=np.float32)),
        spaces.Box(0, 255, shape=(2, 3), dtype=np.uint8),
        spaces.Discrete(5),
        spaces.MultiDiscrete([3, 4]),
        spaces.MultiBinary(6),
    ],
)
def test_spaces_survive_the_wire(space: spaces.Space[Any]) -> None:
    again = spec_to_space(type(space_to_spec(space)).model_validate_json(space_to_spec(space).model_dump_json()))
    assert again == space


def test_checks_name_the_field_and_the_sub_env() -> None:
    box = spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
    with pytest.raises(ForsetiError, match=r"observations\[1\]: NaN or infinity") as info:
        check_batch([[0.0, 0.0], [math.nan, 0.0]], box, 2, "observations")
    assert info.value.code is ErrorCode.INVALID_DATA
    with pytest.raises(ForsetiError, match=r"shape \(3,\) per sub-env, the space says \(2,\)"):
        check_batch([[0.0, 0.0, 0.0]], box, 1, "observations")
    with pytest.raises(ForsetiError, match=r"actions\[0\]: 7 is outside Discrete\(2\)"):
        check_batch([7], spaces.Discrete(2), 1, "actions")
    with pytest.raises(ForsetiError, match=r"rewards\[0\]: .* is not a finite float32"):
        check_rewards([1e39], 1)
    for bad in (math.nan, -math.inf):
        with pytest.raises(ForsetiError, match=r"rewards\[1\]: .* is not a finite float32"):
            check_rewards([0.5, bad, 1.0], 3)
    with pytest.raises(ForsetiError, match=r"infos: 1 values for 2 sub-envs"):
        check_infos([{}], 2)
    assert check_infos([], 2) == [{}, {}]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_forseti_envs_pass_the_gymnasium_checker(env_id: str) -> None:
    register_envs()
    env = gym.make(env_id)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)


class NanEnv(gym.Env[np.ndarray, int]):
    """Emits NaN after two steps, or raises, to stand for a broken executor-side env."""

    def __init__(self, fail: str = "nan") -> None:
        self.observation_space = spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)  # type: ignore[assignment]
        self.fail, self.t = fail, 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        self.t = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        if self.t > 2 and self.fail == "raise":
            raise RuntimeError("sensor unplugged")
        value = math.nan if self.t > 2 else 0.0
        return np.array([0.0, value], dtype=np.float32), 1.0, False, False, {}


@pytest.fixture
async def pair() -> AsyncIterator[tuple[MemoryBus, MemoryBus]]:
    broker = MemoryBroker()
    executor_side, worker_side = MemoryBus(broker), MemoryBus(broker)
    await executor_side.connect()
    await worker_side.connect()
    yield executor_side, worker_side
    await worker_side.close()
    await executor_side.close()


@pytest.mark.parametrize(
    ("fail", "code", "message"),
    [
        ("nan", ErrorCode.INVALID_DATA, r"observations\[0\]: NaN or infinity"),
        ("raise", ErrorCode.HANDLER_ERROR, "the env raised RuntimeError: sensor unplugged"),
    ],
)
async def test_a_broken_env_fails_with_a_message_naming_the_problem(
    pair: tuple[MemoryBus, MemoryBus], fail: str, code: ErrorCode, message: str
) -> None:
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "broken", lambda: NanEnv(fail), num_envs=2)
    await server.start()
    loop = asyncio.get_running_loop()

    def train() -> None:
        env = RemoteVecEnv(worker_side, "broken", loop=loop, session_id="job-1", step_timeout=5)
        env.reset()
        for _ in range(3):
            env.step(np.array([0, 1]))

    with pytest.raises(ForsetiError, match=message) as info:
        await asyncio.to_thread(train)
    assert info.value.code is code


async def test_a_missing_executor_fails_with_executor_timeout(pair: tuple[MemoryBus, MemoryBus]) -> None:
    _, worker_side = pair
    loop = asyncio.get_running_loop()
    with pytest.raises(ForsetiError, match=r"executor 'nobody' did not answer open within 0\.3s") as info:
        await asyncio.to_thread(
            lambda: RemoteVecEnv(worker_side, "nobody", loop=loop, session_id="s", step_timeout=0.3)
        )
    assert info.value.code is ErrorCode.EXECUTOR_TIMEOUT


async def test_an_executor_that_stops_mid_run_fails_the_step_it_left(pair: tuple[MemoryBus, MemoryBus]) -> None:
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "short-lived", gym_factory("CartPole-v1"), num_envs=1)
    await server.start()
    loop = asyncio.get_running_loop()
    env = await asyncio.to_thread(
        lambda: RemoteVecEnv(worker_side, "short-lived", loop=loop, session_id="s", step_timeout=0.3)
    )
    await asyncio.to_thread(env.reset)
    await asyncio.to_thread(env.step, np.array([0]))
    await server.stop()
    with pytest.raises(ForsetiError, match=r"did not answer step 2 within 0\.3s, nor an open of the session") as info:
        await asyncio.to_thread(env.step, np.array([1]))
    assert info.value.code is ErrorCode.EXECUTOR_TIMEOUT


async def test_the_executor_refuses_another_env_than_the_job_expects(pair: tuple[MemoryBus, MemoryBus]) -> None:
    executor_side, worker_side = pair
    await EnvServer(executor_side, "carts", gym_factory("CartPole-v1"), environment="CartPole-v1").start()
    loop = asyncio.get_running_loop()
    with pytest.raises(ForsetiError, match="serves CartPole-v1, not Pendulum-v1"):
        await asyncio.to_thread(
            lambda: RemoteVecEnv(worker_side, "carts", loop=loop, session_id="s", environment="Pendulum-v1")
        )


async def test_one_executor_serves_several_sessions_independently(pair: tuple[MemoryBus, MemoryBus]) -> None:
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "shared", gym_factory("CartPole-v1"), num_envs=2)
    await server.start()
    loop = asyncio.get_running_loop()

    def interleave() -> None:
        first = RemoteVecEnv(worker_side, "shared", loop=loop, session_id="job-a")
        second = RemoteVecEnv(worker_side, "shared", loop=loop, session_id="job-b")
        first.seed(1)
        second.seed(1)
        assert np.array_equal(np.asarray(first.reset()), np.asarray(second.reset()))
        for _ in range(20):  # the same actions in both: their trajectories stay equal, so nothing leaks between
            a = first.step(np.array([0, 1]))[0]
            b = second.step(np.array([0, 1]))[0]
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert set(server.sessions) == {first.session_id, second.session_id}
        assert first.session_id.startswith("job-a.") and second.session_id.startswith("job-b.")
        first.close()
        assert set(server.sessions) == {second.session_id}
        second.close()

    await asyncio.to_thread(interleave)


async def test_an_action_the_executor_rejects_fails_with_the_field_named(pair: tuple[MemoryBus, MemoryBus]) -> None:
    executor_side, worker_side = pair
    await EnvServer(executor_side, "strict", gym_factory("CartPole-v1"), num_envs=2).start()
    loop = asyncio.get_running_loop()

    def act() -> None:
        env = RemoteVecEnv(worker_side, "strict", loop=loop, session_id="s")
        env.reset()
        env.step(np.array([0, 5]))

    with pytest.raises(ForsetiError, match=r"refused step 1: actions\[1\]: 5 is outside Discrete\(2\)") as info:
        await asyncio.to_thread(act)
    assert info.value.code is ErrorCode.INVALID_DATA


async def test_a_full_executor_makes_an_open_wait_for_a_free_session(pair: tuple[MemoryBus, MemoryBus]) -> None:
    """An executor holding max_sessions answered the next open with a permanent invalid_task: the job
    failed though a session would be free seconds later (issue 13)."""
    executor_side, worker_side = pair
    await EnvServer(executor_side, "busy", gym_factory("CartPole-v1"), max_sessions=1).start()
    loop = asyncio.get_running_loop()
    first = await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "busy", loop=loop, session_id="a"))
    waiting = asyncio.create_task(
        asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "busy", loop=loop, session_id="b", open_wait=10))
    )
    await asyncio.sleep(1.0)
    assert not waiting.done(), "the second job waits while the executor is full"
    await asyncio.to_thread(first.close)
    second = await asyncio.wait_for(waiting, 10)
    await asyncio.to_thread(second.reset)
    with pytest.raises(ForsetiError, match="already holds 1 sessions") as info:
        await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "busy", loop=loop, session_id="c", open_wait=0.5))
    assert (info.value.code, info.value.retriable) == (ErrorCode.RESOURCE_EXHAUSTED, True)


async def test_executors_under_one_id_share_its_sessions(broker: MemoryBroker) -> None:
    """Two executors started with one id both answered every request: each made the session, and
    replicas could not add capacity (issue 13)."""
    buses = [MemoryBus(broker) for _ in range(3)]
    for bus in buses:
        await bus.connect()
    servers = [EnvServer(bus, "pool", gym_factory("CartPole-v1"), max_sessions=1) for bus in buses[:2]]
    for server in servers:
        await server.start()
    loop = asyncio.get_running_loop()

    def two_jobs() -> None:
        a = RemoteVecEnv(buses[2], "pool", loop=loop, session_id="job-a")
        b = RemoteVecEnv(buses[2], "pool", loop=loop, session_id="job-b")
        a.reset(), b.reset()
        for _ in range(5):
            a.step(np.array([0]))
            b.step(np.array([1]))
        a.close()
        b.close()

    try:
        await asyncio.to_thread(two_jobs)
        assert all(not s.sessions for s in servers), "each session closed on the replica that held it"
        assert [s.replica.startswith("pool.replica-") for s in servers] == [True, True]
    finally:
        for bus in buses:
            await bus.close()


@pytest.mark.parametrize("replica", [None, "a"], ids=["new-replica-name", "same-replica-name"])
async def test_an_executor_restarted_between_steps_has_the_session_opened_again(
    pair: tuple[MemoryBus, MemoryBus], replica: str | None
) -> None:
    """An executor restarted under its id within the step timeout answered `no session` as a permanent
    invalid_task, and the job failed at once (issue 13). Restarted under its replica name it says
    session_lost; under a new one the old name's silence tells the same."""
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "phoenix", gym_factory("CartPole-v1"), num_envs=2, replica=replica)
    await server.start()
    loop = asyncio.get_running_loop()
    env = await asyncio.to_thread(
        lambda: RemoteVecEnv(worker_side, "phoenix", loop=loop, session_id="s", step_timeout=0.5, max_reopens=1)
    )
    await asyncio.to_thread(env.reset)
    await asyncio.to_thread(env.step, np.array([0, 1]))

    async def restart() -> None:
        nonlocal server
        await server.stop()
        server = EnvServer(executor_side, "phoenix", gym_factory("CartPole-v1"), num_envs=2, replica=replica)
        await server.start()

    await restart()
    _, rewards, dones, infos = await asyncio.to_thread(env.step, np.array([0, 1]))
    assert dones.tolist() == [True, True] and rewards.tolist() == [0.0, 0.0], "every episode ends there"
    assert all(info["session_reopened"] for info in infos)
    _, _, _, infos = await asyncio.to_thread(env.step, np.array([1, 0]))  # the new episodes go on
    assert not any(info.get("session_reopened") for info in infos)
    await restart()  # once more than max_reopens allows: the job hands itself back
    with pytest.raises(ForsetiError, match="opened again 1 times already") as info:
        await asyncio.to_thread(env.step, np.array([0, 0]))
    assert (info.value.code, info.value.retriable) == (ErrorCode.SESSION_LOST, True)


async def test_a_session_whose_job_went_silent_makes_room_for_the_next(pair: tuple[MemoryBus, MemoryBus]) -> None:
    """A worker killed mid-job never closed its session, which held its place on the executor for
    ever: 64 kills and the executor refused every job (issue 13)."""
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "tidy", gym_factory("CartPole-v1"), max_sessions=1, session_idle=0.2)
    await server.start()
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "tidy", loop=loop, session_id="killed-job"))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "tidy", loop=loop, session_id="next", open_wait=0))
    assert [session.split(".")[0] for session in server.sessions] == ["next"]


async def test_only_the_opener_of_a_session_steps_closes_or_reopens_it(pair: tuple[MemoryBus, MemoryBus]) -> None:
    """Anyone on the bus could close a running job's session (its id is the job id), or step it
    (issue 14): the session now answers only requests carrying the secret its opener chose."""
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "owned", gym_factory("CartPole-v1"), num_envs=2)
    await server.start()
    loop = asyncio.get_running_loop()
    env = await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "owned", loop=loop, session_id="job-1"))
    await asyncio.to_thread(env.reset)
    replica = env_channel(server.replica)

    async def stranger(request: EnvOpen | EnvStep | EnvClose) -> Any:
        return decode(await worker_side.request(replica, encode(request), timeout=5)).data

    session = env.session_id
    for request in (
        EnvClose(session_id=session),
        EnvClose(session_id=session, token="guessed-token-0000"),
        EnvStep(session_id=session, step=1, actions=[0, 0]),
        EnvOpen(session_id=session, token="mine-now-0000000000"),
    ):
        refused = await stranger(request)
        assert isinstance(refused, EnvError), request
        assert (refused.code, refused.retriable) == (ErrorCode.FORBIDDEN, False)
    assert server.refused == 4
    await asyncio.to_thread(env.step, np.array([0, 1]))  # the job's own session goes on
    await asyncio.to_thread(env.close)
    assert not server.sessions


async def test_one_client_cannot_take_every_session_of_an_executor(pair: tuple[MemoryBus, MemoryBus]) -> None:
    """A client could open max_sessions sessions and leave every other job waiting (issue 14)."""
    executor_side, worker_side = pair
    server = EnvServer(executor_side, "fair", gym_factory("CartPole-v1"), max_sessions=8, max_sessions_per_client=2)
    await server.start()
    greedy = [EnvOpen(session_id=f"grab-{i}", token=f"greedy-token-{i:06d}", client="greedy") for i in range(3)]
    replies: list[Any] = [
        decode(await worker_side.request("forseti.env.fair", encode(r), timeout=5)).data for r in greedy
    ]
    assert [type(r).__name__ for r in replies] == ["EnvSpec", "EnvSpec", "EnvError"]
    assert (replies[2].code, replies[2].retriable) == (ErrorCode.RESOURCE_EXHAUSTED, True)
    assert "client greedy already holds 2 sessions" in replies[2].message
    loop = asyncio.get_running_loop()
    env = await asyncio.to_thread(lambda: RemoteVecEnv(worker_side, "fair", loop=loop, session_id="real-job"))
    assert set(server.sessions) == {"grab-0", "grab-1", env.session_id}
    await asyncio.to_thread(env.close)


async def test_sub_envs_spread_over_two_executors_step_as_one_vec_env(broker: MemoryBroker) -> None:
    """Issue 16: a job's num_envs spread over two executors is one VecEnv whose sub-envs behave as the
    same envs in the worker would, seeds and all (executor `a` holds sub-envs 0-1, `b` 2-4)."""
    buses = [MemoryBus(broker) for _ in range(3)]
    for bus in buses:
        await bus.connect()
    servers = [EnvServer(bus, name, gym_factory("CartPole-v1")) for bus, name in zip(buses, "ab", strict=False)]
    for server in servers:
        await server.start()
    loop = asyncio.get_running_loop()

    def run() -> tuple[list[Any], list[Any]]:
        remote = RemoteVecEnv(buses[2], ["a", "b"], loop=loop, session_id="job", num_envs=5)
        local = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(5)])
        assert remote.num_envs == 5 and [s.num_envs for s in remote.sessions] == [3, 2]
        remote.seed(7)
        seen, expected = [remote.reset()], [local.reset(seed=list(range(7, 12)))[0]]
        actions = np.random.default_rng(0).integers(0, 2, size=(20, 5))
        for act in actions:
            seen.append(remote.step(act)[0])
            expected.append(local.step(act)[0])
        remote.close()
        return seen, expected

    try:
        seen, expected = await asyncio.to_thread(run)
        # before any episode ends, autoreset conventions agree: every observation matches
        for got, want in zip(seen[:9], expected[:9], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        assert all(not server.sessions for server in servers)
    finally:
        for bus in buses:
            await bus.close()


async def test_a_pool_gives_each_session_of_a_job_its_own_replica(broker: MemoryBroker) -> None:
    """Two sessions of one job on a pool of two replicas land on different replicas; when one replica
    leaves mid-job its session is opened again on the other and only its own episodes are cut."""
    buses = [MemoryBus(broker) for _ in range(3)]
    for bus in buses:
        await bus.connect()
    servers = [EnvServer(bus, "pool", gym_factory("CartPole-v1"), num_envs=2) for bus in buses[:2]]
    for server in servers:
        await server.start()
    loop = asyncio.get_running_loop()
    env = await asyncio.to_thread(
        lambda: RemoteVecEnv(buses[2], ["pool", "pool"], loop=loop, session_id="job", num_envs=4, step_timeout=0.5)
    )
    try:
        assert {s.replica for s in env.sessions} == {server.replica for server in servers}
        assert [len(server.sessions) for server in servers] == [1, 1]
        await asyncio.to_thread(env.reset)
        await asyncio.to_thread(env.step, np.array([0, 1, 0, 1]))
        gone = next(i for i, s in enumerate(env.sessions) if s.replica == servers[0].replica)
        await servers[0].stop()
        _, rewards, _, infos = await asyncio.to_thread(env.step, np.array([0, 1, 0, 1]))
        cut = [bool(info.get("session_reopened")) for info in infos]
        assert cut == [i // 2 == gone for i in range(4)], "only the lost session's episodes end"
        assert rewards[[i for i in range(4) if cut[i]]].tolist() == [0.0, 0.0]
        assert len(servers[1].sessions) == 2, "the replica that stayed holds both sessions now"
        await asyncio.to_thread(env.step, np.array([1, 1, 1, 1]))
        await asyncio.to_thread(env.close)
        assert not servers[1].sessions
    finally:
        for bus in buses:
            await bus.close()


def test_num_envs_cannot_be_spread_thinner_than_one_per_executor() -> None:
    with pytest.raises(ForsetiError, match="num_envs 1 cannot be spread over 2 executors") as info:
        spread(1, 2)
    assert info.value.code is ErrorCode.INVALID_TASK
    assert spread(16, 3) == [6, 5, 5]
