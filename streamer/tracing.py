"""Tracing across hops: W3C trace context in record headers, OpenTelemetry spans at each hop.

On only when OpenTelemetry is there and configured: the application set a tracer provider, or the standard
``OTEL_TRACES_EXPORTER`` variable names an exporter (``console``, or ``otlp`` with an OTLP exporter package
installed; ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_TRACES_SAMPLER`` are read by the
SDK). Otherwise :func:`tracing` returns None, nothing of OpenTelemetry is imported, and the hot path pays one
``is None`` test per batch (``pip install 'streamer[otel]'`` for the API and SDK).

The spans of one request form one trace (WIRE.md, section 2):

- client: ``streamer request`` (CLIENT; from submit to the result, with its status) and its child
  ``streamer publish`` (PRODUCER; until the broker acknowledged the request), whose context the request
  record carries as ``traceparent``;
- each worker or stage: ``streamer process`` (CONSUMER, a child of the incoming ``traceparent``; from the
  record's arrival to its result or stage message being handed to the producer) with a child ``streamer
  queue wait``; its context goes out as the ``traceparent`` of what the worker writes, so the next stage
  continues the trace and the result carries it back to the client;
- per batch: ``streamer batch`` (linked to the ``streamer process`` span of each of its items, as a batch of
  messages is in OpenTelemetry's messaging conventions) with a child ``streamer inference``.

Attributes: ``streamer.model``, ``streamer.model_version``, ``streamer.stage``, ``streamer.batch_size``,
``streamer.request_id``, ``streamer.status``, and the messaging ones (``messaging.system``,
``messaging.destination.name``, ``messaging.kafka.offset``...).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from typing import Any

from schemas import TRACEPARENT_HEADER, TRACESTATE_HEADER

__all__ = ["ClientTracing", "WorkerTracing", "tracing"]

log = logging.getLogger(__name__)



def tracing() -> Any | None:
    """OpenTelemetry's tracer for streamer when tracing is on (see the module doc), else None."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if "opentelemetry.trace" not in sys.modules and exporter in ("", "none"):
        return None  # nothing configured it: do not even import it
    if importlib.util.find_spec("opentelemetry") is None:
        return None
    from opentelemetry import trace

    unset = isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # none set by the application
    if unset and (exporter in ("", "none") or not _configure_from_env(exporter)):
        return None
    return trace.get_tracer("streamer")


def _configure_from_env(exporter: str) -> bool:
    """Set the SDK's tracer provider with the exporter ``OTEL_TRACES_EXPORTER`` names; False if it cannot be."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=%s, but the OpenTelemetry SDK is not installed (pip install "
                    "'streamer[otel]'): no traces", exporter)
        return False
    span_exporter: Any
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: no traces")
            return False
        span_exporter = OTLPSpanExporter()
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not one streamer sets up (console, otlp): no traces", exporter)
        return False
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return True


def _wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as epoch nanoseconds (what spans take)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def _headers(context: Any) -> list[tuple[str, bytes]]:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return [(k, v.encode()) for k, v in carrier.items()]


def _incoming(headers: Any) -> Any:
    """The trace context a record's headers carry (an empty context if none, or one that cannot be read)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key in (TRACEPARENT_HEADER, TRACESTATE_HEADER) and value is not None:
            try:
                carrier[key] = bytes(value).decode()
            except UnicodeDecodeError:
                continue
    return TraceContextTextMapPropagator().extract(carrier)


