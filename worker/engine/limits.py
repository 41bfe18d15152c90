"""What a job may take from its worker, checked before the job allocates it.

A network is sized from its layer widths before any weight exists (on torch's meta device, or from
the widths of an SB3 MLP), so a task asking for `net_arch: [65536, 65536]` is refused with
`resource_exhausted` instead of taking the worker, and every job on it, down with an out-of-memory
kill."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

from forseti.schemas.errors import ErrorCode, ForsetiError

if TYPE_CHECKING:
    from torch import nn

TRAINED_BYTES_PER_PARAMETER = 16
"""float32 weights, their gradients, and Adam's two moments."""


def default_memory_limit() -> int:
    """Half of this host's memory, in bytes: what one job may plan to hold unless the operator says."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def mlp_parameters(widths: Sequence[int]) -> int:
    """Weights and biases of fully connected layers through `widths` (input first, output last)."""
    return sum((a + 1) * b for a, b in pairwise(widths))


def module_parameters(build: Callable[[], nn.Module]) -> int:
    """The parameter count of the module `build` makes, made on the meta device (no memory)."""
    import torch  # only for handlers that train: the worker's core runs without it

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def check_fits(what: str, needed: int, limit: int) -> None:
    """Refuse a job whose `what` needs more than `limit` bytes (ForsetiError resource_exhausted)."""
    if needed > limit:
        raise ForsetiError(
            f"{what} needs about {_size(needed)} to train, more than the {_size(limit)} a job may take "
            "on this worker (max_job_memory_mb)",
            code=ErrorCode.RESOURCE_EXHAUSTED,
        )


def _size(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:,.1f} MiB"
