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
  (``Guardrail Agent``, through ``Agent.kickoff``): that is part of the evaluation, not a
  workflow of its own, so the kickoff adds no span and no duration point
  (:data:`GUARDRAIL_EVALUATION_KEY`); its steps and model calls nest under the evaluation's span.
* The numbers go on across a task run (:class:`TaskAttempts`, kept on the run's kickoff): a
  task with several guardrails, or an agent re-run after an error before the check, never
  repeats a number on ``invoke_agent`` or ``crewai.guardrail`` spans.
* A rejection with no retry left keeps its span open until CrewAI raises; the exception the
  caller gets is recorded there, as the fatal origin.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.context import KICKOFF_KEY
from crew_otel.runtime import Runtime
from crew_otel.wrappers.base import Call, SpanWrapper

#: Context key of the guardrail check in progress (:class:`GuardrailRun`).
GUARDRAIL_RUN_KEY = otel_context.create_key("crew_otel.guardrail_run")
#: Context key of the guardrail evaluation in progress (its span): an agent kicked off right
#: under it is the guardrail's own agent (see :mod:`crew_otel.wrappers.kickoff`).
GUARDRAIL_EVALUATION_KEY = otel_context.create_key("crew_otel.guardrail_evaluation")


class TaskAttempts:
    """The numbers used so far in one task run: its agent attempts and guardrail evaluations.

    Shared by every guardrail check of the run and by the agent's error retries, so numbers go
    on instead of restarting. A kickoff keeps one per task (:func:`task_attempts`).
    """

    __slots__ = ("evaluations", "last_attempt")

    def __init__(self) -> None:
        #: Guardrail evaluations so far (of every guardrail of the task).
        self.evaluations = 0
        #: The number of the agent's last attempt (the first one is 1).
        self.last_attempt = 1


def task_attempts(ctx: otel_context.Context, task: Any) -> TaskAttempts | None:
    """The numbers of ``task``'s run in the kickoff of ``ctx`` (``None`` outside a kickoff)."""
    table = getattr(ctx.get(KICKOFF_KEY), "task_attempts", None)
    if not isinstance(table, dict):
        return None
    found = table.get(id(task))
    if not isinstance(found, TaskAttempts):
        found = table[id(task)] = TaskAttempts()
    return found


class GuardrailRun:
    """One check of one guardrail of a task run: its evaluations and the agent's re-runs."""

    __slots__ = (
        "agent_key",
        "evaluations",
        "max_retries",
        "numbers",
        "pending",
        "rejected",
        "task_key",
    )

    def __init__(self, task: Any, agent: Any, numbers: TaskAttempts | None = None) -> None:
        self.task_key = id(task)
        self.agent_key = id(agent)
        retries = getattr(task, "guardrail_max_retries", None)
        self.max_retries: int | None = retries if isinstance(retries, int) else None
        #: Evaluations of this check (CrewAI's retry limit is per check).
        self.evaluations = 0
        #: The numbers of the task run (this check's own when there is no kickoff).
        self.numbers = numbers if numbers is not None else TaskAttempts()
        #: The last evaluation rejected the output and CrewAI re-runs the agent next.
        self.rejected = False
        #: The evaluation that rejected with no retry left (its span ends when CrewAI raises).
        self.pending: Call[Any] | None = None

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
    guardrails): after a rejection, the re-run is the task run's last attempt's number + 1 and
    counts as a retry of layer ``guardrail``. Every attempt is noted in the task run's
    :class:`TaskAttempts` (error retries before a check included)."""
    run = ctx.get(GUARDRAIL_RUN_KEY)
    if isinstance(run, GuardrailRun) and (run.agent_key, run.task_key) == (id(agent), id(task)):
        numbers = run.numbers
        if run.rejected and number == 1:
            run.rejected = False
            number = numbers.last_attempt + 1
            runtime.metrics.retry(
                attributes.RETRY_LAYER_GUARDRAIL, attributes.ERROR_TYPE_GUARDRAIL_REJECTED
            )
    else:
        found = task_attempts(ctx, task)
        if found is None:
            return number
        numbers = found
    numbers.last_attempt = max(numbers.last_attempt, number)
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
        run = GuardrailRun(instance, _agent_arg(args, kwargs), task_attempts(ctx, instance))
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


class AgentGuardrailCheck:
    """An evaluation of a standalone agent's guardrail (``Agent(guardrail=...)`` run by
    ``Agent.kickoff`` or ``LiteAgent.kickoff``): CrewAI re-runs the agent after a rejection
    while retries are left."""

    __slots__ = ("retries_left",)

    def __init__(self, retries_left: bool) -> None:
        self.retries_left = retries_left


#: ``Call.data`` of an evaluation: a task's guardrail check, an agent's, or neither.
Evaluation = GuardrailRun | AgentGuardrailCheck | None


class GuardrailWrapper(SpanWrapper[Evaluation]):
    """``process_guardrail`` as bound in ``crewai.task`` (task guardrails) and in
    ``crewai.agent.core`` / ``crewai.lite_agent`` (a standalone agent's guardrail): one span
    per guardrail evaluation.

    A guardrail that raises is the origin of that error (CrewAI does not retry it): the base
    records it on this span. An agent's evaluations are named after the agent and numbered
    from CrewAI's ``retry_count``; a rejection with retries left is a retry of layer
    ``guardrail`` (CrewAI re-runs the agent's loop under the same kickoff span).
    """

    operation = Operation.GUARDRAIL

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[Evaluation] | None:
        ctx = otel_context.get_current()
        found = ctx.get(GUARDRAIL_RUN_KEY)
        task, agent = kwargs.get("from_task"), kwargs.get("from_agent")
        data: Evaluation = found if isinstance(found, GuardrailRun) else None
        attempt = 1
        if isinstance(data, GuardrailRun):
            data.evaluations += 1
            data.numbers.evaluations += 1
            attempt = data.numbers.evaluations
        if task is None and agent is not None:
            name = attributes.agent_role(agent)
            attrs: dict[str, AttributeValue] = {attributes.GEN_AI_AGENT_NAME: name}
            data, attempt = _agent_check(agent, kwargs.get("retry_count"))
        else:
            name = attributes.task_name(task)
            attrs = {attributes.CREWAI_TASK_NAME: name}
        attrs[attributes.ATTEMPT] = attempt
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_GUARDRAIL, name), context=ctx, attributes=attrs
        )
        call_ctx = otel_context.set_value(
            GUARDRAIL_EVALUATION_KEY, span, trace.set_span_in_context(span, ctx)
        )
        return Call(span, call_ctx, data)

    def succeed(self, call: Call[Evaluation], result: Any) -> Any:
        passed = getattr(result, "success", None)
        if isinstance(passed, bool):
            call.span.set_attribute(attributes.CREWAI_GUARDRAIL_PASSED, passed)
        run = call.data
        if run is None or passed is not False:
            return result
        if isinstance(run, AgentGuardrailCheck):
            if run.retries_left:
                self.runtime.metrics.retry(
                    attributes.RETRY_LAYER_GUARDRAIL, attributes.ERROR_TYPE_GUARDRAIL_REJECTED
                )
            return result
        if run.retries_left():
            run.rejected = True
        else:
            call.deferred = True  # CrewAI raises next: the failure is recorded here
            run.pending = call
        return result


def _agent_check(agent: Any, retry_count: object) -> tuple[AgentGuardrailCheck, int]:
    """An agent guardrail's evaluation and its number (CrewAI's ``retry_count`` + 1)."""
    retries = retry_count if isinstance(retry_count, int) else 0
    limit = getattr(agent, "guardrail_max_retries", None)
    check = AgentGuardrailCheck(not isinstance(limit, int) or retries < limit)
    return check, retries + 1
