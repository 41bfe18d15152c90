"""SensorAnomaly: flag anomalous readings in a sensor stream (the seed's anomaly-detection use case).

The agent sees the last `window` readings of a noisy periodic signal in which spikes and level
shifts appear now and then, and says for the newest reading whether it is anomalous. +1 for a
caught anomaly, -1 for a missed one, -0.2 for a false alarm, 0 otherwise. Episodes last
`episode_length` readings and end by truncation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

REWARDS = {(True, True): 1.0, (True, False): -1.0, (False, True): -0.2, (False, False): 0.0}
"""Reward by (the reading is anomalous, the agent flagged it)."""


class SensorAnomalyEnv(gym.Env[np.ndarray, np.int64]):
    """Flag the anomalous readings of a sensor."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium reads it from the class)

    def __init__(self, window: int = 16, episode_length: int = 200, anomaly_rate: float = 0.05) -> None:
        self.window, self.episode_length, self.anomaly_rate = window, episode_length, anomaly_rate
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(window,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self._readings = np.zeros(window, dtype=np.float32)
        self._anomalous = False
        self._t = 0
        self._phase = 0.0

    def _reading(self) -> float:
        self._t += 1
        value = np.sin(self._phase + self._t * 2 * np.pi / 24) + self.np_random.normal(0.0, 0.1)
        self._anomalous = bool(self.np_random.random() < self.anomaly_rate)
        if self._anomalous:
            value += float(self.np_random.choice([-1.0, 1.0]) * self.np_random.uniform(2.0, 4.0))
        return float(np.clip(value, -10.0, 10.0))

    def _observe(self) -> np.ndarray:
        self._readings = np.roll(self._readings, -1)
        self._readings[-1] = self._reading()
        return self._readings.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new stream, with a window of readings already in."""
        super().reset(seed=seed)
        self._t, self._phase = 0, float(self.np_random.uniform(0, 2 * np.pi))
        self._readings = np.zeros(self.window, dtype=np.float32)
        for _ in range(self.window):
            obs = self._observe()
        return obs, {}

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Judge the newest reading; the next one arrives."""
        anomalous = self._anomalous
        reward = REWARDS[(anomalous, int(action) == 1)]
        info = {"anomalous": anomalous}
        return self._observe(), reward, False, self._t >= self.episode_length + self.window, info
