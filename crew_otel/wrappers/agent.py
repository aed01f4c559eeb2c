"""Agent execution attempts (``Agent.execute_task``) and agent steps (``get_llm_response``).

An *attempt* is one run of ``Agent.execute_task``; CrewAI re-runs it (recursively, from inside
the failed attempt's ``except`` block) up to ``max_retry_limit`` times, so retries nest and are
numbered with ``crew_otel.attempt``. A *step* is one model round-trip of the agent loop plus the
tools it asked for: the step span starts when CrewAI asks the model (``get_llm_response``) and
stays open while the requested tools run (CrewAI runs them in a separate flow method, in another
thread), ending when the next step starts or the attempt ends. Tool spans are parented on it.
"""

from __future__ import annotations

import sys
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes, internals
from crew_otel.attributes import Operation
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY
from crew_otel.diagnosis.context_window import is_no_final_output
from crew_otel.diagnosis.error_text import safe_str
from crew_otel.diagnosis.retries import agent_will_retry
from crew_otel.diagnosis.sharing import Kind
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.base import Call, DurationPoint, ErrorRecording, SpanWrapper
from crew_otel.wrappers.guardrail import guardrail_attempt_number

#: The attempt's span records the agent's error as the layer that retries it.
_RETRY_LAYER = ErrorRecording(expected_retry=True)


class AgentScope:
    """The innermost agent execution in this context: it owns the open step span."""

    __slots__ = (
        "agent",
        "agent_key",
        "closed",
        "compacted",
        "finish_reasons",
        "input_tokens",
        "iteration",
        "number",
        "output_tokens",
        "role",
        "shared_flagged",
        "span",
        "start",
        "step",
        "task_key",
    )

    def __init__(self, agent: Any, task_key: int, number: int, role: str) -> None:
        #: The agent, held only while the attempt runs (released by :meth:`close`).
        self.agent = agent
        self.agent_key = id(agent)
        self.task_key = task_key
        self.number = number
        self.role = role
        #: The execution's span and start time (set by whoever opens the scope, right after;
        #: not its call, whose data the scope may be: no reference cycle keeps either).
        self.span: trace.Span
        self.start: float
        self.iteration = 0
        self.step: Call[AgentScope | None] | None = None
        self.shared_flagged = False
        #: The execution ended (a step finishing later, in an abandoned worker thread, ends
        #: its span at once instead of waiting for a next step).
        self.closed = False
        #: CrewAI summarised the conversation to fit the context window: the later model calls
        #: of this execution use the summary (``gen_ai.conversation.compacted``).
        self.compacted = False
        #: Usage summed over the model calls of the agent's own LLM, and the finish reasons
        #: of the latest (``None``/empty until one reports them).
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.finish_reasons: tuple[str, ...] = ()

    def note_model_call(
        self, input_tokens: int | None, output_tokens: int | None, finish_reasons: tuple[str, ...]
    ) -> None:
        """One model call of the agent's LLM ended (called in the calling thread of the call;
        one agent attempt's calls are sequential)."""
        if input_tokens is not None:
            self.input_tokens = (self.input_tokens or 0) + input_tokens
        if output_tokens is not None:
            self.output_tokens = (self.output_tokens or 0) + output_tokens
        if finish_reasons:
            self.finish_reasons = finish_reasons

    def usage_attributes(self) -> dict[str, AttributeValue]:
        """The attempt's usage totals and its last finish reasons, for its span's end."""
        attrs: dict[str, AttributeValue] = {}
        if self.input_tokens is not None:
            attrs[attributes.GEN_AI_USAGE_INPUT_TOKENS] = self.input_tokens
        if self.output_tokens is not None:
            attrs[attributes.GEN_AI_USAGE_OUTPUT_TOKENS] = self.output_tokens
        if self.finish_reasons:
            attrs[attributes.GEN_AI_RESPONSE_FINISH_REASONS] = self.finish_reasons
        return attrs

    def open(self, call: Call[Any]) -> None:
        """The scope belongs to ``call``: ending the call ends the scope's open step."""
        self.span = call.span
        self.start = call.start
        call.add_closer(self.close)

    def keep_step_open(self, step: Call[AgentScope | None]) -> None:
        """The step's model call returned: keep its span open for the tools it asked for."""
        step.deferred = True
        self.step = step
        if self.closed:  # the execution ended (was cancelled) while the step ran
            self.close_step()

    def close_step(self) -> None:
        """End the open step span (its tools have finished)."""
        step, self.step = self.step, None
        if step is not None:
            step.end()

    def close(self) -> None:
        """The execution ended: end the open step and drop the reference to the agent."""
        self.closed = True
        self.close_step()
        self.agent = None


