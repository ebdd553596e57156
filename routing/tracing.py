"""OpenTelemetry spans of each request, built from its timing breakdown (routing/timing.py).

One server span per request (continuing the W3C ``traceparent`` the client sent, if any),
with the plan's steps as children laid out in the order the request met them::

    POST /v1/chat/completions
    ├── prefill             (router_queue, prefill_queue, prefill_compute)
    ├── kv_transfer
    └── decode              (decode_queue, first_decode_step)

The steps' durations come from the engines' own per-request stats, so they are placed from
the request's start, back to back. The response carries the request span's own
``traceparent``. Off unless ``tracing.enabled``; exported over OTLP/HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Tracer

from routing.timing import Timing

# The parts of each step (Timing's components).
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("failed_prefill", ("failed_prefill",)),
    ("prefill", ("router_queue", "prefill_queue", "prefill")),
    ("kv_transfer", ("kv_transfer",)),
    ("decode", ("decode_queue", "first_decode_step")),
)
_CHILD_NAME = {"prefill": "prefill_compute"}


def make_tracer(service_name: str, otlp_endpoint: str | None = None) -> Tracer:
    """A tracer exporting over OTLP/HTTP in batches, on a provider of its own."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider.get_tracer("tandem.ingress")


class RequestSpan:
    """The span of one request: started when it arrives, its steps added once the first
    token is out, ended with the response."""

    def __init__(self, tracer: Tracer, name: str, headers: Mapping[str, str], attributes: dict[str, Any]):
        self.started_ns = time.time_ns()
        parent = propagate.extract(dict(headers))
        self.span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=self.started_ns,
                                      attributes=attributes)
        self._tracer = tracer

    def traceparent(self) -> dict[str, str]:
        """The header that continues this request's trace (``traceparent``)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def add_steps(self, timing: Timing) -> None:
        context = trace.set_span_in_context(self.span)
        at = self.started_ns
        for step, parts in STEPS:
            durations = [(part, timing.parts[part]) for part in parts if part in timing.parts]
            if not durations:
                continue
            step_ns = sum(int(seconds * 1e9) for _, seconds in durations)
            step_span = self._tracer.start_span(step, context=context, start_time=at)
            if len(durations) > 1:
                inner = trace.set_span_in_context(step_span)
                child_at = at
                for part, seconds in durations:
                    end = child_at + int(seconds * 1e9)
                    self._tracer.start_span(_CHILD_NAME.get(part, part), context=inner, start_time=child_at).end(end)
                    child_at = end
            step_span.end(at + step_ns)
            at += step_ns

    def end(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(trace.StatusCode.ERROR)
        self.span.end()