class ClientTracing:
    """The client's spans: one ``streamer request`` per request, with its ``streamer publish``."""

    def __init__(self, tracer: Any, topic: str) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._trace = trace
        self._topic = topic
        self._requests: dict[str, Any] = {}
        self._publishes: dict[str, Any] = {}

    def started(self, request_id: str, model: str) -> list[tuple[str, bytes]]:
        """Start the request's spans (children of the caller's current span, if any); its trace headers."""
        trace, attrs = self._trace, {"streamer.request_id": request_id, "streamer.model": model,
                                     "messaging.system": "kafka", "messaging.destination.name": self._topic}
        request = self._tracer.start_span("streamer request", kind=trace.SpanKind.CLIENT, attributes=attrs)
        publish = self._tracer.start_span("streamer publish", context=trace.set_span_in_context(request),
                                          kind=trace.SpanKind.PRODUCER, attributes=attrs)
        self._requests[request_id] = request
        self._publishes[request_id] = publish
        return _headers(trace.set_span_in_context(publish))

    def published(self, request_ids: list[str], exc: BaseException | None = None) -> None:
        for rid in request_ids:
            span = self._publishes.pop(rid, None)
            if span is not None:
                if exc is not None:
                    span.record_exception(exc)
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(exc)))
                span.end()

    def answered(self, request_id: str, result: Any = None, exc: BaseException | None = None) -> None:
        """The request is over: its result (any status) arrived, or ``exc`` (a timeout, a failure to send)."""
        self.published([request_id], exc)
        span = self._requests.pop(request_id, None)
        if span is None:
            return
        if result is not None:
            span.set_attributes({"streamer.status": result.status, "streamer.model_version": result.model_version,
                                 "streamer.worker": result.worker})
            if result.status != "ok":
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, result.status))
        if exc is not None:
            span.record_exception(exc)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__))
        span.end()


class WorkerTracing:
    """A worker's or stage's spans (see the module doc), kept on each batch between its steps."""

    def __init__(self, tracer: Any, model: str, stage: str | None) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._trace = trace
        self._attrs = {"streamer.model": model, "messaging.system": "kafka"}
        if stage:
            self._attrs["streamer.stage"] = stage

    def received(self, batch: Any) -> None:
        """Start a ``streamer process`` span for each record of the batch, from its arrival, with its queue wait
        (the batch starts now)."""
        trace, tracer, attrs = self._trace, self._tracer, self._attrs
        now = time.time_ns()
        spans: list[Any] = []
        for run in batch.runs:
            arrived = _wall_ns(run.arrived)
            for rec in run.records:
                span = tracer.start_span("streamer process", context=_incoming(rec.headers),
                                         kind=trace.SpanKind.CONSUMER, start_time=arrived, attributes={
                                             **attrs, "messaging.destination.name": rec.topic,
                                             "messaging.kafka.partition": rec.partition,
                                             "messaging.kafka.offset": rec.offset})
                tracer.start_span("streamer queue wait", context=trace.set_span_in_context(span),
                                  start_time=arrived, attributes=attrs).end(end_time=now)
                spans.append(span)
        batch.spans = spans

    def ran(self, batch: Any, version: str, inference_s: float, answered_ns: int) -> None:
        """The batch span, linked to its items' spans, and its inference span (which ended ``answered_ns``)."""
        trace, spans = self._trace, batch.spans
        if spans is None:
            return
        size = len(batch.inputs) if batch.inputs else 0
        attrs = {**self._attrs, "streamer.batch_size": size, "streamer.model_version": version}
        start = min((s.start_time for s in spans), default=answered_ns)
        links = [trace.Link(s.get_span_context()) for s in spans]
        batch_span = self._tracer.start_span("streamer batch", links=links, start_time=start, attributes=attrs)
        if size:
            self._tracer.start_span("streamer inference", context=trace.set_span_in_context(batch_span),
                                    start_time=answered_ns - int(inference_s * 1e9), attributes=attrs,
                                    ).end(end_time=answered_ns)
        for s in spans:
            s.set_attributes({"streamer.batch_size": size, "streamer.model_version": version})
        batch_span.end()

    def headers(self, batch: Any, i: int) -> list[tuple[str, bytes]]:
        """The trace headers of what the worker writes for record ``i``: its process span's context."""
        return _headers(self._trace.set_span_in_context(batch.spans[i]))

    def finished(self, batch: Any) -> None:
        """End the batch's process spans, each with its record's outcome."""
        spans, batch.spans = batch.spans, None
        for i, span in enumerate(spans or ()):
            status = batch.status[i]
            if status is not None:
                span.set_attribute("streamer.status", status)
                if status not in ("ok", "forwarded"):
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, status))
            span.end()
