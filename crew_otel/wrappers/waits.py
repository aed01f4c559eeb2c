"""Waits that stall a step: CrewAI's ``max_rpm`` limiter and ``human_input``.

**The limiter.** ``RPMController.check_or_wait`` runs before every model call of an agent with a
``max_rpm`` (the agent's own, or its crew's, shared by all the crew's agents). When the minute's
budget is spent, the caller sleeps 60 s in ``_wait_for_next_minute`` *holding the limiter's
lock*, so every other caller of the same limiter (the crew's other agents, other requests using
the same Agent or Crew object) blocks on that lock until the sleep is over. A call that waited
gets a ``crewai.rpm.wait`` span, from its start to its end, with ``crewai.rpm.wait.reason``:
``limit`` (it slept) or ``lock`` (it waited for a caller that slept; that caller's request ID in
``crew_otel.rpm.lock_holder.request_id``). A call that did not wait leaves nothing: the span is
made when the call returns, from the times taken around it, and only when it slept or waited for
a sleeping caller. The seconds waited are summed on the agent's span (``crewai.rpm.waited``).

**Human input.** A task with ``human_input=True`` makes the agent ask a human about its answer.
CrewAI's default provider (``SyncHumanInputProvider``) prompts in the terminal
(``_prompt_input``, ``_prompt_input_async``) once per round, until the human answers with an
empty line; feedback makes the agent run again. Each prompt is a ``crewai.human_input`` span
under the agent's span, as long as the human took, with its round and whether the human gave
feedback; the seconds are summed on the agent's span (``crewai.human_input.waited``).

Both waits end the agent's open step first (its model call returned and its tools ran; see
:class:`~crew_otel.wrappers.agent.AgentScope`), so the step's span does not swallow the wait.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.context import ATTEMPT_KEY, REQUEST_ID_KEY
from crew_otel.runtime import Runtime
from crew_otel.wrappers.base import Call, SpanWrapper
from crew_otel.wrappers.context_window import agent_span
from crew_otel.wrappers.observer import Observer

_perf = time.perf_counter
#: The limiter call in progress in this context (the sleep hook reports to it).
_PASS_KEY = otel_context.create_key("crew_otel.rpm_pass")
#: A call that waited less than this for the lock (while another caller slept) is not
#: reported: it arrived as the sleep ended.
MIN_LOCK_WAIT = 0.05
#: A call this long with no sleep seen is reported as a lock wait all the same: the sleeper's
#: call escaped the hook (its bound method was taken before ``instrument()``).
UNEXPLAINED_WAIT = 1.0


class WaitTotals:
    """Seconds waited per agent span, summed onto the span under one attribute key."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._seconds: weakref.WeakKeyDictionary[trace.Span, float] = weakref.WeakKeyDictionary()
        self._counts: weakref.WeakKeyDictionary[trace.Span, int] = weakref.WeakKeyDictionary()

    def add(self, span: trace.Span, seconds: float) -> None:
        """Add ``seconds`` to the span's total and set the attribute."""
        if not span.is_recording():
            return
        with self._lock:
            total = self._seconds.get(span, 0.0) + seconds
            self._seconds[span] = total
        span.set_attribute(self.key, total)

    def next_number(self, span: trace.Span) -> int:
        """1 for the span's first wait, then 2, 3, ..."""
        with self._lock:
            number = self._counts.get(span, 0) + 1
            self._counts[span] = number
        return number


def _end_open_step(scope: Any) -> None:
    """A wait starts: the agent's previous step (model call and tools) is over."""
    close_step = getattr(scope, "close_step", None)
    if close_step is not None:
        close_step()


# --- the max_rpm limiter ---------------------------------------------------------------------
class _Sleep:
    """One sleep of a limiter (``_wait_for_next_minute``): who slept, from when to when."""

    __slots__ = ("end", "ref", "request_id", "start")

    def __init__(self, request_id: object, start: float) -> None:
        self.request_id = request_id
        self.start = start
        self.end: float | None = None
        #: A weak reference to the limiter; its callback forgets the sleep with the limiter.
        self.ref: weakref.ref[Any] | None = None


class _Pass:
    """One call of ``check_or_wait``: its times, context, and its own sleep if it slept."""

    __slots__ = (
        "ctx",
        "holder",
        "limiter",
        "registry",
        "request_id",
        "scope",
        "sleep",
        "start",
        "start_ns",
    )

    def __init__(
        self, limiter: object, ctx: otel_context.Context, registry: dict[int, _Sleep]
    ) -> None:
        self.limiter = limiter
        self.ctx = ctx
        self.registry = registry
        self.request_id = ctx.get(REQUEST_ID_KEY)
        self.scope = ctx.get(ATTEMPT_KEY)
        self.start_ns = time.time_ns()
        self.start = _perf()
        self.sleep: _Sleep | None = None
        #: The sleep of another caller in progress when this call began, if any.
        self.holder: _Sleep | None = None

    def begin_sleep(self, limiter: object) -> None:
        """This call found the budget spent and sleeps now, holding the limiter's lock."""
        key = id(limiter)
        sleep = _Sleep(self.request_id, _perf())
        registry = self.registry
        sleep.ref = weakref.ref(limiter, lambda _ref: registry.pop(key, None))
        self.sleep = sleep
        registry[key] = sleep

    def end_sleep(self) -> None:
        if self.sleep is not None:
            self.sleep.end = _perf()

    def other_sleep(self, limiter: object, end: float) -> _Sleep | None:
        """Another caller's sleep on ``limiter`` that overlapped this call."""
        candidates = (self.holder, self.registry.get(id(limiter)))
        for sleep in candidates:
            if sleep is None or sleep is self.sleep or sleep.ref is None:
                continue
            if sleep.ref() is not limiter or sleep.start > end:
                continue
            if sleep.end is None or sleep.end >= self.start:
                return sleep
        return None


