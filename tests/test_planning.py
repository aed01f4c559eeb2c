"""Planning and reasoning under concurrent runs: ``plan Task Execution Planner`` (CrewAI's
planner agent, the crew in ``crewai.crew.name``) for ``Crew(planning=True)``
under the kickoff with the planner's task, agent and model calls below it; ``plan {role}`` for
an agent's reasoning step under its ``invoke_agent`` attempt with its model calls below it;
failures inside planning recorded where they start.

Each scenario runs 8 requests at once (4 threads calling ``kickoff``, 4 ``akickoff`` on one
event loop), each with its own crew and ``[[marker]]``, then again uninstrumented: the caller
sees the same outcome. (CrewAI 1.15 cannot plan inside ``akickoff``: its planner runs a sync
agent on the running loop and raises ``RuntimeError``, with or without instrumentation; the
test checks that failure's trace like any other.)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import crew_otel
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr, whole_run
from tests.test_metrics import points, total
from tests.workloads import kickoff_concurrently, outcome_summary

N_THREADS = 4
N_ASYNC = 4
MARKERS = [f"plan{i}" for i in range(N_THREADS + N_ASYNC)]
CREW = "planned"
PLAN = "plan"
PLANNER = "Task Execution Planner"
CREW_PLAN = f"{PLAN} {PLANNER}"
REASONING = f"{PLAN} Writer"
PLANNER_AGENT = "invoke_agent Task Execution Planner"
ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"
FAST = 0.01  # retry-after seconds, so the SDK's back-off does not slow the test down
#: The planner agent's 3 attempts (max_retry_limit=2), one HTTP attempt each (max_retries=0).
PLANNER_REQUESTS = 3


class PlannedCrews:
    """Builds one crew per marker (planning on, its one agent reasoning) and remembers it."""

    def __init__(
        self,
        provider: FakeOpenAIProvider,
        planning_llm: str | None = None,
        planner_retries: int | None = None,
        markers: int = len(MARKERS),
    ) -> None:
        self.provider = provider
        self.planning_llm = planning_llm
        self.planner_retries = planner_retries
        self.markers = MARKERS[:markers]
        self.crews: dict[str, Any] = {}

    def __call__(self, marker: str) -> Any:
        from crewai import Crew, Task

        base_url = self.provider.base_url
        writer = make_agent(make_llm(base_url), "Writer", reasoning=True)
        write = Task(
            name="write",
            description=f"Write a short report about [[{marker}]].",
            expected_output="A report.",
            agent=writer,
        )
        crew = Crew(
            name=CREW,
            agents=[writer],
            tasks=[write],
            planning=True,
            planning_llm=self.planning_llm or self.planner_llm(),
            verbose=False,
        )
        self.crews[marker] = crew
        return crew

    def planner_llm(self) -> Any:
        if self.planner_retries is None:
            return make_llm(self.provider.base_url)
        return make_llm(self.provider.base_url, max_retries=self.planner_retries)

    def run_all(self) -> dict[str, Any]:
        return kickoff_concurrently(self, self.markers, len(self.markers) // 2)

    def runs(self, spans: Spans) -> dict[str, Spans]:
        """Each marker's trace: the one whose kickoff span names its crew's ID."""
        runs = {}
        for marker, crew in self.crews.items():
            (root,) = [
                s
                for s in spans.roots()
                if s.name == f"invoke_workflow {CREW}" and attr(s, "crewai.crew.id") == str(crew.id)
            ]
            runs[marker] = Spans(spans.traces()[root.context.trace_id])
        return runs


def compare_uninstrumented(
    outcomes: dict[str, Any], crews: PlannedCrews | ReasoningCrews, script: Any = None
) -> None:
    crew_otel.uninstrument()
    crews.provider.reset()
    if script is not None:
        script()
    baseline = crews.run_all()
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }


def crew_plan(run: Spans) -> ReadableSpan:
    """The run's one crew ``plan`` span: under the kickoff, with the planner inside."""
    root = whole_run(run, f"invoke_workflow {CREW}")
    (plan,) = run.named(CREW_PLAN)
    assert run.parent(plan) is root
    assert attr(plan, "gen_ai.operation.name") == PLAN
    assert attr(plan, "gen_ai.agent.name") == PLANNER  # the conventions' plan {agent}
    assert attr(plan, "crewai.crew.name") == CREW
    assert attr(plan, "crewai.plan.scope") == "crew"
    assert isinstance(attr(plan, "thread.id"), int)
    planner = run.named(PLANNER_AGENT)
    assert planner, "the planner's agent attempts are recorded"
    assert all(plan in run.ancestors(s) for s in planner), "the planner runs inside the plan"
    return plan


