"""Where each error originated, and the three stacked retry layers (concurrent runs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from opentelemetry.trace import StatusCode

from crew_otel.targets import rate_limit_layer_present
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_failing_tool, make_llm, research_crew
from tests.spans import Spans, attr

FAST = 0.01  # retry-after seconds, so the SDK's back-off does not slow the tests down
ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"


def has_rate_limit_layer() -> bool:
    return rate_limit_layer_present()


def run_concurrently(fn, n: int) -> list:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


def origins(spans: Spans) -> list:
    return [s for s in spans.all if attr(s, ORIGIN)]


def trace_of(spans: Spans, root) -> Spans:
    return Spans([s for s in spans.all if s.context.trace_id == root.context.trace_id])


def root_with_marker(spans: Spans, fake_provider, marker: str):
    """The kickoff span whose trace made the provider requests carrying ``marker``."""
    trace_ids = {r.traceparent.split("-")[1] for r in fake_provider.requests if marker in r.markers}
    (root,) = [
        s for s in spans.named("invoke_workflow") if f"{s.context.trace_id:032x}" in trace_ids
    ]
    return root


def test_two_500s_then_success_are_two_recovered_http_origins(otel, fake_provider):
    n = 4
    for i in range(n):
        fake_provider.script(Fault.error(500, FAST), Fault.error(500, FAST), key=f"r{i}")

    def run(i: int) -> str:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        return crew.kickoff(inputs={"topic": f"[[r{i}]]"}).raw

    results = run_concurrently(run, n)
    assert all(f"[[r{i}]]" in raw for i, raw in enumerate(results)), "the runs succeed"
    spans = Spans(otel.get_finished_spans())
    for i in range(n):
        run_spans = trace_of(spans, root_with_marker(spans, fake_provider, f"r{i}"))
        first_chat = min(run_spans.named("chat"), key=lambda s: s.start_time)
        attempts = run_spans.kids(first_chat, "POST")
        assert [attr(h, "http.request.resend_count") or 0 for h in attempts] == [0, 1, 2]
        for failed in attempts[:2]:
            assert failed.status.status_code is StatusCode.ERROR
            assert attr(failed, "error.type") == "500"
            assert attr(failed, ORIGIN) is True
            assert attr(failed, RECOVERED) is True
        assert attr(attempts[2], ORIGIN) is None
        assert attempts[2].status.status_code is not StatusCode.ERROR
        assert [s.name for s in origins(run_spans)] == ["POST", "POST"]
        for ancestor in run_spans.ancestors(attempts[0]):
            assert ancestor.status.status_code is not StatusCode.ERROR, ancestor.name
            assert attr(ancestor, ORIGIN) is None
    # the provider saw exactly the retried requests
    assert sorted(r.retry_count for r in fake_provider.requests if r.status == 500) == (
        [0] * n + [1] * n
    )


def test_persistent_500_origins_only_on_http_attempts(otel, fake_provider):
    n = 3
    for i in range(n):
        fake_provider.script(*[Fault.error(500, FAST)] * 9, key=f"p{i}")

    def run(i: int) -> BaseException:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        with pytest.raises(openai.InternalServerError) as info:
            crew.kickoff(inputs={"topic": f"[[p{i}]]"})
        return info.value

    errors = run_concurrently(run, n)
    assert all(isinstance(e, openai.InternalServerError) for e in errors)
    spans = Spans(otel.get_finished_spans())
    for i in range(n):
        root = root_with_marker(spans, fake_provider, f"p{i}")
        run_spans = trace_of(spans, root)
        flagged = origins(run_spans)
        assert {s.name for s in flagged} == {"POST"}, "origins only on HTTP attempts"
        assert len(flagged) == 9, "3 SDK attempts x 3 agent attempts"
        assert all(attr(s, "error.type") == "500" for s in flagged)
        fatal = [s for s in flagged if attr(s, RECOVERED) is False]
        assert len(fatal) == 1, "exactly one origin is the error the caller got"
        assert fatal[0].end_time == max(s.end_time for s in flagged)

        chats = run_spans.named("chat")
        assert len(chats) == 3
        for chat in chats:
            assert chat.status.status_code is StatusCode.ERROR
            assert attr(chat, "error.type") == "500"
            assert attr(chat, ORIGIN) is None
        for ancestor in run_spans.ancestors(fatal[0]):
            assert ancestor.status.status_code is StatusCode.ERROR, ancestor.name
            assert attr(ancestor, "error.type") == "500"
            assert attr(ancestor, ORIGIN) is None

        attempts = run_spans.named("invoke_agent")
        assert sorted(attr(a, "crew_otel.attempt") for a in attempts) == [1, 2, 3]
        by_number = {attr(a, "crew_otel.attempt"): a for a in attempts}
        assert run_spans.parent(by_number[2]) is by_number[1], "CrewAI retries from inside"
        assert run_spans.parent(by_number[3]) is by_number[2]
        assert attr(by_number[3], "crew_otel.retry.budget_remaining") == 0
        assert attr(by_number[3], "crew_otel.retry.budget_exhausted") is True
        assert root.status.status_code is StatusCode.ERROR


def test_rate_limit_retries_are_marked(otel, fake_provider):
    n = 3
    for i in range(n):
        fake_provider.script(Fault.error(429, FAST), key=f"rl{i}")

    def run(i: int):
        crew = research_crew(lambda: make_llm(fake_provider.base_url, max_retries=0))
        return crew.kickoff(inputs={"topic": f"[[rl{i}]]"}).raw

    results = run_concurrently(run, n)
    assert all(f"[[rl{i}]]" in raw for i, raw in enumerate(results))
    spans = Spans(otel.get_finished_spans())
    for i in range(n):
        run_spans = trace_of(spans, root_with_marker(spans, fake_provider, f"rl{i}"))
        (limited,) = [s for s in run_spans.named("POST") if attr(s, "error.type") == "429"]
        assert attr(limited, ORIGIN) is True
        assert attr(limited, RECOVERED) is True
        chat = run_spans.parent(limited)
        retry_events = [e for e in chat.events if e.name == "crew_otel.retry"]
        if has_rate_limit_layer():
            # CrewAI's own rate-limit wrapper retried inside the same model call
            assert [e.attributes["crew_otel.retry.layer"] for e in retry_events] == ["rate_limit"]
            assert retry_events[0].attributes["error.type"] == "429"
            assert retry_events[0].attributes["crew_otel.retry.delay_s"] > 0
            assert len(run_spans.kids(chat, "POST")) == 2
            assert chat.status.status_code is not StatusCode.ERROR
        else:
            # no rate-limit layer in this CrewAI: the agent re-ran instead
            assert retry_events == []
            assert chat.status.status_code is StatusCode.ERROR
            numbers = [attr(a, "crew_otel.attempt") for a in run_spans.named("invoke_agent")]
            assert 2 in numbers


def test_raising_tool_is_the_origin_and_recovered_when_crewai_returns_it_to_the_model(
    otel, fake_provider
):
    def run(i: int) -> str:
        crew = research_crew(lambda: make_llm(fake_provider.base_url), tools=[make_failing_tool()])
        return crew.kickoff(inputs={"topic": f"[[tool{i}]]"}).tasks_output[0].raw

    results = run_concurrently(run, 4)
    assert all("upstream API failed" in raw for raw in results), "the model saw the error text"
    spans = Spans(otel.get_finished_spans())
    tools = spans.named("execute_tool")
    assert len(tools) == 4
    for tool in tools:
        assert tool.name == "execute_tool flaky_api"
        assert tool.status.status_code is StatusCode.ERROR
        assert attr(tool, "error.type") == "RuntimeError"
        assert attr(tool, ORIGIN) is True
        assert attr(tool, RECOVERED) is True
        assert any(e.name == "exception" for e in tool.events)
        for ancestor in spans.ancestors(tool):
            assert ancestor.status.status_code is not StatusCode.ERROR, ancestor.name
    assert {s.name for s in origins(spans)} == {"execute_tool flaky_api"}


def test_response_rejected_by_crewai_makes_the_agent_step_the_origin(otel, fake_provider):
    def run(i: int) -> str:
        fake_provider.script(Fault.empty(), key=f"em{i}")
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        return crew.kickoff(inputs={"topic": f"[[em{i}]]"}).raw

    results = run_concurrently(run, 3)
    assert all(f"[[em{i}]]" in raw for i, raw in enumerate(results)), "the agent retry worked"
    spans = Spans(otel.get_finished_spans())
    flagged = origins(spans)
    assert len(flagged) == 3
    for origin in flagged:
        # the model call itself succeeded (HTTP 200, empty message); CrewAI's step rejected it
        assert origin.name == "crewai.agent.step Researcher"
        assert attr(origin, "error.type") == "ValueError"
        assert attr(origin, RECOVERED) is True, "CrewAI re-ran the agent"
        (chat,) = spans.kids(origin, "chat")
        assert chat.status.status_code is not StatusCode.ERROR


def test_agent_retry_budget_is_never_reset(otel, fake_provider):
    """CrewAI counts agent retries over the Agent's lifetime: the span says so."""
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "Analyst", max_retry_limit=1)
    for round_ in range(3):
        fake_provider.script(Fault.empty(), key=f"b{round_}")
        task = Task(description="Analyse {topic}", expected_output="x", agent=agent)
        try:
            Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": f"[[b{round_}]]"})
        except ValueError:
            pass
    spans = Spans(otel.get_finished_spans())
    firsts = sorted(
        (a for a in spans.named("invoke_agent") if attr(a, "crew_otel.attempt") == 1),
        key=lambda s: s.start_time,
    )
    assert [attr(a, "crew_otel.retry.budget_remaining") for a in firsts] == [1, 0, 0]
    assert attr(firsts[0], "crew_otel.retry.budget_exhausted") is None
    assert attr(firsts[1], "crew_otel.retry.budget_exhausted") is True
    assert any(e.name == "crew_otel.retry_budget_exhausted" for e in firsts[1].events)
    # the second and third rounds failed on their first error
    roots = sorted(spans.named("invoke_workflow"), key=lambda s: s.start_time)
    assert [r.status.status_code for r in roots] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.ERROR,
    ]


