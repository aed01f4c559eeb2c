"""Shared-instance detection: the broken patterns of the article are named, the fixed ones not."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from crew_otel.instrumentor import CrewAIInstrumentor
from crew_otel.testing import FakeOpenAIProvider, Fault, RandomFaults
from crew_otel.testing.crews import make_agent, make_llm, make_lookup_tool, research_crew
from tests.spans import REQUEST_ID, Spans, attr
from tests.workloads import outcome_of, run_while_held

EVENT = "crew_otel.shared_instance"


def conflicts(spans: Spans) -> list[tuple[object, dict]]:
    """(span, event attributes) of every shared-instance event."""
    return [
        (span, dict(event.attributes or {}))
        for span in spans.all
        for event in span.events
        if event.name == EVENT
    ]


def start_together(fn, n: int) -> list:
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:  # the broken patterns fail some requests: that is the point
            return exc

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def slow_provider() -> FakeOpenAIProvider:
    # latency keeps runs in flight long enough to overlap
    return FakeOpenAIProvider(random_faults=RandomFaults(latency=0.05))


def assert_names_both_requests(spans: Spans, kind: str) -> None:
    found = [(s, e) for s, e in conflicts(spans) if e["crew_otel.shared_instance.kind"] == kind]
    assert found, f"no {kind} conflict reported"
    request_ids = {attr(r, REQUEST_ID) for r in spans.named("invoke_workflow")}
    for span, event in found:
        assert attr(span, "crew_otel.shared_instance") is True
        others = event["crew_otel.shared_instance.other_request_ids"]
        assert others, "the other request is named"
        assert attr(span, REQUEST_ID) not in others
        assert set(others) <= request_ids | {"unknown"}
        assert "." in event["crew_otel.shared_instance.class"]


def test_one_crew_shared_by_concurrent_requests(otel, fake_provider, caplog):
    shared = research_crew(lambda: make_llm(fake_provider.base_url))

    def kickoff(round_: int, i: int) -> object:
        return shared.kickoff(inputs={"topic": f"[[s{round_}-{i}]]"})

    with caplog.at_level(logging.WARNING, logger="crew_otel"):
        for round_ in range(2):
            # four requests run while the first one is inside a model call of its kickoff
            run_while_held(
                fake_provider,
                f"s{round_}-0",
                lambda round_=round_: kickoff(round_, 0),
                [lambda round_=round_, i=i: kickoff(round_, i) for i in range(1, 5)],
            )
    spans = Spans(otel.get_finished_spans())
    assert_names_both_requests(spans, "crew")
    crew_warnings = [m for m in caplog.messages if "crew Crew 'research'" in m]
    assert len(crew_warnings) == 1, "warned once per object, not per conflict"
    assert "build the Crew per request" in crew_warnings[0]
    assert CrewAIInstrumentor().runtime.sharing.tracked_objects == 0


def test_module_level_agent_shared_by_per_request_crews(otel, fake_provider):
    """The article's broken pattern: one Agent at module level, a Crew per request."""
    from crewai import Crew, Task

    agent = make_agent(
        make_llm(fake_provider.base_url), "Support Analyst", tools=[make_lookup_tool()]
    )

    def handle(i: int):
        task = Task(description="Investigate ticket {topic}", expected_output="x", agent=agent)
        return Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": f"[[m{i}]]"})

    # the other requests run while the first one holds the agent (inside its model call)
    results = run_while_held(
        fake_provider, "m0", lambda: handle(0), [lambda i=i: handle(i) for i in range(1, 5)]
    )
    spans = Spans(otel.get_finished_spans())
    assert_names_both_requests(spans, "agent")
    # CrewAI >= 1.14 refuses concurrent use of the agent's executor ("Executor is already
    # running"); each such error is attributed to the shared agent and is its own origin.
    failures = [r for r in results if isinstance(r, RuntimeError)]
    busy = [s for s in spans.named("invoke_agent") if attr(s, "error.type") == "RuntimeError"]
    assert bool(failures) == bool(busy)
    assert all(attr(s, "crew_otel.shared_instance") is True for s in busy)
    if failures:
        assert {s.name for s in origins_of(spans)} == {"invoke_agent Support Analyst"}


def origins_of(spans: Spans) -> list:
    return [s for s in spans.all if attr(s, "crew_otel.error.origin")]


