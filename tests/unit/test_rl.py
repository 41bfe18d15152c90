"""The RL handler on the memory bus: four algorithms on tiny budgets, refusals, cancel, resume, executors."""

from __future__ import annotations

import asyncio
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, PPO

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.exporters import sha256_of
from forseti.adapters.inference import OnnxPolicy
from forseti.adapters.registry import ModelRecord
from forseti.envs.executor import EnvServer, gym_factory
from forseti.envs.local_policy import act_locally
from forseti.schemas.catalog import CONTROL, MODELS
from forseti.schemas.control import CancelJob
from forseti.schemas.envelope import encode
from forseti.schemas.errors import ForsetiError
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import RLTask
from forseti.worker.engine.context import Handler
from forseti.worker.handlers import rl_checkpoint
from forseti.worker.handlers.rl import RLHandler

from ..helpers import Watcher, running_worker, stored_job, submit, watch


def rl_task(algorithm: str, environment: str, **config: Any) -> RLTask:
    executor = config.pop("executor", None)
    episodes = config.pop("episodes", 2)
    return RLTask.model_validate(
        {
            "request_id": f"rl-{uuid.uuid4().hex[:8]}",
            "algorithm": algorithm,
            "environment": environment,
            "executor": executor,
            "config": {"seed": 1, **config},
            "policy": {"net_arch": [16, 16]},
            "evaluation": {"episodes": episodes},
        }
    )


@pytest.mark.parametrize(
    ("algorithm", "environment", "config"),
    [
        ("ppo", "CartPole-v1", {"total_timesteps": 128, "n_steps": 64, "quantize_int8": True}),
        ("a2c", "CartPole-v1", {"total_timesteps": 100, "n_steps": 5}),
        ("dqn", "CartPole-v1", {"total_timesteps": 200}),
        ("sac", "Pendulum-v1", {"total_timesteps": 150, "quantize_int8": True}),
        ("ppo", "forseti/EmailTriage-v0", {"total_timesteps": 128, "n_steps": 32, "num_envs": 2}),
    ],
)
async def test_each_algorithm_trains_exports_registers_and_announces(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, algorithm: str, environment: str, config: dict[str, Any]
) -> None:
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=50)], tmp_path) as worker:
        task = rl_task(algorithm, environment, **config)
        job_id = task.request_id or ""
        events = await watch(client, job_id)
        await submit(client, task)
        done = (await events.wait_end()).data
        result = done.result
        assert result.metrics.total_episodes == 2
        assert result.metrics.custom_metrics["timesteps"] >= config["total_timesteps"]
        assert result.metrics.custom_metrics["onnx_action_agreement"] == 1.0
        assert result.metrics.custom_metrics["onnx_max_abs_diff"] < 1e-4
        onnx = Path(result.policy_path)
        assert onnx.is_file()
        assert onnx.with_suffix(".safetensors").is_file()
        assert onnx.with_suffix(".json").is_file()
        progress = [e.data for e in events.events if e.type.endswith("progress.v1")]
        assert progress, "progress events while training"
        assert progress[-1].fraction == 1.0
        announced = (await models.wait_for("available")).data
        assert (announced.kind, announced.format, announced.job_id) == ("policy", "onnx", job_id)
        assert announced.sha256 == sha256_of(onnx)
        assert announced.size_bytes == onnx.stat().st_size
        agents = await worker.store.list_rl_agents(algorithm=algorithm)
        assert [a.id for a in agents] == [job_id]
        stored = {(a.format, a.quantization) for a in await worker.store.list_artifacts(job_id)}
        int8 = config.get("quantize_int8", False)
        assert stored == {("onnx", None), ("safetensors", None), *([("onnx", "int8")] if int8 else [])}
        if int8:  # the quantised policy is announced too, its agreement with the float one in the event
            quantized = (await models.wait_for("available", count=2)).data
            assert (quantized.quantization, quantized.format) == ("int8", "onnx")
            figures = {k: v for k, v in quantized.metrics.items() if k.startswith("int8_")}
            assert figures == {k: v for k, v in result.metrics.custom_metrics.items() if k.startswith("int8_")}
            assert set(figures) == {"int8_action_agreement", "int8_max_abs_diff", "int8_mean_reward"}
            assert np.isfinite(figures["int8_mean_reward"]), "the int8 graph played the evaluation episodes"
            if environment == "CartPole-v1":  # discrete: the same action on nearly every observation
                assert figures["int8_action_agreement"] >= 0.9, figures

    # a device holding only the ONNX file acts with it next to the env, no bus and no worker
    onnx.with_suffix(".json").unlink()
    policy = OnnxPolicy(onnx)
    assert policy.description["algorithm"] == algorithm
    returns = act_locally(gymnasium.make(environment), policy, episodes=2, seed=0)
    assert len(returns) == 2 and all(np.isfinite(returns))
    with pytest.raises(ForsetiError, match="values each") as bad:
        policy.act([[float("nan")] * policy.observation_shape[0]])
    assert bad.value.code == "invalid_data"


