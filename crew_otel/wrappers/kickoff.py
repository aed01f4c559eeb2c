"""Kickoffs: every entry point that starts a run (Crew, user Flow, standalone Agent).

The outermost kickoff of a request gets the request ID (the caller's from
``crew_otel.request(...)``, else a new one) and counts in ``crew_otel.kickoffs.active``. A kickoff
that an entry point delegates to on the *same* object (``kickoff_async`` -> ``kickoff``,
``Flow.kickoff`` -> ``kickoff_async``, the worker of a streaming kickoff) adds no second span;
kickoffs of other objects inside a run (``kickoff_for_each``'s copies, a crew inside a flow)
nest as child spans with the same request ID.

A kickoff ends when its run ends, which may be after the entry point returned or raised
(:class:`KickoffLifetime`): a streaming kickoff's run happens while the caller iterates (or after
it stopped iterating), and a caller that stops waiting (``asyncio.wait_for`` timing out on
``kickoff_async``) leaves the worker thread running the kickoff. The span, the count in flight,
the duration and the shared-instance bookkeeping end with the run's work, never before the
kickoffs nested in it; a cancelled caller is an event on the span
(``crew_otel.kickoff.caller_cancelled``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes as a
from crew_otel import content, internals
from crew_otel.coexistence import innermost_own_span_is
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY, new_request_id
from crew_otel.diagnosis.errors import is_cancellation
from crew_otel.diagnosis.shared_state import RunHoldings
from crew_otel.diagnosis.sharing import KIND_AGENT, KIND_CREW
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.agent import start_scope_for_standalone_agent
from crew_otel.wrappers.base import Call, SpanWrapper, running_loop
from crew_otel.wrappers.streams import is_streaming_output, trace_stream

KIND_OF_CREW = "crew"
KIND_OF_FLOW = "flow"
KIND_OF_AGENT = "agent"

#: Entry points whose work waits in the event loop's default executor.
_EXECUTOR_ENTRYPOINTS = frozenset({"kickoff_async", "kickoff_for_each_async"})
_FIRST_STEP_ENTRYPOINTS = frozenset({"akickoff", "akickoff_for_each"})


class ActiveKickoff:
    """The innermost kickoff in this context (kept in the OTel Context)."""

    __slots__ = (
        "cancel_noted",
        "error_type",
        "holdings",
        "instance_key",
        "lifetime",
        "span",
        "start",
        "wait_recorded",
        "wants_first_step_wait",
        "workflow",
    )

    def __init__(
        self,
        instance_key: int,
        span: trace.Span,
        workflow: str,
        entrypoint: str,
        lifetime: KickoffLifetime,
    ) -> None:
        self.instance_key = instance_key
        self.span = span
        self.workflow = workflow
        self.lifetime = lifetime
        #: error.type of the run's failure (for the duration metric), None while it succeeds.
        self.error_type: str | None = None
        self.cancel_noted = False
        #: Shared state the run's tool code touched (released when the kickoff ends).
        self.holdings: RunHoldings | None = None
        self.start = time.perf_counter()
        self.wait_recorded = entrypoint not in _EXECUTOR_ENTRYPOINTS | _FIRST_STEP_ENTRYPOINTS
        self.wants_first_step_wait = entrypoint in _FIRST_STEP_ENTRYPOINTS

    def record_wait(self, runtime: Runtime) -> None:
        """Record how long the kickoff waited before its work started (once)."""
        if self.wait_recorded:
            return
        self.wait_recorded = True
        self.wants_first_step_wait = False
        wait = time.perf_counter() - self.start
        self.span.set_attribute(a.QUEUE_WAIT, wait)
        runtime.metrics.queue_wait.record(wait, {a.GEN_AI_WORKFLOW_NAME: self.workflow})


class KickoffLifetime:
    """Ends a kickoff (span, count in flight, duration) when the last thing holding it lets go.

    The holders: the entry point's call until it returns or raises; the streaming output it
    returned until that stream is over; the work running for it elsewhere (the worker thread's
    ``kickoff`` behind ``kickoff_async`` or behind a stream, and kickoffs nested in the run). A
    caller that stops waiting (a cancellation, ``wait_for``'s timeout) lets go, but the kickoff
    stays open while its work goes on. Once the work that a stream started is over, the stream
    can yield nothing more of the run and lets go too: an abandoned stream ends with its run,
    not when the garbage collector gets to it. A stream never iterated never started a run; it
    ends when it is closed or collected.
    """

    __slots__ = ("_ended", "_finish", "_holders", "_lock", "_stream", "_work")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 1  # the entry point's call
        self._work = 0
        self._stream = False
        self._ended = False
        self._finish: Callable[[], None] | None = None

    def on_end(self, finish: Callable[[], None]) -> None:
        """What ending the kickoff does (set once, before anything is released)."""
        self._finish = finish

    @property
    def work_in_flight(self) -> int:
        """How many pieces of work for this kickoff are running right now."""
        return self._work

    def hold_work(self) -> bool:
        """Work for this kickoff starts; False if the kickoff already ended."""
        with self._lock:
            if self._ended:
                return False
            self._holders += 1
            self._work += 1
            return True

    def release_work(self) -> None:
        with self._lock:
            self._work -= 1
            self._holders -= 1
            if self._work == 0 and self._stream:
                self._stream = False
                self._holders -= 1
            finish = self._take_finish()
        if finish is not None:
            finish()

    def hold_stream(self) -> None:
        """The call returned a stream that keeps the kickoff open until the stream is over."""
        with self._lock:
            if not self._ended and not self._stream:
                self._stream = True
                self._holders += 1

    def release_stream(self) -> None:
        with self._lock:
            if not self._stream:
                return
            self._stream = False
            self._holders -= 1
            finish = self._take_finish()
        if finish is not None:
            finish()

    def release_call(self) -> None:
        with self._lock:
            self._holders -= 1
            finish = self._take_finish()
        if finish is not None:
            finish()

    def _take_finish(self) -> Callable[[], None] | None:
        """The finish to run once the last holder let go (called with the lock held)."""
        if self._holders > 0 or self._ended:
            return None
        self._ended = True
        finish, self._finish = self._finish, None
        return finish


class _Delegated:
    """``Call.data`` of an entry point delegated to by the same object (no span of its own)."""

    __slots__ = ("record",)

    def __init__(self, record: ActiveKickoff) -> None:
        self.record = record


class _KickoffStream:
    """What a traced stream reports to its kickoff (see :mod:`crew_otel.wrappers.streams`)."""

    __slots__ = ("call", "wrapper")

    def __init__(self, wrapper: KickoffWrapper, call: Call) -> None:
        self.wrapper = wrapper
        self.call = call

    def stream_failed(self, exc: BaseException) -> None:
        self.wrapper.fail(self.call, exc)

    def stream_done(self) -> None:
        record: ActiveKickoff = self.call.data
        record.lifetime.release_stream()


class KickoffWrapper(SpanWrapper):
    """One ``invoke_workflow {name}`` span per kickoff, for every entry point."""

    operation = a.OP_INVOKE_WORKFLOW

    def __init__(self, runtime: Runtime, entrypoint: str, kind: str) -> None:
        super().__init__(runtime)
        self.entrypoint = entrypoint
        self.kind = kind

    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        if self.kind == KIND_OF_FLOW and _is_internal_flow(type(instance)):
            return None  # CrewAI's own flows (the agent executor) are not kickoffs
        ctx = otel_context.get_current()
        active: ActiveKickoff | None = ctx.get(KICKOFF_KEY)  # type: ignore[assignment]
        if (
            active is not None
            and active.instance_key == id(instance)
            and innermost_own_span_is(active.span, ctx)  # also through another's span
        ):
            return self._delegated(active, ctx)
        safe_call(self.runtime.on_kickoff, default=None)
        request_id: Any = ctx.get(REQUEST_ID_KEY)
        if not isinstance(request_id, str):
            request_id = new_request_id()
            ctx = otel_context.set_value(REQUEST_ID_KEY, request_id, ctx)
        name = a.workflow_name(instance)
        attrs = a.kickoff_attributes(instance, self.entrypoint, name)
        if self.kind == KIND_OF_CREW and not self.is_async and running_loop() is not None:
            attrs[a.SYNC_IN_EVENT_LOOP] = True
        if self.is_async:
            depth = _default_executor_queue_depth()
            if depth is not None:
                attrs[a.EXECUTOR_QUEUE_DEPTH] = depth
        if self.config.capture_content:
            inputs = kwargs.get("inputs", args[0] if args else None)
            if inputs is not None:
                attrs[a.CREWAI_KICKOFF_INPUTS] = content.render(
                    inputs, self.config.max_attribute_length, self.config.redact
                )
        span = self.tracer.start_span(
            a.span_name(a.SPAN_WORKFLOW, name), context=ctx, attributes=attrs
        )
        lifetime = KickoffLifetime()
        record = ActiveKickoff(id(instance), span, name, self.entrypoint, lifetime)
        call_ctx = otel_context.set_value(KICKOFF_KEY, record, trace.set_span_in_context(span, ctx))
        call = Call(span, call_ctx, data=record)
        # The span and what the kickoff counts belong to its lifetime, which may outlast the
        # call (a stream, a caller that stopped waiting while the worker thread goes on).
        call.borrowed = True
        cleanups: list[Callable[[], None]] = []
        parent: KickoffLifetime | None = None
        lifetime.on_end(lambda: self._finish(call, cleanups, parent))
        call.add_cleanup(lifetime.release_call)
        if self.kind == KIND_OF_AGENT:
            scope = start_scope_for_standalone_agent(self.runtime, instance, call)
            call.ctx = otel_context.set_value(ATTEMPT_KEY, scope, call.ctx)
        if self.config.detect_shared_instances and self.kind != KIND_OF_FLOW:
            sharing = self.runtime.sharing
            kind = KIND_CREW if self.kind == KIND_OF_CREW else KIND_AGENT
            usage = sharing.enter(instance, kind, request_id, span, name)
            cleanups.append(lambda: sharing.exit(usage))
        if self.config.detect_shared_instances:
            record.holdings = self.runtime.shared_state.new_holdings()
            cleanups.append(record.holdings.release)
        if active is None:
            cleanups.append(self.runtime.errors.hold_run(span, record))
            metrics = self.runtime.metrics
            in_flight = metrics.kickoff_started(name)
            cleanups.append(lambda: metrics.kickoff_ended(name))
            span.set_attribute(a.KICKOFFS_IN_FLIGHT, in_flight)
        elif active.lifetime.hold_work():
            parent = active.lifetime  # a kickoff nested in a run: the run's kickoff ends after it
        return call

    def _delegated(self, active: ActiveKickoff, ctx: otel_context.Context) -> Call | None:
        """The entry point delegates to another entry point of the same object.

        No second span: the call holds the kickoff open while it runs (it is the run's work,
        e.g. the worker thread's ``kickoff`` behind ``kickoff_async`` or behind a stream).
        """
        if not active.wait_recorded and not active.wants_first_step_wait:
            active.record_wait(self.runtime)
        if not active.lifetime.hold_work():
            return None
        call = Call(active.span, ctx, data=_Delegated(active))
        call.borrowed = True
        call.add_cleanup(active.lifetime.release_work)
        return call

    def succeed(self, call: Call, result: Any) -> Any:
        if isinstance(call.data, _Delegated):
            return result
        if is_streaming_output(result) and trace_stream(
            result, call.ctx, _KickoffStream(self, call)
        ):
            record: ActiveKickoff = call.data
            record.lifetime.hold_stream()
            # A stream never iterated starts no run: it ends when it is collected (or closed).
            weakref.finalize(result, record.lifetime.release_stream)
        return result

    def fail(self, call: Call, exc: BaseException) -> None:
        delegated = isinstance(call.data, _Delegated)
        record: ActiveKickoff = call.data.record if delegated else call.data
        if is_cancellation(exc):
            if not record.cancel_noted:
                record.cancel_noted = True
                call.span.add_event(a.EVENT_CALLER_CANCELLED)
            if not delegated and record.lifetime.work_in_flight:
                return  # the caller stopped waiting; the work goes on and decides the outcome
        self.runtime.errors.record(call.span, exc, self.operation, since=call.start)
        if record.error_type is None:
            record.error_type = a.error_type(exc)

    def _finish(
        self, call: Call, cleanups: list[Callable[[], None]], parent: KickoffLifetime | None
    ) -> None:
        """The kickoff's real end: its counts, its duration, its span, then its parent's hold."""
        record: ActiveKickoff = call.data
        for fn in cleanups:
            safe_call(fn, default=None)
        attrs = {a.GEN_AI_WORKFLOW_NAME: record.workflow}
        if record.error_type is not None:
            attrs[a.ERROR_TYPE] = record.error_type
        safe_call(self.runtime.metrics.workflow_duration.record, call.elapsed, attrs, default=None)
        call.span.end()
        if parent is not None:
            parent.release_work()


def _is_internal_flow(cls: type) -> bool:
    """CrewAI's own Flow subclasses (the agent executor, memory flows) are not user kickoffs."""
    return bool(getattr(cls, "is_crewai_internal", False)) or cls.__module__.startswith("crewai.")


def _default_executor_queue_depth() -> int | None:
    """Work items waiting in the running loop's default executor (where kickoffs queue)."""
    queue = internals.LOOP_EXECUTOR_QUEUE.read(running_loop())
    qsize = getattr(queue, "qsize", None)
    return qsize() if callable(qsize) else None
