"""The concurrent mixed workload several tests run (metrics, privacy, the live Prometheus app).

Two successful runs, a persistent provider 500, a tool that raises and two requests sharing one
Agent, started together. ``prefix`` goes into every ``[[marker]]`` (and the topic) so a test can
look for it in what was recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_failing_tool, make_llm, research_crew

FAST = 0.01  # retry-after seconds, so the SDK's back-off does not slow tests down


def mixed_workload(
    provider: FakeOpenAIProvider,
    prefix: str = "",
    extra_jobs: Sequence[Callable[[], None]] = (),
) -> None:
    from crewai import Crew, Task

    provider.script(*[Fault.error(500, FAST)] * 9, key=f"{prefix}fail")
    # Both requests sharing the agent hold it for 0.8 s at least, whichever gets it first (on a
    # loaded machine the later-started one can): they overlap however the threads are scheduled.
    provider.script(Fault.delay(0.8), key=f"{prefix}share0")
    provider.script(Fault.delay(0.8), key=f"{prefix}share1")
    shared_agent = make_agent(make_llm(provider.base_url), "Support Analyst")

    def topic(name: str) -> dict[str, str]:
        return {"topic": f"[[{prefix}{name}]] {prefix}"}

    def ok(i: int) -> None:
        research_crew(lambda: make_llm(provider.base_url)).kickoff(inputs=topic(f"ok{i}"))

    def persistent_500() -> None:
        try:
            research_crew(lambda: make_llm(provider.base_url)).kickoff(inputs=topic("fail"))
        except Exception:  # the failure is the point
            pass

    def raising_tool() -> None:
        research_crew(lambda: make_llm(provider.base_url), tools=[make_failing_tool()]).kickoff(
            inputs=topic("tool")
        )

    def shared(i: int) -> None:
        time.sleep(0.3 * i)  # the second request starts while the first holds the agent
        task = Task(description="Triage {topic}", expected_output="x", agent=shared_agent)
        try:
            Crew(agents=[shared_agent], tasks=[task]).kickoff(inputs=topic(f"share{i}"))
        except RuntimeError:  # "Executor is already running" (CrewAI >= 1.14)
            pass

    jobs = [
        lambda: ok(0),
        lambda: ok(1),
        persistent_500,
        raising_tool,
        lambda: shared(0),
        lambda: shared(1),
        *extra_jobs,
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def kickoff_concurrently(
    make_crew: Callable[[str], Any], markers: Sequence[str], threads: int
) -> dict[str, Any]:
    """Kick off one crew per marker at once: the first ``threads`` markers with ``kickoff`` in
    threads, the rest with ``akickoff`` on one event loop. The result, or the exception raised,
    per marker."""
    crews = {marker: make_crew(marker) for marker in markers}
    outcomes: dict[str, Any] = {}

    def in_thread(marker: str) -> None:
        try:
            outcomes[marker] = crews[marker].kickoff()
        except Exception as exc:
            outcomes[marker] = exc

    async def on_loop() -> None:
        async def one(marker: str) -> None:
            try:
                outcomes[marker] = await crews[marker].akickoff()
            except Exception as exc:
                outcomes[marker] = exc

        await asyncio.gather(*(one(marker) for marker in markers[threads:]))

    with ThreadPoolExecutor(max_workers=threads + 1) as pool:
        futures = [pool.submit(in_thread, marker) for marker in markers[:threads]]
        futures.append(pool.submit(asyncio.run, on_loop()))
        for future in futures:
            future.result()
    return outcomes


def outcome_summary(outcome: Any) -> tuple[str, str]:
    """What the caller got: ("ok", the raw output) or (exception type, message)."""
    if isinstance(outcome, BaseException):
        return type(outcome).__name__, str(outcome)
    return "ok", outcome.raw