class RpmLimiterObserver(Observer):
    """``RPMController.check_or_wait``: a ``crewai.rpm.wait`` span for a call that waited.

    Whether it waited is known only when the call returns (its own sleep, or another caller's
    holding the limiter's lock): the span is made then, with the call's start time, in the
    call's context.
    """

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        #: The latest sleep of each limiter (by id; forgotten with the limiter).
        self.sleeps: dict[int, _Sleep] = {}
        self.totals = WaitTotals(attributes.CREWAI_RPM_WAITED)

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Pass:
        limiter_pass = _Pass(instance, otel_context.get_current(), self.sleeps)
        current = self.sleeps.get(id(instance))
        if current is not None and current.end is None:
            limiter_pass.holder = current
        _end_open_step(limiter_pass.scope)
        return limiter_pass

    def context(self, observed: _Pass) -> otel_context.Context:
        """The pass, for the limiter's sleep inside the call (:class:`RpmSleepObserver`)."""
        return otel_context.set_value(_PASS_KEY, observed)

    def after_result(self, observed: _Pass, result: Any) -> None:
        self._end(observed, observed.limiter, None)

    def after_error(self, observed: _Pass, exc: BaseException) -> None:
        self._end(observed, observed.limiter, exc)

    def _end(self, limiter_pass: _Pass, limiter: object, exc: BaseException | None) -> None:
        end = _perf()
        # the span lasts what the monotonic clock measured (a wall-clock step during CrewAI's
        # 60 s sleep would otherwise make the span and crewai.rpm.waited disagree)
        end_ns = limiter_pass.start_ns + int((end - limiter_pass.start) * 1e9)
        own = limiter_pass.sleep
        other = limiter_pass.other_sleep(limiter, end)
        attrs: dict[str, AttributeValue] = {}
        max_rpm = getattr(limiter, "max_rpm", None)
        if isinstance(max_rpm, int) and not isinstance(max_rpm, bool):
            attrs[attributes.CREWAI_RPM_LIMIT] = max_rpm
        if own is not None:
            attrs[attributes.CREWAI_RPM_WAIT_REASON] = attributes.RPM_WAIT_REASON_LIMIT
            lock_wait = own.start - limiter_pass.start
        elif (other is not None and end - limiter_pass.start >= MIN_LOCK_WAIT) or (
            end - limiter_pass.start >= UNEXPLAINED_WAIT
        ):
            attrs[attributes.CREWAI_RPM_WAIT_REASON] = attributes.RPM_WAIT_REASON_LOCK
            lock_wait = end - limiter_pass.start
        else:
            return  # no wait: no span
        attrs[attributes.CREWAI_RPM_LOCK_WAIT] = lock_wait
        if other is not None and isinstance(other.request_id, str):
            attrs[attributes.RPM_LOCK_HOLDER_REQUEST_ID] = other.request_id
        span = self.runtime.tracer.start_span(
            attributes.SPAN_RPM_WAIT,
            context=limiter_pass.ctx,
            attributes=attrs,
            start_time=limiter_pass.start_ns,
        )
        if exc is not None:
            self.runtime.errors.record(span, exc, attributes.ORIGIN_WAIT, since=limiter_pass.start)
        span.end(end_time=end_ns)
        self.totals.add(agent_span(limiter_pass.scope), end - limiter_pass.start)


class RpmSleepObserver(Observer):
    """``RPMController._wait_for_next_minute``: tells the limiter call in progress that it
    sleeps, so its span says ``limit`` and the callers waiting for its lock name it."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        limiter_pass = otel_context.get_value(_PASS_KEY)
        if not isinstance(limiter_pass, _Pass):
            return None
        limiter_pass.begin_sleep(instance)
        return limiter_pass

    def after_result(self, observed: _Pass, result: Any) -> None:
        observed.end_sleep()

    def after_error(self, observed: _Pass, exc: BaseException) -> None:
        observed.end_sleep()


# --- human input -----------------------------------------------------------------------------
class HumanInputWrapper(SpanWrapper[trace.Span]):
    """``SyncHumanInputProvider._prompt_input`` / ``_prompt_input_async``: one
    ``crewai.human_input`` span per prompt (the data: the agent's span)."""

    operation = Operation.WAIT

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        self.totals = WaitTotals(attributes.CREWAI_HUMAN_INPUT_WAITED)

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[trace.Span] | None:
        ctx = otel_context.get_current()
        scope = ctx.get(ATTEMPT_KEY)
        _end_open_step(scope)
        waiting = agent_span(scope)
        span = self.tracer.start_span(
            attributes.SPAN_HUMAN_INPUT,
            context=ctx,
            attributes={attributes.CREWAI_HUMAN_INPUT_ROUND: self.totals.next_number(waiting)},
        )
        return Call(span, trace.set_span_in_context(span, ctx), waiting)

    def succeed(self, call: Call[trace.Span], result: Any) -> Any:
        if isinstance(result, str) and call.span.is_recording():
            call.span.set_attribute(attributes.CREWAI_HUMAN_INPUT_FEEDBACK, bool(result.strip()))
        self.totals.add(call.data, call.elapsed)
        return result

    def on_fail(self, call: Call[trace.Span], exc: BaseException) -> None:
        self.totals.add(call.data, call.elapsed)
