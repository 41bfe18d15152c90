"""The executor SDK: serve any gymnasium env (or any object with `reset` / `step`) over the bus.

    server = EnvServer(bus, "thor-1", lambda: gymnasium.make("CartPole-v1"), num_envs=8)
    await server.start()        # answers forseti.env.thor-1 until stop()

One server holds many sessions at once (one per RL job); each session owns `num_envs` sub-envs (or
as many as its open asks for, up to `max_envs_per_session`), stepped together so the bus cost is
paid once per vector step. Auto-reset follows SB3's VecEnv:
a finished sub-env is reset at once, its last observation sent as `terminal_observation` in its
info. This module needs gymnasium and numpy only (no torch), so an action system can embed it.

Several servers may serve one executor id, as replicas: they share `forseti.env.<id>` as a queue
group, so each open reaches one of them, and the replica that opened a session names itself in
its spec (`<id>.replica-<name>`), where the session's later requests go. A full server answers an
open with a retriable `resource_exhausted` (after closing the sessions silent for `session_idle`,
whose jobs are gone); one asked about a session it does not hold (it was restarted) answers a
retriable `session_lost`, and the client opens the session again.

A session belongs to whoever opened it: the opener chooses a secret `token`, and the session
answers only requests that carry it (others get `forbidden`), so nobody else on the bus can step,
reset or close another job's session, nor take it over by opening it again. One client (the
`client` an open names, a worker's id) holds at most `max_sessions_per_client` sessions, so a single
client cannot fill the executor.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, SupportsFloat, cast

from gymnasium import spaces

from forseti.adapters import tracing
from forseti.adapters.bus import Bus, Message, Subscription
from forseti.schemas.base import Strict
from forseti.schemas.catalog import env_channel
from forseti.schemas.env import EnvClose, EnvError, EnvOpen, EnvReset, EnvSpec, EnvStep, EnvTransition
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, InvalidTask

from .spaces import check_batch, space_to_spec, to_wire

log = logging.getLogger(__name__)


class EnvLike(Protocol):
    """What an executor can serve: gymnasium's Env API."""

    @property
    def observation_space(self) -> spaces.Space[Any]:
        """What one observation looks like."""

    @property
    def action_space(self) -> spaces.Space[Any]:
        """What one action looks like."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Start an episode."""

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Act once."""

    def close(self) -> None:
        """Release resources."""


@dataclass
class Session:
    """The sub-envs of one client."""

    envs: list[EnvLike]
    token: str | None = None
    """The secret its requests must carry (None: opened by a client without one)."""
    client: str | None = None
    """Who opened it."""
    last_step: int = -1
    used: float = field(default_factory=time.monotonic)
    """When its client last asked anything (time.monotonic)."""

    @property
    def num_envs(self) -> int:
        """Its sub-envs."""
        return len(self.envs)

    def close(self) -> None:
        """Close its envs."""
        for env in self.envs:
            env.close()

    def reset(self, session_id: str, seeds: list[int | None]) -> EnvTransition:
        observations, infos = [], []
        for i, env in enumerate(self.envs):
            obs, info = env.reset(seed=seeds[i] if i < len(seeds) else None)
            observations.append(to_wire(obs))
            infos.append(to_wire(info))
        # model_construct: the executor's own reply needs no validation here; the receiving worker checks it
        return EnvTransition.model_construct(
            session_id=session_id,
            step=0,
            observations=observations,
            infos=infos,
            rewards=[],
            terminated=[],
            truncated=[],
        )

    def step(self, session_id: str, number: int, actions: list[Any]) -> EnvTransition:
        space = self.envs[0].action_space
        batch = check_batch(actions, space, len(self.envs), "actions")
        # a Discrete env takes Python ints: tolist() makes them in one call
        per_env = batch.tolist() if isinstance(space, spaces.Discrete) else batch
        observations, rewards, terminated, truncated, infos = [], [], [], [], []
        for env, action in zip(self.envs, per_env, strict=True):
            obs, reward, term, trunc, info = env.step(action)
            if term or trunc:
                info = {**info, "terminal_observation": obs}
                obs, _ = env.reset()
            observations.append(to_wire(obs))
            rewards.append(float(reward))
            terminated.append(bool(term))
            truncated.append(bool(trunc))
            infos.append(to_wire(info) if info else {})
        self.last_step = number
        return EnvTransition.model_construct(
            session_id=session_id,
            step=number,
            observations=observations,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            infos=infos,
        )


class TeamSession(Session):
    """A multi-agent session: copies of a PettingZoo ParallelEnv's team, each agent a sub-env (the
    layout SuperSuit gives SB3 for parameter sharing: one policy acts for every agent). SuperSuit's
    vector env resets a copy when all its agents are done and puts the last observation in each
    agent's info as `terminal_observation`, as a single-agent session does."""

    def __init__(self, team: Any, copies: int, *, token: str | None, client: str | None) -> None:
        from . import team_vec_env

        super().__init__([], token=token, client=client)
        self.agents = list(team.possible_agents) * copies
        """The agent each sub-env is."""
        self.space = team.action_space(team.possible_agents[0])
        self.vec = team_vec_env(team, copies)

    @property
    def num_envs(self) -> int:
        """Its sub-envs: copies x agents."""
        return len(self.agents)

    def reset(self, session_id: str, seeds: list[int | None]) -> EnvTransition:
        observations, infos = self.vec.reset(seed=seeds[0] if seeds else None)
        return EnvTransition.model_construct(
            session_id=session_id,
            step=0,
            observations=[to_wire(o) for o in observations],
            infos=[to_wire(i) if i else {} for i in infos],
            rewards=[],
            terminated=[],
            truncated=[],
        )

    def step(self, session_id: str, number: int, actions: list[Any]) -> EnvTransition:
        batch = check_batch(actions, self.space, self.num_envs, "actions")
        observations, rewards, terminated, truncated, infos = self.vec.step(batch)
        self.last_step = number
        return EnvTransition.model_construct(
            session_id=session_id,
            step=number,
            observations=[to_wire(o) for o in observations],
            rewards=[float(r) for r in rewards],
            terminated=[bool(t) for t in terminated],
            truncated=[bool(t) for t in truncated],
            infos=[to_wire(i) if i else {} for i in infos],
        )

    def close(self) -> None:
        """Close the team's copies."""
        self.vec.close()


