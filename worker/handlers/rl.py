"""The RL handler: PPO, SAC, DQN and A2C from stable-baselines3, on an env in the worker or on a
remote executor; the trained policy registered, exported to ONNX + SafeTensors and announced."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from forseti.adapters.registry import ModelRecord, RLAgent
from forseti.schemas.capabilities import Capability
from forseti.schemas.errors import ForsetiError
from forseti.schemas.jobs import RLMetrics, RLResult
from forseti.schemas.tasks import RLTask, TaskKind
from forseti.worker.engine.context import JobContext, Work

from .gates import champion_onnx, settle

log = logging.getLogger(__name__)

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
        name = task.name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task.algorithm}-{task.environment}")
        champion, champion_path = await self._champion(task, ctx, name)
        # a remote env talks over the worker's bus, which a child process does not have
        trained = await ctx.work(self._train, task, champion_path, isolate=task.executor is None)
        export = trained.export
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
        verdict = None
        if task.gate is not None:
            value: float = trained.mean_reward
            against: float | ForsetiError | None = None  # no champion: the alias is free
            if trained.gate is not None:
                value, against = trained.gate  # both acted by their ONNX on the same episodes
            elif champion is not None:
                against = ForsetiError(f"the champion {champion.id}'s ONNX policy cannot be read on this worker")
            on = f"the same {trained.episodes} seeded episodes"
            verdict = await settle(
                ctx, model, task.gate.alias, "mean_reward", task.gate.margin, value, champion, against, on
            )
        with ctx.phase("announce"):
            alias = task.gate.alias if task.gate is not None and verdict is not None and verdict.promoted else None
            await ctx.publish_files(model, files, announce={"onnx"}, alias=alias)
        gate = {} if verdict is None else {"gate_score": verdict.value, "gate_promoted": float(verdict.promoted)}
        if verdict is not None and verdict.against_value is not None:
            gate["gate_champion_score"] = verdict.against_value
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
                    **gate,
                },
            ),
        )

    async def _champion(self, task: RLTask, ctx: JobContext, name: str) -> tuple[ModelRecord | None, Path | None]:
        """For a gated task: the policy holding the gate's alias, and its ONNX on this host (None when
        there is none, or it cannot be read: then it is not compared, and the alias stays)."""
        if task.gate is None:
            return None, None
        champion = await ctx.store.get_alias(name, task.gate.alias)
        if champion is None or champion.id == ctx.job_id:
            return None, None
        try:
            return champion, await champion_onnx(ctx, champion)
        except ForsetiError as exc:
            log.warning("job %s: the champion %s cannot be compared: %s", ctx.job_id, champion.id, exc.message)
            return champion, None

    def _train(self, task: RLTask, champion: Path | None, ctx: Work) -> Any:
        import torch

        from .rl_training import train

        torch.set_num_threads(self.torch_threads)
        return train(task, ctx, step_timeout=self.step_timeout, progress_every=self.progress_every, champion=champion)