def test_timeouts_surface_with_the_exception_class(otel, fake_provider):
    fake_provider.script(*[Fault.timeout(2.0)] * 2, key="to")
    crew = research_crew(lambda: make_llm(fake_provider.base_url, timeout=0.3, max_retries=1))
    crew.agents[0].max_retry_limit = 0
    with pytest.raises(ConnectionError):
        crew.kickoff(inputs={"topic": "[[to]]"})
    spans = Spans(otel.get_finished_spans())
    flagged = origins(spans)
    assert [s.name for s in flagged] == ["POST", "POST"]
    assert {attr(s, "error.type") for s in flagged} == {"ReadTimeout"}
    assert sorted(attr(s, RECOVERED) for s in flagged) == [False, True]
    (chat,) = spans.named("chat")
    assert attr(chat, "error.type") == "ConnectionError"
    exception_text = next(e for e in chat.events if e.name == "exception").attributes[
        "exception.stacktrace"
    ]
    assert "APITimeoutError" in exception_text, "the whole exception chain is recorded"


def _context_overflow_run(fake_provider, marker: str, respect: bool):
    from crewai import Crew, Task

    fake_provider.script(Fault.context_length_exceeded(), key=marker)
    agent = make_agent(make_llm(fake_provider.base_url), "Writer", respect_context_window=respect)
    task = Task(description="Write about {topic}", expected_output="text", agent=agent)
    return Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": f"[[{marker}]]"})


