"""Acting with an exported policy next to the env, with no bus and no worker: the executor-side helper
for devices that run their own policy (torch-free: numpy and onnxruntime).

    policy = OnnxPolicy(Path("policy.onnx"))
    returns = act_locally(gymnasium.make("CartPole-v1"), policy, episodes=5)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from forseti.adapters.inference import OnnxPolicy


def act_locally(
    env: Any, policy: OnnxPolicy, *, episodes: int = 1, seed: int | None = None, max_steps: int = 100_000
) -> list[float]:
    """Run `policy` on a gymnasium-style env (`reset` / `step`) for `episodes` episodes; each one's return."""
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=None if seed is None else seed + episode)
        total, steps, done = 0.0, 0, False
        while not done and steps < max_steps:
            (action,) = policy.act(np.asarray(observation)[None])
            observation, reward, terminated, truncated, _ = env.step(action.item() if action.ndim == 0 else action)
            total, steps, done = total + float(reward), steps + 1, bool(terminated or truncated)
        returns.append(total)
    return returns
