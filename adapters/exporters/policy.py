"""An SB3 policy to ONNX (deterministic actions, SB3's preprocessing and action post-processing inside
the graph) and to SafeTensors with a JSON sidecar, checked against `model.predict` before it is kept.

The graph takes raw observations (float32, batch first) and returns what
`model.predict(obs, deterministic=True)` returns: the argmax for discrete spaces; for Box actions the
policy mean clipped to the bounds (PPO, A2C) or unscaled from [-1, 1] (SAC's squashed output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from gymnasium import spaces
from safetensors.torch import save_file
from stable_baselines3.common.base_class import BaseAlgorithm

from forseti.adapters.inference import POLICY_KEY
from forseti.envs.spaces import space_to_spec
from forseti.schemas.errors import ErrorCode, ForsetiError

from .quantize import int8_copy
from .torch_onnx import torch_to_onnx

PARITY_SAMPLES = 1000
CONTINUOUS_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.01
"""An int8 continuous action agrees when each dimension is within this share of its range of the float one."""


class DeterministicPolicy(torch.nn.Module):
    """`predict(obs, deterministic=True)` as one torch module."""

    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, model: BaseAlgorithm) -> None:
        super().__init__()
        self.policy = model.policy
        space = model.action_space
        self.box = isinstance(space, spaces.Box)
        self.squashed = bool(getattr(model.policy, "squash_output", False))
        if self.box:
            assert isinstance(space, spaces.Box)
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Raw observations in, actions out."""
        actions = self.policy._predict(observation, deterministic=True)
        if not self.box:
            return actions
        if self.squashed:
            return self.low + 0.5 * (actions + 1.0) * (self.high - self.low)
        return torch.clamp(actions, self.low, self.high)


@dataclass(frozen=True)
class PolicyExport:
    """The files written and how closely the ONNX graph matches the policy."""

    onnx_path: Path
    safetensors_path: Path
    sidecar_path: Path
    max_abs_diff: float
    agreement: float
    samples: int
    int8_path: Path | None = None
    """The dynamically int8-quantised graph, when asked for."""
    int8_figures: dict[str, float] = field(default_factory=dict)
    """How the int8 graph's actions differ from the float graph's on the parity observations."""


def _sample_observations(space: spaces.Space[Any], count: int, seed: int) -> np.ndarray:
    space.seed(seed)
    return np.stack([np.asarray(space.sample()) for _ in range(count)]).astype(np.float32)


def export_policy(
    model: BaseAlgorithm,
    folder: Path,
    *,
    algorithm: str,
    environment: str,
    extra: dict[str, Any] | None = None,
    seed: int = 0,
    int8: bool = False,
) -> PolicyExport:
    """Write policy.onnx, policy.safetensors and policy.json under `folder` (and policy.int8.onnx with
    `int8`); raise export_mismatch when onnxruntime disagrees with `model.predict` on random observations."""
    folder.mkdir(parents=True, exist_ok=True)
    obs_space, act_space = model.observation_space, model.action_space
    if not isinstance(obs_space, spaces.Box):
        raise ForsetiError(f"ONNX export supports Box observations, not {obs_space}", code=ErrorCode.INVALID_TASK)
    module = DeterministicPolicy(model).to("cpu").eval()
    observations = _sample_observations(obs_space, PARITY_SAMPLES, seed)
    onnx_path = folder / "policy.onnx"
    # tracing meets torch.distributions' argument checks (constant for a fixed policy); the parity
    # check below is what proves the graph right
    torch_to_onnx(module, torch.as_tensor(observations[:1]), onnx_path, "observation", "action", quiet_tracer=True)
    onnx_actions = _run(onnx_path, observations)
    sb3_actions, _ = model.predict(observations, deterministic=True)
    sb3_actions = np.asarray(sb3_actions).reshape(onnx_actions.shape)
    if isinstance(act_space, spaces.Box):
        max_diff = float(np.max(np.abs(onnx_actions.astype(np.float64) - sb3_actions)))
        agreement = float(
            np.mean(
                np.all(
                    np.abs(onnx_actions - sb3_actions) < CONTINUOUS_TOLERANCE, axis=tuple(range(1, onnx_actions.ndim))
                )
            )
        )
        ok = max_diff < CONTINUOUS_TOLERANCE
    else:
        same = onnx_actions.reshape(len(observations), -1) == sb3_actions.reshape(len(observations), -1)
        agreement = float(np.mean(np.all(same, axis=1)))
        max_diff = float(np.max(np.abs(onnx_actions.astype(np.float64) - sb3_actions)))
        ok = agreement == 1.0
    if not ok:
        raise ForsetiError(
            f"the ONNX policy disagrees with the trained one on {PARITY_SAMPLES} observations: "
            f"max abs diff {max_diff:.3g}, agreement {agreement:.1%}",
            code=ErrorCode.EXPORT_MISMATCH,
        )

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.policy.state_dict().items()}
    safetensors_path = folder / "policy.safetensors"
    save_file(tensors, str(safetensors_path), metadata={"algorithm": algorithm, "environment": environment})
    sidecar = {
        "algorithm": algorithm,
        "environment": environment,
        "observation_space": space_to_spec(obs_space).model_dump(mode="json"),
        "action_space": space_to_spec(act_space).model_dump(mode="json"),
        "policy_class": type(model.policy).__name__,
        "onnx": {"input": "observation", "output": "action", "opset": 17},
        "parity": {"samples": PARITY_SAMPLES, "max_abs_diff": max_diff, "agreement": agreement},
        **(extra or {}),
    }
    sidecar_path = folder / "policy.json"
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    graph_with_card = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(graph_with_card, {POLICY_KEY: json.dumps(sidecar)})  # the file alone serves
    onnx.save(graph_with_card, str(onnx_path))
    export = PolicyExport(onnx_path, safetensors_path, sidecar_path, max_diff, agreement, PARITY_SAMPLES)
    if not int8:
        return export
    int8_path = int8_copy(onnx_path, folder / "policy.int8.onnx")
    figures = int8_agreement(onnx_actions, _run(int8_path, observations), act_space)
    return replace(export, int8_path=int8_path, int8_figures=figures)


def _run(path: Path, observations: np.ndarray) -> np.ndarray:
    """The actions an ONNX policy file gives for a batch of observations."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actions: np.ndarray = session.run(None, {"observation": observations})[0]
    return actions


def int8_agreement(float_actions: np.ndarray, int8_actions: np.ndarray, space: spaces.Space[Any]) -> dict[str, float]:
    """The share of observations on which the int8 policy acts as the float one (the same discrete
    action; each continuous dimension within INT8_TOLERANCE of its range), and the largest difference."""
    count = len(float_actions)
    before, after = float_actions.reshape(count, -1), int8_actions.reshape(count, -1)
    diff = np.abs(after.astype(np.float64) - before)
    if isinstance(space, spaces.Box):
        span = (space.high - space.low).astype(np.float64).reshape(-1)
        allowed = INT8_TOLERANCE * np.where(np.isfinite(span), span, 1.0)
        same = np.all(diff <= allowed, axis=1)
    else:
        same = np.all(before == after, axis=1)
    return {"int8_action_agreement": float(np.mean(same)), "int8_max_abs_diff": float(diff.max())}
