"""Schemas: strict validation, bounds, ids, the codec, and generated files that match the models."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from forseti.schemas import generate
from forseti.schemas.catalog import all_specs
from forseti.schemas.envelope import decode, encode, peek_job_id
from forseti.schemas.errors import ErrorCode, InvalidTask
from forseti.schemas.jobs import JobProgress, JobState
from forseti.schemas.tasks import FinetuneTask, InferenceTask, RLTask, TaskKind, TrainingTask


def rl(**data: Any) -> RLTask:
    return RLTask.model_validate({"algorithm": "ppo", "environment": "CartPole-v1", **data})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"config": {"gamma": 0}}, "config.gamma"),
        ({"config": {"gamma": 1.5}}, "config.gamma"),
        ({"config": {"learning_rate": 0}}, "config.learning_rate"),
        ({"config": {"learning_rate": 10}}, "config.learning_rate"),
        ({"config": {"total_timesteps": 10**9 + 1}}, "config.total_timesteps"),
        ({"config": {"num_envs": 0}}, "config.num_envs"),
        ({"config": {"num_envs": 257}}, "config.num_envs"),
        ({"evaluation": {"episodes": 100_000}}, "evaluation.episodes"),
        ({"max_memory_mb": 0}, "max_memory_mb"),
        ({"algorithm": "a3c"}, "algorithm"),
        ({"request_id": "../etc/passwd"}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"request_id": ".."}, "request_id"),
        ({"policy": {"net_arch": [64] * 17}}, "policy.net_arch"),
        ({"unexpected": True}, "unexpected"),
        ({"config": {"unexpected": True}}, "config.unexpected"),
    ],
)
def test_rl_tasks_refuse_out_of_bounds_and_unknown_fields(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        rl(**data)
    assert field in {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}


def test_training_bounds_and_the_one_source_rule() -> None:
    with pytest.raises(ValidationError, match="epochs"):
        TrainingTask.model_validate(
            {"model_type": "classifier", "config": {"epochs": 0}, "data_sources": [{"rows": []}]}
        )
    with pytest.raises(ValidationError, match="exactly one of 'uri' or 'rows'"):
        TrainingTask.model_validate({"model_type": "classifier", "data_sources": [{"uri": "file://a", "rows": []}]})
    with pytest.raises(ValidationError, match="NaN"):
        TrainingTask.model_validate({"model_type": "regressor", "data_sources": [{"rows": [{"x": float("nan")}]}]})
    with pytest.raises(ValidationError, match="exactly one of 'inputs' or 'uri'"):
        InferenceTask(model_id="m")


def test_the_ewc_lambda_travels_under_its_wire_name() -> None:
    task = FinetuneTask.model_validate(
        {"base_model": "models/tiny", "dataset": "data.jsonl", "name": "a", "ewc": {"lambda": 500}}
    )
    assert task.ewc.lambda_ == 500
    assert orjson.loads(encode(task))["data"]["ewc"]["lambda"] == 500


def test_encode_then_decode_gives_the_same_payload() -> None:
    task = rl(request_id="job-1", config={"seed": 3})
    event = decode(encode(task, subject="job-1"), expect=RLTask)
    assert event.type == "forseti.task.rl.v1"
    assert event.subject == "job-1"
    assert event.data == task


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (b"\xff\xfe", ErrorCode.MALFORMED_JSON, "not valid JSON"),
        (b"[]", ErrorCode.INVALID_TASK, "not a valid CloudEvent"),
        (
            b'{"specversion": "0.3", "id": "1", "source": "s", "type": "forseti.task.rl.v1"}',
            ErrorCode.INVALID_TASK,
            "specversion",
        ),
        (
            b'{"specversion": "1.0", "id": "1", "source": "s", "type": "forseti.nope.v1"}',
            ErrorCode.UNKNOWN_KIND,
            "unknown event type",
        ),
        (
            b'{"specversion": "1.0", "id": "1", "source": "s", "type": "forseti.task.rl.v1", "x": 1}',
            ErrorCode.INVALID_TASK,
            "x: Extra inputs",
        ),
    ],
)
def test_decode_says_what_is_wrong(raw: bytes, code: ErrorCode, message: str) -> None:
    with pytest.raises(InvalidTask, match=message) as info:
        decode(raw)
    assert info.value.code is code


def test_decode_refuses_an_event_of_another_family() -> None:
    raw = encode(JobProgress(job_id="j", kind=TaskKind.RL, state=JobState.RUNNING, fraction=0.5))
    with pytest.raises(InvalidTask, match=r"expected a forseti\.task\.rl\.v1 event"):
        decode(raw, expect=RLTask)


def test_peek_job_id_reads_ids_only_when_they_are_valid() -> None:
    assert peek_job_id(b'{"data": {"request_id": "abc"}}') == "abc"
    assert peek_job_id(b'{"subject": "from-subject", "data": {}}') == "from-subject"
    assert peek_job_id(b'{"data": {"request_id": "../../x"}}') is None
    assert peek_job_id(b"nonsense") is None


def test_every_event_type_has_a_generated_schema_and_an_asyncapi_message() -> None:
    assert generate.stale() == [], "run: python -m forseti.schemas.generate"
    asyncapi = generate.asyncapi()
    names = {m["name"] for m in asyncapi["components"]["messages"].values()}
    assert names == {spec.type for spec in all_specs()}
    addresses = {c["address"] for c in asyncapi["channels"].values()}
    assert {"forseti.jobs.{job_id}", "forseti.control", "forseti.models", "forseti.deadletter"} <= addresses


def test_every_field_of_every_event_is_documented() -> None:
    missing = []
    for spec in all_specs():
        schema = generate.event_schema(spec.type)
        defs = schema.get("$defs", {})
        for model in [schema["properties"]["data"], *defs.values()]:
            for name, prop in model.get("properties", {}).items():
                # pydantic leaves out a field description that repeats its model's docstring
                target = defs.get(prop.get("$ref", "").rsplit("/", 1)[-1], {})
                if not prop.get("description") and not target.get("description"):
                    missing.append(f"{spec.type}: {model.get('title')}.{name}")
    assert missing == []
