"""crew_otel leaves nothing to the garbage collector.

A kickoff's calls, their contexts and spans, the kickoff's record and the agents' scopes are
freed by reference counting when the run is over, not left in reference cycles for the cyclic
collector (whose collections then run more often and find more: CPU the instrumentation costs
that no profile of its own functions shows). Real CrewAI kickoffs, concurrent in threads and
on an event loop, against the loopback provider; the collector is off while they run and what
it would have had to free is then listed (``gc.DEBUG_SAVEALL``).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable

from opentelemetry.sdk.trace import Span as SdkSpan

from crew_otel.testing.crews import make_llm, research_crew

#: The modules of what crew_otel makes per call and per run (its metric instruments are made
#: once per ``instrument()``: an earlier test's may be freed meanwhile, by the collector).
_PER_RUN_MODULES = ("crew_otel.wrappers", "crew_otel.context", "crew_otel.diagnosis")


def _garbage_of_crew_otel(run: Callable[[], None], otel) -> list[str]:
    """The types of crew_otel's per-run objects and of SDK spans ``run`` leaves in cycles."""
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        otel.clear()  # the exporter lets go of the spans: only cycles can keep them now
        gc.collect()
        found = {type(o) for o in gc.garbage}
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()
    return sorted(
        f"{t.__module__}.{t.__qualname__}"
        for t in found
        if t.__module__.startswith(_PER_RUN_MODULES) or issubclass(t, SdkSpan)
    )


def _at_once_in_threads(run: Callable[[int], object], threads: int = 3) -> None:
    """``run(i)`` in ``threads`` threads, released together by a barrier; joined."""
    barrier = threading.Barrier(threads)

    def released(i: int) -> None:
        barrier.wait()
        run(i)

    started = [threading.Thread(target=released, args=(i,)) for i in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()


def test_concurrent_kickoffs_leave_no_cycle_of_crew_otels_to_the_collector(otel, fake_provider):
    def crew():
        return research_crew(lambda: make_llm(fake_provider.base_url))

    crew().kickoff(inputs={"topic": "warm-up"})  # lazily made classes and caches

    def in_threads() -> None:
        _at_once_in_threads(lambda i: crew().kickoff(inputs={"topic": f"thread {i}"}))

    def on_a_loop() -> None:
        async def gathered() -> None:
            runs = (crew().akickoff(inputs={"topic": f"task {i}"}) for i in range(3))
            await asyncio.gather(*runs)

        asyncio.run(gathered())

    assert len(otel.get_finished_spans()) > 0
    assert _garbage_of_crew_otel(in_threads, otel) == []
    assert _garbage_of_crew_otel(on_a_loop, otel) == []


def test_concurrent_flows_leave_no_cycle_of_crew_otels_to_the_collector(otel, fake_provider):
    """A user's Flow (its kickoff, a step per method) whose last step kicks a crew off."""
    from crewai.flow.flow import Flow, listen, start

    class Research(Flow):  # type: ignore[type-arg]
        @start()
        def choose(self) -> str:
            return "flows"

        @listen(choose)
        def research(self, topic: str) -> str:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            return str(crew.kickoff(inputs={"topic": topic}).raw)

    Research().kickoff()  # warm-up

    def in_threads() -> None:
        _at_once_in_threads(lambda _: Research().kickoff())

    def on_a_loop() -> None:
        async def gathered() -> None:
            await asyncio.gather(*(Research().kickoff_async() for _ in range(3)))

        asyncio.run(gathered())

    spans = otel.get_finished_spans()
    assert any(s.name.startswith("crewai.flow.step") for s in spans), "flow steps traced"
    assert _garbage_of_crew_otel(in_threads, otel) == []
    assert _garbage_of_crew_otel(on_a_loop, otel) == []