def team_of(env: Any) -> list[str]:
    """The agents of a PettingZoo ParallelEnv (empty for a gymnasium env)."""
    try:
        from pettingzoo import ParallelEnv
    except ImportError:  # an executor without the multi-agent library serves gymnasium envs only
        return []
    return list(env.possible_agents) if isinstance(env, ParallelEnv) else []


class EnvServer:
    """Serves sessions of `num_envs` sub-envs made by `make_env` on `forseti.env.<executor_id>`."""

    def __init__(
        self,
        bus: Bus,
        executor_id: str,
        make_env: Callable[[], EnvLike],
        *,
        num_envs: int = 1,
        environment: str | None = None,
        max_sessions: int = 64,
        max_sessions_per_client: int | None = None,
        replica: str | None = None,
        session_idle: float = 600.0,
        max_envs_per_session: int = 256,
        trace_steps_every: int = 100,
    ) -> None:
        self.bus, self.executor_id, self.make_env = bus, executor_id, make_env
        self.num_envs, self.environment, self.max_sessions = num_envs, environment, max_sessions
        self.max_sessions_per_client = max_sessions_per_client or max(1, max_sessions // 4)
        """Sessions one client may hold at once (a quarter of `max_sessions` unless given)."""
        if replica is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", replica):
            raise ValueError(f"replica name {replica!r}: 1-64 of A-Z a-z 0-9 _ -")
        self.replica = f"{executor_id}.replica-{replica or uuid.uuid4().hex[:8]}"
        """This server's own id, where the requests of the sessions it opened come."""
        self.max_envs_per_session = max(max_envs_per_session, num_envs)
        """The most sub-envs one open may ask for (`EnvOpen.num_envs`)."""
        self.session_idle = session_idle
        """Seconds after which a silent session may be closed to make room (its job is gone)."""
        self.trace_steps_every = trace_steps_every
        """With tracing on: one step in this many gets a span (opens, resets and closes always do)."""
        self.sessions: dict[str, Session] = {}
        self.refused = 0
        """Requests refused for not carrying their session's token."""
        self._subs: list[Subscription] = []
        probe: Any = make_env()
        self.agents = team_of(probe)
        """A multi-agent env's agents (its sessions hold copies of the team); empty for a gymnasium env."""
        if self.agents:
            first = self.agents[0]
            self.spaces = (space_to_spec(probe.observation_space(first)), space_to_spec(probe.action_space(first)))
        else:
            self.spaces = (space_to_spec(probe.observation_space), space_to_spec(probe.action_space))
        probe.close()

    @property
    def channel(self) -> str:
        """Where requests arrive."""
        return env_channel(self.executor_id)

    async def start(self) -> None:
        """Answer requests: opens shared with the other replicas of this id, a session's own here."""
        group = f"forseti-executors.{self.executor_id}"
        self._subs.append(await self.bus.subscribe(self.channel, self._on_request, queue=group))
        self._subs.append(await self.bus.subscribe(env_channel(self.replica), self._on_request))
        log.info(
            "executor %s serving %s x%d on %s (replica %s)",
            self.executor_id,
            self.environment or "env",
            self.num_envs,
            self.channel,
            self.replica,
        )

    async def stop(self) -> None:
        """Stop answering and close every session's envs."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()
        for session_id in list(self.sessions):
            self._close(session_id)

    async def _on_request(self, msg: Message) -> None:
        session_id = "_"
        try:
            event: Event[Strict] = decode(msg.data)
            request: Strict = event.data
            session_id = getattr(request, "session_id", "_")
            sampled = not isinstance(request, EnvStep) or request.step % self.trace_steps_every == 0
            attributes = {"forseti.executor": self.replica, "forseti.session": session_id}
            name = f"forseti.env {type(request).__name__}"
            span = tracing.span(name, parent=event, kind="server", attributes=attributes) if sampled else nullcontext()
            with span:
                reply: EnvSpec | EnvTransition | EnvError = self.handle(request)
        except InvalidTask as exc:
            reply = EnvError(session_id=session_id, code=ErrorCode.INVALID_TASK, message=exc.message)
        except ForsetiError as exc:
            reply = EnvError(session_id=session_id, code=exc.code, message=exc.message, retriable=exc.retriable)
        except Exception as exc:  # the env's own bug: the trainer must hear of it, not wait out a timeout
            log.exception("session %s: the env failed", session_id)
            reply = EnvError(
                session_id=session_id,
                code=ErrorCode.HANDLER_ERROR,
                message=f"the env raised {type(exc).__name__}: {exc}"[:4096],
            )
        if msg.reply is not None:
            await msg.respond(encode(reply, subject=session_id))

    def handle(self, request: object) -> EnvSpec | EnvTransition | EnvError:
        """Answer one request (synchronously: stepping small envs inline beats a thread hop)."""
        if isinstance(request, EnvOpen):
            return self._open(request)
        if not isinstance(request, EnvReset | EnvStep | EnvClose):
            raise InvalidTask(f"{type(request).__name__} is not an env request")
        session = self.sessions.get(request.session_id)
        if session is None:  # this server was restarted, or the client asks the wrong replica
            raise ForsetiError(
                f"no session {request.session_id!r} on executor {self.replica}",
                code=ErrorCode.SESSION_LOST,
                retriable=True,
            )
        if session.token is not None and request.token != session.token:
            raise self._forbidden(request.session_id, type(request).__name__)
        session.used = time.monotonic()
        if isinstance(request, EnvClose):
            self._close(request.session_id)
            return EnvTransition(session_id=request.session_id, step=max(session.last_step, 0))
        if isinstance(request, EnvReset):
            return session.reset(request.session_id, request.seeds)
        return session.step(request.session_id, request.step, request.actions)

    def _open(self, request: EnvOpen) -> EnvSpec:
        if request.environment and self.environment and request.environment != self.environment:
            raise ForsetiError(
                f"executor {self.executor_id} serves {self.environment}, not {request.environment}",
                code=ErrorCode.INVALID_TASK,
            )
        if self.replica in request.avoid:
            raise ForsetiError(
                f"replica {self.replica} already holds a session of this job",
                code=ErrorCode.RESOURCE_EXHAUSTED,
                retriable=True,
            )
        wanted = request.num_envs or self.num_envs
        if wanted > self.max_envs_per_session:
            raise ForsetiError(
                f"num_envs {wanted}: executor {self.executor_id} makes at most {self.max_envs_per_session} per session",
                code=ErrorCode.INVALID_TASK,
            )
        held = self.sessions.get(request.session_id)
        if held is not None and held.token is not None and request.token != held.token:
            raise self._forbidden(request.session_id, "EnvOpen")
        if held is None:
            self._make_room(request.client)
            token, client = request.token, request.client
            if self.agents:  # num_envs counts copies of the team, as in a worker
                held = TeamSession(self.make_env(), wanted, token=token, client=client)
            else:
                held = Session([self.make_env() for _ in range(wanted)], token=token, client=client)
            self.sessions[request.session_id] = held
        observation, action = self.spaces
        return EnvSpec(
            session_id=request.session_id,
            observation_space=observation,
            action_space=action,
            num_envs=held.num_envs,
            executor_id=self.replica,
            agents=held.agents if isinstance(held, TeamSession) else [],
        )

    def _make_room(self, client: str | None) -> None:
        """Refuse (retriable resource_exhausted) a new session of `client` when it holds its share, or
        when the executor is full, after closing the silent sessions either way."""
        if len(self.sessions) >= self.max_sessions or self._held_by(client) >= self.max_sessions_per_client:
            self._close_idle()
        if self._held_by(client) >= self.max_sessions_per_client:
            raise ForsetiError(
                f"client {client or '(unnamed)'} already holds {self.max_sessions_per_client} sessions on "
                f"executor {self.replica}",
                code=ErrorCode.RESOURCE_EXHAUSTED,
                retriable=True,
            )
        if len(self.sessions) >= self.max_sessions:
            raise ForsetiError(
                f"executor {self.replica} already holds {self.max_sessions} sessions",
                code=ErrorCode.RESOURCE_EXHAUSTED,
                retriable=True,
            )

    def _held_by(self, client: str | None) -> int:
        return sum(1 for session in self.sessions.values() if session.client == client)

    def _forbidden(self, session_id: str, what: str) -> ForsetiError:
        """A request for a session without its token: someone other than its opener."""
        self.refused += 1
        log.warning("refused %s for session %s: it does not carry the session's token", what, session_id)
        return ForsetiError(
            f"{what} refused: session {session_id!r} belongs to the client that opened it",
            code=ErrorCode.FORBIDDEN,
        )

    def _close_idle(self) -> None:
        """Close the sessions silent for `session_idle`: their jobs ended without a close (a worker
        killed, a session opened again elsewhere), and would otherwise hold their place for ever."""
        now = time.monotonic()
        for session_id, session in list(self.sessions.items()):
            if now - session.used > self.session_idle:
                log.info("closing session %s, silent for %.0fs", session_id, now - session.used)
                self._close(session_id)

    def _close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.close()


def gym_factory(env_id: str, **kwargs: Any) -> Callable[[], EnvLike]:
    """`make_env` for a registered gymnasium id (Forseti's own envs included), or for one of Forseti's
    multi-agent envs (MULTI_AGENT_ENVS: a PettingZoo ParallelEnv, served as copies of its team)."""
    import gymnasium

    from . import MULTI_AGENT_ENVS, multi_agent_factory, register_envs

    if env_id in MULTI_AGENT_ENVS:
        team = multi_agent_factory(env_id)
        return lambda: cast(EnvLike, team(**kwargs))

    register_envs()

    def make() -> EnvLike:
        register_envs()  # again where it runs: a process it was pickled to starts without them
        env: EnvLike = gymnasium.make(env_id, **kwargs)
        return env

    return make
