"""The remote VecEnv over every transport: the same trajectory as SB3's local DummyVecEnv."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer
from forseti.envs import register_envs
from forseti.envs.executor import EnvServer, gym_factory
from forseti.envs.remote import RemoteVecEnv
from forseti.schemas.tasks import RLTask
from forseti.worker.handlers.rl import RLHandler

from ..helpers import running_worker, submit, watch


@pytest.mark.parametrize(("env_id", "num_envs", "steps"), [("CartPole-v1", 4, 120), ("forseti/EmailTriage-v0", 2, 60)])
async def test_a_remote_env_steps_exactly_like_a_local_one(
    connect: Callable[[], Any], env_id: str, num_envs: int, steps: int
) -> None:
    register_envs()
    executor_side, worker_side = await connect(), await connect()
    executor_id = f"ex-{uuid.uuid4().hex[:6]}"
    await EnvServer(executor_side, executor_id, gym_factory(env_id), num_envs=num_envs, environment=env_id).start()
    loop = asyncio.get_running_loop()

    def compare() -> int:
        remote = RemoteVecEnv(worker_side, executor_id, loop=loop, session_id="job", environment=env_id)
        local = DummyVecEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
        remote.seed(11)
        local.seed(11)
        assert np.array_equal(np.asarray(remote.reset()), np.asarray(local.reset()))
        rng, episodes = np.random.default_rng(0), 0
        for _ in range(steps):
            actions = rng.integers(0, remote.action_space.n, size=num_envs)  # type: ignore[attr-defined]
            r_obs, r_rew, r_done, r_info = remote.step(actions)
            l_obs, l_rew, l_done, l_info = local.step(actions)
            assert np.array_equal(np.asarray(r_obs), np.asarray(l_obs))
            assert np.array_equal(r_rew, l_rew)
            assert np.array_equal(r_done, l_done)
            for mine, theirs in zip(r_info, l_info, strict=True):
                assert mine["TimeLimit.truncated"] == theirs["TimeLimit.truncated"]
                if "terminal_observation" in theirs:
                    assert np.array_equal(mine["terminal_observation"], theirs["terminal_observation"])
                    episodes += 1
        remote.close()
        return episodes

    assert await asyncio.to_thread(compare) > 0


async def test_ppo_trains_through_a_remote_executor(
    bus_factory: Callable[[], Any], tmp_path: Path, transport: str
) -> None:
    executor_side = bus_factory()
    await executor_side.connect()
    executor_id = f"ex-{uuid.uuid4().hex[:6]}"
    server = EnvServer(executor_side, executor_id, gym_factory("CartPole-v1"), num_envs=4, environment="CartPole-v1")
    await server.start()
    client = bus_factory()
    await client.connect()
    try:
        async with running_worker(bus_factory(), [RLHandler(progress_every=64)], tmp_path, poll_interval=0.5) as worker:
            task = RLTask.model_validate(
                {
                    "request_id": f"remote-{uuid.uuid4().hex[:6]}",
                    "algorithm": "ppo",
                    "environment": "CartPole-v1",
                    "executor": executor_id,
                    "config": {"total_timesteps": 256, "n_steps": 32, "seed": 3},
                    "policy": {"net_arch": [16]},
                    "evaluation": {"episodes": 1},
                }
            )
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            done = (await events.wait_end(timeout=120)).data
        assert done.result.metrics.custom_metrics["timesteps"] >= 256
        assert done.result.metrics.custom_metrics["onnx_action_agreement"] == 1.0
        assert [e for e in events.events if e.type.endswith("progress.v1")]
        if transport == "nats":
            # the 64+ vector steps went over the training thread's own connection, not through the
            # worker's (metered) bus and its event loop: issue 16, the worker's bus is a MeteredBus
            through_worker = worker.metrics.registry.get_sample_value(
                "forseti_bus_request_duration_seconds_count", {"transport": "nats"}
            )
            assert (through_worker or 0) < 10
    finally:
        await server.stop()
        await client.close()
        await executor_side.close()


async def test_ppo_trains_across_two_executors(bus_factory: Callable[[], Any], tmp_path: Path) -> None:
    """Issue 16: a job names two executors; its num_envs are spread over them, stepped together."""
    made: dict[str, int] = {}

    def counted(name: str) -> Callable[[], Any]:
        make = gym_factory("CartPole-v1")

        def counting() -> Any:
            made[name] = made.get(name, 0) + 1
            return make()

        return counting

    buses, servers = [], []
    names = [f"ex-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        bus = bus_factory()
        await bus.connect()
        server = EnvServer(bus, name, counted(name), environment="CartPole-v1")
        await server.start()
        buses.append(bus)
        servers.append(server)
    client = bus_factory()
    await client.connect()
    try:
        async with running_worker(bus_factory(), [RLHandler(progress_every=64)], tmp_path, poll_interval=0.5):
            task = RLTask.model_validate(
                {
                    "request_id": f"spread-{uuid.uuid4().hex[:6]}",
                    "algorithm": "ppo",
                    "environment": "CartPole-v1",
                    "executor": names,
                    "config": {"total_timesteps": 256, "n_steps": 32, "num_envs": 4, "seed": 3},
                    "policy": {"net_arch": [16]},
                    "evaluation": {"episodes": 1},
                }
            )
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            done = (await events.wait_end(timeout=120)).data
        assert done.result.metrics.custom_metrics["timesteps"] >= 256
        # each made a probe and two training sub-envs; the first also the evaluation's one
        assert [made[name] for name in names] == [1 + 2 + 1, 1 + 2]
    finally:
        for server in servers:
            await server.stop()
        for bus in [*buses, client]:
            await bus.close()


async def test_a_private_step_connection_dropped_while_idle_reconnects_at_the_next_step(
    nats_server: NatsServer,
) -> None:
    """Over NATS the steps go through a connection driven only while the training thread steps; a
    server that closes it meanwhile (stale after a long pause: unanswered pings) costs a reconnect
    at the next step, not the episodes."""
    executor_side, worker_side = create_bus(nats_server.url), create_bus(nats_server.url)
    for bus in (executor_side, worker_side):
        await bus.connect()
    executor_id = f"ex-{uuid.uuid4().hex[:6]}"
    await EnvServer(executor_side, executor_id, gym_factory("CartPole-v1"), num_envs=2).start()
    loop = asyncio.get_running_loop()

    def run() -> tuple[bool, list[bool], int]:
        env = RemoteVecEnv(worker_side, executor_id, loop=loop, session_id="s", private_loop=asyncio.new_event_loop)
        private = env.requests.bus
        assert isinstance(private, NatsBus) and private is not worker_side
        env.reset()
        env.step(np.array([0, 1]))
        transport = private.nc._transport
        assert transport is not None
        transport.close()  # type: ignore[no-untyped-call]  # stands in for the server closing a stale connection
        _, _, dones, infos = env.step(np.array([0, 1]))
        env.close()
        return any(info.get("session_reopened") for info in infos), dones.tolist(), env.reopens

    reopened, dones, reopens = await asyncio.to_thread(run)
    assert (reopened, reopens) == (False, 0) and dones == [False, False]
    for bus in (executor_side, worker_side):
        await bus.close()
