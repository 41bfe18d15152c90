"""Distributed traces with OpenTelemetry, carried in CloudEvents (the distributed-tracing extension).

Off by default: `span()` is then a `nullcontext` and no event carries trace attributes. On with
one setting, `FORSETI_OTLP_ENDPOINT=http://collector:4318` (OTLP over HTTP): `configure()` sets up a
tracer provider that batches spans to that endpoint, and every event encoded while a span is current
carries its W3C `traceparent` (and `tracestate`) as CloudEvents attributes. A receiver continues the
trace with `span(..., parent=event)`. So one task's trace runs from the client's publish through the
worker's intake and the job's phases, the executor's steps and the device's fetch and load.

The provider is Forseti's own, not OpenTelemetry's global one, so an application that embeds the
client keeps its own tracing setup, and a test can switch tracing off again (`disable()`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from forseti.schemas import envelope

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanKind, Tracer

ENDPOINT_VARIABLE = "FORSETI_OTLP_ENDPOINT"
"""The setting that turns tracing on: an OTLP/HTTP collector's base URL (`/v1/traces` is appended)."""
SAMPLE_VARIABLE = "FORSETI_TRACE_SAMPLE"
"""The share of new traces recorded (0-1, default 1); a trace started elsewhere follows its parent's choice."""

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_W3C: Any = None
"""OpenTelemetry's W3C Trace Context propagator, once tracing is configured."""


def configure(service: str, endpoint: str, *, sample: float = 1.0) -> None:
    """Export this process's spans as `service` to the OTLP/HTTP collector at `endpoint`, and carry
    the current span's context in every event encoded from now on. `sample`: the share of the traces
    this process starts that are recorded (OpenTelemetry's parent-based ratio sampler: a span whose
    parent came in an event is recorded when that parent was)."""
    global _tracer, _provider, _W3C
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise RuntimeError(
            f"{ENDPOINT_VARIABLE} is set, but OpenTelemetry is not installed: install forseti-worker[tracing]"
        ) from exc
    disable()
    if not 0.0 <= sample <= 1.0:
        raise ValueError(f"a trace sample is a share between 0 and 1, not {sample}")
    _provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}), sampler=ParentBased(TraceIdRatioBased(sample))
    )
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    _tracer = _provider.get_tracer("forseti")
    _W3C = TraceContextTextMapPropagator()
    envelope.trace_context = _current_context


def configure_from_env(service: str) -> bool:
    """`configure()` when FORSETI_OTLP_ENDPOINT is set; whether it was."""
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    if endpoint:
        configure(service, endpoint, sample=float(os.environ.get(SAMPLE_VARIABLE, "1")))
    return bool(endpoint)


def disable() -> None:
    """Flush what was recorded and stop tracing (what a service does as it stops)."""
    global _tracer, _provider
    envelope.trace_context = None
    if _provider is not None:
        _provider.shutdown()  # flushes the batch first
    _tracer, _provider = None, None


def _current_context() -> dict[str, str]:
    # W3C Trace Context alone, which is what the CloudEvents extension carries (no baggage)
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier


def _parent_context(parent: envelope.Event[Any] | Mapping[str, str] | None) -> Any:
    if parent is None:
        return None
    if isinstance(parent, envelope.Event):
        if parent.traceparent is None:
            return None
        carrier = {"traceparent": parent.traceparent, "tracestate": parent.tracestate or ""}
    else:
        carrier = dict(parent)
    return _W3C.extract(carrier)


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: envelope.Event[Any] | Mapping[str, str] | None = None,
    kind: str = "internal",
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Span | None]:
    """A span around the block, current inside it (None when tracing is off). `parent`: the event
    (or a `traceparent` carrier) whose trace this continues; else the current span's. `kind`:
    internal, producer, consumer, client or server."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    span_kind: SpanKind = SpanKind[kind.upper()]
    with _tracer.start_as_current_span(
        name, context=_parent_context(parent), kind=span_kind, attributes=dict(attributes or {})
    ) as current:
        yield current
