"""Async misuse (sync kickoff on an event loop, executor queueing) and log correlation."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from crew_otel import logs
from crew_otel.testing import RandomFaults
from crew_otel.testing.crews import make_llm, research_crew
from crew_otel.testing.provider import FakeOpenAIProvider
from tests.spans import REQUEST_ID, Spans, attr


def test_sync_kickoff_inside_async_def_is_flagged(otel, fake_provider):
    async def endpoint(i: int) -> BaseException | None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        try:
            crew.kickoff(inputs={"topic": f"[[loop{i}]]"})  # the bug: blocks the event loop
        except Exception as exc:
            return exc
        return None

    async def main() -> list:
        return await asyncio.gather(*(endpoint(i) for i in range(3)))

    outcomes = asyncio.run(main())
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    assert len(roots) == 3
    assert all(attr(r, "crew_otel.sync_in_event_loop") is True for r in roots)
    # CrewAI refuses it (recent versions) or blocks the loop (older ones); either way it shows
    for outcome, root in zip(outcomes, sorted(roots, key=lambda s: s.start_time)):
        if outcome is not None:
            assert attr(root, "error.type") == type(outcome).__qualname__


def test_sync_kickoff_off_the_loop_is_not_flagged(otel, fake_provider):
    async def endpoint(i: int) -> None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        await asyncio.to_thread(crew.kickoff, inputs={"topic": f"[[ok{i}]]"})  # the fix

    async def main() -> None:
        await asyncio.gather(*(endpoint(i) for i in range(3)))

    asyncio.run(main())
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    assert len(roots) == 3
    assert all(attr(r, "crew_otel.sync_in_event_loop") is None for r in roots)


def test_kickoff_async_queueing_in_the_default_executor_shows_as_wait(otel):
    with FakeOpenAIProvider(random_faults=RandomFaults(latency=0.05)) as provider:

        async def main() -> None:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
            crews = [research_crew(lambda: make_llm(provider.base_url)) for _ in range(6)]
            await asyncio.gather(
                *(c.kickoff_async(inputs={"topic": f"[[q{i}]]"}) for i, c in enumerate(crews))
            )

        asyncio.run(main())
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    waits = sorted(attr(r, "crew_otel.kickoff.queue_wait") for r in roots)
    assert len(waits) == 6
    run_time = min((r.end_time - r.start_time) / 1e9 for r in roots) - waits[0]
    # two workers: the last kickoffs waited for at least two earlier runs to finish
    assert waits[-1] > waits[0] + run_time
    assert max(attr(r, "crew_otel.executor.queue_depth") for r in roots) >= 1


def test_akickoff_records_the_wait_before_its_first_step(otel, fake_provider):
    async def main() -> None:
        await asyncio.gather(
            *(
                research_crew(lambda: make_llm(fake_provider.base_url)).akickoff(
                    inputs={"topic": f"[[w{i}]]"}
                )
                for i in range(4)
            )
        )

    asyncio.run(main())
    spans = Spans(otel.get_finished_spans())
    for root in spans.named("invoke_workflow"):
        wait = attr(root, "crew_otel.kickoff.queue_wait")
        first_step = min(
            (s for s in spans.descendants(root) if s.name.startswith("crewai.agent.step")),
            key=lambda s: s.start_time,
        )
        assert wait == pytest.approx((first_step.start_time - root.start_time) / 1e9, abs=0.05)


def test_log_records_inside_a_run_carry_the_request_id(otel, fake_provider, caplog):
    from crewai.tools import tool

    app_logger = logging.getLogger("my.app.tools")
    logs.install()
    try:

        def make_tool():
            @tool("logging_lookup")
            def logging_lookup(query: str) -> str:
                """Look up and log."""
                app_logger.warning("looking up %s", query)
                return f"FACTS about {query}"

            return logging_lookup

        def run(i: int) -> None:
            research_crew(lambda: make_llm(fake_provider.base_url), tools=[make_tool()]).kickoff(
                inputs={"topic": f"[[log{i}]]"}
            )

        with caplog.at_level(logging.WARNING, logger="my.app.tools"):
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(run, range(4)))
            app_logger.warning("outside any run")
    finally:
        logs.uninstall()
    spans = Spans(otel.get_finished_spans())
    records = [r for r in caplog.records if r.name == "my.app.tools"]
    inside = [r for r in records if r.getMessage().startswith("looking up")]
    assert len(inside) == 4
    for record in inside:
        (tool_span,) = [
            s for s in spans.named("execute_tool") if f"{s.context.span_id:016x}" == record.span_id
        ]
        assert record.request_id == attr(tool_span, REQUEST_ID)
        assert record.trace_id == f"{tool_span.context.trace_id:032x}"
    assert len({r.request_id for r in inside}) == 4
    (outside,) = [r for r in records if r.getMessage() == "outside any run"]
    assert outside.request_id == outside.trace_id == "-"