class _RetryBudget:
    """What is left of an Agent's ``max_retry_limit`` (CrewAI never resets the count)."""

    __slots__ = ("limit", "remaining")

    def __init__(self, agent: Any) -> None:
        limit = getattr(agent, "max_retry_limit", None)
        used = internals.AGENT_TIMES_EXECUTED.read(agent)
        self.limit = limit
        self.remaining: int | None = (
            limit - used if isinstance(limit, int) and isinstance(used, int) else None
        )

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def attributes(self) -> dict[str, AttributeValue]:
        if self.remaining is None:
            return {}
        attrs: dict[str, AttributeValue] = {
            attributes.RETRY_BUDGET_REMAINING: max(self.remaining, 0)
        }
        if self.exhausted:
            attrs[attributes.RETRY_BUDGET_EXHAUSTED] = True
        return attrs

    def note_exhausted(self, span: trace.Span) -> None:
        span.add_event(
            "crew_otel.retry_budget_exhausted",
            {
                "message": f"this Agent has used all {self.limit} retries of its max_retry_limit; "
                "CrewAI never resets Agent._times_executed, so an error in this attempt is "
                "not retried (build the Agent per request to get a fresh budget)",
            },
        )


def _task_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("task", args[0] if args else None)


class AgentAttemptWrapper(SpanWrapper[AgentScope]):
    """``Agent.execute_task`` / ``aexecute_task``: one ``invoke_agent {role}`` span per attempt."""

    operation = Operation.INVOKE_AGENT

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[AgentScope] | None:
        ctx = otel_context.get_current()
        task = _task_arg(args, kwargs)
        number = guardrail_attempt_number(
            self.runtime, ctx, instance, task, self._attempt_number(ctx, instance, task)
        )
        role = attributes.agent_role(instance)
        span = self._start_span(ctx, instance, task, role, number)
        scope = AgentScope(instance, id(task), number, role)
        call_ctx = otel_context.set_value(ATTEMPT_KEY, scope, trace.set_span_in_context(span, ctx))
        call = Call(span, call_ctx, scope)
        scope.open(call)
        usage = self.track_instance(call, Kind.AGENT, instance, role)
        scope.shared_flagged = usage is not None and usage.conflicted
        return call

    def _start_span(
        self, ctx: otel_context.Context, agent: Any, task: Any, role: str, number: int
    ) -> trace.Span:
        """The attempt's span: the agent, the attempt's number, what is left of its retries."""
        budget = _RetryBudget(agent)
        attrs = attributes.agent_attributes(agent, role)
        attrs[attributes.ATTEMPT] = number
        attrs.update(budget.attributes())
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_AGENT, role), context=ctx, attributes=attrs
        )
        if span.is_recording():
            requested = attributes.agent_request_attributes(agent, task)
            if requested:  # often none: the SDK's set_attributes costs a few calls even then
                span.set_attributes(requested)
        if budget.exhausted:
            budget.note_exhausted(span)
        return span

    def _attempt_number(self, ctx: otel_context.Context, agent: Any, task: Any) -> int:
        """1, or the failed attempt's number + 1 when CrewAI retries it (it calls
        ``execute_task`` again from the failed attempt's except block)."""
        parent: AgentScope | None = ctx.get(ATTEMPT_KEY)  # type: ignore[assignment]
        if parent is None or parent.agent_key != id(agent) or parent.task_key != id(task):
            return 1
        self._note_retry(parent)
        return parent.number + 1

    def _note_retry(self, parent: AgentScope) -> None:
        """The parent attempt failed and CrewAI is retrying: say so on the parent span."""
        exc = sys.exc_info()[1]
        error_type = attributes.error_type(exc) if exc is not None else "unknown"
        if exc is not None:
            self.runtime.errors.record(
                parent.span,
                exc,
                self.operation.value,
                recovered=True,
                since=parent.start,
            )
        self.runtime.metrics.retry(attributes.RETRY_LAYER_AGENT, error_type)

    def succeed(self, call: Call[AgentScope], result: Any) -> Any:
        if call.span.is_recording():
            call.span.set_attributes(call.data.usage_attributes())
        if is_no_final_output(result) and call.span.is_recording():
            call.span.set_attribute(attributes.CONTEXT_NO_FINAL_OUTPUT, True)
            call.span.add_event(
                "crew_otel.context.no_final_output",
                {
                    "message": "CrewAI summarised an overflowing context and the agent ended "
                    "without a final answer; the task output is a placeholder"
                },
            )
        return result

    def error_recording(self, call: Call[AgentScope], exc: BaseException) -> ErrorRecording:
        # CrewAI re-runs the agent from this call's except block; an error escaping it was not
        # retried, whatever an inner span expected.
        return _RETRY_LAYER

    def on_fail(self, call: Call[AgentScope], exc: BaseException) -> None:
        if call.span.is_recording():
            call.span.set_attributes(call.data.usage_attributes())
            # the attempt ended without its answer
            call.span.set_attribute(
                attributes.GEN_AI_RESPONSE_FINISH_REASONS, (attributes.FINISH_REASON_ERROR,)
            )
        if isinstance(exc, RuntimeError) and internals.EXECUTOR_BUSY_MESSAGE.matches(safe_str(exc)):
            self._attribute_busy_executor(call, call.data)

    def duration_point(self, call: Call[AgentScope]) -> DurationPoint:
        return (self.runtime.metrics.agent_duration, {attributes.GEN_AI_AGENT_NAME: call.data.role})

    def _attribute_busy_executor(self, call: Call[AgentScope], scope: AgentScope) -> None:
        """CrewAI's "Executor is already running": the Agent object is shared between runs."""
        request_id = call.ctx.get(REQUEST_ID_KEY)
        if scope.shared_flagged or scope.agent is None or not isinstance(request_id, str):
            return
        sharing = self.runtime.sharing
        others = [rid for rid in sharing.users_of(scope.agent) if rid != request_id]
        # The other run may have finished by now; the executor error still proves the sharing.
        sharing.report(
            scope.agent, Kind.AGENT, request_id, others or ["unknown"], call.span, scope.role
        )
        scope.shared_flagged = True


