"""Scale: PPO over several executors against SB3's SubprocVecEnv, and data-parallel training.

    python bench/scale.py

In one run:

- PPO env-steps/s on `forseti/SlowCartPole-v0` (CartPole with 1 ms of CPU a step) at 8 and 16
  sub-envs: through a Worker with the sub-envs spread over 1, 2 and 4 `forseti executor` processes
  on a real nats-server, and SB3's own PPO on a SubprocVecEnv (its layout: one process per
  sub-env; it cannot put several in one). Targets (issue 16): two executors >= 1.7x one, and
  Forseti >= 1.0x SubprocVecEnv.
- DistributedDataParallel on the CPU (gloo): samples/s of one training job at world_size 1 and 2,
  and what Forseti's launch and rendezvous cost against a bare `torchrun` of the same training
  (`bench/ddp_rank.py`): the wall time of each, less its training time. Target: <= 3 s, and <= 5%
  of a 60 s job.

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from report import verdicts, write_section
from rl_common import executor_process, run_rl
from stable_baselines3.common.vec_env import VecEnv

from forseti.adapters.bus.servers import NatsServer
from forseti.envs import SLOW_CARTPOLE
from forseti.envs.executor import gym_factory
from forseti.schemas.tasks import TrainingConfig
from forseti.worker.engine.loop import loop_factory
from forseti.worker.engine.loop import run as run_loop

log = logging.getLogger("bench.scale")

SUBPROC = "SB3 SubprocVecEnv"
REPEATS = 3
"""PPO runs per layout; the table gives their median."""
ROLLOUTS = 3
"""PPO rollouts per run: enough for a steady speed, short enough for many runs."""
N_STEPS = 64
DDP_ROWS, DDP_FEATURES = 60_000, 32
"""The data-parallel job: a classifier on synthetic rows, large enough that an epoch takes seconds."""
DDP_CONFIG = {"epochs": 3, "batch_size": 512, "hidden": [512, 512], "learning_rate": 1e-3, "seed": 0}


def slow_env() -> Callable[..., gym.Env[Any, Any]]:
    """The slow env's constructor for SB3's SubprocVecEnv: a factory, not the id, since its
    sub-processes start bare and must register Forseti's envs themselves."""
    return cast(Callable[..., gym.Env[Any, Any]], gym_factory(SLOW_CARTPOLE))


def ppo_task(num_envs: int, executors: list[str]) -> dict[str, Any]:
    """PPO on the slow env, its sub-envs spread over `executors`."""
    return {
        "algorithm": "ppo",
        "environment": SLOW_CARTPOLE,
        "executor": executors,
        "config": {
            "total_timesteps": N_STEPS * num_envs * ROLLOUTS,
            "n_steps": N_STEPS,
            "num_envs": num_envs,
            "seed": 0,
        },
        "policy": {"net_arch": [64, 64]},
        "evaluation": {"episodes": 0},
    }


async def forseti_speed(url: str, num_envs: int, processes: int) -> float:
    """PPO env-steps/s through a Worker, the sub-envs on `processes` executor processes."""
    ids = [f"scale-{uuid.uuid4().hex[:6]}" for _ in range(processes)]
    with contextlib.ExitStack() as stack:
        for executor in ids:
            stack.enter_context(executor_process(url, SLOW_CARTPOLE, executor, 1))
        run = await run_rl(url, ppo_task(num_envs, ids), progress_every=10**9)
    return float(run.result.metrics.custom_metrics["steps_per_second"])


