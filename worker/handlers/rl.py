"""The RL handler: PPO, SAC, DQN and A2C from stable-baselines3, on an env in the worker or on a
remote executor; the trained policy registered, exported to ONNX + SafeTensors and announced."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from forseti.adapters.registry import ModelRecord, RLAgent
from forseti.schemas.capabilities import Capability
from forseti.schemas.jobs import RLMetrics, RLResult
from forseti.schemas.tasks import RLTask, TaskKind
from forseti.worker.engine.context import JobContext, Work

ALGORITHM_NAMES = ("ppo", "sac", "dqn", "a2c")


class RLHandler:
    """Runs `forseti.task.rl.v1`."""

    kind = TaskKind.RL

    def __init__(self, *, step_timeout: float = 10.0, progress_every: int = 2_000, torch_threads: int = 1) -> None:
        self.step_timeout = step_timeout
        """Seconds an executor may take to answer one vector step."""
        self.progress_every = progress_every
        """Timesteps between progress events."""
        self.torch_threads = torch_threads
        """Torch CPU threads for training: small MLPs run fastest on one, and the event loop keeps a core."""

    def capabilities(self) -> list[Capability]:
        """The algorithms, multi-agent envs (parameter sharing), sub-envs spread over several executors,
        and the formats policies are exported to."""
        return [
            *(Capability(area="reinforcement-learning", name=a) for a in ALGORITHM_NAMES),
            Capability(area="reinforcement-learning", name="multi-agent"),
            Capability(area="reinforcement-learning", name="many-executors"),
            Capability(area="model-export", name="onnx"),
            Capability(area="model-export", name="safetensors"),
        ]

    async def run(self, task: RLTask, ctx: JobContext) -> RLResult:
        """Train (in a child process, for an env in the worker), then register and announce the policy."""
        # a remote env talks over the worker's bus, which a child process does not have
        trained = await ctx.work(self._train, task, isolate=task.executor is None)
        export = trained.export
        name = task.name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task.algorithm}-{task.environment}")
        metrics = {
            "mean_reward": trained.mean_reward,
            "std_reward": trained.std_reward,
            "onnx_max_abs_diff": export.max_abs_diff,
            "onnx_action_agreement": export.agreement,
            **export.int8_figures,
        }
        with ctx.phase("register"):
            model = await ctx.register_model(
                ModelRecord(
                    id=ctx.job_id,
                    name=name,
                    model_type="policy",
                    framework="stable-baselines3",
                    export_path=str(export.onnx_path),
                    export_format="onnx",
                    metrics=metrics,
                    user_id=task.user_id,
                    device_id=task.device_id,
                    device_tags=list(task.device_tags),
                    job_id=ctx.job_id,
                )
            )
            await ctx.store.add_rl_agent(
                RLAgent(
                    id=ctx.job_id,
                    name=name,
                    algorithm=task.algorithm,
                    environment=task.environment,
                    policy_path=str(export.onnx_path),
                    metrics=metrics,
                    user_id=task.user_id,
                    device_id=task.device_id,
                    job_id=ctx.job_id,
                )
            )
        files: list[tuple[str, str | None, Path]] = [
            ("onnx", None, export.onnx_path),
            ("safetensors", None, export.safetensors_path),
        ]
        if export.int8_path is not None:
            files.append(("onnx", "int8", export.int8_path))
        with ctx.phase("announce"):
            await ctx.publish_files(model, files, announce={"onnx"})
        return RLResult(
            agent_id=model.id,
            policy_path=str(export.onnx_path),
            metrics=RLMetrics(
                mean_reward=trained.mean_reward,
                std_reward=trained.std_reward,
                total_episodes=trained.episodes,
                training_time_ms=trained.training_time_ms,
                custom_metrics={
                    "timesteps": float(trained.timesteps),
                    "resumed_from_timesteps": float(trained.resumed_from),
                    "steps_per_second": trained.steps_per_second,
                    "onnx_max_abs_diff": export.max_abs_diff,
                    "onnx_action_agreement": export.agreement,
                    "onnx_parity_samples": float(export.samples),
                    **export.int8_figures,
                    "version": float(model.version),
                },
            ),
        )

    def _train(self, task: RLTask, ctx: Work) -> Any:
        import torch

        from .rl_training import train

        torch.set_num_threads(self.torch_threads)
        return train(task, ctx, step_timeout=self.step_timeout, progress_every=self.progress_every)
