"""RL checkpoints as tensors and JSON: nothing on the resume path can run code.

SB3's own `model.zip` keeps the policy class, spaces and schedules as pickled objects, and its replay
buffer is a plain pickle: reading either back runs whatever code whoever wrote the checkpoint
store put there. A Forseti checkpoint is instead three files in the job's checkpoint folder:

- `rl-state.safetensors`: every tensor, named `<object>/<key>`: the state dicts SB3 lists as its
  own (`policy`, `policy.optimizer`, SAC's `actor.optimizer`, ...), flattened, and its loose torch
  variables (SAC's `log_ent_coef`);
- `rl-state.json`: the counters (timesteps, updates, episodes, episode statistics) and the
  optimizers' non-tensor state (param groups, scalars);
- `rl-replay.safetensors` (DQN, SAC): the filled part of the replay buffer, as arrays.

Resuming builds the model from the task as a fresh run would, then loads these into it; the
loaders are safetensors (a header and raw bytes) and JSON. Shapes and names are checked, so a
file that does not fit the task's model is refused rather than half loaded.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from forseti.schemas.errors import ErrorCode, ForsetiError

TENSORS = "rl-state.safetensors"
STATE = "rl-state.json"
REPLAY = "rl-replay.safetensors"
FORMAT = 1
"""Version of the layout above, written into `rl-state.json`."""
COUNTERS = ("num_timesteps", "_n_updates", "_episode_num", "_n_calls")
"""Algorithm attributes a resumed run continues from (those an algorithm has)."""
REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def exists(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint in this format."""
    return (folder / STATE).is_file() and (folder / TENSORS).is_file()


def save(model: BaseAlgorithm, folder: Path) -> None:
    """Write `model`'s state into `folder`, each file atomically (a worker killed mid-write keeps
    the previous checkpoint's file); the JSON goes last, so it names a complete set."""
    state_dicts, variables = model._get_torch_save_params()
    tensors: dict[str, torch.Tensor] = {}
    optimizers: dict[str, Any] = {}
    for name, state in model.get_parameters().items():
        if "param_groups" in state:  # an optimizer: tensors per parameter, the rest as JSON
            optimizers[name] = _split_optimizer(name, state, tensors)
        else:
            for key, value in state.items():
                tensors[f"{name}/{key}"] = _own(value)
    for name in variables:
        tensors[name] = _own(_attribute(model, name))
    doc: dict[str, Any] = {
        "format": FORMAT,
        "counters": {c: int(getattr(model, c)) for c in COUNTERS if hasattr(model, c)},
        "episodes": [_plain(episode) for episode in model.ep_info_buffer or ()],
        "successes": [bool(s) for s in model.ep_success_buffer or ()],
        "optimizers": optimizers,
        "state_dicts": state_dicts,
    }
    _replace(folder / TENSORS, lambda p: save_tensors(tensors, str(p)))
    if isinstance(model, OffPolicyAlgorithm) and model.replay_buffer is not None:
        doc["replay"] = _save_replay(model.replay_buffer, folder / REPLAY)
    _replace(folder / STATE, lambda p: p.write_text(json.dumps(doc)))


def load(model: BaseAlgorithm, folder: Path) -> None:
    """Load a checkpoint written by `save` into `model`, built from the same task; a ForsetiError
    naming the file's fault when it is unreadable or does not fit the model."""
    try:
        doc = json.loads((folder / STATE).read_text())
        tensors = load_tensors(str(folder / TENSORS), device="cpu")
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, this worker reads {FORMAT}")
        state_dicts, variables = model._get_torch_save_params()
        # a state dict per object: SB3 reads nested dicts here, though its annotation says flat
        params: Any = {name: _gather(name, tensors) for name in state_dicts}
        for name, saved in doc["optimizers"].items():
            params[name] = _join_optimizer(name, saved, params[name])
        model.set_parameters(params, exact_match=True, device="cpu")
        for name in variables:
            _attribute(model, name).data.copy_(tensors[name])
        for counter, value in doc["counters"].items():
            if counter in COUNTERS:
                setattr(model, counter, int(value))
        # learn() keeps a buffer that exists (reset_num_timesteps=False) and makes one that does not
        model.ep_info_buffer = deque(doc["episodes"], maxlen=model._stats_window_size)
        model.ep_success_buffer = deque(doc.get("successes", ()), maxlen=model._stats_window_size)
        if isinstance(model, OffPolicyAlgorithm) and model.replay_buffer is not None and "replay" in doc:
            _load_replay(model.replay_buffer, folder / REPLAY, doc["replay"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise ForsetiError(
            f"the RL checkpoint in {folder} cannot be resumed: {exc}", code=ErrorCode.HANDLER_ERROR
        ) from exc


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy: safetensors refuses tensors that share memory (DQN's target net may)."""
    return tensor.detach().to("cpu").contiguous().clone()


def _plain(episode: dict[str, Any]) -> dict[str, Any]:
    """An episode record as JSON takes it: VecMonitor's hold numpy scalars."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in episode.items()}


def _attribute(model: BaseAlgorithm, dotted: str) -> Any:
    value: Any = model
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _split_optimizer(name: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An optimizer's state dict: its tensors into `tensors`, what remains as JSON."""
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/state/{index}/{key}"] = _own(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}


def _join_optimizer(name: str, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer state dict `_split_optimizer` took apart."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state/"):
            raise ValueError(f"unexpected tensor {name}/{key}")
        _, index, field = key.split("/", 2)
        state.setdefault(int(index), {})[field] = value
    for index, entries in saved["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _gather(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _save_replay(buffer: ReplayBuffer, path: Path) -> dict[str, Any]:
    """The filled part of a replay buffer into `path`; its position and fill as JSON."""
    filled = buffer.buffer_size if buffer.full else buffer.pos
    arrays = {
        name: np.ascontiguousarray(getattr(buffer, name)[:filled])
        for name in REPLAY_ARRAYS
        if getattr(buffer, name, None) is not None
    }
    _replace(path, lambda p: save_arrays(arrays, str(p)))
    return {"pos": int(buffer.pos), "full": bool(buffer.full), "filled": int(filled)}


def _load_replay(buffer: ReplayBuffer, path: Path, saved: dict[str, Any]) -> None:
    arrays = load_arrays(str(path))
    filled, pos = int(saved["filled"]), int(saved["pos"])
    if not (0 <= pos < buffer.buffer_size and pos <= filled <= buffer.buffer_size):
        raise ValueError(f"replay position {pos} of {filled} does not fit a buffer of {buffer.buffer_size}")
    for name in REPLAY_ARRAYS:
        target = getattr(buffer, name, None)
        if target is None:
            continue
        array = arrays[name]
        if array.shape != (filled, *target.shape[1:]) or array.dtype != target.dtype:
            raise ValueError(
                f"replay {name} is {array.dtype}{array.shape}, the buffer holds {target.dtype}{target.shape}"
            )
        target[:filled] = array
    buffer.pos, buffer.full = pos, bool(saved["full"])


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name("partial-" + path.name)
    write(partial)
    partial.replace(path)
