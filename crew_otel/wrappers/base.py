"""The span lifecycle shared by every wrapper: sync, async, sync-returning-a-coroutine.

A wrapper subclass declares its :class:`~crew_otel.attributes.Operation` and implements
``begin(instance, args, kwargs) -> Call | None``, which starts the span (``None``: no span, call
through untouched). It may also override, each run as :func:`~crew_otel.safety.safe_call` runs
a step (an error is logged once, never raised):

* ``succeed(call, result) -> result`` to record what the result says (it may return a
  replacement that keeps the span open, e.g. for a stream),
* ``error_recording(call, exc)`` to say how the exception is recorded on the span, and
  ``on_fail(call, exc)`` to add its own part after that,
* ``duration_point(call)`` to name the histogram and attributes of the call's duration.

The base owns the chores: it records the exception (:meth:`SpanWrapper.fail`), the duration
with ``error.type`` once per call, and offers the steps every ``begin`` shares: shared-instance
bookkeeping (:meth:`SpanWrapper.track_instance`) and content capture
(:meth:`SpanWrapper.capture`, :meth:`SpanWrapper.capture_on_span`).

:class:`SpanWrapper` runs the wrapped function exactly once, with the call's context attached,
and ends the span exactly once (:meth:`Call.end` is idempotent). Only the wrapped call and the
re-raise of its own exception (the same object) can raise into user code.

A span never ends before the spans of the calls started under it. That matters when a run is
cancelled (``asyncio.wait_for`` expiring, a task cancelled, a ``KeyboardInterrupt`` stopping the
loop): the cancelled coroutines end at once, but work CrewAI started in a worker thread (an agent
step in ``asyncio.to_thread``: the model call and its HTTP attempt) cannot be interrupted and runs
on. Ending a call records how it ended at that moment (the cancellation's exception event has
that time) and runs its *closers* (the agent attempt ends its open step); the call *finishes*
(its cleanups: counts in flight, shared-instance bookkeeping; then its span) when the last call
started under it has finished. So the trace stays whole: no span outlives its parent and none is
exported without it; a cancelled run's spans end when its abandoned work does.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import types
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, get_current_span
from opentelemetry.util.types import AttributeValue

from crew_otel import content, internals
from crew_otel.attributes import ERROR_TYPE, Operation, error_type
from crew_otel.context import REQUEST_ID_KEY
from crew_otel.diagnosis.sharing import Kind, Usage
from crew_otel.runtime import Runtime
from crew_otel.safety import internal_error

_detach = otel_context.detach
_CoroutineType = types.CoroutineType
_perf = time.perf_counter
#: The innermost instrumented call in a context (its children register with it).
_CALL_KEY = otel_context.create_key("crew_otel.call")
#: The context of a finished call (its own is dropped: it holds the call).
_FINISHED_CONTEXT = otel_context.Context()
_new_lock = threading.Lock
#: Classes whose ``passes_through`` answer a wrapper keeps (classes made at run time beyond
#: that are asked at every call).
_PASS_CACHE_SIZE = 256

#: A wrapper's own state for one call (``Call.data``).
T = TypeVar("T")
#: What wrapt hands a wrapper: the wrapped function and the call's arguments.
Wrapped = Callable[..., Any]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class Call(Generic[T]):
    """One instrumented call in progress: its span, its context and what ending it must do."""

    __slots__ = (
        "__weakref__",
        "_adopted",
        "_children",
        "_done",
        "_end_ns",
        "_extensions",
        "_finished",
        "_holds",
        "_lock",
        "borrowed",
        "ctx",
        "data",
        "deferred",
        "error_type",
        "on_close",
        "on_end",
        "parent",
        "span",
        "start",
    )

    def __init__(self, span: Span, ctx: otel_context.Context, data: T) -> None:
        self.span = span
        self.ctx = ctx
        self.start = _perf()
        #: Wrapper-specific state (e.g. the model call's HTTP attempts).
        self.data = data
        #: Set by ``succeed`` when something else (a stream) will end the span later.
        self.deferred = False
        #: The span belongs to an outer call (a tool's own ``run`` inside its dispatcher's
        #: span, an entry point delegating to another of the same object): ending this call
        #: runs its cleanups but leaves the span, and its duration, to its owner.
        self.borrowed = False
        #: error.type of the call's failure once recorded (for its duration point).
        self.error_type: str | None = None
        #: The call whose span is this span's parent (``begin`` may set it when the span is
        #: not parented on the current span); it finishes only after this call.
        self.parent: Call[Any] | None = None
        self.on_close: list[Callable[[], None]] | None = None
        self.on_end: list[Callable[[], None]] | None = None
        self._done = False
        self._finished = False
        #: ``parent`` counts this call among its children (:meth:`adopt`).
        self._adopted = False
        self._children = 0
        #: Pending failures that keep the span open (:meth:`hold`).
        self._holds = 0
        #: Holders that extend the call past its end (:meth:`hold` with ``extends``).
        self._extensions = 0
        #: When the call ended, for a span kept open only by a hold (its end time).
        self._end_ns: int | None = None
        #: Guards this call's end flags and its counts of children and holds (held for a few
        #: operations; a lock per call, so concurrent runs never wait for each other).
        self._lock = _new_lock()

    @property
    def elapsed(self) -> float:
        """Seconds since the call began."""
        return _perf() - self.start

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (errors logged, as by safe_call) when the call is over, however it ends.

        That is when the call ended and every call started under it has finished too, just
        before the span ends.
        """
        if self.on_end is None:
            self.on_end = [fn]
        else:
            self.on_end.append(fn)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (errors logged, as by safe_call) as soon as the call ends: it ends what the
        call keeps open for its children (the agent's open step), which the call then waits for.
        """
        if self.on_close is None:
            self.on_close = [fn]
        else:
            self.on_close.append(fn)

    def add_closer_unless_ended(self, fn: Callable[[], None]) -> bool:
        """:meth:`add_closer`, from any thread, unless the call has already ended (False)."""
        with self._lock:
            if self._done:
                return False
            self.add_closer(fn)
        return True

    def hold(self, *, extends: bool = False) -> Callable[[], None]:
        """Keep the span open after the call ends, until the returned release runs (once).

        By default for a failure whose outcome is known only later (see
        ``ErrorRecording.unsettled``): the span then ends with the time the call ended. With
        ``extends``, the call itself goes on after its function returned (a kickoff's stream,
        iterated by its caller): it finishes when the last such holder lets go.
        """
        with self._lock:
            if extends:
                self._extensions += 1
            else:
                self._holds += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                if extends:
                    self._extensions -= 1
                    self._note_end_time()
                else:
                    self._holds -= 1
            self._finish()

        return release

    @property
    def finished(self) -> bool:
        """The call is over: its cleanups ran and its span ended (or was left to its owner)."""
        return self._finished

    def adopt(self, parent: Call[Any] | None) -> None:
        """Make ``parent`` finish only after this call (if it has not finished yet); once."""
        if self._adopted and parent is self.parent:
            return
        if parent is None or parent is self:
            self.parent = None
            return
        with parent._lock:
            if parent._finished:
                self.parent = None
                return
            parent._children += 1
            self.parent = parent
            self._adopted = True

    def end(self) -> None:
        """End the call, once: run its closers now; finish it (cleanups, then the span) once
        no call started under it is still running.
        """
        with self._lock:
            if self._done:
                return
            self._done = True
            if self._holds:
                self._note_end_time()
        if self.on_close is not None:
            for fn in self.on_close:
                try:
                    fn()
                except Exception as exc:
                    internal_error(fn, exc, None)
        self._finish()

    def _note_end_time(self) -> None:
        """Under the lock: the call is over but for pending failures, so its span ends now
        whenever those settle."""
        if self._done and self._holds and not self._children and not self._extensions:
            self._end_ns = time.time_ns()

    def _finish(self) -> None:
        call: Call[Any] | None = self
        while call is not None:
            with call._lock:
                if (
                    not call._done
                    or call._children
                    or call._holds
                    or call._extensions
                    or call._finished
                ):
                    return
                call._finished = True
                parent, call.parent = call.parent, None
            if call.on_end is not None:
                for fn in call.on_end:
                    try:
                        fn()
                    except Exception as exc:
                        internal_error(fn, exc, None)
            if not call.borrowed:
                call.span.end(end_time=call._end_ns)
            # Drop what ties the finished call into reference cycles (its context holds the
            # call itself; its cleanups close over it), so it is freed when its last user lets
            # go rather than by the garbage collector.
            call.ctx = _FINISHED_CONTEXT
            call.on_end = call.on_close = None
            if parent is not None:
                with parent._lock:
                    parent._children -= 1
            call = parent


class ErrorRecording(NamedTuple):
    """How a failed call's exception is recorded on its span (see ``ErrorLedger.record``)."""

    #: A retry layer takes over after this error (or CrewAI handles it).
    recovered: bool = False
    #: ``None`` decides by the exception chain; ``True``/``False`` force it.
    origin: bool | None = None
    #: The span is the retry layer an inner origin counted on.
    expected_retry: bool = False
    #: Whether the error reaches the caller is decided above this call (a tool call that
    #: CrewAI runs beside others in a thread pool: it re-raises one error and drops the
    #: others). An origin here stays open until a span it reaches records it (then it is
    #: recovered or not as that span says) or the call's parent ends (then it is fatal if the
    #: exception object was raised again beyond the call's thread, else dropped: recovered).
    unsettled: bool = False


#: The exception recorded with the defaults: not recovered, origin by the exception chain.
RECORD = ErrorRecording()


class Histogram(Protocol):
    """What a duration is recorded into (an OTel histogram, or a capped one)."""

    def record(self, amount: float, attributes: dict[str, AttributeValue]) -> None: ...


#: Where a call's duration goes: ``(histogram, attributes)`` (``error.type`` is added to the
#: attributes when the call failed). A plain tuple: a named tuple's constructor is a Python
#: call, and one is made at every call that records its duration.
DurationPoint = tuple[Histogram, dict[str, AttributeValue]]


class SpanWrapper(Generic[T]):
    """Base class of the wrapper classes: one instance per target, no global state.

    ``T`` is the wrapper's own state for a call (``Call.data``).
    """

    #: Value of crew_otel.origin.operation when a span of this wrapper is an error origin.
    operation: Operation
    #: The call's duration is recorded when it finishes (its work and holders done: a
    #: kickoff's run), not when its function returns or raises.
    duration_at_finish = False

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        self.runtime = runtime
        self.tracer = runtime.tracer
        self.config = runtime.config
        #: Whether the target is a coroutine function.
        self.is_async = is_async
        # Costs nothing for the wrappers that do not define it.
        self._may_pass = type(self).passes_through is not SpanWrapper.passes_through
        #: ``passes_through`` by class, asked once per class (up to ``_PASS_CACHE_SIZE``).
        self._passing: dict[type, bool] = {}

    # --- what a wrapper implements -------------------------------------------------------
    def passes_through(self, cls: type) -> bool:
        """Whether calls on instances of ``cls`` are never recorded, known from the class
        alone (asked once per class): the target then runs as if unwrapped (for a coroutine
        function, no coroutine of the wrapper's own around it, whose every resumption would
        cost a frame)."""
        return False

    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call[T] | None:
        raise NotImplementedError

    def succeed(self, call: Call[T], result: Any) -> Any:
        return result

    def error_recording(self, call: Call[T], exc: BaseException) -> ErrorRecording | None:
        """How the call's exception is recorded on its span (``None``: it is not)."""
        return RECORD

    def on_fail(self, call: Call[T], exc: BaseException) -> None:
        """The wrapper's own part of a failure, after the exception was recorded."""

    def duration_point(self, call: Call[T]) -> DurationPoint | None:
        """The histogram and attributes of the call's duration (``None``: no point)."""
        return None

    # --- the chores ----------------------------------------------------------------------
    def fail(self, call: Call[T], exc: BaseException) -> None:
        """Record the call's exception as :meth:`error_recording` says, then :meth:`on_fail`."""
        recording = self.error_recording(call, exc)
        if recording is not None:
            if not (recording.unsettled and self._record_unsettled(call, exc, recording)):
                self.runtime.errors.record(
                    call.span,
                    exc,
                    self.operation.value,
                    recovered=recording.recovered,
                    origin=recording.origin,
                    since=call.start,
                    expected_retry=recording.expected_retry,
                )
            call.error_type = error_type(exc)
        self.on_fail(call, exc)

    def _record_unsettled(
        self, call: Call[T], exc: BaseException, recording: ErrorRecording
    ) -> bool:
        """Record an error whose outcome is decided above the call (``ErrorRecording.unsettled``):
        an origin here keeps the span open until a span the error reaches records it, or until
        the call's parent ends (then where the exception object went decides). False when the
        call has no parent to wait for (recorded as usual then).
        """
        parent = call.parent
        if parent is None:
            return False
        release = call.hold()
        try:
            pending = self.runtime.errors.record_unsettled(
                call.span,
                exc,
                self.operation.value,
                release,
                recovered=recording.recovered,
                since=call.start,
                expected_retry=recording.expected_retry,
            )
        except BaseException:
            release()  # never leave the span open
            raise
        if pending is None:
            release()  # not an origin here: nothing to settle
        elif not parent.add_closer_unless_ended(pending.settle_by_path):
            pending.settle(recovered=recording.recovered)  # nothing else will tell
        return True

    def record_duration(self, call: Call[T]) -> None:
        """Record the call's duration point, with the ``error.type`` of its failure if any.

        The base records it when the call returns or raises, unless the span is borrowed (its
        owner's duration) or the wrapper records it when the call finishes
        (:attr:`duration_at_finish`).
        """
        point = self.duration_point(call)
        if point is None:
            return
        histogram, attrs = point
        if call.error_type is not None:
            attrs[ERROR_TYPE] = call.error_type
        histogram.record(_perf() - call.start, attrs)

    def track_instance(
        self,
        call: Call[T],
        kind: Kind,
        instance: object,
        label: str,
        until: Call[Any] | None = None,
    ) -> Usage | None:
        """Shared-instance detection: the call's request uses ``instance`` until the call (or
        ``until``) is over; the span is flagged if another request uses it meanwhile.

        ``None`` when detection is off or the call runs outside a request.
        """
        if not self.config.detect_shared_instances:
            return None
        request_id = call.ctx.get(REQUEST_ID_KEY)
        if not isinstance(request_id, str):
            return None
        sharing = self.runtime.sharing
        usage = sharing.enter(instance, kind, request_id, call.span, label)
        (call if until is None else until).add_cleanup(functools.partial(sharing.exit, usage))
        return usage

    def capture(self, attrs: dict[str, AttributeValue], key: str, value: object) -> None:
        """Content capture into the attributes of a span about to start (``None`` is left out)."""
        if self.config.capture_content and value is not None:
            attrs[key] = self._render(value)

    def capture_on_span(self, span: Span, key: str, value: object) -> None:
        """Content capture onto a started span (when the span records)."""
        if self.config.capture_content and span.is_recording():
            span.set_attribute(key, self._render(value))

    def _render(self, value: object) -> str:
        return content.render(value, self.config.max_attribute_length, self.config.redact)

    # --- lifecycle -----------------------------------------------------------------------
    def __call__(self, wrapped: Wrapped, instance: Any, args: Args, kwargs: Kwargs) -> Any:
        # The steps of crew_otel's own run inline in ``try``/``internal_error`` (what
        # ``safe_call`` does, one Python call fewer per step: this runs ~50 times a kickoff).
        if self._may_pass:
            cls = type(instance)
            passes = self._passing.get(cls)
            if passes is None:
                try:
                    passes = self.passes_through(cls)
                except Exception as exc:
                    passes = internal_error(self.passes_through, exc, False)
                if len(self._passing) < _PASS_CACHE_SIZE:
                    self._passing[cls] = passes
            if passes:
                return wrapped(*args, **kwargs)
        if self.is_async:
            return self._call_async(wrapped, instance, args, kwargs)
        if not self.runtime.recording:
            return wrapped(*args, **kwargs)
        call = self._begin(instance, args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        switch = self.runtime.switch
        token = switch.attach(call.ctx)
        try:
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as exc:
                self._end_failed(call, exc)
                raise
            if isinstance(result, _CoroutineType):  # inspect.iscoroutine, inline
                return self._defer_to_await(call, result)
            return self._end_succeeded(call, result)
        finally:
            try:
                switch.detach(token)
            except Exception:
                _detach(token)  # logs that the token is not this context's, as the API does

    async def _call_async(self, wrapped: Wrapped, instance: Any, args: Args, kwargs: Kwargs) -> Any:
        if not self.runtime.recording:
            return await wrapped(*args, **kwargs)
        call = self._begin(instance, args, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        try:
            awaitable = wrapped(*args, **kwargs)  # raises here on bad arguments
        except BaseException as exc:
            self._end_failed(call, exc)
            raise
        return await self._run_awaitable(call, awaitable)

    def _begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[T] | None:
        """Start the call (``begin``) and register it with the call it runs under."""
        try:
            call = self.begin(instance, args, kwargs)
        except Exception as exc:
            return internal_error(self.begin, exc, None)
        if call is not None:
            try:
                _link(call, self.runtime.current_context().get(_CALL_KEY))
            except Exception as exc:
                internal_error(_link, exc, None)
                call.parent = None  # not registered: nothing waits for this call
        return call

    async def _run_awaitable(self, call: Call[T], awaitable: Coroutine[Any, Any, Any]) -> Any:
        switch = self.runtime.switch
        token = switch.attach(call.ctx)
        try:
            try:
                result = await awaitable
            except BaseException as exc:
                self._end_failed(call, exc)
                raise
            return self._end_succeeded(call, result)
        finally:
            try:
                switch.detach(token)
            except Exception:
                _detach(token)  # logs that the token is not this context's, as the API does

    def _end_succeeded(self, call: Call[T], result: Any) -> Any:
        """Record the call's result and duration; end it unless ``succeed`` deferred that."""
        try:
            result = self.succeed(call, result)
        except Exception as exc:
            result = internal_error(self.succeed, exc, result)
        if not call.borrowed and not self.duration_at_finish:
            try:
                self.record_duration(call)
            except Exception as exc:
                internal_error(self.record_duration, exc, None)
        if not call.deferred:
            call.end()
        return result

    def _end_failed(self, call: Call[T], exc: BaseException) -> None:
        """Record the call's exception and duration, and end it (never raises)."""
        try:
            self.fail(call, exc)
        except Exception as error:
            internal_error(self.fail, error, None)
        if not call.borrowed and not self.duration_at_finish:
            try:
                self.record_duration(call)
            except Exception as error:
                internal_error(self.record_duration, error, None)
        call.end()

    def _defer_to_await(self, call: Call[T], coro: Coroutine[Any, Any, Any]) -> Any:
        """The target returned a coroutine (e.g. ``Agent.kickoff`` inside a running loop).

        Keep the span open until the coroutine finishes; if it is never awaited, end the span
        when the coroutine is garbage collected so nothing stays open (or counted) forever.
        """
        runner = self._run_awaitable(call, coro)
        weakref.finalize(runner, _end_abandoned, call)
        return runner


def _end_abandoned(call: Call[Any]) -> None:
    call.end()


def _link(call: Call[Any], current: object) -> None:
    """Register ``call`` as a child of its parent call and make it current in its context.

    The parent is the one ``begin`` named, else ``current`` (the call current where this one
    started, or ``None``), if that call's span is this span's parent (a span started elsewhere
    is not waited for). A call on the current call's own span (a tool's ``run`` inside its
    dispatcher, an entry point delegating to another of the same object) is neither, unless
    ``begin`` adopted it.
    """
    if isinstance(current, Call) and current.span is call.span:
        return  # ``begin`` may have made it the span owner's work (``Call.adopt``)
    parent = call.parent
    if parent is None and isinstance(current, Call):
        parent_ctx = getattr(call.span, "parent", None)
        if parent_ctx is not None and current.span.get_span_context().span_id == parent_ctx.span_id:
            parent = current
    ctx = otel_context.set_value(_CALL_KEY, call, call.ctx)
    call.adopt(parent)  # last: nothing after it can fail and leave the parent waiting
    call.ctx = ctx


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any (cheap; never raises)."""
    return internals.RUNNING_LOOP.function()  # type: ignore[no-any-return]


def innermost_own_span_is(span: Span, ctx: otel_context.Context) -> bool:
    """Whether ``span`` is current in ``ctx``, or is the span of the innermost crew_otel call
    with only other instrumentations' spans started under it since (OpenInference's tool span
    between crew_otel's dispatcher and crew_otel's hook on ``Tool.run``)."""
    if get_current_span(ctx) is span:
        return True
    call = ctx.get(_CALL_KEY)
    return isinstance(call, Call) and call.span is span
