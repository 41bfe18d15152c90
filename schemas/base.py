"""The strict base every wire model shares, and the constrained types they reuse."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Job, model and executor ids: DESIGN.md's `[A-Za-z0-9._-]{1,128}`, first character alphanumeric
so that no id reads as `.` or `..` when it becomes part of a path."""

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
ShortText = Annotated[str, StringConstraints(max_length=255)]
LongText = Annotated[str, StringConstraints(max_length=4096)]
Tags = Annotated[list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]], Field(max_length=32)]
"""Device tags (`pumps`, `site-3`): ids, 32 at most."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (NaN and infinity are refused)")
    return value


FiniteFloat = Annotated[float, AfterValidator(_finite)]
MetricMap = Annotated[dict[Annotated[str, StringConstraints(max_length=128)], FiniteFloat], Field(max_length=256)]


class Strict(BaseModel):
    """A wire model: unknown fields are refused, fields are documented by their docstrings."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        ser_json_inf_nan="strings",
    )
