"""Learning quality through Forseti: does the policy learn as well with the env on a remote executor?

    python bench/rl_learning.py [--seeds 0 1]

PPO on CartPole-v1 (100k timesteps, 4 sub-envs) and SAC on Pendulum-v1 (20k steps), each with the env
on an executor over a real nats-server and with the env inside the worker, through the Worker and the
RL handler exactly as a task would run. Targets (issue 3): PPO remote >= 475 mean evaluation reward
within 100k timesteps; SAC remote >= -250 within 20k. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from report import write_section
from rl_common import run_rl

from forseti.adapters.bus.servers import NatsServer
from forseti.worker.engine.loop import run as run_loop

CASES: list[tuple[str, dict[str, Any], int, float]] = [
    (
        "PPO CartPole-v1",
        {
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "config": {"total_timesteps": 100_000, "n_steps": 256, "num_envs": 4},
            "policy": {"net_arch": [64, 64], "activation": "tanh"},
            "evaluation": {"episodes": 20},
        },
        4,
        475.0,
    ),
    (
        "SAC Pendulum-v1",
        {
            "algorithm": "sac",
            "environment": "Pendulum-v1",
            "config": {"total_timesteps": 20_000, "learning_rate": 0.001},
            "policy": {"net_arch": [256, 256], "activation": "relu"},
            "evaluation": {"episodes": 10},
        },
        1,
        -250.0,
    ),
]


async def main(seeds: list[int]) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        for name, task, num_envs, target in CASES:
            for seed in seeds:
                for where in ("remote (NATS)", "in the worker"):
                    spec = {**task, "config": {**task["config"], "seed": seed}}
                    started = time.monotonic()
                    remote = where.startswith("remote")
                    run = await run_rl(
                        server.url, spec, executor_env=task["environment"] if remote else None, num_envs=num_envs
                    )
                    metrics = run.result.metrics
                    rows.append(
                        (
                            name,
                            seed,
                            where,
                            metrics.mean_reward,
                            metrics.std_reward,
                            target,
                            time.monotonic() - started,
                            run.curve,
                        )
                    )
                    print(
                        f"{name} seed {seed} {where}: {metrics.mean_reward:.1f} ± {metrics.std_reward:.1f}", flush=True
                    )
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/rl_learning.py --seeds {' '.join(map(str, seeds))}` "
        f"on {platform.machine()}, {os.cpu_count()} cores, CPU, one torch thread; evaluation is deterministic.",
        "",
        "| run | seed | env | eval mean ± std | target | verdict | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, seed, where, mean, std, target, wall, _ in rows:
        verdict = "met" if mean >= target else "missed"
        if not where.startswith("remote"):
            verdict = "(baseline)"
        lines.append(f"| {name} | {seed} | {where} | {mean:.1f} ± {std:.1f} | ≥ {target:g} | {verdict} | {wall:.0f} |")
    lines += ["", "Learning curves (mean episode reward of the last 100 training episodes, by timestep):", ""]
    for name, seed, where, *_, curve in rows:
        points = ", ".join(f"{step // 1000}k: {reward:.0f}" for step, reward in curve)
        lines.append(f"- {name}, seed {seed}, {where}: {points}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    section = run_loop(main(args.seeds))
    print(section)
    write_section("bench/rl_learning.py", "## RL learning (`bench/rl_learning.py`)\n\n" + section)
