"""Multi-agent envs (PettingZoo `ParallelEnv`) trained with parameter sharing: one policy for every
agent, each agent a sub-env of an SB3 VecEnv, through SuperSuit (the Farama library made for this).
Agents must be alike (one observation space, one action space); their rewards stay their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pettingzoo import ParallelEnv
from stable_baselines3.common.vec_env import VecEnv
from supersuit.vector.sb3_vector_wrapper import SB3VecEnvWrapper

from . import multi_agent_factory, team_vec_env

__all__ = ["multi_agent_factory", "shared_policy_vec_env"]


class _SeededVecEnv(SB3VecEnvWrapper):  # type: ignore[misc]  # supersuit ships no type information
    """SuperSuit's SB3 wrapper, seedable: SB3 2.x seeds a VecEnv through `seed()`, which SuperSuit
    3.11's concatenated env lacks (AttributeError); the seed goes to its next reset instead."""

    def __init__(self, venv: Any, agents: list[str]) -> None:
        super().__init__(venv)
        self._seed: int | None = None
        self.sub_env_agents = agents
        """The agent each sub-env is: SuperSuit lays out each copy's agents in turn."""

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seed the next reset."""
        self._seed = seed
        return [seed] * self.num_envs

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        """A sub-env attribute: only `render_mode` (None: nothing draws), which SB3 asks every
        VecEnv for; SuperSuit keeps no other per sub-env."""
        if attr_name != "render_mode":
            raise AttributeError(attr_name)
        return [None] * len(self._get_indices(indices))

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> np.ndarray:
        """Reset every copy (with the stored seed, once)."""
        seed, self._seed = (seed if seed is not None else self._seed), None
        observations, self.reset_infos = self.venv.reset(seed=seed)
        return np.asarray(observations)


def shared_policy_vec_env(make: Callable[[], ParallelEnv], copies: int) -> VecEnv:
    """`copies` of the env, each agent of each a sub-env (copies x agents in all), for one policy."""
    team = make()
    return _SeededVecEnv(team_vec_env(team, copies), [agent for _ in range(copies) for agent in team.possible_agents])
