"""Gymnasium environments: Forseti's own (registered as `forseti/...`), the executor SDK, the remote VecEnv."""

from __future__ import annotations

ENV_IDS = ("forseti/EmailTriage-v0", "forseti/SensorAnomaly-v0")


def register_envs() -> None:
    """Register Forseti's environments with gymnasium (idempotent)."""
    import gymnasium

    if ENV_IDS[0] in gymnasium.registry:
        return
    gymnasium.register(ENV_IDS[0], entry_point="forseti.envs.email_triage:EmailTriageEnv")
    gymnasium.register(ENV_IDS[1], entry_point="forseti.envs.sensor_anomaly:SensorAnomalyEnv")
