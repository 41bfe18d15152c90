"""Multi-agent RL: Forseti's TriageTeam passes PettingZoo's own API test, and an RL job on it trains one
policy shared by every agent (the agents as sub-envs, through SuperSuit) and exports it to ONNX."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.inference import OnnxPolicy
from forseti.envs.executor import EnvServer, gym_factory
from forseti.envs.multi_agent import multi_agent_factory, shared_policy_vec_env
from forseti.envs.remote import RemoteVecEnv
from forseti.envs.triage_team import SKIP, TriageTeamEnv
from forseti.worker.handlers.rl import RLHandler

from ..helpers import running_worker, submit, watch
from .test_rl import rl_task


def test_triage_team_passes_pettingzoo_api_and_seed_tests() -> None:
    parallel_api_test(TriageTeamEnv(), num_cycles=500)
    parallel_seed_test(TriageTeamEnv)


def test_a_skipped_email_waits_and_costs_the_whole_team() -> None:
    env = TriageTeamEnv(agents=2, load=0.0)
    env.reset(seed=0)
    env._arrive = lambda: 0  # type: ignore[method-assign]  # no arrivals: the queue holds what reset brought
    env._queue.extend([(0, np.full(8, 0.5, dtype=np.float32))] * 4)
    waiting = len(env._queue)
    _, rewards, *_ = env.step(dict.fromkeys(env.agents, SKIP))
    assert len(env._queue) == waiting, "nothing filed, nothing gone"
    assert rewards["triager_0"] == rewards["triager_1"] < 0, "the backlog is everyone's"


def test_shared_policy_env_makes_each_agent_a_sub_env_and_is_seeded() -> None:
    venv = shared_policy_vec_env(multi_agent_factory("forseti/TriageTeam-v0"), copies=2)
    assert venv.num_envs == 2 * 3
    venv.seed(7)
    first = np.asarray(venv.reset())
    venv.seed(7)
    assert np.array_equal(first, np.asarray(venv.reset()))


@pytest.mark.parametrize("executor", [None, "team"], ids=["in-the-worker", "on-an-executor"])
async def test_a_multi_agent_job_trains_one_shared_policy_and_exports_it(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, executor: str | None
) -> None:
    executor_side = MemoryBus(broker)
    await executor_side.connect()
    await EnvServer(executor_side, "team", gym_factory("forseti/TriageTeam-v0")).start()
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=64)], tmp_path):
        task = rl_task("ppo", "forseti/TriageTeam-v0", total_timesteps=384, n_steps=64, num_envs=1, executor=executor)
        events = await watch(client, task.request_id or "")
        await submit(client, task)
        done = (await events.wait_end(timeout=120)).data
    await executor_side.close()
    result = done.result
    assert result.metrics.custom_metrics["onnx_action_agreement"] == 1.0
    last = [e.data for e in events.events if e.type.endswith("progress.v1")][-1]
    per_agent = {k for k in last.metrics if k.startswith("mean_reward_100/")}
    assert per_agent == {f"mean_reward_100/triager_{i}" for i in range(3)}, last.metrics
    policy = OnnxPolicy(Path(result.policy_path))
    observation = np.zeros((1, 10), dtype=np.float32)
    assert 0 <= int(np.asarray(policy.act(observation)).ravel()[0]) <= SKIP


async def test_an_executor_serves_a_multi_agent_env_as_copies_of_its_team(broker: MemoryBroker) -> None:
    """Issue 16: an executor serves a PettingZoo ParallelEnv; a session's num_envs counts copies of
    the team, each agent a sub-env named in the spec, stepped as in the worker (seeds and all)."""
    executor_side, worker_side = MemoryBus(broker), MemoryBus(broker)
    for bus in (executor_side, worker_side):
        await bus.connect()
    server = EnvServer(executor_side, "team", gym_factory("forseti/TriageTeam-v0"), num_envs=2)
    await server.start()
    loop = asyncio.get_running_loop()

    def run() -> tuple[RemoteVecEnv, list[Any], list[Any]]:
        remote = RemoteVecEnv(worker_side, "team", loop=loop, session_id="job", environment="forseti/TriageTeam-v0")
        local = shared_policy_vec_env(multi_agent_factory("forseti/TriageTeam-v0"), copies=2)
        remote.seed(3)
        local.seed(3)
        seen: list[Any] = [remote.reset()]
        expected: list[Any] = [local.reset()]
        actions = np.random.default_rng(0).integers(0, 5, size=(30, remote.num_envs))
        for act in actions:
            seen.append(remote.step(act))
            expected.append(local.step(act))
        remote.close()
        return remote, seen, expected

    remote, seen, expected = await asyncio.to_thread(run)
    assert remote.num_envs == 6 and remote.sub_env_agents == [f"triager_{i}" for i in (0, 1, 2)] * 2
    np.testing.assert_allclose(seen[0], expected[0])
    for (obs, rewards, dones, _), (want_obs, want_rewards, want_dones, _) in zip(seen[1:], expected[1:], strict=True):
        np.testing.assert_allclose(obs, want_obs, rtol=1e-6)
        np.testing.assert_allclose(rewards, want_rewards, rtol=1e-6)
        assert dones.tolist() == want_dones.tolist()
    assert not server.sessions
    for bus in (executor_side, worker_side):
        await bus.close()
