"""Task guardrails under concurrent runs: one span per evaluation, rejections as retries of layer
``guardrail`` with the re-run agent attempt numbered, running out of retries as the fatal origin,
and an LLM guardrail's model calls under its evaluation's span.

Each scenario runs 8 requests at once (4 threads calling ``kickoff``, 4 ``akickoff`` on one
event loop), each with its own crew and ``[[marker]]``, then again uninstrumented: the caller
sees the same outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.trace import StatusCode

import crew_otel
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr, traces_by_marker, whole_run
from tests.support.metrics import points, total
from tests.workloads import FAST, kickoff_concurrently, outcome_summary

N_THREADS = 4
N_ASYNC = 4
MARKERS = [f"g{i}" for i in range(N_THREADS + N_ASYNC)]
GUARDRAIL = "crewai.guardrail"
PASSED = "crewai.guardrail.passed"
ATTEMPT = "crew_otel.attempt"
ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"


def guarded_crew(fake_provider: Any, marker: str, guardrail: Any, **task_kwargs: Any) -> Any:
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "Writer")
    task = Task(
        name="write",
        description=f"Write one sentence about [[{marker}]].",
        expected_output="One sentence.",
        agent=agent,
        guardrail=guardrail,
        **task_kwargs,
    )
    return Crew(name="guarded", agents=[agent], tasks=[task])


def fails_once() -> Callable[[Any], tuple[bool, Any]]:
    """A function guardrail (per request) that rejects the first output and passes the next."""
    calls = [0]

    def check(output):  # no return annotation: CrewAI validates a string annotation and fails
        calls[0] += 1
        if calls[0] == 1:
            return False, "Too short, write more."
        return True, output.raw

    return check


def never_passes(output):
    return False, "Never good enough."


def run_all(make_crew: Callable[[str], Any]) -> dict[str, Any]:
    return kickoff_concurrently(make_crew, MARKERS, N_THREADS)


summary = outcome_summary


def run_traces(spans: Spans, fake_provider: Any) -> dict[str, Spans]:
    """Each marker's trace (the one whose model calls carried the marker)."""
    return traces_by_marker(spans, fake_provider, MARKERS)


def check_whole(run: Spans) -> Any:
    """One root, every span carries its request ID, no orphans; returns the root."""
    return whole_run(run, "invoke_workflow guarded")


def guardrail_spans(run: Spans) -> list[Any]:
    found = sorted(run.named(GUARDRAIL), key=lambda s: s.start_time)
    assert {s.name for s in found} == {f"{GUARDRAIL} write"}
    (task,) = run.named("crewai.task")
    assert all(run.parent(s) is task for s in found), "evaluations nest under the task"
    return found


def agent_attempts(run: Spans) -> list[Any]:
    return sorted(run.named("invoke_agent Writer"), key=lambda s: s.start_time)


def compare_uninstrumented(outcomes: dict[str, Any], make_crew: Callable[[str], Any]) -> None:
    crew_otel.uninstrument()
    baseline = run_all(make_crew)
    assert {m: summary(o) for m, o in outcomes.items()} == {
        m: summary(o) for m, o in baseline.items()
    }


def test_a_rejection_is_a_guardrail_retry_of_the_agent(otel, fake_provider, metric_reader):
    def make_crew(marker: str) -> Any:
        return guarded_crew(fake_provider, marker, fails_once())

    outcomes = run_all(make_crew)
    for marker in MARKERS:
        assert f"[[{marker}]]" in outcomes[marker].raw, outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    for marker, run in run_traces(spans, fake_provider).items():
        check_whole(run)
        evaluations = guardrail_spans(run)
        assert [attr(s, PASSED) for s in evaluations] == [False, True], marker
        assert [attr(s, ATTEMPT) for s in evaluations] == [1, 2]
        attempts = agent_attempts(run)
        assert [attr(s, ATTEMPT) for s in attempts] == [1, 2], marker
        # the re-run comes after the rejection and before the evaluation that passed
        assert evaluations[0].end_time <= attempts[1].start_time
        assert attempts[1].end_time <= evaluations[1].start_time
        assert all(s.status.status_code is not StatusCode.ERROR for s in run.all)
    retries = points(metric_reader)["crew_otel.retries"]
    assert total(retries, crew_otel__retry__layer="guardrail") == len(MARKERS)
    assert total(retries, crew_otel__retry__layer="agent") == 0
    compare_uninstrumented(outcomes, make_crew)


def _innermost_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name


