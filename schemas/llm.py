"""LLM service events: completion requests and replies on `forseti.llm.<name>.complete`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from .base import Id, LongText, Name, ShortText, Strict
from .errors import ErrorCode

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=65_536)]


class CompleteRequest(Strict):
    """`forseti.llm.complete.v1`: continue a prompt (request)."""

    prompt: Prompt
    """The text to continue."""
    max_tokens: int = Field(default=64, ge=1, le=8192)
    """Tokens to generate at most."""
    temperature: float = Field(default=0.0, ge=0, le=5)
    """Sampling temperature; 0 is greedy."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Sampling seed, for repeatable samples."""
    name: Name | None = None
    """On an edge device (`forseti.edge.<device_id>.infer`): the model name; may be omitted while the
    device serves one LLM."""


class CompleteReply(Strict):
    """`forseti.llm.completion.v1`: the generated text and which version produced it (reply)."""

    text: str = Field(max_length=1_000_000)
    """The continuation."""
    model_id: Id
    """Registry id of the version that answered."""
    version: ShortText
    """That version's label."""
    prompt_tokens: int = Field(ge=0)
    """Tokens in the prompt."""
    completion_tokens: int = Field(ge=0)
    """Tokens generated."""
    finish_reason: ShortText
    """stop (end of text) or length (max_tokens reached)."""


class LlmError(Strict):
    """`forseti.llm.error.v1`: why a completion request was not answered (reply)."""

    code: ErrorCode
    """Machine-readable reason: invalid_task for a bad request, invalid_model when nothing is loaded."""
    message: LongText
    """What went wrong."""
