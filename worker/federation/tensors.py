"""Parameters on the wire (`schemas.federation.Tensors`) and the checks every incoming update passes.

An update is refused, with a reason, when it does not have the global model's names and shapes, holds
a NaN or an infinity, or is longer (L2) than the federation allows: one agent must not be able to
poison the global model with a single message. Torch-free.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.federation import MAX_TENSOR_BYTES, Encoding, Tensors


class BadUpdate(ForsetiError):
    """An update the coordinator refuses; `kind` names the check it failed (for the counters)."""

    code = ErrorCode.INVALID_DATA

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


Params = list[np.ndarray]
"""A model's parameters (or a change to them), in the model's order."""
DTYPES: dict[Encoding, np.dtype] = {"f32": np.dtype("<f4"), "ring64": np.dtype("<u8")}


@dataclass(frozen=True)
class Layout:
    """The names and shapes a federation's parameters have."""

    names: list[str]
    """Parameter names, in order."""
    shapes: list[tuple[int, ...]]
    """Their shapes."""

    @classmethod
    def of(cls, names: list[str], params: Params) -> Layout:
        """The layout of `params`."""
        return cls(list(names), [tuple(p.shape) for p in params])

    @property
    def size(self) -> int:
        """Numbers in all."""
        return sum(int(np.prod(s)) for s in self.shapes)

    def flat(self, params: Params) -> np.ndarray:
        """The parameters as one vector."""
        return np.concatenate([p.reshape(-1) for p in params]) if params else np.zeros(0)

    def split(self, vector: np.ndarray) -> Params:
        """One vector back into parameters of this layout."""
        out, at = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            out.append(vector[at : at + n].reshape(shape))
            at += n
        return out


def to_wire(layout: Layout, params: Params, encoding: Encoding = "f32") -> Tensors:
    """Parameters as the wire carries them."""
    dtype = DTYPES[encoding]
    raw = b"".join(np.ascontiguousarray(p, dtype=dtype).tobytes() for p in params)
    if len(raw) > MAX_TENSOR_BYTES:
        raise ForsetiError(
            f"{len(raw)} bytes of parameters: more than one message carries ({MAX_TENSOR_BYTES})",
            code=ErrorCode.OVERSIZED,
        )
    return Tensors(
        names=layout.names,
        shapes=[list(s) for s in layout.shapes],
        encoding=encoding,
        data=base64.b64encode(raw).decode(),
    )


def from_wire(tensors: Tensors, layout: Layout, *, encoding: Encoding = "f32") -> Params:
    """The parameters a message carries, as float64 (`f32`) or uint64 (`ring64`); invalid_data when
    their encoding, names or shapes are not the layout's, or their bytes do not fill it."""
    if tensors.encoding != encoding:
        raise BadUpdate(f"expected {encoding} parameters, got {tensors.encoding}", kind="shape")
    if tensors.names != layout.names or [tuple(s) for s in tensors.shapes] != layout.shapes:
        raise BadUpdate(
            f"wrong shapes: the model is {_shown(layout.names, layout.shapes)}, the update "
            f"{_shown(tensors.names, [tuple(s) for s in tensors.shapes])}",
            kind="shape",
        )
    try:
        raw = base64.b64decode(tensors.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadUpdate(f"the parameters are not base64: {exc}", kind="shape") from exc
    dtype = DTYPES[encoding]
    if len(raw) != layout.size * dtype.itemsize:
        raise BadUpdate(
            f"{len(raw)} bytes of parameters; the model's {layout.size} take {layout.size * dtype.itemsize}",
            kind="shape",
        )
    vector = np.frombuffer(raw, dtype=dtype)
    return layout.split(vector.astype(np.float64) if encoding == "f32" else vector.copy())


def check_update(delta: Params, layout: Layout, max_norm: float) -> float:
    """The L2 norm of a decoded update; invalid_data when it holds NaN or infinity or is longer than `max_norm`."""
    vector = layout.flat(delta)
    if not np.all(np.isfinite(vector)):
        raise BadUpdate(
            f"the update holds {int(np.sum(~np.isfinite(vector)))} NaN or infinite values", kind="non_finite"
        )
    norm = float(np.linalg.norm(vector))
    if norm > max_norm:
        raise BadUpdate(f"the update's L2 norm {norm:.4g} is above the federation's bound {max_norm:g}", kind="norm")
    return norm


def _shown(names: list[str], shapes: list[tuple[int, ...]]) -> str:
    parts = [f"{n}{list(s)}" for n, s in zip(names, shapes, strict=False)]
    return ", ".join(parts[:6]) + (f", ... ({len(parts)} in all)" if len(parts) > 6 else "")
