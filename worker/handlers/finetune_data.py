"""Fine-tune data: JSONL examples to token ids, loss masks and feedback weights.

A line is `{"text": ...}` (loss on every token) or `{"prompt": ..., "response": ...}` (loss on the
response only), with an optional `"feedback": 1 | -1` that weighs the example 2.0 or 0.5 (the
seed's feedback learning). Every line is checked before training starts; the first bad one fails
the job with invalid_data and its line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.worker.engine.inputs import jsonl_objects

FEEDBACK_WEIGHTS = {1: 2.0, -1: 0.5}
"""Loss weight of an example by its feedback; 1.0 without feedback."""
IGNORE = -100
"""Label of tokens that carry no loss (the prompt of a prompt/response pair, padding)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    text: str
    ids: list[int]
    labels: list[int]
    weight: float


def _bad(path: Path, number: int, why: str) -> ForsetiError:
    return ForsetiError(f"{path.name} line {number}: {why}", code=ErrorCode.INVALID_DATA)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The dataset's records, each checked for its fields; invalid_data names the first bad line."""
    records = [_checked(record, path, number) for number, record in jsonl_objects(path)]
    if not records:
        raise ForsetiError(f"{path.name} has no examples", code=ErrorCode.INVALID_DATA)
    return records


def _checked(record: dict[str, Any], path: Path, number: int) -> dict[str, Any]:
    has_text, has_pair = "text" in record, "prompt" in record or "response" in record
    if has_text == has_pair:
        raise _bad(path, number, 'needs either "text" or "prompt" and "response"')
    fields = ("text",) if has_text else ("prompt", "response")
    for field in fields:
        if not isinstance(record.get(field), str) or not record[field]:
            raise _bad(path, number, f'"{field}" must be a non-empty string')
    feedback = record.get("feedback")
    if feedback is not None and (isinstance(feedback, bool) or feedback not in FEEDBACK_WEIGHTS):
        raise _bad(path, number, f'"feedback" must be 1 or -1, not {feedback!r}')
    return record


def tokenize(records: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[Example]:
    """Token ids and labels per record, truncated to `max_len`; a response ends with EOS."""
    examples = []
    for record in records:
        if "text" in record:
            text = record["text"]
            ids = tokenizer(text)["input_ids"][:max_len]
            labels = list(ids)
        else:
            text = record["prompt"] + record["response"]
            prompt = tokenizer(record["prompt"])["input_ids"]
            response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + response)[:max_len]
            labels = ([IGNORE] * len(prompt) + response)[:max_len]
        weight = FEEDBACK_WEIGHTS.get(record.get("feedback") or 0, 1.0)
        examples.append(Example(text=text, ids=list(ids), labels=labels, weight=weight))
    return examples