def fatal_origins(run: Spans) -> list[ReadableSpan]:
    return [s for s in run.all if attr(s, ORIGIN) and attr(s, RECOVERED) is False]


def check_failed_inside_plan(run: Spans, plan: ReadableSpan, error_type: str) -> None:
    """The failure reached the caller through the plan span; its one origin is inside it."""
    assert plan.status.status_code is StatusCode.ERROR
    assert attr(plan, "error.type") == error_type
    (fatal,) = fatal_origins(run)
    assert plan in run.ancestors(fatal), fatal.name
    assert attr(fatal, "error.type") == error_type
    assert not run.named("crewai.task write"), "the crew's task did not run"
    root = run.roots()[0]
    assert root.status.status_code is StatusCode.ERROR
    assert attr(root, ORIGIN) is None


def test_plan_spans_hold_the_planning_and_reasoning_model_calls(otel, fake_provider):
    crews = PlannedCrews(fake_provider)
    outcomes = crews.run_all()
    for marker in MARKERS[:N_THREADS]:
        assert f"[[{marker}]]" in outcomes[marker].raw, outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    requests_by_trace: dict[int, int] = {}
    for request in fake_provider.requests:
        trace_id = int(request.traceparent.split("-")[1], 16)
        requests_by_trace[trace_id] = requests_by_trace.get(trace_id, 0) + 1
    for marker, run in crews.runs(spans).items():
        plan = crew_plan(run)
        # akickoff on CrewAI 1.15 fails in its planner (see the module docstring)
        if isinstance(outcomes[marker], BaseException):
            assert isinstance(outcomes[marker], RuntimeError), outcomes[marker]
            check_failed_inside_plan(run, plan, "RuntimeError")
            continue
        assert all(s.status.status_code is not StatusCode.ERROR for s in run.all), marker
        (task,) = run.named("crewai.task write")
        assert plan.end_time <= task.start_time, "planning comes first"
        plan_chats = [s for s in run.descendants(plan) if s.name.startswith("chat ")]
        assert plan_chats, "the planner's model call is under the plan span"
        reasoning = run.named(REASONING)
        assert reasoning, marker
        for step in reasoning:
            assert run.parent(step).name == "invoke_agent Writer"
            assert attr(step, "gen_ai.operation.name") == PLAN
            assert attr(step, "gen_ai.agent.name") == "Writer"
            assert attr(step, "crewai.plan.scope") == "agent"
            assert attr(step, "crewai.task.name") == "write"
            assert isinstance(attr(step, "crewai.plan.ready"), bool)
            assert any(s.name.startswith("chat ") for s in run.descendants(step))
        reasoning_planner = [
            s for s in run.named(CREW_PLAN) if attr(s, "crewai.plan.scope") == "agent"
        ]
        assert not reasoning_planner, "the planner does not reason"
        chats = run.named("chat")
        for chat in chats:  # every model call sits in a plan or in an agent step
            assert any(
                a.name.startswith((f"{PLAN} ", "crewai.agent.step ")) for a in run.ancestors(chat)
            ), [a.name for a in run.ancestors(chat)]
        trace_id = plan.context.trace_id
        assert len(chats) == requests_by_trace[trace_id], "every model call is recorded"
    compare_uninstrumented(outcomes, crews)


def test_a_planner_500_that_exhausts_retries_fails_the_plan_span(
    otel, fake_provider, metric_reader
):
    def script() -> None:
        for marker in crews.markers:
            fake_provider.script(*[Fault.error(500, FAST)] * PLANNER_REQUESTS, key=marker)

    crews = PlannedCrews(fake_provider, planner_retries=0)
    script()
    outcomes = crews.run_all()
    assert all(isinstance(o, Exception) for o in outcomes.values()), outcomes
    spans = Spans(otel.get_finished_spans())
    failed_500 = 0
    for marker, run in crews.runs(spans).items():
        plan = crew_plan(run)
        # akickoff on CrewAI 1.15 fails in its planner before any model call
        if isinstance(outcomes[marker], RuntimeError):
            check_failed_inside_plan(run, plan, "RuntimeError")
            continue
        check_failed_inside_plan(run, plan, "500")
        failed_500 += 1
        (fatal,) = fatal_origins(run)
        assert fatal.name == "POST", "the last HTTP attempt of the planner's last attempt"
        attempts = sorted(run.named(PLANNER_AGENT), key=lambda s: s.start_time)
        assert [attr(s, "crew_otel.attempt") for s in attempts] == [1, 2, 3]
        assert attempts[-1] in run.ancestors(fatal)
        assert len([s for s in run.descendants(plan) if s.name == "POST"]) == PLANNER_REQUESTS
    assert failed_500 >= N_THREADS
    assert (
        total(
            points(metric_reader)["crew_otel.error.origins"],
            crew_otel__origin__operation="http",
            crew_otel__error__recovered="false",
        )
        == failed_500
    )
    compare_uninstrumented(outcomes, crews, script)


