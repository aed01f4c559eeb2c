"""One failure, one fatal origin: of two errors started in a run, only the one that reaches the
caller is ``crew_otel.error.recovered=false``.

* CrewAI's parallel native tool calls: the model asks for two tools in one message, CrewAI runs
  them in a thread pool, both raise ``KeyboardInterrupt`` (or ``SystemExit``); the caller gets one
  of the two exception objects, and CrewAI drops the other one.
* A context-window overflow (``context_length_exceeded``) with ``respect_context_window=True``
  whose summarising call overflows too: CrewAI handled the first 400 (it summarised); the
  summariser's 400 is the one that reaches the caller.

Each case runs in threads and in event loops at once, and the outcome (which exception the
caller gets) is compared with the same runs uninstrumented.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import crew_otel
from crew_otel.safety import reset_reported_errors
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr

ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"
RUNS = 3  # kickoffs in threads, and as many akickoffs, each on an event loop of its own
#: How long the two tool calls of a run wait for each other (they run at once in CrewAI's pool).
BARRIER_TIMEOUT = 20.0
JOIN_TIMEOUT = 60.0
#: What the caller got: the exception's type, and whether it is an object the run raised.
Outcome = tuple[str, bool]


class Instrumentation:
    """Switches crew_otel off (for the baseline) and on again, with the session tracer."""

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider

    def on(self) -> None:
        crew_otel.instrument(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def off(self) -> None:
        crew_otel.uninstrument()


@pytest.fixture
def instrumentation(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
) -> Iterator[Instrumentation]:
    crew_otel.uninstrument()
    reset_reported_errors()
    try:
        yield Instrumentation(otel_tracer_provider, meter_provider)
    finally:
        crew_otel.uninstrument()


def run_at_once(kickoffs: list[Callable[[], Any]]) -> list[BaseException | None]:
    """Half the kickoffs in threads, half as ``asyncio.run`` of their coroutine, each in a
    thread of its own (a ``KeyboardInterrupt``/``SystemExit`` stops its event loop); returns
    what each raised (``BaseException`` included: it is caught in its thread)."""
    outcomes: list[BaseException | None] = [None] * len(kickoffs)
    finished = [False] * len(kickoffs)

    def run(i: int) -> None:
        try:
            result = kickoffs[i]()
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: the app's outcome
            outcomes[i] = exc
        finished[i] = True

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kickoffs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert all(finished), "a run did not finish"
    return outcomes


def fatal_origins(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if attr(s, ORIGIN) is True and attr(s, RECOVERED) is False]


# --- two parallel tool calls, both raising a BaseException ------------------------------------
class InterruptingRun:
    """A one-task crew whose model asks for two calls of a tool that raises ``exc_type``."""

    def __init__(self, provider: FakeOpenAIProvider, marker: str, exc_type: type) -> None:
        from crewai import Crew, Task
        from crewai.tools import tool

        self.marker = marker
        #: Each exception the tool raised, with the (trace ID, span ID) current where it was.
        self.raised: list[tuple[BaseException, tuple[int, int]]] = []
        lock = threading.Lock()
        both_running = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

        @tool("interrupting_lookup")
        def interrupting_lookup(query: str) -> str:
            """Look up facts about a topic."""
            both_running.wait()  # the two calls of this run overlap
            exc = exc_type(f"stop {marker}")
            ctx = trace.get_current_span().get_span_context()
            with lock:
                self.raised.append((exc, (ctx.trace_id, ctx.span_id)))
            raise exc

        agent = make_agent(make_llm(provider.base_url), "Researcher", [interrupting_lookup])
        task = Task(
            description=f"Research [[{marker}]] with the lookup tool.",
            expected_output="Facts.",
            agent=agent,
        )
        self.crew = Crew(agents=[agent], tasks=[task])

    def outcome(self, exc: BaseException | None) -> Outcome:
        if exc is None:
            return ("nothing", False)
        return (type(exc).__name__, any(exc is raised for raised, _ in self.raised))

    def where_raised(self, exc: BaseException | None) -> tuple[int, int]:
        (where,) = [where for raised, where in self.raised if raised is exc]
        return where


def interrupting_runs(
    provider: FakeOpenAIProvider, tag: str, exc_type: type
) -> tuple[list[InterruptingRun], list[BaseException | None]]:
    runs = [InterruptingRun(provider, f"{tag}{i}", exc_type) for i in range(2 * RUNS)]
    kickoffs: list[Callable[[], Any]] = [run.crew.kickoff for run in runs[:RUNS]]
    kickoffs += [run.crew.akickoff for run in runs[RUNS:]]
    return runs, run_at_once(kickoffs)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_two_parallel_tool_calls_raising_have_one_fatal_origin(
    instrumentation, span_exporter, fake_provider, exc_type
):
    fake_provider.tool_calls_per_turn = 2  # CrewAI runs the two calls in parallel threads
    plain_runs, plain = interrupting_runs(fake_provider, "plain", exc_type)
    baseline = [run.outcome(exc) for run, exc in zip(plain_runs, plain, strict=True)]
    assert baseline == [(exc_type.__name__, True)] * (2 * RUNS)
    assert all(len(run.raised) == 2 for run in plain_runs), "both tool calls raised"

    instrumentation.on()
    runs, outcomes = interrupting_runs(fake_provider, "otel", exc_type)
    assert [run.outcome(exc) for run, exc in zip(runs, outcomes, strict=True)] == baseline

    traces = Spans(span_exporter.get_finished_spans()).traces()
    for run, exc in zip(runs, outcomes, strict=True):
        assert len(run.raised) == 2
        trace_id, reached = run.where_raised(exc)
        spans = traces[trace_id]
        tools = [s for s in spans if s.name == "execute_tool interrupting_lookup"]
        assert sorted(s.context.span_id for s in tools) == sorted(w[1] for _, w in run.raised)
        fatal = fatal_origins(spans)
        assert [s.context.span_id for s in fatal] == [reached], (
            "one fatal origin: the tool call whose exception reached the caller"
        )
        (dropped,) = [s for s in tools if s.context.span_id != reached]
        assert attr(dropped, "error.type") == exc_type.__name__
        assert attr(dropped, ORIGIN) is True
        assert attr(dropped, RECOVERED) is True, "CrewAI dropped this one"
        step = Spans(spans).parent(dropped)
        assert step is not None
        assert step.end_time >= dropped.end_time, "it ends before its parent"


# --- a provider's 400: a context-window overflow CrewAI handles, or not ------------------------
#: The provider's answers to a run, and how its agent handles an overflow.
REJECTIONS: dict[str, tuple[tuple[Fault, ...], bool]] = {
    # the agent's call overflows, CrewAI summarises, the summarising call overflows too
    "summary": ((Fault.context_length_exceeded(), Fault.context_length_exceeded()), True),
    # the agent's call overflows and CrewAI may not summarise: SystemExit
    "exit": ((Fault.context_length_exceeded(),), False),
    # a 400 that is no overflow
    "invalid": ((Fault.error(400),), True),
}


def rejected_crew(provider: FakeOpenAIProvider, marker: str, kind: str) -> Any:
    """One agent that does not re-run, whose model calls the provider rejects as ``kind``."""
    from crewai import Crew, Task

    faults, respect = REJECTIONS[kind]
    provider.script(*faults, key=marker)
    agent = make_agent(
        make_llm(provider.base_url), "Writer", respect_context_window=respect, max_retry_limit=0
    )
    task = Task(description=f"Write about [[{marker}]].", expected_output="text", agent=agent)
    return Crew(agents=[agent], tasks=[task])


def rejected_runs(
    provider: FakeOpenAIProvider, tag: str, kinds: list[str]
) -> list[BaseException | None]:
    """Each kind in a thread's kickoff and in an event loop's akickoff, all at once (run ``i``
    has marker ``[[<tag><i>]]``)."""
    crews = [rejected_crew(provider, f"{tag}{i}", kind) for i, kind in enumerate(kinds + kinds)]
    half = len(kinds)
    kickoffs: list[Callable[[], Any]] = [crew.kickoff for crew in crews[:half]]
    kickoffs += [crew.akickoff for crew in crews[half:]]
    return run_at_once(kickoffs)


def http_span_id(traceparent: str | None) -> tuple[int, int]:
    """(trace ID, span ID) of the HTTP span that sent a request (from its ``traceparent``)."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def rejected_spans(
    spans: Spans, provider: FakeOpenAIProvider, marker: str
) -> tuple[list[ReadableSpan], list[ReadableSpan]]:
    """The run's spans, and its HTTP spans the provider answered (in order)."""
    requests = [r for r in provider.requests if marker in r.markers]
    ids = [http_span_id(r.traceparent) for r in requests]
    (trace_id,) = {trace_id for trace_id, _ in ids}
    run = spans.traces()[trace_id]
    by_id = {s.context.span_id: s for s in run}
    return run, [by_id[span_id] for _, span_id in ids]