@pytest.mark.parametrize(
    ("algorithm", "environment", "message"),
    [
        ("dqn", "Pendulum-v1", "DQN cannot act in a Box action space"),
        ("sac", "CartPole-v1", "SAC cannot act in a Discrete action space"),
        ("ppo", "NoSuchEnv-v9", "unknown environment 'NoSuchEnv-v9'"),
    ],
)
async def test_impossible_tasks_are_refused_before_any_training(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, algorithm: str, environment: str, message: str
) -> None:
    async with running_worker(MemoryBus(broker), [RLHandler()], tmp_path):
        task = rl_task(algorithm, environment, total_timesteps=1000)
        events = await watch(client, task.request_id or "")
        await submit(client, task)
        failed = (await events.wait_end("failed")).data
        assert failed.code == "invalid_task"
        assert message in failed.message
        assert not [e for e in events.events if e.type.endswith("progress.v1")]


async def test_cancel_ends_training_within_two_seconds_and_keeps_the_checkpoint(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=256)], tmp_path):
        task = rl_task("ppo", "CartPole-v1", total_timesteps=1_000_000, n_steps=256)
        job_id = task.request_id or ""
        events = await watch(client, job_id)
        await submit(client, task)
        await events.wait_for("progress", timeout=60)
        asked = asyncio.get_running_loop().time()
        await client.publish(CONTROL, encode(CancelJob(job_id=job_id, reason="enough")))
        await events.wait_end("cancelled", timeout=10)
        assert asyncio.get_running_loop().time() - asked < 2.0
    assert (tmp_path / "jobs" / job_id / "checkpoints" / "rl-state.safetensors").is_file()


async def test_a_job_handed_back_at_shutdown_resumes_from_its_checkpoint(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    task = rl_task("ppo", "CartPole-v1", total_timesteps=4096, n_steps=128, checkpoint_interval=128, episodes=1)
    job_id = task.request_id or ""
    events = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=128)], tmp_path, shutdown_grace=0.0):
        await submit(client, task)
        await events.wait_for("progress", count=2, timeout=60)
    assert (await stored_job(tmp_path, job_id)).state is JobState.PENDING
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=512)], tmp_path):
        done = (await events.wait_end()).data
    assert done.result.metrics.custom_metrics["resumed_from_timesteps"] >= 256
    assert done.result.metrics.custom_metrics["timesteps"] >= 4096


