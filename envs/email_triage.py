"""EmailTriage: sort a stream of emails into categories (the seed's mail-assistant use case).

Each email is a feature vector (sender reputation, links, attachments, urgency words, length, ...)
drawn around its category's prototype; the agent picks a category per email. +1 for the right one,
-1 for a wrong one, -2 for letting spam into the inbox. An episode is a stream of `episode_length`
emails; it terminates when the stream ends.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CATEGORIES = ("inbox", "spam", "urgent", "newsletter")
FEATURES = (
    "sender_reputation",
    "links",
    "attachments",
    "urgency_words",
    "length",
    "recipients",
    "known_thread",
    "unsubscribe_link",
)
PROTOTYPES = np.array(
    [
        # rep  links attach urgent length recip thread unsub
        [0.8, 0.2, 0.3, 0.1, 0.5, 0.2, 0.7, 0.0],  # inbox
        [0.1, 0.9, 0.4, 0.6, 0.3, 0.9, 0.0, 0.3],  # spam
        [0.7, 0.1, 0.2, 0.9, 0.3, 0.3, 0.5, 0.0],  # urgent
        [0.5, 0.7, 0.0, 0.1, 0.8, 0.8, 0.0, 1.0],  # newsletter
    ],
    dtype=np.float32,
)


def filing_reward(label: int, chosen: int) -> float:
    """The reward for filing an email of category `label` as `chosen`: +1 right, -2 for spam let into
    the inbox, -1 for any other mistake."""
    if chosen == label:
        return 1.0
    if label == CATEGORIES.index("spam") and chosen == CATEGORIES.index("inbox"):
        return -2.0
    return -1.0


class EmailTriageEnv(gym.Env[np.ndarray, np.int64]):
    """Pick the category of each email in a stream."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium reads it from the class)

    def __init__(self, episode_length: int = 50, noise: float = 0.15) -> None:
        self.episode_length, self.noise = episode_length, noise
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = spaces.Discrete(len(CATEGORIES))
        self._label = 0
        self._seen = 0

    def _next_email(self) -> np.ndarray:
        self._label = int(self.np_random.integers(len(CATEGORIES)))
        noise = self.np_random.normal(0.0, self.noise, size=len(FEATURES)).astype(np.float32)
        email: np.ndarray = np.clip(PROTOTYPES[self._label] + noise, 0.0, 1.0).astype(np.float32)
        return email

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new stream."""
        super().reset(seed=seed)
        self._seen = 0
        return self._next_email(), {}

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """File the current email; the next one arrives."""
        label, chosen = self._label, int(action)
        reward = filing_reward(label, chosen)
        self._seen += 1
        info = {"label": label, "correct": chosen == label}
        return self._next_email(), reward, self._seen >= self.episode_length, False, info