@pytest.mark.skipif(
    importlib.util.find_spec("litellm") is not None,
    reason="with litellm installed CrewAI builds an LLM for any model name",
)
def test_a_planner_crewai_cannot_build_makes_the_plan_span_the_origin(
    otel, fake_provider, metric_reader
):
    crews = PlannedCrews(fake_provider, "nonexistent-provider/some-model", markers=4)
    outcomes = crews.run_all()
    assert all(type(o) is ImportError for o in outcomes.values()), outcomes
    spans = Spans(otel.get_finished_spans())
    for run in crews.runs(spans).values():
        root = whole_run(run, f"invoke_workflow {CREW}")
        (plan,) = run.named(CREW_PLAN)
        assert run.parent(plan) is root
        assert fatal_origins(run) == [plan]
        assert attr(plan, "error.type") == "ImportError"
        assert plan.status.status_code is StatusCode.ERROR
        assert [s.name for s in run.all if s is not root and s is not plan] == []
    assert total(
        points(metric_reader)["crew_otel.error.origins"],
        crew_otel__origin__operation="plan",
        crew_otel__error__recovered="false",
    ) == len(crews.markers)
    assert fake_provider.requests == []
    compare_uninstrumented(outcomes, crews)


class ReasoningCrews:
    """One crew per marker: a Writer that reasons before its task, with no retries of any
    layer (``max_retry_limit=0``, the SDK's ``max_retries=0``); no crew planning."""

    def __init__(self, provider: FakeOpenAIProvider) -> None:
        self.provider = provider
        self.crews: dict[str, Any] = {}

    def __call__(self, marker: str) -> Any:
        from crewai import Crew, Task

        llm = make_llm(self.provider.base_url, max_retries=0)
        writer = make_agent(llm, "Writer", reasoning=True, max_retry_limit=0)
        write = Task(
            name="write",
            description=f"Write a short report about [[{marker}]].",
            expected_output="A report.",
            agent=writer,
        )
        crew = Crew(name=CREW, agents=[writer], tasks=[write], verbose=False)
        self.crews[marker] = crew
        return crew

    def run_all(self) -> dict[str, Any]:
        return kickoff_concurrently(self, MARKERS, N_THREADS)


def test_a_reasoning_error_crewai_swallows_is_recovered_even_without_retries_left(
    otel, fake_provider, metric_reader
):
    def script() -> None:
        for marker in MARKERS:  # the reasoning step's model call is each run's first
            fake_provider.script(Fault.error(500, FAST), key=marker)

    crews = ReasoningCrews(fake_provider)
    script()
    outcomes = crews.run_all()
    assert not [o for o in outcomes.values() if isinstance(o, BaseException)], outcomes
    for marker, outcome in outcomes.items():
        assert f"[[{marker}]]" in outcome.raw, "the agent worked without a plan"
    assert fake_provider.stats()["by_status"]["500"] == len(MARKERS)

    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    by_crew = {str(crew.id): marker for marker, crew in crews.crews.items()}
    seen = set()
    for root in spans.roots():
        marker = by_crew[str(attr(root, "crewai.crew.id"))]
        seen.add(marker)
        run = Spans(spans.traces()[root.context.trace_id])
        assert root.status.status_code is not StatusCode.ERROR, marker
        assert fatal_origins(run) == [], [s.name for s in fatal_origins(run)]
        # the 500 is the origin, inside the reasoning step (CrewAI's reasoning falls back to
        # a plain-text plan call, or its caller logs the error: either way the agent works on)
        (origin,) = [s for s in run.all if attr(s, ORIGIN)]
        assert origin.name == "POST"
        assert attr(origin, "error.type") == "500"
        assert attr(origin, RECOVERED) is True
        (plan,) = [s for s in run.ancestors(origin) if s.name == REASONING]
        assert run.parent(plan).name == "invoke_agent Writer"
        (attempt,) = run.named("invoke_agent Writer")
        assert attempt.status.status_code is not StatusCode.ERROR
        assert attr(attempt, "crew_otel.attempt") == 1
    assert seen == set(MARKERS)
    origins = points(metric_reader)["crew_otel.error.origins"]
    assert total(origins, crew_otel__error__recovered="false") == 0
    assert total(origins, crew_otel__origin__operation="http") == len(MARKERS)
    compare_uninstrumented(outcomes, crews, script)