def test_running_out_of_guardrail_retries_is_the_fatal_origin(otel, fake_provider, metric_reader):
    def make_crew(marker: str) -> Any:
        return guarded_crew(fake_provider, marker, never_passes, guardrail_max_retries=1)

    outcomes = run_all(make_crew)
    for marker in MARKERS:
        exc = outcomes[marker]
        assert type(exc) is Exception, exc
        assert "validation after 1 retries" in str(exc)
        # CrewAI's own exception object, not one the instrumentation raised or re-wrapped
        assert _innermost_frame(exc) in (
            "_invoke_guardrail_function",
            "_ainvoke_guardrail_function",
        )
    spans = Spans(otel.get_finished_spans())
    for marker, run in run_traces(spans, fake_provider).items():
        root = check_whole(run)
        evaluations = guardrail_spans(run)
        assert [attr(s, PASSED) for s in evaluations] == [False, False], marker
        assert [attr(s, ATTEMPT) for s in agent_attempts(run)] == [1, 2], marker
        fatal = [s for s in run.all if attr(s, ORIGIN) and not attr(s, RECOVERED)]
        assert fatal == [evaluations[-1]], [s.name for s in fatal]
        assert attr(evaluations[-1], ORIGIN) is True
        assert attr(evaluations[-1], RECOVERED) is False
        assert evaluations[-1].status.status_code is StatusCode.ERROR
        assert attr(evaluations[-1], "error.type") == "Exception"
        assert evaluations[0].status.status_code is not StatusCode.ERROR
        assert root.status.status_code is StatusCode.ERROR
        assert attr(root, ORIGIN) is None
    found = points(metric_reader)
    assert total(found["crew_otel.retries"], crew_otel__retry__layer="guardrail") == len(MARKERS)
    assert total(
        found["crew_otel.error.origins"],
        crew_otel__origin__operation="guardrail",
        crew_otel__error__recovered="false",
    ) == len(MARKERS)
    compare_uninstrumented(outcomes, make_crew)


def test_an_llm_guardrails_model_calls_nest_under_its_evaluation(
    otel, fake_provider, metric_reader
):
    def make_crew(marker: str) -> Any:
        return guarded_crew(fake_provider, marker, "The sentence must mention the topic.")

    outcomes = run_all(make_crew)
    spans = Spans(otel.get_finished_spans())
    # CrewAI's internal "Guardrail Agent" kickoff is part of the evaluation, not a workflow
    assert not [s for s in spans.all if s.name.startswith("invoke_workflow Guardrail")]
    workflows = points(metric_reader)["gen_ai.invoke_workflow.duration"]
    assert total(workflows, gen_ai__workflow__name="guarded") == len(MARKERS)
    assert {p.attributes.get("gen_ai.workflow.name") for p in workflows} == {"guarded"}
    for marker, run in run_traces(spans, fake_provider).items():
        check_whole(run)
        evaluations = guardrail_spans(run)
        assert evaluations, marker
        for evaluation in evaluations:
            for step in run.kids(evaluation):
                assert step.name == "crewai.agent.step Guardrail Agent", step.name
        writer_chats = {
            id(s)
            for a in agent_attempts(run)
            for s in run.descendants(a)
            if s.name.startswith("chat")
        }
        for evaluation in evaluations:
            chats = [s for s in run.descendants(evaluation) if s.name.startswith("chat")]
            if attr(evaluation, PASSED):
                assert chats, "the guardrail's model call is under its evaluation"
            # else: crewai 1.12 cannot run the guardrail's agent inside an event loop
            # (asyncio.run from a running loop): no model call, a rejection, like uninstrumented
        if marker in MARKERS[:N_THREADS]:
            assert [attr(e, PASSED) for e in evaluations] == [True], marker
        guardrail_chats = {
            id(s) for e in evaluations for s in run.descendants(e) if s.name.startswith("chat")
        }
        all_chats = {id(s) for s in run.named("chat")}
        assert all_chats == writer_chats | guardrail_chats
        assert not writer_chats & guardrail_chats
        if not isinstance(outcomes[marker], BaseException):
            assert attr(evaluations[-1], PASSED) is True
            assert f"[[{marker}]]" in outcomes[marker].raw
    compare_uninstrumented(outcomes, make_crew)


def rejects_once(feedback: str) -> Callable[[Any], tuple[bool, Any]]:
    """A function guardrail (per request) that rejects its first output and passes the next."""
    calls = [0]

    def check(output):
        calls[0] += 1
        if calls[0] == 1:
            return False, feedback
        return True, output.raw

    return check


