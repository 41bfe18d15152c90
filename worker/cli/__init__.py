"""The `forseti` command."""

from . import (
    federation,  # registers `coordinator` and `federate` on the app
    rollouts,  # registers `models rollout`, `models rollouts` and `models rollout-abort`
    schedules,  # registers `schedules ...`
)
from .commands import app, main

__all__ = ["app", "federation", "main", "rollouts", "schedules"]