def subproc_speed(num_envs: int) -> float:
    """SB3's PPO on a SubprocVecEnv of `num_envs` processes, the same budget and network."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    env = make_vec_env(slow_env(), n_envs=num_envs, seed=0, vec_env_cls=SubprocVecEnv)
    model = PPO("MlpPolicy", env, n_steps=N_STEPS, policy_kwargs={"net_arch": [64, 64]}, seed=0, device="cpu")
    total = N_STEPS * num_envs * ROLLOUTS
    start = time.perf_counter()
    model.learn(total)
    elapsed = time.perf_counter() - start
    env.close()
    return total / elapsed


STEPS = 200
"""Vector steps of the stepping-only figures."""
new_event_loop = loop_factory() or asyncio.new_event_loop


async def forseti_stepping(url: str, num_envs: int, processes: int) -> float:
    """Env-steps/s of random vector steps through RemoteVecEnv alone (no policy, no PPO update), the
    sub-envs on `processes` executor processes: what spreading them speeds up."""
    from forseti.adapters.bus import create_bus
    from forseti.envs.remote import RemoteVecEnv

    ids = [f"step-{uuid.uuid4().hex[:6]}" for _ in range(processes)]
    bus = create_bus(url)
    await bus.connect()
    loop = asyncio.get_running_loop()

    def measure() -> float:
        env = RemoteVecEnv(bus, ids, loop=loop, session_id="scale", num_envs=num_envs, private_loop=new_event_loop)
        return stepping_rate(env)

    with contextlib.ExitStack() as stack:
        for executor in ids:
            stack.enter_context(executor_process(url, SLOW_CARTPOLE, executor, 1))
        speed = await asyncio.to_thread(measure)
    await bus.close()
    return speed


def subproc_stepping(num_envs: int) -> float:
    """Env-steps/s of random vector steps through SB3's SubprocVecEnv alone."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    return stepping_rate(make_vec_env(slow_env(), n_envs=num_envs, seed=0, vec_env_cls=SubprocVecEnv))


def stepping_rate(env: VecEnv) -> float:
    """Env-steps/s of `STEPS` random vector steps of `env` (closed after)."""
    env.reset()
    actions = np.random.default_rng(0).integers(0, 2, size=(STEPS, env.num_envs))
    start = time.perf_counter()
    for act in actions:
        env.step(act)
    elapsed = time.perf_counter() - start
    env.close()
    return STEPS * env.num_envs / elapsed


@contextlib.contextmanager
def ddp_data() -> Iterator[Path]:
    """The data-parallel job's rows and config, as files the torchrun script reads too."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(DDP_ROWS, DDP_FEATURES)).astype(np.float32)
        y = (x[:, :4].sum(axis=1) + 0.5 * rng.normal(size=DDP_ROWS) > 0).astype(int)
        rows = [{**{f"f{j}": float(v) for j, v in enumerate(r)}, "label": int(t)} for r, t in zip(x, y, strict=True)]
        (folder / "rows.json").write_text(json.dumps(rows))
        yield folder


def ddp_forseti(folder: Path, world_size: int) -> tuple[float, float, float]:
    """(wall s, training s, samples/s) of one job through Forseti's `train`, in a fresh process as a
    worker's child would run it (torch imported before the clock starts, as in a warm worker)."""
    out = folder / f"forseti-{world_size}.json"
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("ddp_rank.py")),
            "forseti",
            str(folder),
            str(world_size),
            str(out),
        ],
        check=True,
    )
    figures = json.loads(out.read_text())
    return figures["wall"], figures["training"], figures["samples_per_second"]


def ddp_torchrun(folder: Path, world_size: int) -> tuple[float, float]:
    """(wall s, training s) of the same training under a bare `torchrun`, timed from the command, less
    the time its ranks spent reading and preparing the data (which Forseti's job did before the call)."""
    out = folder / f"torchrun-{world_size}.json"
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            str(Path(__file__).with_name("ddp_rank.py")),
            "torchrun",
            str(folder),
            str(world_size),
            str(out),
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    figures = json.loads(out.read_text())
    return wall - figures["prep"], figures["training"]


