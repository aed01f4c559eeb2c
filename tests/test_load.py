"""Concurrent runs with provider faults: the invariants that hold however runs interleave.

Every span's request ID is its trace's, no span is lost (the spans account for every request
the provider saw, every task and tool CrewAI ran), no span is orphaned, the in-flight gauge
returns to 0 and the instrumentation raised nothing (strict mode turns any internal error into
a failure).

In CI: threaded kickoffs all parked in their first model call at once (a gate of the loopback
provider), akickoffs on one event loop run to their end meanwhile, with scripted faults
(persistent 500s, a 429, a dropped connection). The random-fault load (200 threaded kickoffs
and 100 akickoffs, 20% random faults, the provider in its own process) is a benchmark of the
same invariants: ``make load`` (a fixed seed; ``CREW_OTEL_LOAD_SEED=random`` or a number
explores others).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from crew_otel import safety
from crew_otel.testing import FakeOpenAIProvider, Fault, RandomFaults
from crew_otel.testing.crews import make_agent, make_llm, research_crew
from tests.provider_process import ProviderProcess
from tests.spans import REQUEST_ID, Spans, attr
from tests.workloads import FAST

THREADED = 200
ASYNC = 100
#: The gated test: threaded kickoffs parked together, akickoffs meanwhile.
GATED_THREADED = 16
GATED_ASYNC = 8
#: A bound against a broken test (a run that never reaches the gate), not a measurement.
WAIT_S = 120.0
FAULT_RATE = 0.2
#: The model client's timeout (connecting included): long enough that a client thread waiting
#: for the GIL among 300 busy ones on a loaded 2-core machine does not time out a connection the
#: kernel already made; a timeout fault hangs just longer.
CLIENT_TIMEOUT = 5.0


def load_seed() -> int:
    raw = os.environ.get("CREW_OTEL_LOAD_SEED", "20261128")
    return random.randrange(2**32) if raw == "random" else int(raw)


class Executed:
    """What CrewAI ran, counted from its own event bus and the tool bodies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tools = 0
        self.tasks = Counter[str]()

    def tool(self):
        from crewai.tools import tool

        @tool("counted_lookup")
        def counted_lookup(query: str) -> str:
            """Look up facts (counted)."""
            with self.lock:
                self.tools += 1
            return f"FACTS about {query}"

        return counted_lookup


def crew_for(provider: ProviderProcess | FakeOpenAIProvider, executed: Executed):
    def llm():
        return make_llm(provider.base_url, timeout=CLIENT_TIMEOUT)

    researcher = make_agent(llm(), "Researcher", tools=[executed.tool()])
    return research_crew(llm, researcher=researcher)


ALLOWED_FAILURES = frozenset(
    {
        "InternalServerError",
        "RateLimitError",
        "ConnectionError",
        "APITimeoutError",
        "APIConnectionError",
    }
)


def script_faults(provider: FakeOpenAIProvider, marker: str, i: int) -> None:
    """Run ``i``'s faults after its first model call: every fourth run's provider fails for
    good (500s outlast every retry), others get a 429, a dropped connection, or nothing."""
    kind = i % 4
    if kind == 0:
        provider.script(*[Fault.error(500, FAST)] * 9, key=marker)
    elif kind == 1:
        provider.script(Fault.error(429, FAST), key=marker)
    elif kind == 2:
        provider.script(Fault.disconnect(), key=marker)


def check_invariants(
    spans: Spans, runs: int, provider_requests: int, executed: Executed, metric_reader
) -> None:
    """What must hold after ``runs`` concurrent kickoffs, however they interleaved."""
    roots = spans.named("invoke_workflow")
    assert len(roots) == runs
    assert len(spans.traces()) == runs, "one trace per kickoff"
    assert spans.orphans() == [], "no span lost its parent"
    for trace_id, members in spans.traces().items():
        (root,) = [s for s in members if s.parent is None]
        assert {attr(s, REQUEST_ID) for s in members} == {attr(root, REQUEST_ID)}, trace_id
    assert len({attr(r, REQUEST_ID) for r in roots}) == runs

    http_attempts = [s for s in spans.named("POST") if spans.parent(s).name.startswith("chat ")]
    errors = Counter(attr(s, "error.type") for s in http_attempts)
    # attempts that never connected (the client's timeout covers connecting too) never reached
    # the provider; every other attempt is one request the provider saw
    never_connected = errors["ConnectTimeout"] + errors["ConnectError"]
    assert len(http_attempts) - never_connected == provider_requests, errors
    assert never_connected <= 0.02 * len(http_attempts), errors
    tool_spans = spans.named("execute_tool counted_lookup")
    assert len(tool_spans) == executed.tools, "every tool execution has its span"
    task_spans = len(spans.named("crewai.task"))
    assert task_spans == sum(executed.tasks.values()), "every task CrewAI started has its span"

    active = [
        point.value
        for rm in metric_reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "crew_otel.kickoffs.active"
        for point in metric.data.data_points
    ]
    assert sum(active) == 0, "nothing left in flight"
    assert safety._reported == set(), "the instrumentation reported no internal error"


