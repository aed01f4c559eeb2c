"""Planning: a ``plan {gen_ai.agent.name}`` span for a crew's planning (CrewAI's planner agent)
and for an agent's reasoning step, with their model calls below.

The GenAI conventions name a planning or task-decomposition phase ``gen_ai.operation.name=plan``
with an INTERNAL span ``plan {gen_ai.agent.name}``; the model call that makes the plan is its
child. CrewAI has two such phases:

* ``Crew(planning=True)``: before the crew's tasks run, ``Crew._handle_crew_planning`` (called
  by ``prepare_kickoff`` inside the kickoff) has ``CrewPlanner`` run one task of its own
  planner agent (``Task Execution Planner``, structured output) and appends each task's plan to
  its description. The span is the planner agent's, ``plan Task Execution Planner`` with
  ``gen_ai.agent.name`` (the same role for every crew, built inside the hook, so named from
  :data:`~crew_otel.attributes.CREW_PLANNER_ROLE`), the crew in ``crewai.crew.name``; it nests
  under the kickoff; the planner's task, agent attempts (numbered, retried like any agent) and
  model calls nest under it.
* ``Agent(reasoning=True)`` (``planning_config`` in newer CrewAI): before the agent works on a
  task, ``AgentReasoning.handle_agent_reasoning`` asks the agent's LLM for a plan (and may
  refine it). It runs inside the agent's attempt (``invoke_agent``), from ``Agent.execute_task``
  in crewai 1.12 and from the agent executor's first flow step in 1.15 (which also replans
  through it after a failed step: one span per replan); the span is named after the agent's
  role, carries ``gen_ai.agent.name`` and whether the agent declared itself ready
  (``crewai.plan.ready``).

``crewai.plan.scope`` (``crew`` or ``agent``) tells the two apart. A failure inside planning is
recorded like any other (the HTTP attempt that got the 500 is the origin; an error CrewAI raises
in the planner itself, such as a plan it could not parse, makes the plan span the origin with
``crew_otel.origin.operation=plan``). CrewAI swallows errors of an agent's reasoning and runs
the task without a plan: an error there is recorded as recovered (``crew_otel.error.recovered``),
also when the agent has no retries left.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.diagnosis.retries import SWALLOWED_BY_CALLER_KEY, swallowed
from crew_otel.wrappers.base import Call, ErrorRecording, SpanWrapper


class CrewPlanningWrapper(SpanWrapper[None]):
    """``Crew._handle_crew_planning``: one ``plan Task Execution Planner`` span per crew
    planning."""

    operation = Operation.PLAN

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[None] | None:
        ctx = otel_context.get_current()
        name = attributes.workflow_name(instance)
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_PLAN, attributes.CREW_PLANNER_ROLE),
            context=ctx,
            attributes=attributes.crew_plan_attributes(instance, name),
        )
        return Call(span, trace.set_span_in_context(span, ctx), None)


class AgentReasoningWrapper(SpanWrapper[None]):
    """``AgentReasoning.handle_agent_reasoning``: one ``plan {role}`` span per reasoning step."""

    operation = Operation.PLAN

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[None] | None:
        ctx = otel_context.get_current()
        agent = getattr(instance, "agent", None)
        role = attributes.agent_role(agent)
        attrs: dict[str, AttributeValue] = attributes.agent_plan_attributes(agent, role)
        task = getattr(instance, "task", None)
        if task is not None:
            attrs[attributes.CREWAI_TASK_NAME] = attributes.task_name(task)
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_PLAN, role), context=ctx, attributes=attrs
        )
        # Every caller of the reasoning step logs its errors and lets the agent work without a
        # plan: an error inside it (a model call's) is recovered, whatever the agent's retries.
        inner = otel_context.set_value(SWALLOWED_BY_CALLER_KEY, True, ctx)
        return Call(span, trace.set_span_in_context(span, inner), None)

    def error_recording(self, call: Call[None], exc: BaseException) -> ErrorRecording:
        return ErrorRecording(recovered=swallowed(exc))

    def succeed(self, call: Call[None], result: Any) -> Any:
        ready = getattr(getattr(result, "plan", None), "ready", None)
        if isinstance(ready, bool) and call.span.is_recording():
            call.span.set_attribute(attributes.CREWAI_PLAN_READY, ready)
        return result