async def main() -> str:
    logging.getLogger("forseti").setLevel(logging.WARNING)
    runs: dict[tuple[str, int], list[float]] = {}
    stepping: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as nats_server:
        url = nats_server.url
        for envs in (8, 16):
            for processes in (1, 2, 4):
                layout = f"Forseti, {processes} executor(s)"
                stepping[(layout, envs)] = await forseti_stepping(url, envs, processes)
            stepping[(SUBPROC, envs)] = await asyncio.to_thread(subproc_stepping, envs)
            # PPO runs in rounds, every layout once a round: the machine's drift falls on all alike
            for _ in range(REPEATS):
                for processes in (1, 2, 4):
                    layout = f"Forseti, {processes} executor(s)"
                    runs.setdefault((layout, envs), []).append(await forseti_speed(url, envs, processes))
                runs.setdefault((SUBPROC, envs), []).append(await asyncio.to_thread(subproc_speed, envs))
                log.warning("%d envs: %s", envs, {k[0]: round(v[-1]) for k, v in runs.items() if k[1] == envs})
    speeds = {key: statistics.median(values) for key, values in runs.items()}
    ddp: dict[int, tuple[float, float, float]] = {}
    torchruns: dict[int, tuple[float, float]] = {}
    with ddp_data() as folder:
        for world_size in (1, 2):
            ddp[world_size] = ddp_forseti(folder, world_size)
        torchruns[2] = ddp_torchrun(folder, 2)
    config = TrainingConfig.model_validate(DDP_CONFIG)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/scale.py` on {platform.machine()}, {os.cpu_count()} "
        f"cores, CPU only, torch {torch.__version__}; nats-server, the worker and the executors on one machine.",
        "",
        f"PPO on `{SLOW_CARTPOLE}` (CartPole with 1 ms of CPU a step), {ROLLOUTS} rollouts of {N_STEPS} steps per "
        "sub-env, net [64, 64]. Forseti spreads the sub-envs over `forseti executor` processes (one session on "
        "each, stepped at once); SB3's SubprocVecEnv runs one process per sub-env (it cannot hold several in one).",
        "",
        f"PPO figures are medians of {REPEATS} runs; stepping alone is {STEPS} random vector steps, no "
        "policy and no update: what spreading the sub-envs speeds up.",
        "",
        "| env layout | PPO env-steps/s, 8 envs | 16 envs | stepping alone, 8 envs | 16 envs |",
        "| --- | --- | --- | --- | --- |",
    ]
    layouts = ["Forseti, 1 executor(s)", "Forseti, 2 executor(s)", "Forseti, 4 executor(s)", SUBPROC]
    for layout in layouts:
        lines.append(
            f"| {layout} | {speeds[(layout, 8)]:,.0f} | {speeds[(layout, 16)]:,.0f} | "
            f"{stepping[(layout, 8)]:,.0f} | {stepping[(layout, 16)]:,.0f} |"
        )
    wall1, train1, sps1 = ddp[1]
    wall2, train2, sps2 = ddp[2]
    torchrun_wall, torchrun_train = torchruns[2]
    launch = (wall2 - train2) - (torchrun_wall - torchrun_train)
    lines += [
        "",
        f"Data-parallel training (gloo): a classifier, {DDP_ROWS:,} rows x {DDP_FEATURES} features, hidden "
        f"{list(config.hidden)}, batch {config.batch_size}, {config.epochs} epochs. Wall time counts from the call "
        "(Forseti: `train()` in a process with torch imported, as in a warm worker; torchrun: the command) to "
        "the end; training time is the epochs' own.",
        "",
        "| run | wall s | training s | samples/s | efficiency |",
        "| --- | --- | --- | --- | --- |",
        f"| Forseti, world_size 1 | {wall1:.1f} | {train1:.1f} | {sps1:,.0f} | 1.00 |",
        f"| Forseti, world_size 2 | {wall2:.1f} | {train2:.1f} | {sps2:,.0f} | {sps2 / (2 * sps1):.2f} |",
        f"| bare torchrun, 2 ranks | {torchrun_wall:.1f} | {torchrun_train:.1f} | | |",
    ]
    two = speeds[("Forseti, 2 executor(s)", 16)] / speeds[("Forseti, 1 executor(s)", 16)]
    two_stepping = stepping[("Forseti, 2 executor(s)", 16)] / stepping[("Forseti, 1 executor(s)", 16)]
    checks = [
        ("two executors >= 1.7x one (PPO, 16 envs)", f"{two:.2f}x", two >= 1.7),
        ("... stepping alone", f"{two_stepping:.2f}x", two_stepping >= 1.7),
    ]
    for envs in (8, 16):
        for processes in (2, 4):
            ratio = speeds[(f"Forseti, {processes} executor(s)", envs)] / speeds[(SUBPROC, envs)]
            checks.append(
                (f"Forseti, {processes} executors >= 1.0x SubprocVecEnv ({envs} envs)", f"{ratio:.2f}x", ratio >= 1)
            )
    checks += [
        ("launch + rendezvous over a bare torchrun <= 3 s", f"{launch:+.1f} s", launch <= 3),
        ("... and <= 5% of a 60 s job", f"{100 * max(launch, 0) / 60:.1f}%", launch <= 3),
    ]
    lines += verdicts(checks, "target (issue 16)")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    section = run_loop(main())
    write_section("bench/scale.py", "## Scale (`bench/scale.py`)\n\n" + section)
    print(section)
