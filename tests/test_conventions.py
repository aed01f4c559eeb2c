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
