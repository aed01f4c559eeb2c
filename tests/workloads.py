"""Workloads and overlap helpers the test modules share: the concurrent mixed workload
(metrics, privacy, the live Prometheus app), runs held at a gate of the loopback provider
(:func:`run_while_held`, :func:`wait_parked_or_done`), barriers in tool code, crews to kick off
concurrently.

Two successful runs, a persistent provider 500, a tool that raises and two requests sharing one
Agent, started together. ``prefix`` goes into every ``[[marker]]`` (and the topic) so a test can
look for it in what was recorded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import crew_otel
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_failing_tool, make_llm, research_crew
from crew_otel.testing.provider import Gate

FAST = 0.01  # retry-after seconds, so the SDK's back-off does not slow tests down


def mixed_workload(
    provider: FakeOpenAIProvider,
    prefix: str = "",
    extra_jobs: Sequence[Callable[[], None]] = (),
) -> None:
    from crewai import Crew, Task

    provider.script(*[Fault.error(500, FAST)] * 9, key=f"{prefix}fail")
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
        task = Task(description="Triage {topic}", expected_output="x", agent=shared_agent)
        try:
            Crew(agents=[shared_agent], tasks=[task]).kickoff(inputs=topic(f"share{i}"))
        except RuntimeError:  # "Executor is already running" (CrewAI >= 1.14)
            pass

    def sharing_the_agent() -> None:
        # the second request runs while the first holds the agent (inside its model call)
        outcomes = run_while_held(
            provider, f"{prefix}share0", lambda: shared(0), [lambda: shared(1)]
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    jobs = [
        lambda: ok(0),
        lambda: ok(1),
        persistent_500,
        raising_tool,
        sharing_the_agent,
        *extra_jobs,
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def outcome_of(fn: Callable[[], Any]) -> Any:
    """What ``fn()`` returned, or the exception it raised."""
    try:
        return fn()
    except Exception as exc:
        return exc


def run_while_held(
    provider: FakeOpenAIProvider,
    key: str,
    holder: Callable[[], Any],
    others: Sequence[Callable[[], Any]],
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``others`` (together, to their end) while ``holder`` is inside a model call: its
    first model request carrying ``[[key]]`` is parked at a gate until they are done, so each
    of them overlaps the holder's run as a fact, however the threads are scheduled. What each
    returned or raised, the holder's first.

    With one shared Agent, the holder holds it the whole time: CrewAI >= 1.14 refuses the
    others ("Executor is already running"), 1.12 runs them beside it.
    """
    gate = provider.gate(f"held:{key}")
    provider.script(Fault.hold(gate.name, seconds=timeout), key=key)
    with ThreadPoolExecutor(max_workers=1 + len(others)) as pool:
        try:
            held = pool.submit(outcome_of, holder)
            held.add_done_callback(
                lambda done: gate.give_up(
                    f"the holder's run ended before its model call reached the gate: "
                    f"{done.result()!r}"
                )
            )
            gate.wait_parked(1, timeout)
            running = [pool.submit(outcome_of, fn) for fn in others]
            outcomes = [future.result(timeout) for future in running]
        finally:
            gate.open()
        return [held.result(timeout), *outcomes]


def wait_parked_or_done(
    gate: Gate, futures: Sequence[Future[Any]], count: int = 1, timeout: float = 60.0
) -> bool:
    """Wait until ``count`` requests are parked at ``gate`` (True) or every one of ``futures``
    is done first (False): a fact either way, whichever the CrewAI version makes happen.
    ``TimeoutError`` after ``timeout`` s (a bound against a broken test)."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                gate.give_up("every run ended")

    for future in futures:
        future.add_done_callback(one_done)
    try:
        gate.wait_parked(count, timeout)
    except RuntimeError:
        return False
    return True


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


def meet_in_tool(barrier: threading.Barrier | None, timeout: float = 30.0) -> None:
    """Inside tool code: wait until every request of the test is in its tool call (bounded).

    Not on an event loop's thread (CrewAI 1.12 runs ``akickoff`` tools there): waiting would
    stop the other runs, which are all in flight in that loop anyway.
    """
    if barrier is None or _on_event_loop():
        return
    try:
        barrier.wait(timeout=timeout)
    except threading.BrokenBarrierError:
        pass


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def one_task_crew(
    fake_provider: Any,
    marker: str,
    *,
    llm: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    tools: list[Any] | None = None,
    crew: dict[str, Any] | None = None,
) -> Any:
    """A crew named after ``marker`` (its kickoff span says which run it is)."""
    from crewai import Crew, Task

    worker = make_agent(
        make_llm(fake_provider.base_url, **(llm or {})),
        "Analyst",
        tools=tools or [],
        **{"max_retry_limit": 0, **(agent or {})},
    )
    job = Task(
        name="analyse",
        description=f"Analyse [[{marker}]] using the tools you have.",
        expected_output="One sentence.",
        agent=worker,
        **(task or {}),
    )
    return Crew(name=marker, agents=[worker], tasks=[job], **(crew or {}))


def run_requests(
    fake_provider: Any, make_tool: Callable[[str], Any], tags: list[str], asyncio_tags: list[str]
) -> None:
    """Run ``tags`` in threads (``kickoff``) and ``asyncio_tags`` with ``akickoff``, at once."""

    def crew_for(tag: str) -> Any:
        return research_crew(lambda: make_llm(fake_provider.base_url), tools=[make_tool(tag)])

    def threaded(tag: str) -> None:
        with crew_otel.request(f"req-{tag}"):
            crew_for(tag).kickoff(inputs={"topic": f"[[{tag}]]"})

    async def one_async(tag: str) -> None:
        with crew_otel.request(f"req-{tag}"):
            await crew_for(tag).akickoff(inputs={"topic": f"[[{tag}]]"})

    async def all_async() -> None:
        await asyncio.gather(*(one_async(tag) for tag in asyncio_tags))

    with ThreadPoolExecutor(max_workers=len(tags) + 1) as callers:
        futures = [callers.submit(threaded, tag) for tag in tags]
        if asyncio_tags:
            futures.append(callers.submit(asyncio.run, all_async()))
        for future in futures:
            future.result()
