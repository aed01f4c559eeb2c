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

Two cases are decided after the origin's own call ended. Tool calls CrewAI runs side by side in a
thread pool re-raise one error of theirs and drop the others: an error escaping a tool
dispatcher is a :class:`PendingOrigin` whose span stays open until a span the error reaches
records it, or until the step that waits for the tool ends (then the exception object's
traceback tells whether it was raised again beyond the tool's thread). And an HTTP attempt that
counted on a layer above (a 400 CrewAI handles as a context-window overflow) while the model
call around it finds that none takes over: the model call is the fatal origin
(:meth:`ErrorRecorder.record` with ``origin=False``).

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
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType, TracebackType

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode

from crew_otel import attributes as a
from crew_otel.context import KICKOFF_KEY
from crew_otel.diagnosis import error_text
from crew_otel.diagnosis.failure_cause import Failure, SharedThing, classify
from crew_otel.metrics import CrewOtelMetrics

#: Runs (traces) whose marks are kept; the oldest are forgotten beyond this.
MAX_TRACKED_RUNS = 1024
#: Marks kept per run (an exception chain is short; a run raising thousands is cut).
MAX_MARKS_PER_RUN = 512
#: Frames looked at to tell where a pending origin's exception went.
MAX_STACK = 256
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
    #: Its origin, while whether it reaches the caller is not known yet.
    pending: PendingOrigin | None = None
    #: The operation and span name of its origin (when this exception's span is one).
    origin_operation: str | None = None
    origin_name: str | None = None
    #: A span it went through was in use by another request (the first seen).
    shared: SharedThing | None = None
    #: A span it went through found a SQLite database locked.
    database_locked: bool = False


class PendingOrigin:
    """An error's origin whose outcome is decided above it (see ``ErrorRecorder.record_unsettled``).

    Its span stays open without ``crew_otel.error.origin``/``recovered`` until it is settled:
    by the first span the error reaches that records it (recovered as that span says), or, when
    the call that waits for it ends first, by where the exception object went
    (:meth:`settle_by_path`).
    """

    def __init__(
        self,
        recorder: ErrorRecorder,
        mark: _Mark,
        span: Span,
        operation: str,
        release: Callable[[], None],
    ) -> None:
        self._recorder = recorder
        self._mark = mark
        self._span = span
        self._operation = operation
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()
        #: The exception's traceback where it was recorded, and the frames then on the stack.
        self._recorded_tb = mark.exc.__traceback__
        self._stack = _stack_frames(sys._getframe(1))

    def settle_by_path(self) -> None:
        """Settle from the exception object's own traceback: fatal if it was raised again
        outside the frames that were running where it was recorded (CrewAI re-raised it in the
        thread that waited for the tool call), recovered if it went no further (dropped).

        That is what decides when no span it reaches records it: a ``KeyboardInterrupt`` that
        stops an event loop leaves the run's coroutines to a cancellation.
        """
        self.settle(recovered=not _raised_beyond(self._mark.exc, self._recorded_tb, self._stack))

    def settle(self, recovered: bool) -> None:
        """Mark the origin (once): ``recovered`` says whether the error ended there; then let
        its span end."""
        with self._lock:
            release, self._release = self._release, None
        if release is None:
            return
        self._recorded_tb, self._stack = None, frozenset()
        mark = self._mark
        mark.recovered = recovered
        mark.recovered_at = _clock() if recovered else None
        mark.pending = None
        try:
            self._recorder.mark_origin(self._span, mark.exc, self._operation, recovered)
        finally:
            release()


def _span_name(span: Span) -> str | None:
    name = getattr(span, "name", None)
    return name if isinstance(name, str) else None


def _note_path(mark: _Mark, span: Span) -> None:
    """What the failure met on ``span`` (an SDK span tells): sharing, a locked database."""
    attributes = getattr(span, "attributes", None)
    if not isinstance(attributes, Mapping):
        return
    if attributes.get(a.DATABASE_LOCKED) is not None:
        mark.database_locked = True
    if mark.shared is None and attributes.get(a.SHARED_INSTANCE) is True:
        mark.shared = shared_on(span)


def shared_on(span: Span) -> SharedThing | None:
    """The thing ``span``'s last ``crew_otel.shared_instance`` event names (SDK spans)."""
    for event in reversed(tuple(getattr(span, "events", ()) or ())):
        if getattr(event, "name", None) == a.EVENT_SHARED_INSTANCE:
            attrs = event.attributes or {}
            kind = attrs.get(a.SHARED_INSTANCE_KIND)
            name = attrs.get(a.SHARED_INSTANCE_NAME) or attrs.get(a.SHARED_INSTANCE_CLASS)
            if isinstance(kind, str):
                return SharedThing(kind, str(name) if name is not None else kind)
    return None


def _stack_frames(frame: FrameType | None) -> frozenset[FrameType]:
    """The frames running in this thread from ``frame`` outwards (at most ``MAX_STACK``)."""
    frames: set[FrameType] = set()
    while frame is not None and len(frames) < MAX_STACK:
        frames.add(frame)
        frame = frame.f_back
    return frozenset(frames)


def _raised_beyond(
    exc: BaseException, recorded: TracebackType | None, stack: frozenset[FrameType]
) -> bool:
    """Whether ``exc`` went through a frame outside ``stack`` since its traceback was
    ``recorded`` (its traceback grows at the front as it propagates)."""
    tb = exc.__traceback__
    seen = 0
    while tb is not None and tb is not recorded and seen < MAX_STACK:
        if tb.tb_frame not in stack:
            return True
        tb = tb.tb_next
        seen += 1
    return False


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
        #: Per run: whether the HTTP attempt that failed last inside a span (by span ID)
        #: counted on a layer above to take over (``record_status`` of an origin), and its
        #: span's name.
        self._inner: dict[int, dict[int, tuple[bool, str | None]]] = {}

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
                    self._inner.pop(evicted, None)
            if len(marks) < MAX_MARKS_PER_RUN or id(mark.exc) in marks:
                marks[id(mark.exc)] = mark

    def note_inner(
        self, run: int, parent_span_id: int, recovered: bool, name: str | None = None
    ) -> None:
        """An origin without an exception (an HTTP attempt, span ``name``) inside the span
        ``parent_span_id``: whether it counted on a layer above to take over."""
        with self._lock:
            if run not in self._holders:
                return  # outside a kickoff: nothing is kept for the run
            inner = self._inner.setdefault(run, {})
            if len(inner) < MAX_MARKS_PER_RUN or parent_span_id in inner:
                inner[parent_span_id] = (recovered, name)

    def inner(self, run: int, span_id: int) -> tuple[bool, str | None] | None:
        """What :meth:`note_inner` noted for the span ``span_id`` (``None``: nothing)."""
        with self._lock:
            return self._inner.get(run, {}).get(span_id)

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
            self._inner.pop(run, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)


def _is_origin_span(span: Span) -> bool:
    """Whether ``span`` is already marked as an error's origin (an SDK span tells)."""
    attributes = getattr(span, "attributes", None)
    return isinstance(attributes, Mapping) and attributes.get(a.ERROR_ORIGIN) is True


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
                the origin: it becomes the fatal origin itself when that attempt counted on a
                layer to take over and ``recovered`` says none does). A cancellation is never
                an origin (see the module docstring).
            recovered: a retry layer takes over after this error (or CrewAI handles it).
            since: when the span's call began (``perf_counter``): an exception recovered
                before that is a new failure here, not the same one propagating.
            expected_retry: this span is the retry layer an inner origin counted on; the
                error escaping it means no retry happened, so this span becomes the fatal
                origin when the error's origin said ``recovered``.
        """
        is_origin, _ = self._record(
            span, exc, operation, recovered, origin, since, expected_retry, None
        )
        return is_origin

    def failure(self, span: Span, exc: BaseException) -> Failure:
        """Why the run of ``span`` (its kickoff) failed with ``exc``, which reached the caller
        (see :mod:`crew_otel.diagnosis.failure_cause`); call after recording ``exc`` there."""
        run = run_key(span)
        operation = origin = None
        shared: SharedThing | None = None
        locked = False
        seen = 0
        current: BaseException | None = exc
        while current is not None and seen < error_text.MAX_CHAIN:
            mark = self.ledger.get(run, current)
            if mark is not None:
                if operation is None and mark.origin_operation is not None:
                    operation, origin = mark.origin_operation, mark.origin_name
                shared = shared or mark.shared
                locked = locked or mark.database_locked
            seen += 1
            current = current.__cause__ or current.__context__
        if shared is None and span.is_recording():
            shared = shared_on(span)  # a shared Crew: the kickoff's own span
        cause = classify(exc, operation, shared, locked)
        return Failure(cause, origin, shared if cause.value.startswith("shared") else None)

    def record_unsettled(
        self,
        span: Span,
        exc: BaseException,
        operation: str,
        release: Callable[[], None],
        *,
        recovered: bool = False,
        since: float | None = None,
        expected_retry: bool = False,
    ) -> PendingOrigin | None:
        """:meth:`record` for an error whose outcome is decided above ``span`` (CrewAI runs
        tool calls side by side and re-raises one of their errors).

        When ``span`` is the error's origin, the origin attributes wait for
        :meth:`PendingOrigin.settle` (a span the error reaches settles it when it records it;
        the caller settles it otherwise), which then calls ``release`` (the span may end).
        Returns ``None`` when ``span`` is not the origin (recorded; ``release`` is not kept).
        """
        _, pending = self._record(
            span, exc, operation, recovered, None, since, expected_retry, release
        )
        return pending

    def _record(
        self,
        span: Span,
        exc: BaseException,
        operation: str,
        recovered: bool,
        origin: bool | None,
        since: float | None,
        expected_retry: bool,
        release: Callable[[], None] | None,
    ) -> tuple[bool, PendingOrigin | None]:
        run = run_key(span)
        mark = self.ledger.get(run, exc)
        if mark is not None and id(span) in mark.spans:
            return False, None  # already recorded on this span (by an inner hook of the same call)
        if is_cancellation(exc):
            is_origin = False
        elif origin is False:
            is_origin = self._escapes_inner_origin(run, span, recovered)
        elif origin is not None:
            is_origin = origin
        else:
            is_origin = not self._same_failure(run, exc, since, expected_retry)
        if not is_cancellation(exc):
            # The error (or the one it was raised from or while handling) reached this span: an
            # origin still waiting to know that is settled.
            self._settle_chain(run, exc, recovered or is_origin)
        if mark is None or is_origin:
            new = _Mark(exc, recovered, _clock() if recovered else None)
            if mark is not None:
                new.spans = mark.spans
            mark = new
        elif recovered and mark.recovered:
            mark.recovered_at = _clock()
        pending = None
        if is_origin and release is not None:
            pending = mark.pending = PendingOrigin(self, mark, span, operation, release)
        if is_origin:
            mark.origin_operation, mark.origin_name = operation, _span_name(span)
        elif origin is False and mark.origin_operation is None:
            # a model call whose failed HTTP attempt is the origin
            inner = self.ledger.inner(run, span.get_span_context().span_id)
            if inner is not None:
                mark.origin_operation, mark.origin_name = a.Operation.HTTP.value, inner[1]
        if span.is_recording():
            _note_path(mark, span)
        mark.spans.add(id(span))
        self.ledger.put(run, mark)
        if span.is_recording():
            self._describe(span, exc, recovered)
        if is_origin and pending is None:
            self.mark_origin(span, exc, operation, recovered)
        return is_origin, pending

    def _describe(self, span: Span, exc: BaseException, recovered: bool) -> None:
        """Status ERROR, ``error.type`` and the exception event."""
        capture = self._capture
        text = error_text.message(exc, capture)
        if not (is_cancellation(exc) and _is_origin_span(span)):
            # (a span that is an error's origin keeps saying what failed when the run's
            # coroutines are cancelled afterwards: a SystemExit that stopped the event loop)
            span.set_status(Status(StatusCode.ERROR, error_text.describe(exc, text)))
            span.set_attribute(a.ERROR_TYPE, a.error_type(exc))
        span.add_event(
            "exception",
            {
                "exception.type": type(exc).__name__,
                "exception.message": text,
                "exception.stacktrace": error_text.stacktrace(exc, capture),
                "exception.escaped": str(not recovered),
            },
        )

    def mark_origin(self, span: Span, exc: BaseException, operation: str, recovered: bool) -> None:
        """``span`` is the origin of ``exc``: the origin attributes and the origin count."""
        if span.is_recording():
            span.set_attributes({a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered})
        self._metrics.origin(operation, a.error_type(exc), recovered)

    def _settle_chain(self, run: int, exc: BaseException, recovered: bool) -> None:
        """Settle the pending origin of ``exc``'s failure, if its origin is still pending."""
        seen = 0
        current: BaseException | None = exc
        while current is not None and seen < error_text.MAX_CHAIN:
            mark = self.ledger.get(run, current)
            if mark is not None:
                pending = mark.pending
                if pending is not None:
                    pending.settle(recovered)
                return
            seen += 1
            current = current.__cause__ or current.__context__

    def _escapes_inner_origin(self, run: int, span: Span, recovered: bool) -> bool:
        """Whether an error whose origin is an HTTP attempt inside ``span`` escapes here though
        that attempt counted on a layer to take over: then ``span`` is the fatal origin."""
        if recovered:
            return False
        inner = self.ledger.inner(run, span.get_span_context().span_id)
        return inner is not None and inner[0]

    def _same_failure(
        self, run: int, exc: BaseException, since: float | None, expected_retry: bool
    ) -> bool:
        """Whether ``exc`` continues a failure that already has its origin in this run."""
        seen = 0
        current: BaseException | None = exc
        while current is not None and seen < error_text.MAX_CHAIN:
            mark = self.ledger.get(run, current)
            if mark is not None:
                if not mark.recovered or mark.pending is not None:
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
        """Mark ``span`` as an error origin without an exception (e.g. an HTTP 500 response).

        The model call it runs in becomes the fatal origin of the error it raises if this
        origin is ``recovered`` and none of the layers it counted on takes over (see
        :meth:`record`, ``origin=False``).
        """
        parent_id = getattr(getattr(span, "parent", None), "span_id", None)
        if isinstance(parent_id, int):
            self.ledger.note_inner(run_key(span), parent_id, recovered, _span_name(span))
        if span.is_recording():
            span.set_status(
                Status(StatusCode.ERROR, description[: error_text.MAX_STATUS_DESCRIPTION])
            )
            span.set_attributes(
                {a.ERROR_TYPE: error_type, a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: recovered}
            )
        self._metrics.origin(operation, error_type, recovered)
