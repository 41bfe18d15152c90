"""TriageTeam: several triage agents share one queue of incoming emails (the seed's mail-assistant use
case, with a team). A PettingZoo `ParallelEnv`, the ecosystem's multi-agent API.

Each step, emails arrive in the shared queue (Poisson, about `load` per agent), and agent i is shown
the i-th email waiting, if there is one: its features (as in EmailTriage), the queue's fill and
whether it holds an email. It files the email in a category (+1 right, -1 wrong, -2 spam let into the
inbox, as in EmailTriage) or skips it (0: the email waits for the next step). Every agent also pays
a share of the backlog (-`backlog_cost` x the queue's fill), so what one agent leaves costs the team.
Emails past the queue's capacity are lost (-1 to every agent). An episode is `episode_length` steps;
then every agent is truncated and leaves. Agents are alike, so one policy can serve them all
(parameter sharing).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from .email_triage import CATEGORIES, FEATURES, PROTOTYPES, filing_reward

SKIP = len(CATEGORIES)
"""The action that leaves the shown email in the queue."""


class TriageTeamEnv(ParallelEnv):  # type: ignore[misc]  # pettingzoo ships no type information
    """A team of triage agents on one shared queue."""

    metadata = {"name": "triage_team_v0", "render_modes": []}  # noqa: RUF012 (PettingZoo reads it from the class)

    def __init__(
        self,
        agents: int = 3,
        *,
        episode_length: int = 50,
        capacity: int = 20,
        load: float = 0.9,
        backlog_cost: float = 0.2,
        noise: float = 0.15,
    ) -> None:
        self.possible_agents = [f"triager_{i}" for i in range(agents)]
        self.agents: list[str] = []
        self.render_mode = None  # nothing to draw; wrappers (SuperSuit) read it
        self.episode_length, self.capacity = episode_length, capacity
        self.load, self.backlog_cost, self.noise = load, backlog_cost, noise
        self._observation_space = spaces.Box(0.0, 1.0, shape=(len(FEATURES) + 2,), dtype=np.float32)
        self._action_space = spaces.Discrete(len(CATEGORIES) + 1)
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._steps = 0
        self._rng = np.random.default_rng()

    def observation_space(self, agent: str) -> spaces.Box:
        """Every agent sees the same kind of thing: an email's features, the queue's fill, a flag."""
        return self._observation_space

    def action_space(self, agent: str) -> spaces.Discrete:
        """A category, or SKIP."""
        return self._action_space

    def _arrive(self) -> int:
        """Emails arrive; the number lost to a full queue."""
        lost = 0
        for _ in range(int(self._rng.poisson(self.load * len(self.possible_agents)))):
            if len(self._queue) >= self.capacity:
                lost += 1
                continue
            label = int(self._rng.integers(len(CATEGORIES)))
            noise = self._rng.normal(0.0, self.noise, size=len(FEATURES))
            self._queue.append((label, np.clip(PROTOTYPES[label] + noise, 0.0, 1.0).astype(np.float32)))
        return lost

    def _observations(self) -> dict[str, np.ndarray]:
        fill = np.float32(len(self._queue) / self.capacity)
        observations = {}
        for i, agent in enumerate(self.agents):
            if i < len(self._queue):
                email, holds = self._queue[i][1], np.float32(1.0)
            else:
                email, holds = np.zeros(len(FEATURES), dtype=np.float32), np.float32(0.0)
            observations[agent] = np.concatenate([email, [fill, holds]]).astype(np.float32)
        return observations

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """A new episode: an empty queue, then the first arrivals."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self._queue.clear()
        self._steps = 0
        self._arrive()
        return self._observations(), {agent: {} for agent in self.agents}

    def step(
        self, actions: dict[str, np.int64 | int]
    ) -> tuple[
        dict[str, np.ndarray],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        """Each agent files or skips the email it was shown; then new emails arrive."""
        rewards = dict.fromkeys(self.agents, 0.0)
        infos: dict[str, dict[str, Any]] = {agent: {} for agent in self.agents}
        filed = []
        for i, agent in enumerate(self.agents):
            chosen = int(actions.get(agent, SKIP))
            if i >= len(self._queue) or chosen == SKIP:
                continue
            label = self._queue[i][0]
            rewards[agent] += filing_reward(label, chosen)
            infos[agent] = {"label": label, "correct": chosen == label}
            filed.append(i)
        for i in reversed(filed):  # from the back, so the positions still hold
            del self._queue[i]
        lost = self._arrive()
        shared = self.backlog_cost * len(self._queue) / self.capacity + lost
        for agent in self.agents:
            rewards[agent] -= shared
        self._steps += 1
        observations = self._observations()
        ended = self._steps >= self.episode_length
        terminations = dict.fromkeys(self.agents, False)
        truncations = dict.fromkeys(self.agents, ended)
        if ended:
            self.agents = []
        return observations, rewards, terminations, truncations, infos
