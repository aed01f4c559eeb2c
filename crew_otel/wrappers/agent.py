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

from crew_otel import attributes as a
from crew_otel import internals
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY
from crew_otel.diagnosis.context_window import is_no_final_output
from crew_otel.diagnosis.error_text import safe_str
from crew_otel.diagnosis.retries import agent_will_retry
from crew_otel.diagnosis.sharing import KIND_AGENT
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.base import Call, SpanWrapper


class AgentScope:
    """The innermost agent execution in this context: it owns the open step span."""

    __slots__ = (
        "agent",
        "agent_key",
        "call",
        "closed",
        "iteration",
        "number",
        "role",
        "shared_flagged",
        "step",
        "task_key",
    )

    def __init__(self, agent: Any, task_key: int, number: int, role: str, call: Call) -> None:
        #: The agent, held only while the attempt runs (released by :meth:`close`).
        self.agent = agent
        self.agent_key = id(agent)
        self.task_key = task_key
        self.number = number
        self.role = role
        self.call = call
        self.iteration = 0
        self.step: Call | None = None
        self.shared_flagged = False
        #: The execution ended (a step finishing later, in an abandoned worker thread, ends
        #: its span at once instead of waiting for a next step).
        self.closed = False

    def keep_step_open(self, step: Call) -> None:
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


def _task_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("task", args[0] if args else None)


class AgentAttemptWrapper(SpanWrapper):
    """``Agent.execute_task`` / ``aexecute_task``: one ``invoke_agent {role}`` span per attempt."""

    operation = a.OP_INVOKE_AGENT

    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        ctx = otel_context.get_current()
        request_id: Any = ctx.get(REQUEST_ID_KEY)
        task = _task_arg(args, kwargs)
        parent: AgentScope | None = ctx.get(ATTEMPT_KEY)  # type: ignore[assignment]
        number = 1
        if parent is not None and parent.agent_key == id(instance) and parent.task_key == id(task):
            # CrewAI retries by calling execute_task again from the failed attempt's except block.
            number = parent.number + 1
            self._note_retry(parent, request_id)
        role = a.agent_role(instance)
        attrs = a.agent_attributes(instance, role)
        attrs[a.ATTEMPT] = number
        limit = getattr(instance, "max_retry_limit", None)
        used = internals.AGENT_TIMES_EXECUTED.read(instance)
        exhausted = False
        if isinstance(limit, int) and isinstance(used, int):
            remaining = limit - used
            attrs[a.RETRY_BUDGET_REMAINING] = max(remaining, 0)
            exhausted = remaining <= 0
            if exhausted:
                attrs[a.RETRY_BUDGET_EXHAUSTED] = True
        span = self.tracer.start_span(
            a.span_name(a.SPAN_AGENT, role), context=ctx, attributes=attrs
        )
        if exhausted:
            span.add_event(
                "crew_otel.retry_budget_exhausted",
                {
                    "message": f"this Agent has used all {limit} retries of its max_retry_limit; "
                    "CrewAI never resets Agent._times_executed, so an error in this attempt is "
                    "not retried (build the Agent per request to get a fresh budget)",
                },
            )
        call = Call(span, ctx)
        scope = AgentScope(instance, id(task), number, role, call)
        call.data = scope
        call.ctx = otel_context.set_value(ATTEMPT_KEY, scope, trace.set_span_in_context(span, ctx))
        call.add_closer(scope.close)
        if self.config.detect_shared_instances and isinstance(request_id, str):
            sharing = self.runtime.sharing
            usage = sharing.enter(instance, KIND_AGENT, request_id, span, role)
            scope.shared_flagged = usage.conflicted
            call.add_cleanup(lambda: sharing.exit(usage))
        return call

    def _note_retry(self, parent: AgentScope, request_id: object) -> None:
        """The parent attempt failed and CrewAI is retrying: say so on the parent span."""
        exc = sys.exc_info()[1]
        error_type = a.error_type(exc) if exc is not None else "unknown"
        if exc is not None:
            self.runtime.errors.record(
                parent.call.span, exc, self.operation, recovered=True, since=parent.call.start
            )
        self.runtime.metrics.retry(a.RETRY_LAYER_AGENT, error_type)

    def succeed(self, call: Call, result: Any) -> Any:
        scope: AgentScope = call.data
        if is_no_final_output(result) and call.span.is_recording():
            call.span.set_attribute(a.CONTEXT_NO_FINAL_OUTPUT, True)
            call.span.add_event(
                "crew_otel.context.no_final_output",
                {
                    "message": "CrewAI summarised an overflowing context and the agent ended "
                    "without a final answer; the task output is a placeholder"
                },
            )
        self.runtime.metrics.agent_duration.record(call.elapsed, {a.GEN_AI_AGENT_NAME: scope.role})
        return result

    def fail(self, call: Call, exc: BaseException) -> None:
        scope: AgentScope = call.data
        # CrewAI re-runs the agent from this call's except block; an error escaping it was not
        # retried, whatever an inner span expected.
        self.runtime.errors.record(
            call.span, exc, self.operation, since=call.start, expected_retry=True
        )
        if isinstance(exc, RuntimeError) and internals.EXECUTOR_BUSY_MESSAGE.matches(safe_str(exc)):
            self._attribute_busy_executor(call, scope)
        self.runtime.metrics.agent_duration.record(
            call.elapsed, {a.GEN_AI_AGENT_NAME: scope.role, a.ERROR_TYPE: a.error_type(exc)}
        )

    def _attribute_busy_executor(self, call: Call, scope: AgentScope) -> None:
        """CrewAI's "Executor is already running": the Agent object is shared between runs."""
        request_id = call.ctx.get(REQUEST_ID_KEY)
        if scope.shared_flagged or scope.agent is None or not isinstance(request_id, str):
            return
        sharing = self.runtime.sharing
        others = [rid for rid in sharing.users_of(scope.agent) if rid != request_id]
        # The other run may have finished by now; the executor error still proves the sharing.
        sharing.report(
            scope.agent, KIND_AGENT, request_id, others or ["unknown"], call.span, scope.role
        )
        scope.shared_flagged = True


