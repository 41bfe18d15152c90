"""Gymnasium spaces on the wire (SpaceSpec), and the checks every observation, reward and action passes.

Values travel as JSON lists; Box bounds may be infinite, written as "Infinity" / "-Infinity".
A check that fails raises ForsetiError(invalid_data) naming the field and the sub-env.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gymnasium import spaces

from forseti.schemas.env import SpaceSpec
from forseti.schemas.errors import ErrorCode, ForsetiError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bound(value: float) -> float | str:
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def _unbound(value: float | str) -> float:
    return float(value)  # float("Infinity") and float("-Infinity") parse


def space_to_spec(space: spaces.Space[Any]) -> SpaceSpec:
    """The wire form of a Box, Discrete, MultiDiscrete or MultiBinary space."""
    if isinstance(space, spaces.Box):
        return SpaceSpec(
            type="box",
            shape=list(space.shape),
            dtype=space.dtype.name,
            low=[_bound(v) for v in space.low.flatten().tolist()],
            high=[_bound(v) for v in space.high.flatten().tolist()],
        )
    if isinstance(space, spaces.Discrete):
        if int(space.start) != 0:
            raise ForsetiError(
                f"Discrete spaces must start at 0, this one starts at {space.start}", code=ErrorCode.INVALID_DATA
            )
        return SpaceSpec(type="discrete", n=int(space.n), dtype="int64")
    if isinstance(space, spaces.MultiDiscrete):
        return SpaceSpec(
            type="multi_discrete", shape=list(space.shape), nvec=space.nvec.flatten().tolist(), dtype="int64"
        )
    if isinstance(space, spaces.MultiBinary):
        return SpaceSpec(type="multi_binary", shape=list(space.shape), dtype="int8")
    raise ForsetiError(
        f"{type(space).__name__} spaces cannot cross the bus; use Box, Discrete, MultiDiscrete or MultiBinary",
        code=ErrorCode.INVALID_DATA,
    )


def spec_to_space(spec: SpaceSpec) -> spaces.Space[Any]:
    """The gymnasium space a SpaceSpec describes."""
    if spec.type == "box":
        if spec.low is None or spec.high is None:
            raise ForsetiError("a box space needs low and high", code=ErrorCode.INVALID_DATA)
        shape = tuple(spec.shape)
        low = np.array([_unbound(v) for v in spec.low], dtype=spec.dtype).reshape(shape)
        high = np.array([_unbound(v) for v in spec.high], dtype=spec.dtype).reshape(shape)
        return spaces.Box(low=low, high=high, shape=shape, dtype=np.dtype(spec.dtype))
    if spec.type == "discrete":
        if spec.n is None:
            raise ForsetiError("a discrete space needs n", code=ErrorCode.INVALID_DATA)
        return spaces.Discrete(spec.n)
    if spec.type == "multi_discrete":
        if spec.nvec is None:
            raise ForsetiError("a multi_discrete space needs nvec", code=ErrorCode.INVALID_DATA)
        return spaces.MultiDiscrete(np.array(spec.nvec).reshape(tuple(spec.shape)))
    return spaces.MultiBinary(spec.shape[0] if len(spec.shape) == 1 else list(spec.shape))


def _invalid(message: str) -> ForsetiError:
    return ForsetiError(message, code=ErrorCode.INVALID_DATA)


def check_batch(values: list[Any], space: spaces.Space[Any], num_envs: int, field: str) -> np.ndarray:
    """Observations (or actions) of all sub-envs as one array, checked against the space."""
    if len(values) != num_envs:
        raise _invalid(f"{field}: {len(values)} values for {num_envs} sub-envs")
    dtype = space.dtype if space.dtype is not None else np.float32
    try:
        array = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"{field}: not numbers of the space's shape {space.shape}: {exc}") from exc
    want = (num_envs, *(space.shape or ()))
    if array.shape != want:
        raise _invalid(f"{field}: shape {array.shape[1:]} per sub-env, the space says {space.shape}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array.reshape(num_envs, -1)).all(axis=1)
        if bad.any():
            raise _invalid(f"{field}[{int(np.argmax(bad))}]: NaN or infinity")
    outside = _outside(array, space)
    if outside is not None and outside.any():
        i = int(np.argmax(outside))
        raise _invalid(f"{field}[{i}]: {array[i].tolist()} is outside {space}")
    return array


def _outside(array: np.ndarray, space: spaces.Space[Any]) -> np.ndarray | None:
    """Per sub-env, whether its value lies outside a discrete space (vectorised: this runs every step)."""
    flat = array.reshape(len(array), -1)
    if isinstance(space, spaces.Discrete):
        start = int(space.start)
        bad = (flat < start) | (flat >= start + int(space.n))
    elif isinstance(space, spaces.MultiDiscrete):
        bad = (flat < 0) | (flat >= space.nvec.reshape(1, -1))
    elif isinstance(space, spaces.MultiBinary):
        bad = (flat != 0) & (flat != 1)
    else:
        return None  # Box: NaN / infinity were checked; bounds are the env's to clip, as SB3 does
    outside = np.asarray(np.asarray(bad).any(axis=1), dtype=bool)
    return outside


def check_rewards(values: list[float], num_envs: int) -> np.ndarray:
    """Rewards of all sub-envs: finite and within float32 range."""
    if len(values) != num_envs:
        raise _invalid(f"rewards: {len(values)} values for {num_envs} sub-envs")
    rewards = np.asarray(values, dtype=np.float64)
    bad = ~(np.abs(rewards) <= FLOAT32_MAX)  # NaN compares False, so it is caught with the infinities
    if bad.any():
        i = int(np.argmax(bad))
        raise _invalid(f"rewards[{i}]: {rewards[i]} is not a finite float32")
    return rewards.astype(np.float32)


def check_flags(values: list[bool], num_envs: int, field: str) -> np.ndarray:
    """terminated / truncated flags of all sub-envs."""
    if len(values) != num_envs:
        raise _invalid(f"{field}: {len(values)} values for {num_envs} sub-envs")
    return np.asarray(values, dtype=bool)


def check_infos(values: list[dict[str, Any]], num_envs: int) -> list[dict[str, Any]]:
    """Per-sub-env info dicts: one each, or none at all (then empty ones)."""
    if not values:
        return [{} for _ in range(num_envs)]
    if len(values) != num_envs:
        raise _invalid(f"infos: {len(values)} values for {num_envs} sub-envs")
    return values


def to_wire(value: Any) -> Any:
    """numpy values (and containers of them) as JSON-ready Python values; NaN and infinity stay floats
    so the receiving side's checks can name them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value
