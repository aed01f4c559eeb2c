"""The span lifecycle shared by every wrapper: sync, async, sync-returning-a-coroutine.

A wrapper subclass implements three hooks, each run through :func:`~crew_otel.safety.safe_call`:

* ``begin(instance, args, kwargs) -> Call | None`` starts the span (``None``: no span, call
  through untouched),
* ``succeed(call, result) -> result`` records what the result says (it may return a
  replacement that keeps the span open, e.g. for a stream),
* ``fail(call, exc)`` records the exception.

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
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Span

from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call

_attach = otel_context.attach
_detach = otel_context.detach
_perf = time.perf_counter
#: The innermost instrumented call in a context (its children register with it).
_CALL_KEY = otel_context.create_key("crew_otel.call")
#: Guards the parent/child counts and the end flags of every Call (held for a few operations).
_tree_lock = threading.Lock()


class Call:
    """One instrumented call in progress: its span, its context and what ending it must do."""

    __slots__ = (
        "__weakref__",
        "_children",
        "_done",
        "_finished",
        "borrowed",
        "ctx",
        "data",
        "deferred",
        "on_close",
        "on_end",
        "parent",
        "span",
        "start",
    )

    def __init__(self, span: Span, ctx: otel_context.Context, data: Any = None) -> None:
        self.span = span
        self.ctx = ctx
        self.start = _perf()
        #: Wrapper-specific state (e.g. the model call's HTTP attempts).
        self.data = data
        #: Set by ``succeed`` when something else (a stream) will end the span later.
        self.deferred = False
        #: The span belongs to an outer call (a tool's own ``run`` inside its dispatcher's
        #: span): ending this call runs its cleanups but leaves the span to its owner.
        self.borrowed = False
        #: The call whose span is this span's parent (``begin`` may set it when the span is
        #: not parented on the current span); it finishes only after this call.
        self.parent: Call | None = None
        self.on_close: list[Callable[[], None]] | None = None
        self.on_end: list[Callable[[], None]] | None = None
        self._done = False
        self._finished = False
        self._children = 0

    @property
    def elapsed(self) -> float:
        """Seconds since the call began."""
        return _perf() - self.start

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (through safe_call) when the call is over, however it ends.

        That is when the call ended and every call started under it has finished too, just
        before the span ends.
        """
        if self.on_end is None:
            self.on_end = [fn]
        else:
            self.on_end.append(fn)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (through safe_call) as soon as the call ends: it ends what the call keeps
        open for its children (the agent's open step), which the call then waits for.
        """
        if self.on_close is None:
            self.on_close = [fn]
        else:
            self.on_close.append(fn)

    def adopt(self, parent: Call | None) -> None:
        """Make ``parent`` finish only after this call (if it has not finished yet)."""
        with _tree_lock:
            if parent is None or parent is self or parent._finished:
                self.parent = None
                return
            parent._children += 1
            self.parent = parent

    def end(self) -> None:
        """End the call, once: run its closers now; finish it (cleanups, then the span) once
        no call started under it is still running.
        """
        with _tree_lock:
            if self._done:
                return
            self._done = True
        if self.on_close is not None:
            for fn in self.on_close:
                safe_call(fn, default=None)
        self._finish()

    def _finish(self) -> None:
        call: Call | None = self
        while call is not None:
            with _tree_lock:
                if not call._done or call._children or call._finished:
                    return
                call._finished = True
                parent, call.parent = call.parent, None
            if call.on_end is not None:
                for fn in call.on_end:
                    safe_call(fn, default=None)
            if not call.borrowed:
                call.span.end()
            if parent is not None:
                with _tree_lock:
                    parent._children -= 1
            call = parent


class SpanWrapper:
    """Base class of the wrapper classes: one instance per target, no global state."""

    #: Whether the target is a coroutine function (set by the instrumentor per target).
    is_async: bool = False

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tracer = runtime.tracer
        self.config = runtime.config

    # --- hooks ---------------------------------------------------------------------------
    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        raise NotImplementedError

    def succeed(self, call: Call, result: Any) -> Any:
        return result

    def fail(self, call: Call, exc: BaseException) -> None:
        self.runtime.errors.record(call.span, exc, self.operation, since=call.start)

    #: Value of crew_otel.origin.operation when a span of this wrapper is an error origin.
    operation: str = "unknown"

    # --- lifecycle -----------------------------------------------------------------------
    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.is_async:
            return self._call_async(wrapped, instance, args, kwargs)
        if not self.runtime.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = self._begin(instance, args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        token = _attach(call.ctx)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            try:
                self._end_failed(call, exc)
            finally:
                _detach(token)
            raise
        try:
            if inspect.iscoroutine(result):
                return self._defer_to_await(call, result)
            result = safe_call(self.succeed, call, result, default=result)
            if not call.deferred:
                call.end()
        finally:
            _detach(token)
        return result

    async def _call_async(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not self.runtime.active or not is_instrumentation_enabled():
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

    def _begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        """Start the call (``begin``) and register it with the call it runs under."""
        call = safe_call(self.begin, instance, args, kwargs, default=None)
        if call is not None and not safe_call(_link, call, default=False):
            call.parent = None  # not registered: nothing waits for this call
        return call

    async def _run_awaitable(self, call: Call, awaitable: Coroutine[Any, Any, Any]) -> Any:
        token = _attach(call.ctx)
        try:
            try:
                result = await awaitable
            except BaseException as exc:
                self._end_failed(call, exc)
                raise
            result = safe_call(self.succeed, call, result, default=result)
            if not call.deferred:
                call.end()
            return result
        finally:
            _detach(token)

    def _end_failed(self, call: Call, exc: BaseException) -> None:
        """Record the call's exception and end it (never raises)."""
        safe_call(self.fail, call, exc, default=None)
        call.end()

    def _defer_to_await(self, call: Call, coro: Coroutine[Any, Any, Any]) -> Any:
        """The target returned a coroutine (e.g. ``Agent.kickoff`` inside a running loop).

        Keep the span open until the coroutine finishes; if it is never awaited, end the span
        when the coroutine is garbage collected so nothing stays open (or counted) forever.
        """
        runner = self._run_awaitable(call, coro)
        weakref.finalize(runner, _end_abandoned, call)
        return runner


class Observer:
    """Base of the hooks that make no span: they run the call, then note something about it.

    Subclasses implement :meth:`observe`, which runs (through ``safe_call``) after the wrapped
    call returned, in the caller's context, with the call's result.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        result = wrapped(*args, **kwargs)
        if self.runtime.active:
            safe_call(self.observe, instance, args, kwargs, result, default=None)
        return result

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        raise NotImplementedError


def _end_abandoned(call: Call) -> None:
    call.end()


def _link(call: Call) -> bool:
    """Register ``call`` as a child of its parent call and make it current in its context.

    The parent is the one ``begin`` named, else the call current where this one started, if
    that call's span is this span's parent (a span started elsewhere is not waited for). A call
    on the current call's own span (a tool's ``run`` inside its dispatcher, an entry point
    delegating to another of the same object) is neither.
    """
    current = otel_context.get_value(_CALL_KEY)
    if isinstance(current, Call) and current.span is call.span:
        call.parent = None
        return True
    parent = call.parent
    if parent is None and isinstance(current, Call):
        parent_ctx = getattr(call.span, "parent", None)
        if parent_ctx is not None and current.span.get_span_context().span_id == parent_ctx.span_id:
            parent = current
    ctx = otel_context.set_value(_CALL_KEY, call, call.ctx)
    call.adopt(parent)  # last: nothing after it can fail and leave the parent waiting
    call.ctx = ctx
    return True


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any (cheap; never raises)."""
    return asyncio._get_running_loop()
