"""One RL training run, in the handler's thread: env, algorithm, checkpoints, evaluation, export.

SB3 owns the loop; `JobCallback` is the one hook: progress every `progress_every` timesteps,
a checkpoint every `checkpoint_interval`, and `ctx.hold()` so a pause holds and a cancel stops
(SB3 ends `learn()` when `_on_step` returns False).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from forseti.adapters.exporters.policy import PolicyExport, export_policy
from forseti.adapters.inference import OnnxPolicy
from forseti.envs import MULTI_AGENT_ENVS, register_envs
from forseti.envs.remote import RemoteVecEnv
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import RLTask
from forseti.worker.engine.context import Work
from forseti.worker.engine.limits import TRAINED_BYTES_PER_PARAMETER, check_fits, mlp_parameters
from forseti.worker.engine.loop import loop_factory

from . import rl_checkpoint

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "sac": SAC, "dqn": DQN, "a2c": A2C}
ACTION_SPACES: dict[str, tuple[type[spaces.Space[Any]], ...]] = {
    "ppo": (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
    "a2c": (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
    "dqn": (spaces.Discrete,),
    "sac": (spaces.Box,),
}
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "elu": torch.nn.ELU,
    "gelu": torch.nn.GELU,
}


@dataclass(frozen=True)
class TrainedPolicy:
    """What a finished run hands back to the handler."""

    export: PolicyExport
    mean_reward: float
    std_reward: float
    episodes: int
    timesteps: int
    resumed_from: int
    training_time_ms: int
    steps_per_second: float
    gate: tuple[float, float] | None = None
    """With a gate and a champion: (this policy's, the champion's) mean return on the same seeded
    episodes, both acted by their exported ONNX as devices run them."""


def check_algorithm(algorithm: str, action_space: spaces.Space[Any]) -> None:
    """Refuse, before any training, an algorithm that cannot act in this action space."""
    allowed = ACTION_SPACES[algorithm]
    if not isinstance(action_space, allowed):
        names = ", ".join(cls.__name__ for cls in allowed)
        raise ForsetiError(
            f"{algorithm.upper()} cannot act in a {type(action_space).__name__} action space "
            f"({action_space}); it needs {names}",
            code=ErrorCode.INVALID_TASK,
        )


def make_env(task: RLTask, ctx: Work, *, session: str, step_timeout: float, evaluation: bool = False) -> VecEnv:
    """The training env (`config.num_envs` sub-envs) or the evaluation env (one): in this process, or
    on the task's executors; with episode stats."""
    num_envs = 1 if evaluation else task.config.num_envs
    venv: VecEnv
    if task.executor is None and task.environment in MULTI_AGENT_ENVS:
        from forseti.envs.multi_agent import multi_agent_factory, shared_policy_vec_env

        # parameter sharing: num_envs copies of the team, each agent a sub-env of one policy
        venv = shared_policy_vec_env(multi_agent_factory(task.environment), num_envs)
    elif task.executor is None:
        register_envs()
        try:
            gym.spec(task.environment)
        except gym.error.Error as exc:
            raise ForsetiError(f"unknown environment {task.environment!r}: {exc}", code=ErrorCode.INVALID_TASK) from exc
        venv = DummyVecEnv([lambda: gym.make(task.environment) for _ in range(num_envs)])
    else:
        if ctx.bus is None:
            raise ForsetiError("remote envs need the worker's bus", code=ErrorCode.INVALID_TASK)
        executors = [task.executor] if isinstance(task.executor, str) else task.executor
        if evaluation:  # one sub-env on the first executor, as in the worker
            executors = executors[:1]
        # one executor serves its own number of sub-envs unless the task asks for one; several
        # share the task's
        asked = evaluation or len(executors) > 1 or "num_envs" in task.config.model_fields_set
        venv = RemoteVecEnv(
            ctx.bus,
            executors,
            loop=ctx.loop,
            session_id=session,
            environment=task.environment,
            num_envs=num_envs if asked else None,
            step_timeout=step_timeout,
            check=ctx.check,
            private_loop=loop_factory() or asyncio.new_event_loop,
        )
    return VecMonitor(venv)


def replay_size(task: RLTask) -> int:
    """Transitions an off-policy algorithm's replay buffer holds."""
    return int(min(1_000_000, max(task.config.total_timesteps, 1_000)))


def check_fits_memory(task: RLTask, env: VecEnv, limit: int) -> None:
    """Refuse (resource_exhausted) an algorithm whose networks and buffer would not fit in `limit`
    bytes, before SB3 allocates them: PPO / A2C train a policy and a value net and keep a rollout,
    DQN a Q-net and its target and a replay buffer, SAC an actor, two critics, their targets and a
    replay buffer (observations stored twice, as SB3 does)."""
    obs, act = spaces.flatdim(env.observation_space), spaces.flatdim(env.action_space)
    arch = list(task.policy.net_arch)
    if task.algorithm == "sac":
        parameters = mlp_parameters([obs, *arch, 2 * act]) + 4 * mlp_parameters([obs + act, *arch, 1])
    else:
        parameters = 2 * mlp_parameters([obs, *arch, act])
    off_policy = task.algorithm in ("dqn", "sac")
    transitions = replay_size(task) if off_policy else task.config.n_steps * env.num_envs
    buffer = transitions * (2 * obs + act + 4) * 4
    what = f"{task.algorithm} with net_arch {arch} ({parameters:,} parameters) and {transitions:,} stored steps"
    check_fits(what, parameters * TRAINED_BYTES_PER_PARAMETER + buffer, limit)


