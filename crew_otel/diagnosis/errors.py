"""Failing spans and error origins.

Every failing span gets status ERROR, ``error.type`` and an exception event (the traceback text
includes the whole ``__cause__``/``__context__`` chain; see :mod:`.error_text` for what is kept
out of it). Exactly one span per failure also gets ``crew_otel.error.origin=true``: the
innermost span where the error first appeared. The first span to record an exception notes it
in the :class:`OriginLedger`; ancestors that see the same exception (or one raised from it, or
one raised while handling it) find the note and only propagate.

``crew_otel.error.recovered=true`` on an origin means a retry layer took over after this error
(the HTTP client's retries, CrewAI's rate-limit retry, CrewAI re-running the agent) or CrewAI
handled it (a tool error returned to the model as text), so it did not propagate from there. An
error raised *after* its predecessor was recovered (the re-run agent failing again, raising a
new error inside CrewAI's ``except`` block, or re-raising the same object) is a new failure with
its own origin. When a layer that was expected to retry lets the error through instead (CrewAI
decides from counters that concurrent runs sharing an Agent also move), the span where it
escaped becomes the fatal origin. So every failure that reaches the caller has exactly one
origin with ``recovered=false``.

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
import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode

from crew_otel import attributes as a
from crew_otel.context import KICKOFF_KEY
from crew_otel.diagnosis import error_text
from crew_otel.metrics import CrewOtelMetrics

#: Runs (traces) whose marks are kept; the oldest are forgotten beyond this.
MAX_TRACKED_RUNS = 1024
#: Marks kept per run (an exception chain is short; a run raising thousands is cut).
MAX_MARKS_PER_RUN = 512
_clock = time.perf_counter


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` cancels the work rather than reports a failure of it."""
    return isinstance(exc, asyncio.CancelledError)


@dataclasses.dataclass
class _Mark:
    """What is known about one exception object within one run."""

    #: The exception itself (held only while its run is tracked; compared by identity).
    exc: BaseException
    #: Whether its origin said a retry layer takes over.
    recovered: bool
    #: When it was last recorded as recovered (``perf_counter``), or None.
    recovered_at: float | None
    #: ``id`` of the spans it was recorded on.
    spans: set[int] = dataclasses.field(default_factory=set)


class OriginLedger:
    """Which exceptions already have an origin span, per run, kept off the exception objects.

    The application's exception objects are never touched (an exception instance raised again
    in a later request, a circuit breaker's shared error, gets an origin in each run). Marks are
    kept per trace while a kickoff of that trace is in flight (:meth:`hold`/:meth:`release`)
    and dropped when the last one ends; beyond :data:`MAX_TRACKED_RUNS` runs the oldest go.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: collections.OrderedDict[int, dict[int, _Mark]] = collections.OrderedDict()
        self._holders: dict[int, int] = {}

    def get(self, run: int, exc: BaseException) -> _Mark | None:
        with self._lock:
            marks = self._runs.get(run)
            mark = marks.get(id(exc)) if marks is not None else None
        return mark if mark is not None and mark.exc is exc else None

    def put(self, run: int, mark: _Mark) -> None:
        with self._lock:
            marks = self._runs.get(run)
            if marks is None:
                marks = self._runs[run] = {}
                while len(self._runs) > MAX_TRACKED_RUNS:
                    evicted, _ = self._runs.popitem(last=False)
                    self._holders.pop(evicted, None)
            if len(marks) < MAX_MARKS_PER_RUN or id(mark.exc) in marks:
                marks[id(mark.exc)] = mark

    def hold(self, run: int) -> None:
        """A kickoff of this run began: keep its marks until :meth:`release`."""
        with self._lock:
            self._holders[run] = self._holders.get(run, 0) + 1

    def release(self, run: int) -> None:
        """A kickoff of this run ended: drop the run's marks when it was the last one."""
        with self._lock:
            left = self._holders.get(run, 0) - 1
            if left > 0:
                self._holders[run] = left
                return
            self._holders.pop(run, None)
            self._runs.pop(run, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)


def run_key(span: Span, kickoff: object = None) -> int:
    """The run a span belongs to: its trace, or (spans without one: no SDK) its kickoff."""
    trace_id = span.get_span_context().trace_id
    if trace_id:
        return int(trace_id)
    return id(kickoff if kickoff is not None else otel_context.get_value(KICKOFF_KEY))


