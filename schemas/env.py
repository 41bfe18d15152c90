"""The remote environment protocol on `forseti.env.<executor_id>` (request-reply)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import Id, ShortText, Strict

Shape = Annotated[list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(max_length=8)]


class SpaceSpec(Strict):
    """A gymnasium space: Box, Discrete, MultiDiscrete or MultiBinary."""

    type: Literal["box", "discrete", "multi_discrete", "multi_binary"]
    """Which space."""
    shape: Shape = Field(default_factory=list)
    """Element shape."""
    dtype: ShortText = "float32"
    """numpy dtype name."""
    low: list[Any] | None = None
    """Box lower bounds, flattened (floats; -inf as the string "-Infinity")."""
    high: list[Any] | None = None
    """Box upper bounds, flattened."""
    n: int | None = Field(default=None, ge=1)
    """Discrete: number of actions."""
    nvec: list[Annotated[int, Field(ge=1)]] | None = None
    """MultiDiscrete: actions per dimension."""


class EnvOpen(Strict):
    """`forseti.env.open.v1`: start a session on an executor."""

    session_id: Id
    """Client-chosen session id (the job id, usually)."""
    environment: ShortText | None = None
    """Env id to open, when the executor serves more than one."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Seed for the sub-envs."""


class EnvReset(Strict):
    """`forseti.env.reset.v1`: reset every sub-env of a session."""

    session_id: Id
    """The session."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Seed for this reset."""


class EnvStep(Strict):
    """`forseti.env.step.v1`: one vector step, the actions of all sub-envs."""

    session_id: Id
    """The session."""
    step: int = Field(ge=0)
    """Vector step number, for error messages and ordering."""
    actions: list[Any] = Field(max_length=1024)
    """One action per sub-env."""


class EnvClose(Strict):
    """`forseti.env.close.v1`: end a session."""

    session_id: Id
    """The session."""


class EnvSpec(Strict):
    """`forseti.env.spec.v1`: the reply to open: what the session looks like."""

    session_id: Id
    """The session."""
    observation_space: SpaceSpec
    """Observation space of one sub-env."""
    action_space: SpaceSpec
    """Action space of one sub-env."""
    num_envs: int = Field(ge=1, le=1024)
    """Sub-envs stepped together."""


class EnvTransition(Strict):
    """`forseti.env.transition.v1`: the reply to reset and step."""

    session_id: Id
    """The session."""
    step: int = Field(ge=0)
    """The step this answers."""
    observations: list[Any] = Field(max_length=1024)
    """One observation per sub-env."""
    rewards: list[float] = Field(default_factory=list, max_length=1024)
    """One reward per sub-env (empty after reset)."""
    terminated: list[bool] = Field(default_factory=list, max_length=1024)
    """Episode ended in a terminal state."""
    truncated: list[bool] = Field(default_factory=list, max_length=1024)
    """Episode cut off by a time limit."""
    infos: list[dict[str, Any]] = Field(default_factory=list, max_length=1024)
    """Per-sub-env info; `terminal_observation` after an auto-reset."""