def test_overflow_whose_summary_overflows_too_has_one_fatal_origin(
    instrumentation, span_exporter, fake_provider
):
    kinds = ["summary"] * RUNS
    plain = rejected_runs(fake_provider, "plain", kinds)
    baseline = [type(exc).__name__ for exc in plain]
    assert baseline == ["LLMContextLengthExceededError"] * (2 * RUNS)

    fake_provider.reset()
    instrumentation.on()
    outcomes = rejected_runs(fake_provider, "otel", kinds)
    assert [type(exc).__name__ for exc in outcomes] == baseline

    spans = Spans(span_exporter.get_finished_spans())
    for i in range(2 * RUNS):
        run, (rejected, summarising) = rejected_spans(spans, fake_provider, f"otel{i}")
        assert [attr(s, "error.type") for s in (rejected, summarising)] == ["400", "400"]
        assert fatal_origins(run) == [summarising], (
            "one fatal origin: the summarising call's 400, which reached the caller"
        )
        assert attr(rejected, ORIGIN) is True
        assert attr(rejected, RECOVERED) is True, "CrewAI summarised after this 400"


def test_overflow_without_summary_and_a_400_that_is_no_overflow_have_one_fatal_origin(
    instrumentation, span_exporter, fake_provider
):
    kinds = ["exit", "invalid", "exit"]
    plain = rejected_runs(fake_provider, "plain", kinds)
    baseline = [type(exc).__name__ for exc in plain]
    assert baseline == ["SystemExit", "BadRequestError", "SystemExit"] * 2

    fake_provider.reset()
    instrumentation.on()
    outcomes = rejected_runs(fake_provider, "otel", kinds)
    assert [type(exc).__name__ for exc in outcomes] == baseline

    spans = Spans(span_exporter.get_finished_spans())
    for i, kind in enumerate(kinds + kinds):
        run, (rejected,) = rejected_spans(spans, fake_provider, f"otel{i}")
        fatal_ones = fatal_origins(run)
        assert len(fatal_ones) == 1, f"one fatal origin ({kind}): {[s.name for s in fatal_ones]}"
        (fatal,) = fatal_ones
        if kind == "exit":
            # CrewAI's SystemExit, raised in the agent's execution, is the failure
            assert fatal.name == "invoke_agent Writer"
            assert attr(fatal, "error.type") == "SystemExit"
            assert attr(rejected, RECOVERED) is True, "CrewAI handled the overflow"
        else:
            # the model call that raised the 400's exception, the request's own span
            assert fatal is spans.parent(rejected)
            assert fatal.name.startswith("chat ")
            assert attr(fatal, "error.type") == "400"
