"""Observers: the hooks that make no span of their own; they note something about a call.

An observer runs the wrapped call exactly once and, around it, three steps of its own, each
through :func:`~crew_otel.safety.safe_call`:

* ``before(instance, args, kwargs)`` notes what the call is about to do and returns what the
  other two steps need (``None``: nothing to observe, the call runs untouched),
* ``after_result(observed, result)`` once the call returned,
* ``after_error(observed, exc)`` once it raised (the same exception then reaches the caller).

Two more steps serve the hooks that change what the call sees or returns:

* ``context(observed)``: a context attached for the call's duration (a value the code the call
  runs will look up, e.g. the time a memory save was queued),
* ``wrap_result(observed, result)``: what the caller gets instead of ``result`` (the same
  chunks of a stream, noted on the way; a lock that times its acquisition).

So every hook of crew_otel is one of two kinds, built the same way (``cls(runtime,
is_async=...)``): a span (:class:`~crew_otel.wrappers.base.SpanWrapper`) or an observation
(this class), which may carry a context value for the call's duration.

The default steps hand the call and its result to :meth:`Observer.observe`, for observers that
only look at what a call returned. One driver runs sync targets, another async ones
(``is_async``, given at construction). Like the span wrappers, an observer records nothing
while instrumentation is suppressed (``opentelemetry.instrumentation.utils
.suppress_instrumentation()``) or after ``uninstrument()``: the call goes straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context

from crew_otel.runtime import Runtime
from crew_otel.safety import internal_error, safe_call

#: ``(instance, args, kwargs)`` of an observed call: what the default steps pass to ``observe``.
ObservedCall = tuple[Any, tuple[Any, ...], dict[str, Any]]


class Observer:
    """Base of the hooks that make no span: they run the call and note something about it."""

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        self.runtime = runtime
        #: The wrapped target is a coroutine function (the hook then returns a coroutine).
        self.is_async = is_async
        # The optional steps cost nothing for the observers that do not define them.
        self._sets_context = type(self).context is not Observer.context
        self._wraps_result = type(self).wrap_result is not Observer.wrap_result

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.is_async:
            return self._run_async(wrapped, instance, args, kwargs)
        observed = self._begin(instance, args, kwargs)
        if observed is None:
            return wrapped(*args, **kwargs)
        token = self._attach(observed) if self._sets_context else None
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _detach(token)
            safe_call(self.after_error, observed, exc, default=None)
            raise
        if token is not None:  # inline: most observers attach nothing
            _detach(token)
        return self._returned(observed, result)

    async def _run_async(
        self,
        wrapped: Callable[..., Awaitable[Any]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        observed = self._begin(instance, args, kwargs)
        if observed is None:
            return await wrapped(*args, **kwargs)
        token = self._attach(observed) if self._sets_context else None
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _detach(token)
            safe_call(self.after_error, observed, exc, default=None)
            raise
        _detach(token)
        return self._returned(observed, result)

    def _attach(self, observed: Any) -> object:
        ctx = safe_call(self.context, observed, default=None)
        return otel_context.attach(ctx) if ctx is not None else None

    # ``_begin`` and ``_returned`` run on every observed call (each model call's HTTP attempt,
    # each step): their steps run inline in ``try``/``internal_error``, as ``safe_call`` would
    # run them, one Python call fewer each.
    def _returned(self, observed: Any, result: Any) -> Any:
        try:
            self.after_result(observed, result)
        except Exception as exc:
            internal_error(self.after_result, exc, None)
        if self._wraps_result:
            return safe_call(self.wrap_result, observed, result, default=result)
        return result

    def _begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What ``before`` returns, or ``None`` when nothing is to be recorded now."""
        if not self.runtime.recording:
            return None
        try:
            return self.before(instance, args, kwargs)
        except Exception as exc:
            return internal_error(self.before, exc, None)

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Note what the call is about to do; return what the after steps need (``None``:
        nothing to observe). The default keeps the call for :meth:`observe`."""
        observed: ObservedCall = (instance, args, kwargs)
        return observed

    def after_result(self, observed: Any, result: Any) -> None:
        """Note what the call returned (default: :meth:`observe`)."""
        instance, args, kwargs = observed
        self.observe(instance, args, kwargs, result)

    def after_error(self, observed: Any, exc: BaseException) -> None:
        """Note what the call raised (default: nothing)."""

    def context(self, observed: Any) -> otel_context.Context | None:
        """A context to attach while the call runs (default: none)."""
        return None

    def wrap_result(self, observed: Any, result: Any) -> Any:
        """What the caller gets instead of ``result`` (default: ``result`` itself)."""
        return result

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Note something about a call that returned (default: nothing)."""


def _detach(token: object) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]