def test_llm_and_tool_objects_shared_by_per_request_agents(otel, fake_provider):
    from crewai.tools import tool

    runs = 3
    shared_llm = make_llm(fake_provider.base_url)
    in_the_tool = threading.Barrier(runs, timeout=60)

    @tool("slow_lookup")
    def slow_lookup(query: str) -> str:
        """A module-level tool (shared); every request is inside it at once."""
        in_the_tool.wait()
        return f"FACTS about {query}"

    gate = fake_provider.gate("llm")
    for i in range(runs):
        fake_provider.script(Fault.hold(gate.name), key=f"l{i}")

    def handle(i: int):
        researcher = make_agent(shared_llm, "Researcher", tools=[slow_lookup])
        return research_crew(
            lambda: make_llm(fake_provider.base_url), researcher=researcher
        ).kickoff(inputs={"topic": f"[[l{i}]]"})

    with ThreadPoolExecutor(max_workers=runs) as pool:
        try:
            futures = [pool.submit(outcome_of, lambda i=i: handle(i)) for i in range(runs)]
            gate.wait_parked(runs)  # every request is inside a model call of the shared LLM
        finally:
            gate.open()
        results = [future.result() for future in futures]
    assert not [r for r in results if isinstance(r, Exception)], "sharing these is survivable"
    spans = Spans(otel.get_finished_spans())
    assert_names_both_requests(spans, "llm")
    assert_names_both_requests(spans, "tool")
    llm_spans = {
        s.name for s, e in conflicts(spans) if e["crew_otel.shared_instance.kind"] == "llm"
    }
    tool_spans = {
        s.name for s, e in conflicts(spans) if e["crew_otel.shared_instance.kind"] == "tool"
    }
    assert llm_spans == {"chat gpt-4o-mini"}
    assert tool_spans == {"execute_tool slow_lookup"}


def test_task_run_with_another_requests_inputs_is_flagged(otel, fake_provider):
    shared = research_crew(lambda: make_llm(fake_provider.base_url))

    # the second kickoff starts (and interpolates its inputs) while the first one runs
    run_while_held(
        fake_provider,
        "first",
        lambda: shared.kickoff(inputs={"topic": "[[first]]"}),
        [lambda: shared.kickoff(inputs={"topic": "[[second]]"})],
    )
    spans = Spans(otel.get_finished_spans())
    cross_talk = [
        (s, e) for s, e in conflicts(spans) if e["crew_otel.shared_instance.kind"] == "task_inputs"
    ]
    assert cross_talk, "a task ran with inputs another request interpolated into it"
    for span, event in cross_talk:
        assert span.name.startswith("crewai.task")
        assert event["crew_otel.shared_instance.other_request_ids"] != (attr(span, REQUEST_ID),)


def test_fixed_pattern_reports_nothing_over_repeated_rounds_threads_and_asyncio(otel, caplog):
    with slow_provider() as provider, caplog.at_level(logging.WARNING, logger="crew_otel"):
        for round_ in range(3):
            start_together(
                lambda i: research_crew(lambda: make_llm(provider.base_url)).kickoff(
                    inputs={"topic": f"[[f{round_}-{i}]]"}
                ),
                5,
            )

        async def main() -> None:
            await asyncio.gather(
                *(
                    research_crew(lambda: make_llm(provider.base_url)).akickoff(
                        inputs={"topic": f"[[fa{i}]]"}
                    )
                    for i in range(5)
                )
            )

        asyncio.run(main())
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("invoke_workflow")) == 20
    assert conflicts(spans) == []
    assert not [s for s in spans.all if attr(s, "crew_otel.shared_instance")]
    assert not [m for m in caplog.messages if "is used by request" in m]


def test_kickoff_for_each_async_copies_are_not_conflicts(otel, fake_provider):
    async def main() -> None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        await crew.kickoff_for_each_async([{"topic": f"[[c{i}]]"} for i in range(4)])

    asyncio.run(main())
    # the copies share the LLM object, but within one request: not a cross-request conflict
    assert conflicts(Spans(otel.get_finished_spans())) == []


def test_bookkeeping_holds_no_strong_references(otel, fake_provider):
    refs = []

    def run(i: int) -> None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        refs.append(weakref.ref(crew))
        refs.append(weakref.ref(crew.agents[0]))
        crew.kickoff(inputs={"topic": f"[[g{i}]]"})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, range(8)))
    otel.clear()
    # CrewAI's event handlers run later in its own thread pool, and its events hold the Crew
    # and the Agent until they have run: those references are CrewAI's, not crew_otel's.
    from crewai.events import crewai_event_bus

    assert crewai_event_bus.flush(timeout=30)
    gc.collect()
    assert CrewAIInstrumentor().runtime.sharing.tracked_objects == 0
    alive = [r for r in refs if r() is not None]
    assert alive == [], "crew_otel keeps no Crew or Agent alive"
