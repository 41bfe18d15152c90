"""RemoteVecEnv: an SB3 VecEnv whose sub-envs live on an executor across the bus.

It is called from the training thread (SB3's loop is synchronous) and hands each request to the
event loop that owns the bus, so one `step` event carries the actions of all sub-envs and one
reply brings back their observations, rewards, flags and infos. Whatever the executor sends is
checked (shape, dtype, NaN / infinity, float32 range) before SB3 sees it; an executor that does
not answer in time fails with `executor_timeout`, naming the executor and the step.

Executors come and go: while every executor of the id is full, opening waits (up to `open_wait`).
A session whose executor no longer holds it (restarted under its id) or no longer answers (killed:
another replica, or its restart, may take the session) is opened again, up to `max_reopens`
times, and that step ends every sub-env's episode (reward 0, `session_reopened` in its info)
before the new episodes start from a reset. When the open is not answered either (the broker is
away), the error stands and the job hands itself back to resume from its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from forseti.adapters.bus import Bus
from forseti.schemas.base import Strict
from forseti.schemas.catalog import env_channel
from forseti.schemas.env import EnvClose, EnvError, EnvOpen, EnvReset, EnvSpec, EnvStep, EnvTransition
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, InvalidTask, RequestTimeout

from .spaces import check_batch, check_flags, check_infos, check_rewards, spec_to_space

log = logging.getLogger(__name__)

SESSION_NAME = 110
"""Characters of the given session name kept in the session id (ids are 128 at most)."""
LOST = (ErrorCode.SESSION_LOST, ErrorCode.EXECUTOR_TIMEOUT)
"""What a session's request may meet when its executor went away: open the session again (on any
executor of the id: a restarted one, or another replica)."""


class RemoteVecEnv(VecEnv):
    """Sub-envs on executor `executor_id`, reached over `bus` from a thread other than `loop`'s."""

    def __init__(
        self,
        bus: Bus,
        executor_id: str,
        *,
        loop: asyncio.AbstractEventLoop,
        session_id: str,
        environment: str | None = None,
        step_timeout: float = 10.0,
        open_wait: float = 60.0,
        max_reopens: int = 3,
        check: Callable[[], object] | None = None,
        client: str | None = None,
    ) -> None:
        self.bus, self.executor_id, self.loop = bus, executor_id, loop
        self.client = client or f"{socket.gethostname()}-{os.getpid()}"
        """Who opens the session (this process, by default), for the executor's per-client limit."""
        self.token = secrets.token_urlsafe(24)
        """The session's secret: only requests that carry it are answered."""
        # a random suffix makes each instance's session its own: a job taken over on another host
        # never meets the session its dead worker left behind, and nobody can open one under a
        # job's id before the job does
        self.session_id = f"{session_id[:SESSION_NAME]}.{secrets.token_hex(4)}"
        """The session's id on the executor: the name given, and a random suffix."""
        self.environment, self.step_timeout = environment, step_timeout
        self.open_wait, self.max_reopens, self.check = open_wait, max_reopens, check
        self.steps = self.reopens = 0
        self._actions: np.ndarray | None = None
        self._channel = env_channel(executor_id)
        self._spec = self._open()
        spec = self._spec
        super().__init__(spec.num_envs, spec_to_space(spec.observation_space), spec_to_space(spec.action_space))

    def _open(self) -> EnvSpec:
        """Open the session on any executor of the id, waiting while every one of them is full."""
        deadline, delay = time.monotonic() + self.open_wait, 0.25
        request = EnvOpen(
            session_id=self.session_id, environment=self.environment, token=self.token, client=self.client
        )
        while True:
            try:
                spec: EnvSpec = self._call(request, EnvSpec, "open", channel=env_channel(self.executor_id))
            except ForsetiError as exc:
                full = exc.code is ErrorCode.RESOURCE_EXHAUSTED and exc.retriable
                if not full or time.monotonic() + delay > deadline:
                    raise
                log.info("%s; opening again in %.2fs", exc.message, delay)
                self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._channel = env_channel(spec.executor_id or self.executor_id)
            return spec

    def _sleep(self, seconds: float) -> None:
        """Wait, in slices short enough that a cancel (raised by `check`) is heard within one."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.check is not None:
                self.check()
            time.sleep(min(left, 0.5))

    def _reopen(self, lost: ForsetiError) -> None:
        """Open the session again after the executor lost it, or give up with what it said."""
        if self.reopens >= self.max_reopens:
            raise ForsetiError(
                f"{lost.message} (the session was opened again {self.reopens} times already)",
                code=ErrorCode.SESSION_LOST,
                retriable=True,
            )
        self.reopens += 1
        log.warning("%s: opening the session again (%d of %d)", lost.message, self.reopens, self.max_reopens)
        try:
            spec = self._open()
        except ForsetiError as exc:
            if exc.code is not ErrorCode.EXECUTOR_TIMEOUT:
                raise
            raise ForsetiError(
                f"{lost.message}, nor an open of the session again", code=lost.code, retriable=True
            ) from exc
        if (spec.num_envs, spec.observation_space, spec.action_space) != (
            self._spec.num_envs,
            self._spec.observation_space,
            self._spec.action_space,
        ):
            raise ForsetiError(
                f"executor {self.executor_id!r} came back serving other spaces or another number of sub-envs",
                code=ErrorCode.INVALID_DATA,
            )

    def _call(self, request: Strict, expect: type[Any], what: str, *, channel: str | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(
            self.bus.request(
                channel or self._channel, encode(request, subject=self.session_id), timeout=self.step_timeout
            ),
            self.loop,
        )
        try:
            raw = future.result(self.step_timeout + 5)
        except (RequestTimeout, TimeoutError) as exc:
            future.cancel()
            # retriable: a broker restarting, or an executor restarted under its id, is back within
            # seconds, and the job resumes from its checkpoint on its next attempt
            raise ForsetiError(
                f"executor {self.executor_id!r} did not answer {what} within {self.step_timeout:g}s",
                code=ErrorCode.EXECUTOR_TIMEOUT,
                retriable=True,
            ) from exc
        try:
            reply: Strict = decode(raw).data
        except InvalidTask as exc:
            raise ForsetiError(
                f"executor {self.executor_id!r} answered {what} with an invalid reply: {exc.message}",
                code=ErrorCode.INVALID_DATA,
            ) from exc
        if isinstance(reply, EnvError):
            raise ForsetiError(
                f"executor {self.executor_id!r} refused {what}: {reply.message}",
                code=reply.code,
                retriable=reply.retriable,
            )
        if not isinstance(reply, expect):
            raise ForsetiError(
                f"executor {self.executor_id!r} answered {what} with {type(reply).__name__}",
                code=ErrorCode.INVALID_DATA,
            )
        return reply

    def reset(self) -> VecEnvObs:
        """Reset every sub-env with the seeds set by `seed()`."""
        seeds = [s if s is None else int(s) % 2**32 for s in self._seeds]
        request = EnvReset(session_id=self.session_id, seeds=seeds, token=self.token)
        try:
            transition: EnvTransition = self._call(request, EnvTransition, "reset")
        except ForsetiError as exc:
            if exc.code not in LOST:
                raise
            self._reopen(exc)
            transition = self._call(request, EnvTransition, "reset")
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [dict(info) for info in transition.infos] or [{} for _ in range(self.num_envs)]
        return check_batch(transition.observations, self.observation_space, self.num_envs, "observations")

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions for step_wait."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """One round trip for all sub-envs; SB3's auto-reset semantics."""
        assert self._actions is not None, "step_async first"
        # the executor checks the actions (and names a bad one); SB3's own output needs no second check here
        actions = np.asarray(self._actions).tolist()
        self.steps += 1
        what = f"step {self.steps}"
        try:
            t: EnvTransition = self._call(
                EnvStep(session_id=self.session_id, step=self.steps, actions=actions, token=self.token),
                EnvTransition,
                what,
            )
        except ForsetiError as exc:
            if exc.code not in LOST:
                raise
            return self._episodes_cut(exc)
        observations = check_batch(t.observations, self.observation_space, self.num_envs, "observations")
        rewards = check_rewards(t.rewards, self.num_envs)
        terminated = check_flags(t.terminated, self.num_envs, "terminated")
        truncated = check_flags(t.truncated, self.num_envs, "truncated")
        infos = check_infos(t.infos, self.num_envs)  # decoding made them ours: SB3 may write into them
        for i, info in enumerate(infos):
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if "terminal_observation" in info:
                info["terminal_observation"] = check_batch(
                    [info["terminal_observation"]], self.observation_space, 1, f"infos[{i}].terminal_observation"
                )[0]
        return observations, rewards, terminated | truncated, infos

    def _episodes_cut(self, lost: ForsetiError) -> VecEnvStepReturn:
        """The step on which a lost session was opened again: every sub-env's episode ends there
        (reward 0, no terminal observation to bootstrap from) and the new ones start from a reset."""
        self._reopen(lost)
        observations = self.reset()
        infos: list[dict[str, Any]] = [{"session_reopened": True} for _ in range(self.num_envs)]
        return observations, np.zeros(self.num_envs, np.float32), np.ones(self.num_envs, bool), infos

    def close(self) -> None:
        """End the session on the executor (a gone executor is not an error here)."""
        try:
            self._call(EnvClose(session_id=self.session_id, token=self.token), EnvTransition, "close")
        except ForsetiError:
            return

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Only `render_mode` is known across the bus (remote envs do not render here)."""
        if attr_name == "render_mode":
            return [None for _ in self._get_indices(indices)]
        raise AttributeError(f"{attr_name!r} of a remote env is not available across the bus")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Remote env attributes cannot be set from here."""
        raise AttributeError(f"cannot set {attr_name!r} on a remote env")

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Remote env methods cannot be called from here."""
        raise AttributeError(f"cannot call {method_name!r} on a remote env")

    def env_is_wrapped(self, wrapper_class: type[Any], indices: VecEnvIndices = None) -> list[bool]:
        """Remote envs report no wrappers (wrap this VecEnv in VecMonitor for episode statistics)."""
        return [False for _ in self._get_indices(indices)]

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seeds for the next reset, `seed + i` per sub-env as SB3's DummyVecEnv does."""
        return super().seed(seed)


def is_discrete(space: spaces.Space[Any]) -> bool:
    """True for the spaces whose actions compare exactly."""
    return isinstance(space, spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary)