class AgentStepWrapper(SpanWrapper[AgentScope | None]):
    """``get_llm_response`` as bound in CrewAI's executor modules: one span per agent step."""

    operation = Operation.STEP

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[AgentScope | None] | None:
        ctx = otel_context.get_current()
        scope: AgentScope | None = ctx.get(ATTEMPT_KEY)  # type: ignore[assignment]
        if scope is not None:
            scope.close_step()
            scope.iteration += 1
            iteration = scope.iteration
            role = scope.role
        else:
            iteration = 1
            role = attributes.agent_role(kwargs.get("from_agent"))
        self._note_first_step(ctx)
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_STEP, role),
            context=ctx,
            attributes={attributes.CREWAI_AGENT_ITERATION: iteration},
        )
        return Call(span, trace.set_span_in_context(span, ctx), scope)

    def _note_first_step(self, ctx: otel_context.Context) -> None:
        """For async kickoffs: the wait until the first step started (executor queueing)."""
        active: Any = ctx.get(KICKOFF_KEY)
        if active is not None and active.wants_first_step_wait:
            active.record_wait(self.runtime)

    def succeed(self, call: Call[AgentScope | None], result: Any) -> Any:
        if call.data is not None:
            # Keep the step open while the tools it asked for run; the next step or the end of
            # the attempt closes it.
            call.data.keep_step_open(call)
        return result

    def error_recording(self, call: Call[AgentScope | None], exc: BaseException) -> ErrorRecording:
        return ErrorRecording(recovered=agent_will_retry(exc))


def start_scope_for_standalone_agent(runtime: Runtime, agent: Any, call: Call[Any]) -> AgentScope:
    """Standalone ``Agent.kickoff``: steps nest under the kickoff span (no task, no attempt)."""
    role = safe_call(attributes.agent_role, agent, default=attributes.DEFAULT_AGENT_NAME)
    scope = AgentScope(agent, 0, 1, role)
    scope.open(call)
    return scope