def test_attempts_increase_across_several_guardrails_of_a_task(otel, fake_provider, metric_reader):
    """Two guardrails, each rejecting once: the agent runs 3 times and the guardrails evaluate 4
    times; every attempt has its own number (none restarts at the second guardrail)."""

    def make_crew(marker: str) -> Any:
        from crewai import Crew, Task

        agent = make_agent(make_llm(fake_provider.base_url), "Writer")
        task = Task(
            name="write",
            description=f"Write one sentence about [[{marker}]].",
            expected_output="One sentence.",
            agent=agent,
            guardrails=[rejects_once("Too short."), rejects_once("Too plain.")],
        )
        return Crew(name="guarded", agents=[agent], tasks=[task])

    outcomes = run_all(make_crew)
    for marker in MARKERS:
        assert f"[[{marker}]]" in outcomes[marker].raw, outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    for marker, run in run_traces(spans, fake_provider).items():
        check_whole(run)
        evaluations = guardrail_spans(run)
        assert [attr(s, PASSED) for s in evaluations] == [False, True, False, True], marker
        assert [attr(s, ATTEMPT) for s in evaluations] == [1, 2, 3, 4], marker
        assert [attr(s, ATTEMPT) for s in agent_attempts(run)] == [1, 2, 3], marker
    retries = points(metric_reader)["crew_otel.retries"]
    assert total(retries, crew_otel__retry__layer="guardrail") == 2 * len(MARKERS)
    compare_uninstrumented(outcomes, make_crew)


def test_a_guardrail_rerun_after_an_error_retry_gets_the_next_number(
    otel, fake_provider, metric_reader
):
    """The agent's first attempt fails (HTTP 500, no SDK retries) and CrewAI re-runs it
    (attempt 2); the guardrail then rejects its output: the re-run is attempt 3, not 2 again."""

    def make_crew(marker: str) -> Any:
        from crewai import Crew, Task

        fake_provider.script(Fault.error(500, FAST), key=marker)
        agent = make_agent(make_llm(fake_provider.base_url, max_retries=0), "Writer")
        task = Task(
            name="write",
            description=f"Write one sentence about [[{marker}]].",
            expected_output="One sentence.",
            agent=agent,
            guardrail=fails_once(),
        )
        return Crew(name="guarded", agents=[agent], tasks=[task])

    outcomes = run_all(make_crew)
    for marker in MARKERS:
        assert f"[[{marker}]]" in outcomes[marker].raw, outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    for marker, run in run_traces(spans, fake_provider).items():
        check_whole(run)
        attempts = agent_attempts(run)
        assert [attr(s, ATTEMPT) for s in attempts] == [1, 2, 3], marker
        assert run.parent(attempts[1]) is attempts[0], "CrewAI retries from the failed attempt"
        assert [attr(s, ATTEMPT) for s in guardrail_spans(run)] == [1, 2], marker
    retries = points(metric_reader)["crew_otel.retries"]
    assert total(retries, crew_otel__retry__layer="guardrail") == len(MARKERS)
    assert total(retries, crew_otel__retry__layer="agent") == len(MARKERS)


def test_a_standalone_agents_guardrail_is_evaluated_and_retried(otel, fake_provider, metric_reader):
    """``Agent(guardrail=...)`` run by ``Agent.kickoff``: one span per evaluation under the
    kickoff, numbered, the rejection a retry of layer ``guardrail``. Threads only: CrewAI 1.15
    re-runs a rejected agent of ``kickoff_async`` with its sync executor inside the event loop
    and fails ('coroutine' object has no attribute 'get'), with or without instrumentation."""
    from crewai import Agent

    def make_agent_for(marker: str) -> Any:
        return Agent(
            role="Writer",
            goal="Write one sentence",
            backstory="An experienced writer.",
            llm=make_llm(fake_provider.base_url),
            guardrail=fails_once(),
        )

    agents = {marker: make_agent_for(marker) for marker in MARKERS}

    def run() -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=len(MARKERS)) as pool:
            futures = {m: pool.submit(agents[m].kickoff, f"Write about [[{m}]].") for m in MARKERS}
            return {m: f.result() for m, f in futures.items()}

    outcomes = run()
    for marker in MARKERS:
        assert f"[[{marker}]]" in outcomes[marker].raw, outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    for marker, trace_spans in run_traces(spans, fake_provider).items():
        root = whole_run(trace_spans, "invoke_workflow Writer")
        evaluations = sorted(trace_spans.named(GUARDRAIL), key=lambda s: s.start_time)
        assert [s.name for s in evaluations] == [f"{GUARDRAIL} Writer"] * 2, marker
        assert all(trace_spans.parent(s) is root for s in evaluations)
        assert [attr(s, PASSED) for s in evaluations] == [False, True], marker
        assert [attr(s, ATTEMPT) for s in evaluations] == [1, 2], marker
    retries = points(metric_reader)["crew_otel.retries"]
    assert total(retries, crew_otel__retry__layer="guardrail") == len(MARKERS)
    crew_otel.uninstrument()
    agents = {marker: make_agent_for(marker) for marker in MARKERS}
    baseline = run()
    assert {m: summary(o) for m, o in outcomes.items()} == {
        m: summary(o) for m, o in baseline.items()
    }
