"""The remote environment protocol on `forseti.env.<executor_id>` (request-reply)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from .base import Id, LongText, ShortText, Strict
from .errors import ErrorCode

ReplicaId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]
"""One replica of an executor: its executor id and `.replica-<name>`."""
SessionToken = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,128}$")]
"""A secret the opener of a session chooses; the session answers only requests that carry it."""
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
    """Client-chosen session id (a worker sends its job id and a random suffix, new for every attempt)."""
    environment: ShortText | None = None
    """The env id the client expects; refused when the executor serves another."""
    token: SessionToken | None = None
    """A secret chosen by the opener: the session's later requests must carry it, so nobody else on
    the bus can step, reset or close it (None: an open session, for clients that predate tokens)."""
    client: ShortText | None = None
    """Who opens it (a worker's id): an executor limits the sessions one client holds."""
    num_envs: int | None = Field(default=None, ge=1, le=1024)
    """Sub-envs the session should hold (None: as many as the executor serves by default)."""
    avoid: list[ReplicaId] = Field(default_factory=list, max_length=32)
    """Replicas that already hold a session of the same job: one of them refuses the open (retriable
    `resource_exhausted`) so that the queue group offers it to another replica of the pool."""


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class EnvReset(Strict):
    """`forseti.env.reset.v1`: reset every sub-env of a session."""

    session_id: Id
    """The session."""
    seeds: list[Seed | None] = Field(default_factory=list, max_length=1024)
    """One seed per sub-env (SB3 passes seed + i); empty or null for no seeding."""
    token: SessionToken | None = None
    """The secret the session was opened with."""


class EnvStep(Strict):
    """`forseti.env.step.v1`: one vector step, the actions of all sub-envs."""

    session_id: Id
    """The session."""
    step: int = Field(ge=0)
    """Vector step number, for error messages and ordering."""
    actions: list[Any] = Field(max_length=1024)
    """One action per sub-env."""
    token: SessionToken | None = None
    """The secret the session was opened with."""


class EnvClose(Strict):
    """`forseti.env.close.v1`: end a session."""

    session_id: Id
    """The session."""
    token: SessionToken | None = None
    """The secret the session was opened with."""


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
    executor_id: ReplicaId | None = None
    """Where the session's later requests go: the replica that holds it, when several executors serve
    one id (None: the id it was opened on)."""
    agents: list[ShortText] = Field(default_factory=list, max_length=1024)
    """A multi-agent env: the agent each sub-env is (copies of the team, in turn); empty otherwise."""


class EnvError(Strict):
    """`forseti.env.error.v1`: the reply when the executor cannot do what was asked."""

    session_id: ShortText
    """The session, as the request named it."""
    code: ErrorCode
    """Machine-readable reason (invalid_task for a bad request, invalid_data for a rejected action)."""
    message: LongText
    """What was wrong, naming the field."""
    retriable: bool = False
    """True when the request may succeed if made again: the executor is full (open), or it no longer
    holds the session, as after a restart (a session's requests; open it again)."""


class EnvTransition(Strict):
    """`forseti.env.transition.v1`: the reply to reset and step."""

    session_id: Id
    """The session."""
    step: int = Field(ge=0)
    """The step this answers."""
    observations: list[Any] = Field(default_factory=list, max_length=1024)
    """One observation per sub-env (empty in the reply to close)."""
    rewards: list[float] = Field(default_factory=list, max_length=1024)
    """One reward per sub-env (empty after reset)."""
    terminated: list[bool] = Field(default_factory=list, max_length=1024)
    """Episode ended in a terminal state."""
    truncated: list[bool] = Field(default_factory=list, max_length=1024)
    """Episode cut off by a time limit."""
    infos: list[dict[str, Any]] = Field(default_factory=list, max_length=1024)
    """Per-sub-env info; `terminal_observation` after an auto-reset."""
