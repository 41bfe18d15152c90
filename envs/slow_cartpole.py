"""SlowCartPole: CartPole whose every step costs `step_cost_ms` of CPU, as a physics simulator's
would. A benchmark env (`bench/scale.py`): it makes the cost of stepping envs, which spreading them
over processes or executors divides, large against the cost of the policy and the transport."""

from __future__ import annotations

import time
from typing import Any, SupportsFloat

import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class SlowCartPoleEnv(CartPoleEnv):
    """CartPole-v1 (500-step episodes), each step busy for `step_cost_ms` milliseconds of CPU."""

    def __init__(self, step_cost_ms: float = 1.0, render_mode: str | None = None) -> None:
        super().__init__(render_mode=render_mode)
        self.step_cost = step_cost_ms / 1000
        self._steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A new episode."""
        self._steps = 0
        observation, info = super().reset(seed=seed, options=options)
        return np.asarray(observation), dict(info)

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """CartPole's step, after `step_cost_ms` of work (a spin, not a sleep: it holds a core)."""
        end = time.perf_counter() + self.step_cost
        while time.perf_counter() < end:
            pass
        obs, reward, terminated, truncated, info = super().step(action)  # type: ignore[no-untyped-call]
        self._steps += 1
        return obs, reward, terminated, truncated or self._steps >= 500, info