class ErrorRecorder:
    """Records failures on spans and counts error origins."""

    def __init__(self, metrics: CrewOtelMetrics, capture_content: bool = False) -> None:
        self._metrics = metrics
        self._capture = capture_content
        self.ledger = OriginLedger()

    def hold_run(self, span: Span, kickoff: object) -> Callable[[], None]:
        """A top-level kickoff began: keep its run's marks until the returned release runs."""
        run = run_key(span, kickoff)
        self.ledger.hold(run)
        return lambda: self.ledger.release(run)

    def record(
        self,
        span: Span,
        exc: BaseException,
        operation: str,
        *,
        recovered: bool = False,
        origin: bool | None = None,
        since: float | None = None,
        expected_retry: bool = False,
    ) -> bool:
        """Mark ``span`` as failed by ``exc``; returns whether it is the error's origin.

        Args:
            origin: ``None`` decides by the exception chain; ``True``/``False`` force it (the
                model call passes ``False`` when a failed HTTP attempt inside it is already
                the origin). A cancellation is never an origin (see the module docstring).
            recovered: a retry layer takes over after this error (or CrewAI handles it).
            since: when the span's call began (``perf_counter``): an exception recovered
                before that is a new failure here, not the same one propagating.
            expected_retry: this span is the retry layer an inner origin counted on; the
                error escaping it means no retry happened, so this span becomes the fatal
                origin when the error's origin said ``recovered``.
        """
        run = run_key(span)
        mark = self.ledger.get(run, exc)
        if mark is not None and id(span) in mark.spans:
            return False  # already recorded on this span (by an inner hook of the same call)
        if is_cancellation(exc):
            is_origin = False
        elif origin is not None:
            is_origin = origin
        else:
            is_origin = not self._same_failure(run, exc, since, expected_retry)
        if mark is None or is_origin:
            new = _Mark(exc, recovered, _clock() if recovered else None)
            if mark is not None:
                new.spans = mark.spans
            mark = new
        elif recovered and mark.recovered:
            mark.recovered_at = _clock()
        mark.spans.add(id(span))
        self.ledger.put(run, mark)
        error_type = a.error_type(exc)
        if span.is_recording():
            capture = self._capture
            text = error_text.message(exc, capture)
            span.set_status(Status(StatusCode.ERROR, error_text.describe(exc, text)))
            span.set_attribute(a.ERROR_TYPE, error_type)
            span.add_event(
                "exception",
                {
                    "exception.type": type(exc).__name__,
                    "exception.message": text,
                    "exception.stacktrace": error_text.stacktrace(exc, capture),
                    "exception.escaped": str(not recovered),
                },
            )
            if is_origin:
                span.set_attributes({a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered})
        if is_origin:
            self._metrics.origin(operation, error_type, recovered)
        return is_origin

    def _same_failure(
        self, run: int, exc: BaseException, since: float | None, expected_retry: bool
    ) -> bool:
        """Whether ``exc`` continues a failure that already has its origin in this run."""
        seen = 0
        current: BaseException | None = exc
        while current is not None and seen < error_text.MAX_CHAIN:
            mark = self.ledger.get(run, current)
            if mark is not None:
                if not mark.recovered:
                    return True  # the same failure (or one raised from / while handling it)
                recovered_at = mark.recovered_at
                if since is not None and recovered_at is not None and recovered_at < since:
                    return False  # handled before this call began: this is a new failure
                # Still propagating towards the layer that recovers it, unless this span is
                # that layer and the error escapes it.
                return not expected_retry
            seen += 1
            current = current.__cause__ or current.__context__
        return False

    def record_status(
        self, span: Span, error_type: str, operation: str, *, recovered: bool, description: str
    ) -> None:
        """Mark ``span`` as an error origin without an exception (e.g. an HTTP 500 response)."""
        if span.is_recording():
            span.set_status(
                Status(StatusCode.ERROR, description[: error_text.MAX_STATUS_DESCRIPTION])
            )
            span.set_attributes(
                {a.ERROR_TYPE: error_type, a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered}
            )
        self._metrics.origin(operation, error_type, recovered)
