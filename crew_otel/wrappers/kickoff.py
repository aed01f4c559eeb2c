"""Kickoffs: every entry point that starts a run (Crew, user Flow, standalone Agent).

The outermost kickoff of a request gets the request ID (the caller's from
``crew_otel.request(...)``, else a new one) and counts in ``crew_otel.kickoffs.active``. A kickoff
that an entry point delegates to on the *same* object (``kickoff_async`` -> ``kickoff``,
``Flow.kickoff`` -> ``kickoff_async``, the worker of a streaming kickoff) adds no second span;
kickoffs of other objects inside a run (``kickoff_for_each``'s copies, a crew inside a flow)
nest as child spans with the same request ID.

A kickoff is an ordinary :class:`~crew_otel.wrappers.base.Call` that ends when its run ends,
which may be after the entry point returned or raised: a streaming kickoff's run happens while
the caller iterates (the stream holds the call open, ``Call.hold(extends=True)``), and a caller
that stops waiting (``asyncio.wait_for`` timing out on ``kickoff_async``) leaves the worker
thread running the kickoff (the delegated entry point there is the kickoff call's child). The
span, the count in flight, the duration and the shared-instance bookkeeping end with the run's
work, never before the kickoffs nested in it (children too); a cancelled caller is an event on
the span (``crew_otel.kickoff.caller_cancelled``). Once the work a stream started is over, the
stream can yield nothing more of the run and lets go too: an abandoned stream ends with its run,
not when the garbage collector gets to it. A stream never iterated never started a run; it ends
when it is closed or collected.

An agent kicked off right under a guardrail evaluation's span (CrewAI's ``Guardrail Agent`` of
an LLM guardrail) is part of that evaluation, not a workflow: no ``invoke_workflow`` span and no
duration point; its steps and model calls nest under the evaluation's span.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes, internals
from crew_otel.attributes import Operation
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY, RunScope, new_request_id
from crew_otel.diagnosis.crosstalk import strings_in
from crew_otel.diagnosis.errors import is_cancellation
from crew_otel.diagnosis.shared_state import RunHoldings
from crew_otel.diagnosis.sharing import Kind
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.agent import start_scope_for_standalone_agent
from crew_otel.wrappers.base import (
    RECORD,
    Call,
    DurationPoint,
    ErrorRecording,
    SpanWrapper,
    innermost_own_span_is,
    running_loop,
)
from crew_otel.wrappers.guardrail import GUARDRAIL_EVALUATION_KEY, TaskAttempts
from crew_otel.wrappers.streams import is_streaming_output, trace_stream

#: Entry points whose work waits in the event loop's default executor.
_EXECUTOR_ENTRYPOINTS = frozenset({"kickoff_async", "kickoff_for_each_async"})
_FIRST_STEP_ENTRYPOINTS = frozenset({"akickoff", "akickoff_for_each"})
#: Context key of the guardrail's own agent running (the ``id`` of that agent).
_GUARDRAIL_AGENT_KEY = otel_context.create_key("crew_otel.guardrail_agent")


class ActiveKickoff:
    """The innermost kickoff in this context (kept in the OTel Context)."""

    __slots__ = (
        "__weakref__",
        "_lock",
        "_release_stream",
        "_work",
        "call",
        "cancel_noted",
        "error_type",
        "failure_noted",
        "holdings",
        "instance_key",
        "nested",
        "run",
        "span",
        "start",
        "task_attempts",
        "wait_recorded",
        "wants_first_step_wait",
        "workflow",
    )

    def __init__(
        self, instance_key: int, span: trace.Span, workflow: str, entrypoint: str, nested: bool
    ) -> None:
        self.instance_key = instance_key
        self.span = span
        self.workflow = workflow
        #: The kickoff's call (set once it exists): it finishes when the run's work is over.
        self.call: Call[KickoffData] | None = None
        #: The run: ``ended`` turns true when the kickoff's call finishes, whether or not its
        #: span records anything, and the threads the run started let go of it then.
        self.run = RunScope()
        #: The kickoff runs inside another kickoff's run.
        self.nested = nested
        self._lock = threading.Lock()
        #: Pieces of work for this kickoff running elsewhere (delegated entry points, nested
        #: kickoffs): while any runs, a cancelled caller does not decide the outcome.
        self._work = 0
        #: Lets go of the kickoff's call once its stream is over (``None``: no stream).
        self._release_stream: Callable[[], None] | None = None
        #: error.type of the run's failure (for the duration metric), None while it succeeds.
        self.error_type: str | None = None
        self.cancel_noted = False
        #: The run's failure was classified (once: the entry point and its delegates fail).
        self.failure_noted = False
        #: Shared state the run's tool code touched (released when the kickoff ends).
        self.holdings: RunHoldings | None = None
        #: The attempt numbers of each task run in this kickoff, by ``id`` of the Task.
        self.task_attempts: dict[int, TaskAttempts] = {}
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
        self.span.set_attribute(attributes.QUEUE_WAIT, wait)
        runtime.metrics.queue_wait.record(wait, {attributes.GEN_AI_WORKFLOW_NAME: self.workflow})

    @property
    def work_in_flight(self) -> int:
        """How many pieces of work for this kickoff are running right now."""
        return self._work

    def start_work(self, work: Call[Any]) -> bool:
        """``work`` runs for this kickoff: the kickoff's call finishes only after it. False if
        the kickoff is over already."""
        call = self.call
        if call is None:
            return False
        work.adopt(call)
        if work.parent is not call:
            return False
        with self._lock:
            self._work += 1
        work.add_cleanup(self._work_done)
        return True

    def _work_done(self) -> None:
        with self._lock:
            self._work -= 1
            release = None
            if self._work == 0:
                # the run is over: its stream yields nothing more
                release, self._release_stream = self._release_stream, None
        if release is not None:
            release()

    def hold_stream(self, stream: object) -> None:
        """The call returned a stream that keeps the kickoff open until the stream is over
        (or collected, never iterated)."""
        call = self.call
        if call is None:
            return
        with self._lock:
            if self._release_stream is not None:
                return
            self._release_stream = call.hold(extends=True)
        weakref.finalize(stream, self.release_stream)

    def release_stream(self) -> None:
        """The stream is over: it no longer holds the kickoff open."""
        with self._lock:
            release, self._release_stream = self._release_stream, None
        if release is not None:
            release()


class _Delegated:
    """``Call.data`` of an entry point delegated to by the same object (no span of its own)."""

    __slots__ = ("record",)

    def __init__(self, record: ActiveKickoff) -> None:
        self.record = record


class _GuardrailAgent:
    """``Call.data`` of a guardrail's own agent: no kickoff, the evaluation's span is borrowed."""

    __slots__ = ()


_IN_GUARDRAIL = _GuardrailAgent()

#: ``Call.data`` of a kickoff: its record, or the delegation to the kickoff in progress, or a
#: guardrail's agent.
KickoffData = ActiveKickoff | _Delegated | _GuardrailAgent


def _record_of(call: Call[KickoffData]) -> ActiveKickoff | None:
    data = call.data
    if isinstance(data, _GuardrailAgent):
        return None
    return data.record if isinstance(data, _Delegated) else data


class _KickoffStream:
    """What a traced stream reports to its kickoff (see :mod:`crew_otel.wrappers.streams`)."""

    __slots__ = ("call", "wrapper")

    def __init__(self, wrapper: KickoffWrapper, call: Call[KickoffData]) -> None:
        self.wrapper = wrapper
        self.call = call

    def stream_failed(self, exc: BaseException) -> None:
        self.wrapper.fail(self.call, exc)

    def stream_done(self) -> None:
        record = _record_of(self.call)
        if record is not None:
            record.release_stream()


class KickoffWrapper(SpanWrapper[KickoffData]):
    """One ``invoke_workflow {name}`` span per kickoff, for every entry point."""

    operation = Operation.INVOKE_WORKFLOW
    duration_at_finish = True

    def __init__(
        self, runtime: Runtime, entrypoint: str, kind: Kind, *, is_async: bool = False
    ) -> None:
        super().__init__(runtime, is_async=is_async)
        self.entrypoint = entrypoint
        self.kind = kind

    def passes_through(self, cls: type) -> bool:
        # CrewAI's own flows (the agent executor, memory flows) are not kickoffs.
        return self.kind == Kind.FLOW and _is_internal_flow(cls)

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[KickoffData] | None:
        ctx = otel_context.get_current()
        active: ActiveKickoff | None = ctx.get(KICKOFF_KEY)  # type: ignore[assignment]
        if active is not None and _delegates_to_itself(active, instance, ctx):
            return self._delegated(active, ctx)
        if self.kind == Kind.AGENT:
            evaluation = ctx.get(GUARDRAIL_EVALUATION_KEY)
            if isinstance(evaluation, trace.Span) and innermost_own_span_is(evaluation, ctx):
                return self._guardrail_agent(instance, evaluation, ctx)
        safe_call(self.runtime.on_kickoff, default=None)
        ctx = _with_request_id(ctx)
        name = attributes.workflow_name(instance)
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_WORKFLOW, name),
            context=ctx,
            attributes=self._attributes(instance, name, args, kwargs),
        )
        call, record = self._start(instance, span, name, ctx, nested=active is not None)
        if self.kind == Kind.AGENT:
            self._open_agent_scope(call, instance)
        if self.kind != Kind.FLOW:
            self.track_instance(call, self.kind, instance, name)
        self._hold_shared_state(record)
        self._join_run(call, record, active)
        self._mark_run(record, ctx, kwargs.get("inputs", args[0] if args else None))
        call.add_cleanup(lambda: self._finish(call, record))
        return call

    def _mark_run(self, record: ActiveKickoff, ctx: otel_context.Context, inputs: Any) -> None:
        """The run's identifiers (kept as hashes until it ends): data of another run found in
        it is cross-talk (:mod:`crew_otel.diagnosis.crosstalk`)."""
        crosstalk = self.runtime.crosstalk
        request_id = ctx.get(REQUEST_ID_KEY)
        if crosstalk is not None and isinstance(request_id, str):
            end = crosstalk.start_run(request_id, inputs, record.span, record.workflow)
            _call_of(record).add_cleanup(end)

    def _attributes(
        self, instance: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, AttributeValue]:
        """The kickoff span's attributes: what it runs, where, and its inputs (content)."""
        attrs = attributes.kickoff_attributes(instance, self.entrypoint, name)
        if self.kind == Kind.CREW and not self.is_async and running_loop() is not None:
            attrs[attributes.SYNC_IN_EVENT_LOOP] = True
        if self.is_async:
            depth = _default_executor_queue_depth()
            if depth is not None:
                attrs[attributes.EXECUTOR_QUEUE_DEPTH] = depth
        self.capture(
            attrs, attributes.CREWAI_KICKOFF_INPUTS, kwargs.get("inputs", args[0] if args else None)
        )
        return attrs

    def _start(
        self, instance: Any, span: trace.Span, name: str, ctx: otel_context.Context, nested: bool
    ) -> tuple[Call[KickoffData], ActiveKickoff]:
        """The kickoff's call and record. The call may outlast its function (a stream, a
        caller that stopped waiting while the worker thread goes on): it finishes, ending the
        run first, when its work is over."""
        record = ActiveKickoff(id(instance), span, name, self.entrypoint, nested)
        call_ctx = otel_context.set_value(KICKOFF_KEY, record, trace.set_span_in_context(span, ctx))
        call: Call[KickoffData] = Call(span, call_ctx, record)
        record.call = call
        call.add_cleanup(record.run.end)  # first: threads bound to the run let go of it
        return call, record

    def _guardrail_agent(
        self, agent: Any, evaluation: trace.Span, ctx: otel_context.Context
    ) -> Call[KickoffData] | None:
        """A guardrail's own agent: its steps nest under the evaluation's span (borrowed)."""
        if ctx.get(_GUARDRAIL_AGENT_KEY) is not None:
            return None  # that agent's kickoff delegating to another entry point
        call: Call[KickoffData] = Call(
            evaluation, otel_context.set_value(_GUARDRAIL_AGENT_KEY, id(agent), ctx), _IN_GUARDRAIL
        )
        call.borrowed = True
        self._open_agent_scope(call, agent)
        return call

    def _open_agent_scope(self, call: Call[KickoffData], agent: Any) -> None:
        """Standalone ``Agent.kickoff``: the agent's steps nest under the kickoff span."""
        scope = start_scope_for_standalone_agent(self.runtime, agent, call)
        call.ctx = otel_context.set_value(ATTEMPT_KEY, scope, call.ctx)

    def _hold_shared_state(self, record: ActiveKickoff) -> None:
        """The shared state the run's tool code touches is the run's until the kickoff ends."""
        if self.config.detect_shared_instances:
            record.holdings = self.runtime.shared_state.new_holdings()
            _call_of(record).add_cleanup(record.holdings.release)

    def _join_run(
        self, call: Call[KickoffData], record: ActiveKickoff, active: ActiveKickoff | None
    ) -> None:
        """A top-level kickoff starts a run: it keeps the run's error marks and counts in
        flight. A kickoff nested in a run is that run's work until it finishes."""
        if active is not None:
            active.start_work(call)
            return
        call.add_cleanup(self.runtime.errors.hold_run(record.span, record))
        metrics = self.runtime.metrics
        name = record.workflow
        in_flight = metrics.kickoff_started(name)
        call.add_cleanup(lambda: metrics.kickoff_ended(name))
        record.span.set_attribute(attributes.KICKOFFS_IN_FLIGHT, in_flight)

    def _delegated(
        self, active: ActiveKickoff, ctx: otel_context.Context
    ) -> Call[KickoffData] | None:
        """The entry point delegates to another entry point of the same object.

        No second span: the call holds the kickoff open while it runs (it is the run's work,
        e.g. the worker thread's ``kickoff`` behind ``kickoff_async`` or behind a stream).
        """
        if not active.wait_recorded and not active.wants_first_step_wait:
            active.record_wait(self.runtime)
        call: Call[KickoffData] = Call(active.span, ctx, _Delegated(active))
        call.borrowed = True
        return call if active.start_work(call) else None

    def succeed(self, call: Call[KickoffData], result: Any) -> Any:
        record = call.data
        if isinstance(record, (_Delegated, _GuardrailAgent)):
            return result
        crosstalk = self.runtime.crosstalk
        if crosstalk is not None and not is_streaming_output(result):
            raw = getattr(result, "raw", None)
            crosstalk.check(
                call.ctx.get(REQUEST_ID_KEY),  # type: ignore[arg-type]
                [raw] if isinstance(raw, str) else strings_in(result),
                attributes.CROSSTALK_OUTPUT,
                record.span,
            )
        if is_streaming_output(result) and trace_stream(
            result, call.ctx, _KickoffStream(self, call)
        ):
            # A stream never iterated starts no run: it ends when it is collected (or closed).
            record.hold_stream(result)
        return result

    def error_recording(self, call: Call[KickoffData], exc: BaseException) -> ErrorRecording | None:
        """A cancelled caller is noted first; if the work goes on, it decides the outcome."""
        record = _record_of(call)
        if record is None:
            return None  # a guardrail's agent: the evaluation's span records it
        if is_cancellation(exc):
            if not record.cancel_noted:
                record.cancel_noted = True
                call.span.add_event(attributes.EVENT_CALLER_CANCELLED)
            if not isinstance(call.data, _Delegated) and record.work_in_flight:
                return None  # the caller stopped waiting; the work goes on
        return RECORD

    def on_fail(self, call: Call[KickoffData], exc: BaseException) -> None:
        record = _record_of(call)
        if record is None:
            return
        if record.error_type is None:
            record.error_type = call.error_type
        if not record.failure_noted and not record.nested:
            record.failure_noted = True
            self._note_failure(record, exc)

    def _note_failure(self, record: ActiveKickoff, exc: BaseException) -> None:
        """A run's exception reached the caller: why, on the kickoff span and in the metric."""
        failure = self.runtime.errors.failure(record.span, exc)
        span = record.span
        if span.is_recording():
            attrs: dict[str, AttributeValue] = {attributes.FAILURE_CAUSE: failure.cause.value}
            if failure.origin is not None:
                attrs[attributes.FAILURE_ORIGIN] = failure.origin
            if failure.shared is not None:
                attrs[attributes.FAILURE_SHARED_KIND] = failure.shared.kind
                attrs[attributes.FAILURE_SHARED_NAME] = failure.shared.name
            span.set_attributes(attrs)
        ctx = trace.set_span_in_context(span)
        token = otel_context.attach(ctx)  # the point's exemplar links the failed run's trace
        try:
            self.runtime.metrics.failure(failure.cause.value, record.workflow)
        finally:
            otel_context.detach(token)

    def duration_point(self, call: Call[KickoffData]) -> DurationPoint | None:
        record = _record_of(call)
        if record is None:
            return None  # a guardrail's agent is part of the evaluation, not a workflow
        return (
            self.runtime.metrics.workflow_duration,
            {attributes.GEN_AI_WORKFLOW_NAME: record.workflow},
        )

    def _finish(self, call: Call[KickoffData], record: ActiveKickoff) -> None:
        """The kickoff's duration, when its run is over (the call's last cleanup; its span
        ends next)."""
        record.call = None  # over: nothing starts as its work now, and no cycle keeps it
        call.error_type = record.error_type  # the run's first failure, also a delegated call's
        self.record_duration(call)


