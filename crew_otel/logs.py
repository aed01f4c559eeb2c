"""Log correlation: ``request_id``, ``trace_id`` and ``span_id`` on log records made in a run.

Enable it with one line at start-up::

    crew_otel.logs.install()

and use the fields in a format string::

    logging.basicConfig(format="%(asctime)s [%(request_id)s %(trace_id)s] %(message)s")

:func:`install` chains a log-record factory, so every record from every logger (CrewAI's and
yours) gets the fields whatever handlers are configured. :class:`RequestContextFilter` does the
same as a ``logging.Filter`` for those who prefer to attach it to specific handlers. Records made
outside a run get ``"-"``, so format strings never fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from crew_otel.context import current_request_id

EMPTY = "-"


def _annotate(record: logging.LogRecord) -> None:
    request_id = current_request_id()
    record.request_id = request_id if request_id is not None else EMPTY
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        record.trace_id = format(span_context.trace_id, "032x")
        record.span_id = format(span_context.span_id, "016x")
    else:
        record.trace_id = EMPTY
        record.span_id = EMPTY


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        _annotate(record)
        return True


class _RecordFactory:
    """A log-record factory that annotates records and defers to the previous factory."""

    def __init__(self, previous: Callable[..., logging.LogRecord]) -> None:
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        try:
            _annotate(record)
        except Exception:  # never let correlation break logging
            record.request_id = record.trace_id = record.span_id = EMPTY
        return record


def install() -> None:
    """Add ``request_id``, ``trace_id``, ``span_id`` to every log record (idempotent)."""
    current = logging.getLogRecordFactory()
    if isinstance(current, _RecordFactory):
        return
    logging.setLogRecordFactory(_RecordFactory(current))


def uninstall() -> None:
    """Remove what :func:`install` added (if nothing was chained on top of it since)."""
    current = logging.getLogRecordFactory()
    if isinstance(current, _RecordFactory):
        logging.setLogRecordFactory(current.previous)
