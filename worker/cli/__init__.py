"""The `forseti` command."""

from . import (
    federation,  # registers `coordinator` and `federate` on the app
    schedules,  # registers `schedules ...`
)
from .commands import app, main

__all__ = ["app", "federation", "main", "schedules"]
