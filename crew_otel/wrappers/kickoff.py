"""Kickoffs: every entry point that starts a run (Crew, user Flow, standalone Agent).

The outermost kickoff of a request gets the request ID (the caller's from
``crew_otel.request(...)``, else a new one) and counts in ``crew_otel.kickoffs.active``. A kickoff
that an entry point delegates to on the *same* object (``kickoff_async`` -> ``kickoff``,
``Flow.kickoff`` -> ``kickoff_async``, the worker of a streaming kickoff) adds no second span;
kickoffs of other objects inside a run (``kickoff_for_each``'s copies, a crew inside a flow)
nest as child spans with the same request ID.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes as a
from crew_otel import content
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY, new_request_id
from crew_otel.diagnosis.sharing import KIND_AGENT, KIND_CREW
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.agent import start_scope_for_standalone_agent
from crew_otel.wrappers.base import Call, SpanWrapper, running_loop

KIND_OF_CREW = "crew"
KIND_OF_FLOW = "flow"
KIND_OF_AGENT = "agent"

#: Entry points whose work waits in the event loop's default executor.
_EXECUTOR_ENTRYPOINTS = frozenset({"kickoff_async", "kickoff_for_each_async"})
_FIRST_STEP_ENTRYPOINTS = frozenset({"akickoff", "akickoff_for_each"})


class ActiveKickoff:
    """The innermost kickoff in this context (kept in the OTel Context)."""

    __slots__ = (
        "instance_key",
        "span",
        "start",
        "wait_recorded",
        "wants_first_step_wait",
        "workflow",
    )

    def __init__(self, instance_key: int, span: trace.Span, workflow: str, entrypoint: str) -> None:
        self.instance_key = instance_key
        self.span = span
        self.workflow = workflow
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
            and trace.get_current_span(ctx) is active.span
        ):
            # The entry point delegates to another entry point of the same object.
            if not active.wait_recorded and not active.wants_first_step_wait:
                active.record_wait(self.runtime)
            return None
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
        record = ActiveKickoff(id(instance), span, name, self.entrypoint)
        call_ctx = otel_context.set_value(KICKOFF_KEY, record, trace.set_span_in_context(span, ctx))
        call = Call(span, call_ctx, data=record)
        if self.kind == KIND_OF_AGENT:
            scope = start_scope_for_standalone_agent(self.runtime, instance, call)
            call.ctx = otel_context.set_value(ATTEMPT_KEY, scope, call.ctx)
        if self.config.detect_shared_instances and self.kind != KIND_OF_FLOW:
            sharing = self.runtime.sharing
            kind = KIND_CREW if self.kind == KIND_OF_CREW else KIND_AGENT
            usage = sharing.enter(instance, kind, request_id, span, name)
            call.add_cleanup(lambda: sharing.exit(usage))
        if active is None:
            metrics = self.runtime.metrics
            in_flight = metrics.kickoff_started(name)
            call.add_cleanup(lambda: metrics.kickoff_ended(name))
            span.set_attribute(a.KICKOFFS_IN_FLIGHT, in_flight)
        return call

    def succeed(self, call: Call, result: Any) -> Any:
        if _is_streaming_output(result):
            iterator = getattr(result, "_sync_iterator", None)
            if iterator is not None:
                result._sync_iterator = self._traced_stream(call, iterator)
                call.deferred = True
                # A stream that is never iterated never runs its generator's cleanup: end the
                # kickoff (and its count in flight) when the output object goes away.
                weakref.finalize(result, call.end)
                return result
        self._record_duration(call, None)
        return result

    def fail(self, call: Call, exc: BaseException) -> None:
        self.runtime.errors.record(call.span, exc, self.operation)
        self._record_duration(call, a.error_type(exc))

    def _record_duration(self, call: Call, error_type: str | None) -> None:
        record: ActiveKickoff = call.data
        attrs = {a.GEN_AI_WORKFLOW_NAME: record.workflow}
        if error_type is not None:
            attrs[a.ERROR_TYPE] = error_type
        self.runtime.metrics.workflow_duration.record(call.elapsed, attrs)

    def _traced_stream(self, call: Call, inner: Iterator[Any]) -> Iterator[Any]:
        """Iterate a streaming kickoff inside the kickoff's context; end the span at the end.

        CrewAI starts the streaming run's thread at the first ``next()`` with a copy of the
        context current *then*; running each ``next()`` under the kickoff's context keeps the
        run in the kickoff's trace.
        """
        try:
            while True:
                token = otel_context.attach(call.ctx)
                try:
                    item = next(inner)
                except StopIteration:
                    safe_call(self._record_duration, call, None, default=None)
                    return
                except BaseException as exc:
                    safe_call(self.fail, call, exc, default=None)
                    raise
                finally:
                    otel_context.detach(token)
                yield item
        finally:
            close = getattr(inner, "close", None)
            if callable(close):
                safe_call(close, default=None)
            call.end()


def _is_internal_flow(cls: type) -> bool:
    """CrewAI's own Flow subclasses (the agent executor, memory flows) are not user kickoffs."""
    return bool(getattr(cls, "is_crewai_internal", False)) or cls.__module__.startswith("crewai.")


def _is_streaming_output(result: Any) -> bool:
    return type(result).__name__.endswith("StreamingOutput")


def _default_executor_queue_depth() -> int | None:
    """Work items waiting in the running loop's default executor (where kickoffs queue)."""
    loop = running_loop()
    executor = getattr(loop, "_default_executor", None)
    queue = getattr(executor, "_work_queue", None)
    qsize = getattr(queue, "qsize", None)
    return qsize() if callable(qsize) else None