class AgentStepWrapper(SpanWrapper):
    """``get_llm_response`` as bound in CrewAI's executor modules: one span per agent step."""

    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        ctx = otel_context.get_current()
        scope: AgentScope | None = ctx.get(ATTEMPT_KEY)  # type: ignore[assignment]
        if scope is not None:
            scope.close_step()
            scope.iteration += 1
            iteration = scope.iteration
            role = scope.role
        else:
            iteration = 1
            role = a.agent_role(kwargs.get("from_agent"))
        self._note_first_step(ctx)
        span = self.tracer.start_span(
            a.span_name(a.SPAN_STEP, role),
            context=ctx,
            attributes={a.CREWAI_AGENT_ITERATION: iteration},
        )
        return Call(span, trace.set_span_in_context(span, ctx), data=scope)

    def _note_first_step(self, ctx: otel_context.Context) -> None:
        """For async kickoffs: the wait until the first step started (executor queueing)."""
        active: Any = ctx.get(KICKOFF_KEY)
        if active is not None and active.wants_first_step_wait:
            active.record_wait(self.runtime)

    def succeed(self, call: Call, result: Any) -> Any:
        scope: AgentScope | None = call.data
        if scope is not None:
            # Keep the step open while the tools it asked for run; the next step or the end of
            # the attempt closes it.
            scope.keep_step_open(call)
        return result

    def fail(self, call: Call, exc: BaseException) -> None:
        self.runtime.errors.record(
            call.span, exc, a.ORIGIN_STEP, recovered=agent_will_retry(exc), since=call.start
        )


def start_scope_for_standalone_agent(runtime: Runtime, agent: Any, call: Call) -> AgentScope:
    """Standalone ``Agent.kickoff``: steps nest under the kickoff span (no task, no attempt)."""
    role = safe_call(a.agent_role, agent, default=a.DEFAULT_AGENT_NAME)
    scope = AgentScope(agent, 0, 1, role, call)
    call.add_closer(scope.close)
    return scope
