"""What the GenAI semantic conventions ask of the agent spans, under concurrent runs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from opentelemetry.sdk.trace import SpanProcessor

from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import Spans, attr


class StartAttributes(SpanProcessor):
    """The attributes each span had when it started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[int, dict[str, object]] = {}

    def on_start(self, span, parent_context=None) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.started[span.context.span_id] = dict(span.attributes or {})


def test_invoke_agent_carries_provider_model_and_crewais_own_id_from_the_start(
    otel, otel_tracer_provider, fake_provider
):
    starts = StartAttributes()
    otel_tracer_provider.add_span_processor(starts)
    crews = [research_crew(lambda: make_llm(fake_provider.base_url)) for _ in range(8)]

    def run(i: int) -> None:
        crews[i].kickoff(inputs={"topic": f"[[c{i}]]"})

    async def arun() -> None:
        await asyncio.gather(
            *(crews[i].akickoff(inputs={"topic": f"[[c{i}]]"}) for i in range(4, 8))
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))
    asyncio.run(arun())

    agents = {str(agent.id): agent for crew in crews for agent in crew.agents}
    attempts = Spans(otel.get_finished_spans()).named("invoke_agent")
    assert len(attempts) >= 16  # two agents per crew (a slow machine may retry one)
    for span in attempts:
        at_start = starts.started[span.context.span_id]
        assert at_start["gen_ai.provider.name"] == "openai"
        assert at_start["gen_ai.request.model"] == "gpt-4o-mini"
        assert "gen_ai.agent.id" not in (span.attributes or {})
        agent = agents[attr(span, "crewai.agent.id")]
        assert attr(span, "gen_ai.agent.name") == agent.role
    assert len({attr(s, "crewai.agent.id") for s in attempts}) == 16


PARAMETERS = {
    "seed": 7,
    "temperature": 0.5,
    "top_p": 0.8,
    "max_tokens": 300,
    "frequency_penalty": 0.25,
    "presence_penalty": 0.5,
}
EXPECTED_PARAMETERS = {
    "gen_ai.request.seed": 7,
    "gen_ai.request.temperature": 0.5,
    "gen_ai.request.top_p": 0.8,
    "gen_ai.request.max_tokens": 300,
    "gen_ai.request.frequency_penalty": 0.25,
    "gen_ai.request.presence_penalty": 0.5,
}


def test_request_parameters_usage_totals_and_tool_descriptions_under_concurrent_runs(
    otel, fake_provider
):
    """Chat spans carry the LLM's parameters and where they were sent; an agent attempt its
    LLM's parameters, the usage summed over its own model calls and the last call's finish
    reasons; a tool span the tool's developer description, its type and the agent running it."""
    crews = [
        research_crew(lambda: make_llm(fake_provider.base_url, **PARAMETERS)) for _ in range(8)
    ]

    def run(i: int) -> None:
        crews[i].kickoff(inputs={"topic": f"[[p{i}]]"})

    async def arun() -> None:
        await asyncio.gather(
            *(crews[i].akickoff(inputs={"topic": f"[[p{i}]]"}) for i in range(4, 8))
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))
    asyncio.run(arun())

    spans = Spans(otel.get_finished_spans())
    chats = spans.named("chat")
    assert len(chats) >= 24
    for chat in chats:
        for key, value in EXPECTED_PARAMETERS.items():
            assert attr(chat, key) == value, key
        assert attr(chat, "server.address") == "127.0.0.1"
        assert attr(chat, "server.port") == fake_provider.port
        assert attr(chat, "openai.api.type") == "chat_completions"
        assert attr(chat, "gen_ai.request.stream") is None  # no stream asked
    agents = spans.named("invoke_agent")
    assert len(agents) >= 16
    for agent in agents:
        for key, value in EXPECTED_PARAMETERS.items():
            assert attr(agent, key) == value, key
        own = sorted(
            (s for s in spans.descendants(agent) if s.name.startswith("chat ")),
            key=lambda s: s.end_time or 0,
        )
        assert own
        for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
            assert attr(agent, key) == sum(attr(s, key) for s in own), key
        assert attr(agent, "gen_ai.response.finish_reasons") == attr(
            own[-1], "gen_ai.response.finish_reasons"
        )
    tools = spans.named("execute_tool lookup_facts")
    assert len(tools) >= 8
    for tool in tools:
        assert attr(tool, "gen_ai.tool.type") == "function"
        assert "Look up facts about a topic." in attr(tool, "gen_ai.tool.description")
        assert "[[p" not in attr(tool, "gen_ai.tool.description")  # no input in it
        assert attr(tool, "gen_ai.agent.name") == "Researcher"