def _call_of(record: ActiveKickoff) -> Call[KickoffData]:
    call = record.call
    assert call is not None  # set by _start, before anything asks
    return call


def _delegates_to_itself(active: ActiveKickoff, instance: Any, ctx: otel_context.Context) -> bool:
    """Whether an entry point of the object whose kickoff is in progress calls another one
    (also through another instrumentation's span)."""
    return active.instance_key == id(instance) and innermost_own_span_is(active.span, ctx)


def _with_request_id(ctx: otel_context.Context) -> otel_context.Context:
    """``ctx`` with a request ID: the caller's (``crew_otel.request``), else a new one."""
    if isinstance(ctx.get(REQUEST_ID_KEY), str):
        return ctx
    return otel_context.set_value(REQUEST_ID_KEY, new_request_id(), ctx)


def _is_internal_flow(cls: type) -> bool:
    """CrewAI's own Flow subclasses (the agent executor, memory flows) are not user kickoffs."""
    return bool(getattr(cls, "is_crewai_internal", False)) or cls.__module__.startswith("crewai.")


def _default_executor_queue_depth() -> int | None:
    """Work items waiting in the running loop's default executor (where kickoffs queue)."""
    queue = internals.LOOP_EXECUTOR_QUEUE.read(running_loop())
    qsize = getattr(queue, "qsize", None)
    return qsize() if callable(qsize) else None