def test_concurrent_runs_with_faults_keep_every_invariant(otel, metric_reader, fake_provider):
    """Threaded kickoffs parked together in their first model calls while akickoffs run to
    their end on one event loop; scripted faults: the load test's invariants, as facts."""
    from crewai.events import crewai_event_bus
    from crewai.events.types.task_events import TaskStartedEvent

    executed = Executed()
    gate = fake_provider.gate("all-threads-in-flight")
    threaded_markers = [f"t{i}" for i in range(GATED_THREADED)]
    async_markers = [f"a{i}" for i in range(GATED_ASYNC)]
    for i, marker in enumerate(threaded_markers):
        fake_provider.script(Fault.hold(gate.name, seconds=WAIT_S), key=marker)
        script_faults(fake_provider, marker, i)
    for i, marker in enumerate(async_markers):
        script_faults(fake_provider, marker, i)
    safety.reset_reported_errors()

    def run(marker: str) -> str:
        try:
            crew_for(fake_provider, executed).kickoff(inputs={"topic": f"[[{marker}]]"})
            return "ok"
        except Exception as exc:  # the scripted faults outlast every retry layer
            return type(exc).__name__

    async def on_one_loop() -> list:
        return await asyncio.gather(
            *(
                crew_for(fake_provider, executed).akickoff(inputs={"topic": f"[[{marker}]]"})
                for marker in async_markers
            ),
            return_exceptions=True,
        )

    with crewai_event_bus.scoped_handlers():

        @crewai_event_bus.on(TaskStartedEvent)
        def count_task(source, event) -> None:
            with executed.lock:
                executed.tasks[getattr(event, "task_name", None) or "task"] += 1

        with ThreadPoolExecutor(max_workers=GATED_THREADED) as pool:
            threaded_runs = [pool.submit(run, marker) for marker in threaded_markers]
            try:
                # every threaded run is in flight, held inside its first model call...
                gate.wait_parked(GATED_THREADED, WAIT_S)
                # ...while the akickoffs run from start to end
                asynchronous = asyncio.run(on_one_loop())
            finally:
                gate.open()
            threaded = [future.result(WAIT_S) for future in threaded_runs]
        crewai_event_bus.flush(timeout=30)

    outcomes = Counter(threaded) + Counter(
        "ok" if not isinstance(r, BaseException) else type(r).__name__ for r in asynchronous
    )
    # the persistent 500s fail their runs; the client retries past a 429 and a dropped
    # connection
    failing = len(range(0, GATED_THREADED, 4)) + len(range(0, GATED_ASYNC, 4))
    assert outcomes == {
        "InternalServerError": failing,
        "ok": GATED_THREADED + GATED_ASYNC - failing,
    }
    provider_requests = len([r for r in fake_provider.requests if r.path.endswith("/completions")])
    check_invariants(
        Spans(otel.get_finished_spans()),
        GATED_THREADED + GATED_ASYNC,
        provider_requests,
        executed,
        metric_reader,
    )


@pytest.mark.load
def test_load_with_random_faults(otel, metric_reader):
    from crewai.events import crewai_event_bus
    from crewai.events.types.task_events import TaskStartedEvent

    seed = load_seed()
    print(f"load seed {seed}")
    executed = Executed()
    faults = RandomFaults(
        error_rate=FAULT_RATE * 0.5,
        rate_limit_rate=FAULT_RATE * 0.3,
        timeout_rate=FAULT_RATE * 0.2,
        timeout_seconds=CLIENT_TIMEOUT + 0.5,
        seed=seed,
    )
    safety.reset_reported_errors()
    with crewai_event_bus.scoped_handlers():

        @crewai_event_bus.on(TaskStartedEvent)
        def count_task(source, event) -> None:
            with executed.lock:
                executed.tasks[getattr(event, "task_name", None) or "task"] += 1

        with ProviderProcess(random_faults=faults) as provider:

            def run(i: int) -> str:
                try:
                    crew_for(provider, executed).kickoff(inputs={"topic": f"[[t{i}]]"})
                    return "ok"
                except Exception as exc:  # provider faults may outlast every retry layer
                    return type(exc).__name__

            with ThreadPoolExecutor(max_workers=THREADED) as pool:
                threaded = list(pool.map(run, range(THREADED)))

            async def main() -> list:
                return await asyncio.gather(
                    *(
                        crew_for(provider, executed).akickoff(inputs={"topic": f"[[a{i}]]"})
                        for i in range(ASYNC)
                    ),
                    return_exceptions=True,
                )

            asynchronous = asyncio.run(main())
            provider_requests = provider.request_count()
        crewai_event_bus.flush(timeout=30)

    outcomes = Counter(threaded) + Counter(
        "ok" if not isinstance(r, BaseException) else type(r).__name__ for r in asynchronous
    )
    print(f"outcomes {dict(outcomes)}; provider requests {provider_requests}")
    assert set(outcomes) - {"ok"} <= ALLOWED_FAILURES, outcomes
    check_invariants(
        Spans(otel.get_finished_spans()),
        THREADED + ASYNC,
        provider_requests,
        executed,
        metric_reader,
    )
