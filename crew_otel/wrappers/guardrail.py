"""Task guardrails: one ``crewai.guardrail {task}`` span per evaluation, rejections as retries.

CrewAI checks one guardrail of a task in ``Task._invoke_guardrail_function`` (``_ainvoke_...``
for native async tasks): it evaluates the guardrail (``process_guardrail``, bound in
``crewai.task``) and, on a rejection, re-runs the agent with the feedback and evaluates again,
up to ``guardrail_max_retries`` times; then it raises. So:

* :class:`GuardrailRunWrapper` (no span of its own) puts a :class:`GuardrailRun` in the context
  of that loop; the agent attempt re-run after a rejection asks it for its number
  (:func:`guardrail_attempt_number`: the last attempt's + 1) and that is a retry of layer
  ``guardrail`` in ``crew_otel.retries``.
* :class:`GuardrailWrapper` makes the span of each evaluation, with ``crewai.guardrail.passed``
  and ``crew_otel.attempt`` (1 = first evaluation). An LLM guardrail runs its own small agent
  (``Guardrail Agent``): that kickoff and its model calls nest under the evaluation's span.
* A rejection with no retry left keeps its span open until CrewAI raises; the exception the
  caller gets is recorded there, as the fatal origin.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.runtime import Runtime
from crew_otel.wrappers.base import Call, SpanWrapper

#: Context key of the guardrail check in progress (:class:`GuardrailRun`).
GUARDRAIL_RUN_KEY = otel_context.create_key("crew_otel.guardrail_run")


class GuardrailRun:
    """One check of one guardrail of a task run: its evaluations and the agent's re-runs."""

    __slots__ = (
        "agent_key",
        "evaluations",
        "last_attempt",
        "max_retries",
        "pending",
        "rejected",
        "task_key",
    )

    def __init__(self, task: Any, agent: Any) -> None:
        self.task_key = id(task)
        self.agent_key = id(agent)
        retries = getattr(task, "guardrail_max_retries", None)
        self.max_retries: int | None = retries if isinstance(retries, int) else None
        self.evaluations = 0
        #: The number of the agent's last attempt (the one before the check counts as 1).
        self.last_attempt = 1
        #: The last evaluation rejected the output and CrewAI re-runs the agent next.
        self.rejected = False
        #: The evaluation that rejected with no retry left (its span ends when CrewAI raises).
        self.pending: Call[GuardrailRun | None] | None = None

    def retries_left(self) -> bool:
        """Whether CrewAI re-runs the agent after a rejection of the latest evaluation."""
        return self.max_retries is None or self.evaluations <= self.max_retries

    def end_pending(self) -> None:
        """End the held span of the last evaluation (if any)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.end()


def guardrail_attempt_number(
    runtime: Runtime, ctx: otel_context.Context, agent: Any, task: Any, number: int
) -> int:
    """The number of an agent attempt starting in ``ctx`` (``number`` as counted without
    guardrails): after a rejection, the re-run is the last attempt's number + 1 and counts as
    a retry of layer ``guardrail``."""
    run = ctx.get(GUARDRAIL_RUN_KEY)
    if not isinstance(run, GuardrailRun) or (run.agent_key, run.task_key) != (id(agent), id(task)):
        return number
    if run.rejected and number == 1:
        run.rejected = False
        number = run.last_attempt + 1
        runtime.metrics.retry(
            attributes.RETRY_LAYER_GUARDRAIL, attributes.ERROR_TYPE_GUARDRAIL_REJECTED
        )
    run.last_attempt = max(run.last_attempt, number)
    return number


def _agent_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("agent", args[1] if len(args) > 1 else None)


class GuardrailRunWrapper(SpanWrapper[GuardrailRun]):
    """``Task._invoke_guardrail_function`` / ``_ainvoke_guardrail_function``: the check of one
    guardrail (no span: the task's span is borrowed; its evaluations and re-runs nest there)."""

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[GuardrailRun] | None:
        guardrail = kwargs.get("guardrail", args[3] if len(args) > 3 else None)
        if not guardrail:
            return None  # CrewAI returns at once
        ctx = otel_context.get_current()
        run = GuardrailRun(instance, _agent_arg(args, kwargs))
        call = Call(
            trace.get_current_span(ctx), otel_context.set_value(GUARDRAIL_RUN_KEY, run, ctx), run
        )
        call.borrowed = True
        call.add_closer(run.end_pending)
        return call

    def error_recording(self, call: Call[GuardrailRun], exc: BaseException) -> None:
        return None  # the task's own span records it

    def on_fail(self, call: Call[GuardrailRun], exc: BaseException) -> None:
        pending = call.data.pending
        if pending is not None:  # out of retries: the failure starts at the last evaluation
            self.runtime.errors.record(
                pending.span, exc, attributes.ORIGIN_GUARDRAIL, since=pending.start
            )


class GuardrailWrapper(SpanWrapper[GuardrailRun | None]):
    """``process_guardrail`` as bound in ``crewai.task``: one span per guardrail evaluation.

    A guardrail that raises is the origin of that error (CrewAI does not retry it): the base
    records it on this span.
    """

    operation = Operation.GUARDRAIL

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[GuardrailRun | None] | None:
        ctx = otel_context.get_current()
        found = ctx.get(GUARDRAIL_RUN_KEY)
        run = found if isinstance(found, GuardrailRun) else None
        attempt = 1
        if run is not None:
            run.evaluations += 1
            attempt = run.evaluations
        name = attributes.task_name(kwargs.get("from_task"))
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_GUARDRAIL, name),
            context=ctx,
            attributes={attributes.ATTEMPT: attempt, attributes.CREWAI_TASK_NAME: name},
        )
        return Call(span, trace.set_span_in_context(span, ctx), run)

    def succeed(self, call: Call[GuardrailRun | None], result: Any) -> Any:
        passed = getattr(result, "success", None)
        if isinstance(passed, bool):
            call.span.set_attribute(attributes.CREWAI_GUARDRAIL_PASSED, passed)
        run = call.data
        if run is None or passed is not False:
            return result
        if run.retries_left():
            run.rejected = True
        else:
            call.deferred = True  # CrewAI raises next: the failure is recorded here
            run.pending = call
        return result
