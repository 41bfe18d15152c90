"""Gymnasium environments: Forseti's own (registered as `forseti/...`), the executor SDK, the remote VecEnv."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENV_IDS = ("forseti/EmailTriage-v0", "forseti/SensorAnomaly-v0")
SLOW_CARTPOLE = "forseti/SlowCartPole-v0"
"""CartPole with 1 ms of CPU a step (`step_cost_ms`): the benchmarks' costly env (`bench/scale.py`)."""
MULTI_AGENT_ENVS = {"forseti/TriageTeam-v0": "forseti.envs.triage_team:TriageTeamEnv"}
"""Forseti's own multi-agent envs (PettingZoo ParallelEnv), by the id a task names them with: trained
with parameter sharing (`envs/multi_agent.py`)."""


def multi_agent_factory(env_id: str) -> Callable[[], Any]:
    """The constructor of the multi-agent env `env_id` (one of MULTI_AGENT_ENVS): a PettingZoo
    ParallelEnv class, imported on first use."""
    module, _, name = MULTI_AGENT_ENVS[env_id].partition(":")
    cls: Callable[[], Any] = getattr(importlib.import_module(module), name)
    return cls


def team_vec_env(team: Any, copies: int) -> Any:
    """SuperSuit's gymnasium vector env of `copies` of a ParallelEnv's team, each agent a sub-env (each
    copy's agents in turn); what parameter sharing steps, in a worker and on an executor alike."""
    import supersuit

    vectorised = supersuit.pettingzoo_env_to_vec_env_v1(team)
    return supersuit.concat_vec_envs_v1(vectorised, copies, num_cpus=0, base_class="gymnasium")


def register_envs() -> None:
    """Register Forseti's environments with gymnasium (idempotent)."""
    import gymnasium

    if ENV_IDS[0] in gymnasium.registry:
        return
    gymnasium.register(ENV_IDS[0], entry_point="forseti.envs.email_triage:EmailTriageEnv")
    gymnasium.register(ENV_IDS[1], entry_point="forseti.envs.sensor_anomaly:SensorAnomalyEnv")
    gymnasium.register(SLOW_CARTPOLE, entry_point="forseti.envs.slow_cartpole:SlowCartPoleEnv")
