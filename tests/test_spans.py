"""The span model of one run: names, kinds, nesting and attributes (DESIGN.md "Span model")."""

from __future__ import annotations

import re
import threading

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from crew_otel.testing.crews import make_agent, make_llm, make_lookup_tool, research_crew
from tests.spans import REQUEST_ID, Spans, attr

# Span names may only be "{operation} {code-defined name}" or the HTTP method.
ALLOWED_NAME = re.compile(
    r"^(invoke_workflow|crewai\.task|invoke_agent|crewai\.agent\.step|execute_tool|chat) "
    r"[A-Za-z0-9_. -]{1,64}$|^(POST|GET)$"
)


def run_crew(fake_provider, marker: str = "t1"):
    crew = research_crew(lambda: make_llm(fake_provider.base_url))
    return crew.kickoff(inputs={"topic": f"[[{marker}]]"})


def test_one_kickoff_is_one_correctly_nested_trace(otel, fake_provider):
    result = run_crew(fake_provider)
    assert "[[t1]]" in result.raw
    spans = Spans(otel.get_finished_spans())

    assert len(spans.traces()) == 1, "one trace per kickoff"
    (root,) = spans.roots()
    assert root.name == "invoke_workflow research"
    assert attr(root, "gen_ai.operation.name") == "invoke_workflow"
    assert attr(root, "crewai.kickoff.entrypoint") == "kickoff"
    assert attr(root, "crew_otel.kickoffs.in_flight") == 1

    tasks = spans.kids(root, "crewai.task")
    assert [t.name for t in tasks] == ["crewai.task research", "crewai.task write"]
    for task in tasks:
        (attempt,) = spans.kids(task, "invoke_agent")
        assert attr(attempt, "crew_otel.attempt") == 1
        steps = spans.kids(attempt, "crewai.agent.step")
        assert steps, "every attempt has steps"
        assert [attr(s, "crewai.agent.iteration") for s in steps] == list(range(1, len(steps) + 1))
        for step in steps:
            (chat,) = spans.kids(step, "chat")
            assert chat.kind is SpanKind.CLIENT
            http = spans.kids(chat)
            assert [h.name for h in http] == ["POST"], "HTTP attempts are children of the chat"
            assert http[0].kind is SpanKind.CLIENT
            assert (
                attr(http[0], "http.response.status_code") == 200
                or attr(http[0], "http.status_code") == 200
            )

    research_attempt = spans.kids(tasks[0], "invoke_agent")[0]
    first_step = spans.kids(research_attempt, "crewai.agent.step")[0]
    (tool,) = spans.kids(first_step, "execute_tool")
    assert tool.name == "execute_tool lookup_facts"
    assert attr(tool, "gen_ai.tool.name") == "lookup_facts"
    assert attr(tool, "gen_ai.tool.call.id").startswith("call_")
    assert attr(tool, "crewai.tool.cache_hit") is False

    (chat,) = spans.kids(first_step, "chat")
    assert chat.name == "chat gpt-4o-mini"
    assert attr(chat, "gen_ai.provider.name") == "openai"
    assert attr(chat, "gen_ai.request.model") == "gpt-4o-mini"
    assert attr(chat, "gen_ai.usage.input_tokens") > 0
    assert attr(chat, "gen_ai.usage.output_tokens") > 0
    assert attr(chat, "gen_ai.response.finish_reasons") == ("tool_calls",)
    assert attr(chat, "crewai.llm.messages") >= 2

    # Every span, the HTTP ones included, carries the run's request ID and thread.
    request_ids = {attr(s, REQUEST_ID) for s in spans.all}
    assert len(request_ids) == 1
    assert None not in request_ids
    for span in spans.all:
        assert isinstance(attr(span, "thread.id"), int)
        assert attr(span, "thread.name")
    assert attr(root, "thread.id") == threading.get_ident()
    # CrewAI >= 1.14 runs agent steps in asyncio worker threads, older ones in the caller's;
    # either way the span says which thread it ran on.
    assert isinstance(attr(first_step, "thread.id"), int)
    assert isinstance(attr(tool, "thread.id"), int)


def test_span_names_are_low_cardinality(otel, fake_provider):
    for marker in ("alpha", "beta"):
        run_crew(fake_provider, marker)
    spans = Spans(otel.get_finished_spans())
    assert len(spans.traces()) == 2
    for span in spans.all:
        assert ALLOWED_NAME.match(span.name), span.name
        assert "[[" not in span.name
        assert "Research" not in span.name.split(" ", 1)[0]
    # the same code produces the same set of names whatever the inputs
    by_trace = [sorted({s.name for s in t}) for t in spans.traces().values()]
    assert by_trace[0] == by_trace[1]


def test_task_description_and_inputs_are_not_recorded_by_default(otel, fake_provider):
    run_crew(fake_provider, "secret-topic")
    for span in otel.get_finished_spans():
        for value in (span.attributes or {}).values():
            assert "secret-topic" not in str(value), span.name


def test_role_interpolated_with_inputs_keeps_the_code_defined_span_name(otel, fake_provider):
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "{topic} analyst")
    task = Task(description="Analyse {topic}", expected_output="x", agent=agent)
    Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": "[[zeta]]"})
    spans = Spans(otel.get_finished_spans())
    (attempt,) = spans.named("invoke_agent")
    assert attempt.name == "invoke_agent {topic} analyst"
    assert spans.named("crewai.task")[0].name == "crewai.task task"


def test_user_spans_inside_a_run_carry_the_request_id(otel, fake_provider):
    from crewai.tools import tool

    tracer = trace.get_tracer("my.app")

    @tool("annotated_lookup")
    def annotated_lookup(query: str) -> str:
        """Look up with a span of the application's own."""
        with tracer.start_as_current_span("my.db.query"):
            return f"FACTS about {query}"

    crew = research_crew(lambda: make_llm(fake_provider.base_url), tools=[annotated_lookup])
    crew.kickoff(inputs={"topic": "[[user]]"})
    spans = Spans(otel.get_finished_spans())
    (mine,) = spans.named("my.db.query")
    (root,) = spans.named("invoke_workflow")
    assert attr(mine, REQUEST_ID) == attr(root, REQUEST_ID)
    assert spans.parent(mine).name == "execute_tool annotated_lookup"
    assert isinstance(attr(mine, "thread.id"), int)


def test_spans_outside_a_run_are_not_stamped(otel):
    with trace.get_tracer("my.app").start_as_current_span("outside"):
        pass
    (span,) = otel.get_finished_spans()
    assert attr(span, REQUEST_ID) is None
    assert attr(span, "thread.id") is None


def test_standalone_agent_kickoff(otel, fake_provider):
    agent = make_agent(make_llm(fake_provider.base_url), "Helper", tools=[make_lookup_tool()])
    result = agent.kickoff("Look up [[solo]]")
    assert "[[solo]]" in str(result.raw)
    spans = Spans(otel.get_finished_spans())
    (root,) = spans.roots()
    assert root.name == "invoke_workflow Helper"
    assert attr(root, "crewai.kickoff.entrypoint") == "agent.kickoff"
    steps = spans.kids(root, "crewai.agent.step")
    assert len(steps) == 2
    assert [t.name for t in spans.kids(steps[0], "execute_tool")] == ["execute_tool lookup_facts"]
    assert all(attr(s, REQUEST_ID) == attr(root, REQUEST_ID) for s in spans.all)
