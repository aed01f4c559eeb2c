"""Failing spans and error origins.

Every failing span gets status ERROR, ``error.type`` and an exception event (the traceback text
includes the whole ``__cause__``/``__context__`` chain). Exactly one span per failure also gets
``crew_otel.error.origin=true``: the innermost span where the error first appeared. The first
span to record an exception marks the exception object; ancestors that see the same exception
(or one raised from it) find the mark in the chain and only propagate.

``crew_otel.error.recovered=true`` on an origin means a retry layer took over after this error
(the HTTP client's retries, CrewAI's rate-limit retry) or CrewAI handled it (a tool error
returned to the model as text), so it did not propagate from there.

A cancellation (``asyncio.CancelledError``: ``wait_for`` timing out, a task cancelled, asyncio
cancelling the loop's other tasks after a ``KeyboardInterrupt``/``SystemExit`` stopped it) is
not a failure inside the run: a span it ends gets status ERROR, ``error.type="CancelledError"``
and the exception event (the run did not complete, and the event's time is when it was
cancelled), but never ``crew_otel.error.origin`` and no count in ``crew_otel.error.origins``. So
a caller's timeout invents no origin, and a ``BaseException`` that stopped the loop keeps its
one origin (where it was raised) however many tasks asyncio cancelled because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback

from opentelemetry.trace import Span, Status, StatusCode

from crew_otel import attributes as a
from crew_otel.content import redact
from crew_otel.metrics import CrewOtelMetrics

_MARK = "_crew_otel_error_origin"
_RECORDED_ON = "_crew_otel_recorded_on"
_MAX_CHAIN = 32
_MAX_STATUS_DESCRIPTION = 256
#: Longest exception message / stack trace recorded (the end of a long trace is kept).
MAX_EXCEPTION_TEXT = 16384


def is_marked(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception in its chain already has an origin span."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _MAX_CHAIN:
        if current.__dict__.get(_MARK):
            return True
        seen += 1
        current = current.__cause__ or current.__context__
    return False


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` cancels the work rather than reports a failure of it."""
    return isinstance(exc, asyncio.CancelledError)


def mark(exc: BaseException) -> None:
    """Record on the exception object that its origin span has been marked."""
    with contextlib.suppress(AttributeError, TypeError):  # a type without a __dict__
        exc.__dict__[_MARK] = True


def exception_attributes(exc: BaseException) -> dict[str, str]:
    """The exception event's message and stack trace (whole chain), with secrets redacted.

    Error texts are not content, but they can carry an API key (a provider rejecting it) or
    a connection string: they go through the same redaction as captured content.
    """
    try:
        message = str(exc)
    except Exception:
        message = ""
    stacktrace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "exception.message": redact(message[:MAX_EXCEPTION_TEXT]),
        "exception.stacktrace": redact(stacktrace[-MAX_EXCEPTION_TEXT:]),
    }


def describe(exc: BaseException) -> str:
    """Short status description: ``"ClassName: message"`` (cut)."""
    try:
        message = str(exc)
    except Exception:
        message = ""
    text = f"{type(exc).__qualname__}: {message}" if message else type(exc).__qualname__
    return text[:_MAX_STATUS_DESCRIPTION]


class ErrorRecorder:
    """Records failures on spans and counts error origins."""

    def __init__(self, metrics: CrewOtelMetrics) -> None:
        self._metrics = metrics

    def record(
        self,
        span: Span,
        exc: BaseException,
        operation: str,
        *,
        recovered: bool = False,
        origin: bool | None = None,
    ) -> bool:
        """Mark ``span`` as failed by ``exc``; returns whether it is the error's origin.

        ``origin=None`` decides by the exception chain; ``True``/``False`` force it (the model
        call passes ``False`` when a failed HTTP attempt inside it is already the origin). A
        cancellation is never an origin (see the module docstring).
        """
        if exc.__dict__.get(_RECORDED_ON) == id(span):
            return False  # already recorded on this span (by an inner hook of the same call)
        error_type = a.error_type(exc)
        if is_cancellation(exc):
            is_origin = False
        else:
            is_origin = (not is_marked(exc)) if origin is None else origin
            mark(exc)
        with contextlib.suppress(AttributeError, TypeError):
            exc.__dict__[_RECORDED_ON] = id(span)
        if span.is_recording():
            span.set_status(Status(StatusCode.ERROR, redact(describe(exc))))
            span.set_attribute(a.ERROR_TYPE, error_type)
            span.record_exception(exc, attributes=exception_attributes(exc), escaped=not recovered)
            if is_origin:
                span.set_attributes({a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered})
        if is_origin:
            self._metrics.origin(operation, error_type, recovered)
        return is_origin

    def record_status(
        self, span: Span, error_type: str, operation: str, *, recovered: bool, description: str
    ) -> None:
        """Mark ``span`` as an error origin without an exception (e.g. an HTTP 500 response)."""
        if span.is_recording():
            span.set_status(Status(StatusCode.ERROR, description[:_MAX_STATUS_DESCRIPTION]))
            span.set_attributes(
                {a.ERROR_TYPE: error_type, a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered}
            )
        self._metrics.origin(operation, error_type, recovered)
