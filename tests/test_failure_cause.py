"""Why did requests fail: every failed run carries exactly one cause on its kickoff span
(``crew_otel.failure.cause``, with ``crew_otel.failure.origin``), counted in
``crew_otel.failures``; successful runs carry none.

Each cause is provoked for real (the loopback provider's faults, CrewAI's own guardrails,
callbacks and tool policies) in concurrent runs: threads and ``akickoff`` on one loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr
from tests.support.metrics import points, total
from tests.workloads import FAST, kickoff_concurrently, one_task_crew, wait_parked_or_done

CAUSE = "crew_otel.failure.cause"
ORIGIN = "crew_otel.failure.origin"
THREADS = 2
MARKERS = ["fc0", "fc1", "fc2", "fc3"]  # two in threads, two with akickoff


def check_causes(
    otel: Any, metric_reader: Any, outcomes: dict[str, Any], expected: str
) -> dict[str, Any]:
    """Each failed run has ``expected`` as its one cause (and an origin); the others none; the
    metric counts the failed runs by cause."""
    spans = Spans(otel.get_finished_spans())
    kickoffs = {s.name.removeprefix("invoke_workflow "): s for s in spans.named("invoke_workflow")}
    failed = {m for m, o in outcomes.items() if isinstance(o, BaseException)}
    assert failed, f"the {expected} scenario made no run fail: {outcomes}"
    for marker, span in kickoffs.items():
        if marker in failed:
            assert attr(span, CAUSE) == expected, (marker, outcomes[marker])
            assert isinstance(attr(span, ORIGIN), str) or expected == "cancelled", marker
        else:
            assert attr(span, CAUSE) is None, marker
            assert attr(span, ORIGIN) is None, marker
    found = points(metric_reader).get("crew_otel.failures", [])
    assert total(found) == len(failed)
    assert total(found, crew_otel__failure__cause=expected) == len(failed)
    return kickoffs


def test_persistent_500s_are_provider_errors(otel, fake_provider, metric_reader):
    for marker in MARKERS:
        fake_provider.script(*[Fault.error(500, FAST)] * 4, key=marker)
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, llm={"max_retries": 1}), MARKERS, THREADS
    )
    kickoffs = check_causes(otel, metric_reader, outcomes, "provider_error")
    assert {attr(s, ORIGIN) for s in kickoffs.values()} == {"POST"}


def test_persistent_429s_are_rate_limits(otel, fake_provider, metric_reader):
    for marker in MARKERS:
        fake_provider.script(*[Fault.error(429, FAST)] * 12, key=marker)
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, llm={"max_retries": 0}), MARKERS, THREADS
    )
    check_causes(otel, metric_reader, outcomes, "rate_limit")


def test_provider_timeouts(otel, fake_provider, metric_reader):
    for marker in MARKERS:
        fake_provider.script(*[Fault.timeout(5.0)] * 2, key=marker)
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, llm={"timeout": 0.3, "max_retries": 1}),
        MARKERS,
        THREADS,
    )
    check_causes(otel, metric_reader, outcomes, "provider_timeout")


def never_passes(output):  # no return annotation: CrewAI validates a string annotation
    return False, "Never good enough."


def test_a_guardrail_that_never_passes(otel, fake_provider, metric_reader):
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(
            fake_provider, m, task={"guardrail": never_passes, "guardrail_max_retries": 1}
        ),
        MARKERS,
        THREADS,
    )
    check_causes(otel, metric_reader, outcomes, "guardrail")


def _failing_callback(output: Any) -> None:
    raise ValueError("the ticket system rejected the update")


def test_an_exception_in_a_task_callback_is_an_application_error(
    otel, fake_provider, metric_reader
):
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, task={"callback": _failing_callback}),
        MARKERS,
        THREADS,
    )
    check_causes(otel, metric_reader, outcomes, "application_error")


def test_an_overflow_crewai_cannot_summarise_is_context_window(otel, fake_provider, metric_reader):
    for marker in MARKERS:  # the conversation, then the summary of it, are too long
        fake_provider.script(*[Fault.context_length_exceeded()] * 2, key=marker)
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, agent={"respect_context_window": True}),
        MARKERS,
        THREADS,
    )
    check_causes(otel, metric_reader, outcomes, "context_window")


def _tool_failure_policy_raises() -> bool:
    from crewai import Crew

    return "tool_failure_policy" in Crew.model_fields


def _ledger_tool(error: BaseException) -> Any:
    """A tool built per request (one shared by the runs would be a shared_instance cause)."""
    from crewai.tools import tool

    @tool("ledger")
    def ledger(query: str) -> str:
        """Record the ticket in the ledger."""
        raise error

    return ledger


def test_a_raising_tool_nothing_takes_over_is_a_tool_error(otel, fake_provider, metric_reader):
    if _tool_failure_policy_raises():  # CrewAI >= 1.15: the tool's error ends the run
        error: BaseException = ConnectionRefusedError("ledger service unavailable")
        crew_options: dict[str, Any] = {"tool_failure_policy": "raise"}
        markers = MARKERS
    else:  # older CrewAI hands every Exception back to the model: an exit is not handed back
        error = SystemExit("ledger gave up")
        crew_options = {}
        markers = MARKERS[:THREADS]  # an exit stops an event loop: only threads here

    def make_crew(marker: str) -> Any:
        return one_task_crew(fake_provider, marker, tools=[_ledger_tool(error)], crew=crew_options)

    outcomes: dict[str, Any] = {}

    def run(marker: str) -> None:
        crew = make_crew(marker)
        try:
            outcomes[marker] = crew.kickoff()
        except BaseException as exc:
            outcomes[marker] = exc

    if len(markers) == len(MARKERS):
        outcomes = kickoff_concurrently(make_crew, markers, THREADS)
    else:
        with ThreadPoolExecutor(max_workers=len(markers)) as pool:
            list(pool.map(run, markers))
    kickoffs = check_causes(otel, metric_reader, outcomes, "tool_error")
    assert {attr(s, ORIGIN) for s in kickoffs.values()} == {"execute_tool ledger"}


def test_a_caller_that_gives_up_is_cancelled(otel, fake_provider, metric_reader):
    for marker in MARKERS[:2]:
        fake_provider.script(Fault.hold("stuck"), key=marker)
    fine = MARKERS[2]
    gate = fake_provider.gate("stuck")
    outcomes: dict[str, Any] = {}

    async def main() -> None:
        async def give_up(marker: str) -> None:
            crew = one_task_crew(fake_provider, marker)
            task = asyncio.ensure_future(crew.akickoff())
            await asyncio.to_thread(gate.wait_parked, 2)  # both are inside their model call
            task.cancel()
            try:
                outcomes[marker] = await task
            except BaseException as exc:
                outcomes[marker] = exc

        async def finish() -> None:
            outcomes[fine] = await one_task_crew(fake_provider, fine).akickoff()

        finishing = asyncio.ensure_future(finish())
        await asyncio.gather(give_up(MARKERS[0]), give_up(MARKERS[1]))
        gate.open()  # the cancelled runs' work goes on in its threads, and ends
        await finishing

    try:
        asyncio.run(main())
    finally:
        gate.open()
    assert all(isinstance(outcomes[m], asyncio.CancelledError) for m in MARKERS[:2]), outcomes
    check_causes(otel, metric_reader, outcomes, "cancelled")


def test_a_shared_agent_is_the_cause_not_the_runtime_error(otel, fake_provider, metric_reader):
    """Five requests share one Agent; the first holds it inside a model call until every
    other one has met it busy (CrewAI >= 1.14 then raises "Executor is already running")."""
    from crewai import Crew, Task

    shared = make_agent(make_llm(fake_provider.base_url), "Support Analyst", max_retry_limit=0)
    fake_provider.script(Fault.hold("busy"), key="sa0")
    gate = fake_provider.gate("busy")
    outcomes: dict[str, Any] = {}

    def request(i: int) -> None:
        task = Task(description=f"Triage [[sa{i}]]", expected_output="x", agent=shared)
        crew = Crew(name=f"sa{i}", agents=[shared], tasks=[task])
        try:
            outcomes[f"sa{i}"] = crew.kickoff()
        except BaseException as exc:
            outcomes[f"sa{i}"] = exc

    with ThreadPoolExecutor(max_workers=5) as pool:
        first = pool.submit(request, 0)
        try:
            gate.wait_parked(1)
            others = [pool.submit(request, i) for i in range(1, 5)]
            # the others ran beside the held run (CrewAI 1.12) or failed on the busy agent
            wait_parked_or_done(gate, others, count=2)
        finally:
            gate.open()
        first.result(timeout=120)
        for future in others:
            future.result(timeout=120)
    if not any(isinstance(o, BaseException) for o in outcomes.values()):
        # CrewAI 1.12 lets the requests use the agent together: nothing fails, nothing is said
        spans = Spans(otel.get_finished_spans())
        assert [s for s in spans.named("invoke_workflow") if attr(s, CAUSE)] == []
        assert "crew_otel.failures" not in points(metric_reader)
        return
    kickoffs = check_causes(otel, metric_reader, outcomes, "shared_instance")
    for marker, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            span = kickoffs[marker]
            assert attr(span, "crew_otel.failure.shared_instance.kind") == "agent"
            assert attr(span, "crew_otel.failure.shared_instance.name") == "Support Analyst"