async def test_ppo_trains_on_a_remote_executor_and_a_killed_executor_fails_the_job(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    executor_bus = MemoryBus(broker)
    await executor_bus.connect()
    server = EnvServer(executor_bus, "cart-exec", gym_factory("CartPole-v1"), num_envs=2, environment="CartPole-v1")
    await server.start()
    handlers: list[Handler] = [RLHandler(step_timeout=1.0, progress_every=64)]
    async with running_worker(MemoryBus(broker), handlers, tmp_path, max_attempts=2, retry_delay=0.2):
        task = rl_task("ppo", "CartPole-v1", total_timesteps=128, n_steps=32, executor="cart-exec", episodes=1)
        events = await watch(client, task.request_id or "")
        await submit(client, task)
        done = (await events.wait_end()).data
        assert done.result.metrics.custom_metrics["timesteps"] >= 128
        assert not server.sessions, "the job closes its sessions"

        doomed = rl_task("ppo", "CartPole-v1", total_timesteps=100_000, n_steps=32, executor="cart-exec")
        events = await watch(client, doomed.request_id or "")
        await submit(client, doomed)
        await events.wait_for("progress", timeout=60)
        await server.stop()  # the executor goes away mid-training, for good
        failed = (await events.wait_end("failed", timeout=30)).data
        assert failed.code == "retries_exhausted"
        assert "executor_timeout on attempt 2, the last: executor 'cart-exec' did not answer open" in failed.message
        assert [e.data.attempt for e in events.events if e.type.endswith("accepted.v1")] == [1, 2]
    await executor_bus.close()


async def test_an_executor_restarted_under_its_id_is_used_again_from_the_checkpoint(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """An executor restarted under the same id 3 s after a kill failed its job with executor_timeout,
    retriable: false, and the job's checkpoint was never used (issue 13)."""

    async def executor() -> tuple[MemoryBus, EnvServer]:
        bus = MemoryBus(broker)
        await bus.connect()
        server = EnvServer(bus, "cart-exec", gym_factory("CartPole-v1"), num_envs=2, environment="CartPole-v1")
        await server.start()
        return bus, server

    bus, server = await executor()
    handlers: list[Handler] = [RLHandler(step_timeout=1.0, progress_every=64)]
    async with running_worker(MemoryBus(broker), handlers, tmp_path, retry_delay=1.0):
        task = rl_task(
            "ppo", "CartPole-v1", total_timesteps=1_024, n_steps=32, checkpoint_interval=64, executor="cart-exec"
        )
        events = await watch(client, task.request_id or "")
        await submit(client, task)
        await events.wait_for("progress", count=2, timeout=60)
        await server.stop()
        await bus.close()
        await asyncio.sleep(3.0)
        bus, server = await executor()  # the same id, a new process's worth of state
        done = (await events.wait_end(timeout=60)).data
        assert done.result.metrics.custom_metrics["resumed_from_timesteps"] >= 64
        assert done.result.metrics.custom_metrics["timesteps"] >= 1_024
        assert [e.data.attempt for e in events.events if e.type.endswith("accepted.v1")][-1] >= 2
    await server.stop()
    await bus.close()


async def test_a_job_redelivered_after_its_last_checkpoint_evaluates_and_exports(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Killed between its final checkpoint and its end, the job had nothing left to learn, and its
    callback then saved without a model: a permanent handler_error (issue 13)."""
    task = rl_task("ppo", "CartPole-v1", total_timesteps=128, n_steps=64, episodes=1)
    job_id = task.request_id or ""
    checkpoints = tmp_path / "jobs" / job_id / "checkpoints"
    checkpoints.mkdir(parents=True)
    trained = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, policy_kwargs={"net_arch": [16, 16]}, seed=1)
    trained.learn(128)
    rl_checkpoint.save(trained, checkpoints)
    events = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [RLHandler()], tmp_path):
        await submit(client, task)
        done = (await events.wait_end()).data
    assert done.result.metrics.custom_metrics["resumed_from_timesteps"] == trained.num_timesteps
    assert done.result.metrics.total_episodes == 1
    assert Path(done.result.policy_path).is_file()


async def test_cancel_reaches_the_evaluation_episodes(broker: MemoryBroker, client: MemoryBus, tmp_path: Path) -> None:
    """A cancel during 100,000 evaluation episodes was ignored until they had all run (issue 13); the
    schema now caps them at 10,000, still tens of seconds of CartPole for an untrained policy."""
    # progress only at the end of training, so the cancel comes once the evaluation has begun
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=10_000)], tmp_path):
        task = rl_task("ppo", "CartPole-v1", total_timesteps=64, n_steps=64, episodes=10_000)
        job_id = task.request_id or ""
        events = await watch(client, job_id)
        await submit(client, task)
        await events.wait_until(
            lambda seen: [e for e in seen if e.type.endswith("progress.v1") and e.data.fraction == 1.0]
        )
        asked = asyncio.get_running_loop().time()
        await client.publish(CONTROL, encode(CancelJob(job_id=job_id, reason="enough")))
        await events.wait_end("cancelled", timeout=30)
        assert asyncio.get_running_loop().time() - asked < 2.0


async def test_a_job_whose_earlier_attempt_registered_its_policy_finishes(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """A PPO job whose first worker registered the policy and died before the job's end could never
    finish: every later attempt hit `duplicate key ... models_pkey`, store_error, until
    retries_exhausted (bench/faults.py pause, issue 13)."""
    task = rl_task("ppo", "CartPole-v1", total_timesteps=64, n_steps=64, episodes=1)
    job_id = task.request_id or ""
    async with running_worker(MemoryBus(broker), [RLHandler()], tmp_path) as worker:
        earlier = ModelRecord(
            id=job_id, name="ppo-CartPole-v1", model_type="policy", export_path="/elsewhere", export_format="onnx"
        )
        await worker.store.add_model(earlier)  # as the dead worker's attempt left it
        events = await watch(client, job_id)
        await submit(client, task)
        done = await events.wait_end()
    assert done.type.endswith("completed.v1"), done.data
    assert done.data.result.agent_id == job_id


class _Planted:
    """A pickle that makes a folder when it is read: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


async def test_a_pickle_planted_in_the_checkpoint_store_runs_nothing(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """Whoever could write a job's checkpoint folder ran code on the worker that resumed it: SB3's
    zip and its replay buffer were read back with (cloud)pickle (issue 14)."""
    task = rl_task("dqn", "CartPole-v1", total_timesteps=300, episodes=1)
    job_id = task.request_id or ""
    checkpoints = tmp_path / "jobs" / job_id / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    planted = DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16, 16]}, learning_starts=50, seed=1)
    planted.learn(100)
    planted.save(checkpoints / "model.zip")  # what a worker wrote before: SB3's zip and a pickled buffer
    (checkpoints / "replay_buffer.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    (checkpoints / "checkpoint.json").write_text('{"timesteps": 100}')
    events = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [RLHandler()], tmp_path):
        await submit(client, task)
        done = (await events.wait_end()).data
    assert not marker.exists(), "the planted pickle ran"
    assert done.result.metrics.custom_metrics["resumed_from_timesteps"] == 0, "the zip is not a checkpoint"
    assert rl_checkpoint.exists(checkpoints)


@pytest.mark.parametrize(
    ("algorithm", "environment", "kwargs"),
    [
        ("ppo", "CartPole-v1", {"n_steps": 32, "batch_size": 32}),
        ("a2c", "CartPole-v1", {"n_steps": 5}),
        ("dqn", "CartPole-v1", {"learning_starts": 20, "buffer_size": 80}),
        ("sac", "Pendulum-v1", {"learning_starts": 20, "buffer_size": 1_000}),
    ],
)
def test_a_checkpoint_of_tensors_and_json_restores_the_whole_training_state(
    tmp_path: Path, algorithm: str, environment: str, kwargs: dict[str, Any]
) -> None:
    """Weights, optimizer moments, counters, episode statistics and the replay buffer (wrapped past
    its end for DQN) come back exactly from the files `rl_checkpoint` writes."""
    from forseti.worker.handlers.rl_training import ALGORITHMS

    def fresh() -> Any:
        return ALGORITHMS[algorithm]("MlpPolicy", environment, policy_kwargs={"net_arch": [8]}, seed=3, **kwargs)

    trained = fresh()
    trained.learn(128)
    rl_checkpoint.save(trained, tmp_path)
    assert not list(tmp_path.glob("partial-*")), "every file was moved into place"
    restored = fresh()
    rl_checkpoint.load(restored, tmp_path)
    for name, state in trained.get_parameters().items():
        again = restored.get_parameters()[name]
        flat, flat_again = _tensors(state), _tensors(again)
        assert flat.keys() == flat_again.keys(), name
        for key, value in flat.items():
            same = torch.equal(value, flat_again[key]) if isinstance(value, torch.Tensor) else value == flat_again[key]
            assert same, f"{name} {key}"
    for counter in ("num_timesteps", "_n_updates", "_episode_num"):
        assert getattr(restored, counter) == getattr(trained, counter)
    assert list(restored.ep_info_buffer) == list(trained.ep_info_buffer)
    if algorithm in ("dqn", "sac"):
        buffer, again = trained.replay_buffer, restored.replay_buffer
        assert (again.pos, again.full) == (buffer.pos, buffer.full)
        assert buffer.full == (algorithm == "dqn")
        for name in ("observations", "actions", "rewards", "dones"):
            assert np.array_equal(getattr(again, name), getattr(buffer, name)), name
    if algorithm == "sac":
        assert torch.equal(restored.log_ent_coef, trained.log_ent_coef)
    restored.learn(32, reset_num_timesteps=False)  # and it trains on from there
    assert restored.num_timesteps >= trained.num_timesteps + 32


def _tensors(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    if isinstance(state, list | tuple):
        return {k: v for i, value in enumerate(state) for k, v in _tensors(value, f"{prefix}/{i}").items()}
    return {prefix: state}


def test_a_checkpoint_that_does_not_fit_the_task_is_refused_with_its_reason(tmp_path: Path) -> None:
    wide = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs={"net_arch": [8]})
    rl_checkpoint.save(wide, tmp_path)
    narrow = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs={"net_arch": [4]})
    with pytest.raises(ForsetiError, match=r"(?s)cannot be resumed: .*size mismatch"):
        rl_checkpoint.load(narrow, tmp_path)
