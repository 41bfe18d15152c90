"""Streaming inference events: request-reply on `forseti.infer.<model_id>` and, on an edge device,
`forseti.edge.<device_id>.infer` (which also answers RL policies' `act` requests)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import FiniteFloat, Id, LongText, Name, ShortText, Strict
from .errors import ErrorCode
from .tasks import Row


class InferRequest(Strict):
    """`forseti.infer.request.v1`: predict on a few rows now (request)."""

    rows: list[Row] = Field(min_length=1, max_length=10_000)
    """Raw rows, column name to value, as the model was trained on (a forecaster: its series, in order)."""
    name: Name | None = None
    """On an edge device (`forseti.edge.<device_id>.infer`): the model name to ask; may be omitted
    while the device serves one model."""


class InferReply(Strict):
    """`forseti.infer.result.v1`: one prediction per row (reply)."""

    outputs: list[Any] = Field(max_length=10_000)
    """One prediction per input row, shaped as in the inference task's result."""
    model_id: Id
    """The registry id of the model that answered."""
    version: ShortText
    """That model's version (its registry number, or label)."""
    batched: int = Field(ge=1)
    """Requests answered by the same onnxruntime call as this one (micro-batching at work)."""


class InferError(Strict):
    """`forseti.infer.error.v1`: why a streaming request was not answered (reply)."""

    code: ErrorCode
    """malformed_json or invalid_task (bad request), invalid_model (unknown model), invalid_data (unusable rows)."""
    message: LongText
    """What went wrong."""


class ActRequest(Strict):
    """`forseti.edge.act.v1`: actions of an RL policy held by an edge device (request)."""

    observations: list[list[FiniteFloat]] = Field(min_length=1, max_length=10_000)
    """One observation per action wanted, flattened."""
    name: Name | None = None
    """The policy's model name; may be omitted while the device serves one model."""


class ActReply(Strict):
    """`forseti.edge.actions.v1`: the policy's deterministic action for each observation (reply)."""

    actions: list[Any] = Field(max_length=10_000)
    """One action per observation (an index for discrete spaces, a list for boxes)."""
    model_id: Id
    """The registry id of the policy that answered."""
    version: ShortText
    """That policy's version."""
