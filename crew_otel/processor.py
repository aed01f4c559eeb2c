"""The span processor that stamps every span started inside a run with its request ID and thread.

It sees every span of the tracer provider it is added to: crew_otel's own, the HTTP
instrumentation's and the application's. A span started inside a run (a request ID is in its
parent context) gets ``crew_otel.request.id``, ``thread.id`` and ``thread.name``; other spans
are left alone. The work per span is one context lookup and, inside a run, one
``set_attributes`` call.
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from crew_otel.attributes import REQUEST_ID, THREAD_ID, THREAD_NAME
from crew_otel.context import REQUEST_ID_KEY

_get_ident = threading.get_ident
_current_thread = threading.current_thread


class RequestSpanProcessor(SpanProcessor):
    """Adds ``crew_otel.request.id``, ``thread.id`` and ``thread.name`` to spans inside a run.

    Add it once per TracerProvider; :func:`crew_otel.instrument` does that for the provider it
    is given. ``enabled`` is switched off by ``uninstrument()`` (the SDK cannot remove a
    processor), so an uninstrumented process pays one attribute check per span.
    """

    def __init__(self) -> None:
        self.enabled = True

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        if not self.enabled:
            return
        ctx = parent_context if parent_context is not None else otel_context.get_current()
        request_id: Any = ctx.get(REQUEST_ID_KEY)
        if request_id is None:
            return
        span.set_attributes(
            {
                REQUEST_ID: request_id,
                THREAD_ID: _get_ident(),
                THREAD_NAME: _current_thread().name,
            }
        )

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
