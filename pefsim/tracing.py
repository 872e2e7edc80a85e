"""Trace context across the services: W3C ``traceparent`` on every call, in the call histories,
and (when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set) as OpenTelemetry spans over OTLP/gRPC.

Every call a service serves is a span. Its parent is the span of the call that made it, named
by the ``traceparent`` gRPC metadata the caller sent (W3C Trace Context: ``00-<trace id>-<parent
span id>-<flags>``); a call without one (an operator's, a guest's first) starts a trace. While a
call is served its span is the current one (a context variable, so tasks the handler starts
inherit it), and every call the service makes meanwhile carries it on. So a guest's UV_ESM, the
UV's H_SVM_INIT_START ... H_SVM_INIT_ABORT, and the HV's UV_PAGE_OUTs, UV_SVM_TERMINATE and
VcpuResume share one trace id, and each history line names its ``trace``, ``span`` and
``parent``: the timeline (pefsim/timeline) draws the causal arrows from them.

A traceparent a caller sends may be hostile: anything but the W3C form (lowercase hex, ids not
all zero) is ignored and the call starts a trace of its own.

The OpenTelemetry SDK and its OTLP exporter are imported only when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; the spans then
go through its BatchSpanProcessor (bounded queue, batches, retries) to the collector, with the
service's name as ``service.name``. Without it a span costs two random ids and a context switch.
This module imports nothing of grpc.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

HEADER = "traceparent"
_FORM = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(frozen=True)
class Span:
    trace: str  # 32 hex digits
    span: str  # 16 hex digits
    parent: str = ""  # the caller's span ("" for a trace's first call)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace}-{self.span}-01"

    def fields(self) -> dict[str, str]:
        """What a history line records of it."""
        return {"trace": self.trace, "span": self.span, "parent": self.parent}


CURRENT: contextvars.ContextVar[Span | None] = contextvars.ContextVar("pefsim_span", default=None)
_rng = random.Random()  # ids only need to be unique, not secret


def _new_id(digits: int) -> str:
    while True:
        value = f"{_rng.getrandbits(digits * 4):0{digits}x}"
        if value.strip("0"):
            return value


def parse(traceparent: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a well-formed W3C traceparent, else None."""
    if not traceparent or len(traceparent) > 256:
        return None
    m = _FORM.fullmatch(traceparent.strip())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
        return None
    return m.group(1), m.group(2)


def child_of(traceparent: str | None) -> Span:
    """A new span under the caller's (a new trace when it sent none, or a malformed one)."""
    parent = parse(traceparent)
    if parent is None:
        return Span(_new_id(32), _new_id(16))
    return Span(parent[0], _new_id(16), parent[1])


def current_traceparent() -> str | None:
    span = CURRENT.get()
    return None if span is None else span.traceparent


def outgoing_metadata(metadata: Any) -> tuple:
    """A call's metadata with the current span's traceparent added (as its parent), unless it
    has one already."""
    md = tuple(metadata or ())
    tp = current_traceparent()
    return md if tp is None or any(k == HEADER for k, _ in md) else md + ((HEADER, tp),)


@contextlib.contextmanager
def serving(service: str, name: str, traceparent: str | None) -> Iterator[Span]:
    """The span of one call ``name`` a gRPC ``service`` serves: current for the block (and the
    tasks it starts), exported when the block ends if an exporter is on."""
    span = child_of(traceparent)
    token = CURRENT.set(span)
    start = time.time_ns()
    try:
        yield span
    finally:
        CURRENT.reset(token)
        if _exporter is not None:
            _exporter.export(name, span, start, time.time_ns(), {"rpc.service": service, "rpc.method": name})


@contextlib.contextmanager
def resumed(traceparent: str | None) -> Iterator[None]:
    """Work carried on for an earlier call (an HV that restarted finishing a journalled abort):
    its calls join that call's trace, as children of its span."""
    parent = parse(traceparent)
    token = CURRENT.set(None if parent is None else Span(parent[0], parent[1]))
    try:
        yield
    finally:
        CURRENT.reset(token)


# -- OTLP export --------------------------------------------------------------------------------

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class _OtlpExporter:
    """Our spans as OpenTelemetry SDK ReadableSpans, through its BatchSpanProcessor and OTLP/gRPC
    exporter (which read the standard OTEL_EXPORTER_OTLP_* variables: endpoint, headers, insecure)."""

    def __init__(self, service: str):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

        self._readable, self._context, self._kind, self._flags = ReadableSpan, SpanContext, SpanKind, TraceFlags
        self.resource = Resource.create({"service.name": service})
        self.processor = BatchSpanProcessor(OTLPSpanExporter())

    def export(self, name: str, span: Span, start_ns: int, end_ns: int, attributes: dict) -> None:
        ctx = self._context(int(span.trace, 16), int(span.span, 16), is_remote=False,
                            trace_flags=self._flags(self._flags.SAMPLED))
        parent = self._context(int(span.trace, 16), int(span.parent, 16), is_remote=True,
                               trace_flags=self._flags(self._flags.SAMPLED)) if span.parent else None
        self.processor.on_end(self._readable(name=name, context=ctx, parent=parent, resource=self.resource,
                                             attributes=attributes, kind=self._kind.SERVER,
                                             start_time=start_ns, end_time=end_ns))

    def shutdown(self) -> None:
        self.processor.shutdown()  # flushes what is queued


_exporter: _OtlpExporter | None = None


def configure(service: str) -> bool:
    """Export this process's spans over OTLP if the standard endpoint variable is set; True if so."""
    global _exporter
    if _exporter is None and any(os.environ.get(v) for v in ENDPOINT_VARS):
        _exporter = _OtlpExporter(service)
    return _exporter is not None


def shutdown() -> None:
    """Flush and stop the exporter (a service's clean stop)."""
    global _exporter
    if _exporter is not None:
        _exporter.shutdown()
        _exporter = None