def test_context_overflow_summarised_and_silent_fallback_are_flagged(otel, fake_provider):
    results = run_concurrently(lambda i: _context_overflow_run(fake_provider, f"cw{i}", True), 2)
    spans = Spans(otel.get_finished_spans())
    agents = spans.named("invoke_agent")
    assert len(agents) == 2
    for agent in agents:
        assert attr(agent, "crew_otel.context.summarized") is True
        assert "crew_otel.context.summarized" in [e.name for e in agent.events]
    # CrewAI >= 1.14 ends the loop after summarising and returns a placeholder: flagged
    # exactly when it happens.
    placeholders = sum("produced no final output" in r.raw for r in results)
    flagged = sum(bool(attr(a, "crew_otel.context.no_final_output")) for a in agents)
    assert placeholders == flagged
    rejected = [s for s in spans.named("POST") if attr(s, "error.type") == "400"]
    assert len(rejected) == 2
    assert all(attr(s, ORIGIN) is True for s in rejected)
    for chat in spans.named("chat"):
        assert attr(chat, "crewai.llm.messages") >= 2
        if chat.status.status_code is not StatusCode.ERROR:
            assert attr(chat, "gen_ai.usage.input_tokens") > 0


def test_context_overflow_without_summarising_raises_system_exit_and_is_flagged(
    otel, fake_provider
):
    def run(i: int) -> BaseException | None:
        try:
            _context_overflow_run(fake_provider, f"se{i}", False)
        except SystemExit as exc:  # a BaseException: web frameworks' handlers miss it
            return exc
        return None

    outcomes = run_concurrently(run, 2)
    assert all(isinstance(o, SystemExit) for o in outcomes)
    spans = Spans(otel.get_finished_spans())
    for agent in spans.named("invoke_agent"):
        assert attr(agent, "crew_otel.context.overflow") is True
        assert attr(agent, "error.type") == "SystemExit"
        assert attr(agent, ORIGIN) is True
        assert attr(agent, RECOVERED) is False
    for root in spans.named("invoke_workflow"):
        assert attr(root, "error.type") == "SystemExit"
        assert attr(root, ORIGIN) is None