def build_model(task: RLTask, env: VecEnv, checkpoints: Path) -> tuple[BaseAlgorithm, int]:
    """The task's model, fresh or with the state of the last checkpoint in `checkpoints` (tensors and
    JSON, `rl_checkpoint`: SB3's pickled zip is never read); and the timesteps it starts from."""
    model = new_model(task, env)
    if rl_checkpoint.exists(checkpoints):
        rl_checkpoint.load(model, checkpoints)
    return model, int(model.num_timesteps)


def new_model(task: RLTask, env: VecEnv) -> BaseAlgorithm:
    """A fresh model of the task's algorithm, policy and hyperparameters."""
    config = task.config
    kwargs: dict[str, Any] = {
        "learning_rate": config.learning_rate,
        "gamma": config.gamma,
        "seed": config.seed,
        "device": "cpu",
        "policy_kwargs": {"net_arch": list(task.policy.net_arch), "activation_fn": ACTIVATIONS[task.policy.activation]},
        "verbose": 0,
    }
    if task.algorithm in ("ppo", "a2c"):
        kwargs["n_steps"] = config.n_steps
    if task.algorithm == "ppo":
        rollout = config.n_steps * env.num_envs
        kwargs["batch_size"] = max(d for d in range(1, min(64, rollout) + 1) if rollout % d == 0)
    if task.algorithm in ("dqn", "sac"):
        kwargs["buffer_size"] = replay_size(task)
        kwargs["learning_starts"] = int(min(100, config.total_timesteps // 2))
    return ALGORITHMS[task.algorithm]("MlpPolicy", env, **kwargs)


def sub_env_agents(venv: VecEnv | None) -> list[str]:
    """The agent each sub-env of a multi-agent env is (`envs/multi_agent.py` marks them), looked for
    through the wrappers around it; empty for any other env."""
    while venv is not None:
        agents: list[str] | None = vars(venv).get("sub_env_agents")
        if agents:
            return agents
        venv = vars(venv).get("venv")
    return []


class JobCallback(BaseCallback):
    """Progress, checkpoints, pause and cancel, from inside SB3's loop."""

    def __init__(self, ctx: Work, total: int, checkpoints: Path, *, every: int, progress_every: int) -> None:
        super().__init__()
        self.ctx, self.total, self.checkpoints = ctx, total, checkpoints
        self.every, self.progress_every = every, progress_every
        self.episodes = 0
        self._last_checkpoint = self._last_progress = 0
        self._started = time.monotonic()
        self._start_steps = 0
        self.agents: list[str] = []
        """For a multi-agent env, the agent each sub-env is (empty otherwise)."""
        self.agent_rewards: dict[str, deque[float]] = {}
        """Per agent, the rewards of its last 100 episodes."""

    def _on_training_start(self) -> None:
        self._start_steps = self._last_checkpoint = self._last_progress = self.num_timesteps
        self.agents = sub_env_agents(self.training_env)
        self.agent_rewards = {agent: deque(maxlen=100) for agent in dict.fromkeys(self.agents)}

    def _on_step(self) -> bool:
        infos = self.locals.get("infos", ())
        self.episodes += sum(1 for info in infos if "episode" in info)
        for i, info in enumerate(infos):
            if "episode" in info and i < len(self.agents):
                self.agent_rewards[self.agents[i]].append(float(info["episode"]["r"]))
        checkpoint = self.num_timesteps - self._last_checkpoint >= self.every
        if checkpoint:
            self.save()
        # a checkpoint is reported too: a watcher sees the step a takeover would resume from
        if checkpoint or self.num_timesteps - self._last_progress >= self.progress_every:
            self.report()
        return self.ctx.hold()

    def steps_per_second(self) -> float:
        """Training speed since this run (or resume) began."""
        return (self.num_timesteps - self._start_steps) / max(time.monotonic() - self._started, 1e-9)

    def report(self) -> None:
        """One progress event: timesteps, fraction, episodes, mean reward over the last 100, steps/s."""
        self._last_progress = self.num_timesteps
        rewards = [info["r"] for info in self.model.ep_info_buffer or ()]
        metrics = {
            "timesteps": float(self.num_timesteps),
            "episodes": float(self.episodes),
            "steps_per_second": self.steps_per_second(),
        }
        if rewards:
            metrics["mean_reward_100"] = float(np.mean(rewards))
        for agent, kept in self.agent_rewards.items():
            if kept:
                metrics[f"mean_reward_100/{agent}"] = float(np.mean(kept))
        self.ctx.progress(
            self.num_timesteps / self.total,
            step=self.num_timesteps,
            total=self.total,
            message=f"{self.num_timesteps:,} / {self.total:,} timesteps",
            metrics=metrics,
        )

    def save(self) -> None:
        """Write the checkpoint (DQN and SAC with their replay buffer) and share it."""
        self._last_checkpoint = self.num_timesteps
        rl_checkpoint.save(self.model, self.checkpoints)
        self.ctx.checkpointed(self.num_timesteps)


def train(
    task: RLTask, ctx: Work, *, step_timeout: float, progress_every: int, champion: Path | None = None
) -> TrainedPolicy:
    """Train (or resume), evaluate and export; raises JobStopped (via ctx.check) when stopped. With a
    `champion` ONNX policy (a gated task), evaluate it on the same seeded episodes too."""
    env = make_env(task, ctx, session=ctx.job_id, step_timeout=step_timeout)
    try:
        check_algorithm(task.algorithm, env.action_space)
        check_fits_memory(task, env, ctx.memory_limit)
        model, resumed_from = build_model(task, env, ctx.checkpoint_dir)
        total = task.config.total_timesteps
        callback = JobCallback(
            ctx, total, ctx.checkpoint_dir, every=task.config.checkpoint_interval, progress_every=progress_every
        )
        started = time.monotonic()
        # a job redelivered after its last checkpoint has nothing left to learn: it goes straight to
        # evaluation and export (the callback has no model until learn() gives it one)
        if total > model.num_timesteps:
            with ctx.phase("training"):
                model.learn(total - model.num_timesteps, callback=callback, reset_num_timesteps=False)
            callback.save()  # the last state, whether finished, cancelled or handed back
            ctx.check()
            callback.report()
        ctx.check()
        training_ms = int((time.monotonic() - started) * 1000)
    finally:
        env.close()
    episodes = task.evaluation.episodes
    if episodes:
        with ctx.phase("evaluation"):
            mean, std = evaluate(task, ctx, model, session=f"{ctx.job_id}.eval", step_timeout=step_timeout)
    else:  # no evaluation asked for: training's last 100 episodes
        rewards = [info["r"] for info in model.ep_info_buffer or ()] or [0.0]
        mean, std = float(np.mean(rewards)), float(np.std(rewards))
    with ctx.phase("export"):
        export = _export(task, model, ctx.artifacts_dir)
    if export.int8_path is not None and episodes:  # the same seeded episodes, acted by the int8 graph
        int8 = ExportedPolicy(OnnxPolicy(export.int8_path))
        int8_mean, _ = evaluate(task, ctx, int8, session=f"{ctx.job_id}.eval-int8", step_timeout=step_timeout)
        export = replace(export, int8_figures={**export.int8_figures, "int8_mean_reward": int8_mean})
    gate = None
    if champion is not None and episodes:
        with ctx.phase("evaluation"):
            ours, theirs = (ExportedPolicy(OnnxPolicy(path)) for path in (export.onnx_path, champion))
            mine, _ = evaluate(task, ctx, ours, session=f"{ctx.job_id}.eval-gate", step_timeout=step_timeout)
            against, _ = evaluate(task, ctx, theirs, session=f"{ctx.job_id}.eval-champion", step_timeout=step_timeout)
            gate = (mine, against)
    return TrainedPolicy(
        export, mean, std, episodes, int(model.num_timesteps), resumed_from, training_ms, callback.steps_per_second(),
        gate,
    )  # fmt: skip


def _export(task: RLTask, model: Any, artifacts_dir: Path) -> PolicyExport:
    """The trained policy exported to ONNX (and int8 when the task asks) with its card."""
    return export_policy(
        model,
        artifacts_dir,
        algorithm=task.algorithm,
        environment=task.environment,
        extra={
            "net_arch": list(task.policy.net_arch),
            "activation": task.policy.activation,
            "timesteps": int(model.num_timesteps),
        },
        seed=task.config.seed or 0,
        int8=task.config.quantize_int8,
    )


class ExportedPolicy:
    """An exported policy behind SB3's `predict`, so `evaluate_policy` runs it as it runs the model."""

    def __init__(self, policy: OnnxPolicy) -> None:
        self.policy = policy

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The graph's (deterministic) actions for a batch of observations."""
        return self.policy.act(observation), None


def evaluate(
    task: RLTask, ctx: Work, model: BaseAlgorithm | ExportedPolicy, *, session: str, step_timeout: float
) -> tuple[float, float]:
    """Mean and std of the return over `evaluation.episodes` deterministic episodes, seeded alike for
    every model evaluated in a job."""
    env = make_env(task, ctx, session=session, step_timeout=step_timeout, evaluation=True)
    try:
        if task.config.seed is not None:
            env.seed(task.config.seed + 10_000)
        mean, std = evaluate_policy(
            model,
            env,
            n_eval_episodes=task.evaluation.episodes,
            deterministic=True,
            callback=lambda _locals, _globals: ctx.check(),  # pause and cancel reach every step
        )
    finally:
        env.close()
    return float(cast(float, mean)), float(cast(float, std))
