"""Cancellation and BaseExceptions: every span ends, parents after children, one origin.

``asyncio.wait_for(crew.akickoff(...), t)`` expiring while a model call is in flight cancels the
run's coroutines, but CrewAI's agent step keeps running in its ``asyncio.to_thread`` worker until
the model answers. The trace must still be whole: every started span ends once, no span outlives
its parent, nothing is exported without its parent, and ``crew_otel.kickoffs.active`` returns to
0. A cancellation is not a failure inside the run: no span becomes an error origin for it. A
``KeyboardInterrupt`` raised by a tool stops the event loop, and asyncio cancels every other task
of the loop: the tool is the one origin, and the caller gets the same exception object as
without instrumentation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import crew_otel
from crew_otel import metrics as m
from crew_otel.safety import reset_reported_errors
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import Spans, attr
from tests.support.metrics import points

#: What the caller got: exception type, whether it is the tool's object, type of __context__.
Outcome = tuple[str, bool, str]
ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"
#: A bound against a broken test (a run that never reaches its model call), not a measurement.
PARK_TIMEOUT = 60.0


class StartEndTracker(SpanProcessor):
    """Counts, per span, how often it started and ended (what the exporter cannot tell)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: dict[int, str] = {}
        self.ended: Counter[int] = Counter()

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        with self._lock:
            self.started[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended[span.context.span_id] += 1

    def open_spans(self) -> list[str]:
        with self._lock:
            return [name for sid, name in self.started.items() if self.ended[sid] == 0]

    def ended_twice(self) -> list[str]:
        with self._lock:
            return [name for sid, name in self.started.items() if self.ended[sid] > 1]


class Tracked:
    """An instrumented CrewAI whose spans are exported and counted at start and end."""

    def __init__(
        self,
        exporter: InMemorySpanExporter,
        tracker: StartEndTracker,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
    ) -> None:
        self.exporter = exporter
        self.tracker = tracker
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider

    def instrument(self) -> None:
        crew_otel.instrument(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def spans(self) -> Spans:
        """What was exported. Call it once every thread that ran CrewAI code has finished:
        ``asyncio.run`` returns only when its loop's worker threads (where a cancelled run's
        model call goes on until the provider answers) are done, and the tests join theirs."""
        return Spans(self.exporter.get_finished_spans())


@pytest.fixture
def tracked(meter_provider: MeterProvider) -> Iterator[Tracked]:
    """CrewAI instrumented with a tracer provider of its own (exporter + start/end tracker)."""
    exporter = InMemorySpanExporter()
    tracker = StartEndTracker()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer_provider.add_span_processor(tracker)
    crew_otel.uninstrument()
    reset_reported_errors()
    tracked = Tracked(exporter, tracker, tracer_provider, meter_provider)
    tracked.instrument()
    try:
        yield tracked
    finally:
        crew_otel.uninstrument()
        tracer_provider.shutdown()


def active_kickoffs(reader: InMemoryMetricReader) -> list[float]:
    return [p.value for p in points(reader)[m.KICKOFFS_ACTIVE]]


def assert_whole_trace(tracked: Tracked, spans: Spans) -> None:
    """Every span ended once, no orphan, no child outliving its parent."""
    assert tracked.tracker.open_spans() == [], "spans started but never ended"
    assert tracked.tracker.ended_twice() == []
    assert len(spans.all) == len(tracked.tracker.started)
    assert [s.name for s in spans.orphans()] == [], "exported without their parent"
    for span in spans.all:
        parent = spans.parent(span)
        if parent is not None:
            assert parent.end_time >= span.end_time, f"{parent.name} ended before {span.name}"


def trace_of(spans: Spans, provider: FakeOpenAIProvider, marker: str) -> list[ReadableSpan]:
    """The spans of the run whose model requests carried ``[[marker]]`` (by traceparent)."""
    parents = {r.traceparent for r in provider.requests if marker in r.markers}
    trace_ids = {int(tp.split("-")[1], 16) for tp in parents if tp}
    assert len(trace_ids) == 1, (marker, parents)
    return [s for s in spans.all if s.context.trace_id in trace_ids]


def assert_cancelled_run(members: list[ReadableSpan]) -> None:
    """A run cancelled during its first model call: whole, and no error origin."""
    names = {s.name.split(" ", 1)[0] for s in members}
    assert {"invoke_workflow", "crewai.task", "invoke_agent", "crewai.agent.step"} <= names
    assert {"chat", "POST"} <= names, "the model call in flight when the run was cancelled"
    (root,) = [s for s in members if s.name.startswith("invoke_workflow")]
    assert root.status.status_code is StatusCode.ERROR
    assert attr(root, "error.type") == "CancelledError"
    (agent,) = [s for s in members if s.name.startswith("invoke_agent")]
    assert attr(agent, "error.type") == "CancelledError"
    assert [s.name for s in members if attr(s, ORIGIN)] == [], "a cancellation is no origin"


def cancelled_runs(
    provider: FakeOpenAIProvider, markers: list[str], timeouts: list[float]
) -> Callable[[], Any]:
    """A coroutine factory: one ``wait_for(akickoff)`` per marker, all concurrently.

    The provider parks each run's first model request at a gate of its own; the timeout starts
    once it is parked and the gate opens only when the timeout has expired, so the run is
    cancelled while that model call is in flight, however slow the machine is.
    """
    gates = {marker: provider.gate(f"cancel:{marker}") for marker in markers}
    for marker, gate in gates.items():
        provider.script(Fault.hold(gate.name), key=marker)

    async def run(marker: str, timeout: float, waiter: ThreadPoolExecutor) -> BaseException | None:
        crew = research_crew(lambda: make_llm(provider.base_url))
        gate = gates[marker]
        kickoff = asyncio.ensure_future(crew.akickoff(inputs={"topic": f"[[{marker}]]"}))
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(waiter, gate.wait_parked, 1, PARK_TIMEOUT)
            try:
                await asyncio.wait_for(kickoff, timeout)
            except BaseException as exc:
                return exc
        finally:
            gate.open()
        return None

    async def main() -> list[BaseException | None]:
        # not the loop's executor for the waits: the runs' steps use that one
        with ThreadPoolExecutor(len(markers)) as waiter:
            runs = (run(k, t, waiter) for k, t in zip(markers, timeouts, strict=True))
            return list(await asyncio.gather(*runs))

    return main


def origin_error_types(reader: InMemoryMetricReader) -> list[str]:
    return [p.attributes.get("error.type") for p in points(reader)[m.ERROR_ORIGINS]]


def test_wait_for_timeouts_during_model_calls_close_every_span(
    tracked, fake_provider, metric_reader
):
    markers = [f"wf{i}" for i in range(4)]
    timeouts = [0.05, 0.1, 0.2, 0.3]

    async def main() -> tuple[list[BaseException | None], str]:
        finishing = research_crew(lambda: make_llm(fake_provider.base_url))
        cancelled = cancelled_runs(fake_provider, markers, timeouts)
        results, done = await asyncio.gather(
            cancelled(), finishing.akickoff(inputs={"topic": "[[fine]]"})
        )
        return results, done.raw

    results, raw = asyncio.run(main())
    assert all(isinstance(r, TimeoutError) for r in results), results
    assert "[[fine]]" in raw, "a sibling run in the same loop is unaffected"
    spans = tracked.spans()
    assert_whole_trace(tracked, spans)
    for marker in markers:
        assert_cancelled_run(trace_of(spans, fake_provider, marker))
    fine = trace_of(spans, fake_provider, "fine")
    assert [s.name for s in fine if s.status.status_code is StatusCode.ERROR] == []
    assert active_kickoffs(metric_reader) == [0]
    assert "CancelledError" not in origin_error_types(metric_reader)


def test_wait_for_timeouts_in_loops_of_several_threads_close_every_span(
    tracked, fake_provider, metric_reader
):
    markers = [f"th{i}" for i in range(4)]
    results: dict[int, list[BaseException | None]] = {}

    def in_thread(i: int) -> None:
        pair = markers[2 * i : 2 * i + 2]
        results[i] = asyncio.run(cancelled_runs(fake_provider, pair, [0.05 + 0.1 * i, 0.3])())

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    got = [r for i in range(2) for r in results[i]]
    assert len(got) == 4
    assert all(isinstance(r, TimeoutError) for r in got), got
    spans = tracked.spans()
    assert_whole_trace(tracked, spans)
    for marker in markers:
        assert_cancelled_run(trace_of(spans, fake_provider, marker))
    assert active_kickoffs(metric_reader) == [0]
    assert "CancelledError" not in origin_error_types(metric_reader)


def interrupted_loops(provider: FakeOpenAIProvider, tag: str) -> tuple[list[Outcome], str]:
    """Two threads, each an event loop running a kickoff whose tool raises KeyboardInterrupt,
    and a third thread running an ordinary kickoff meanwhile. Returns, per interrupted thread,
    what ``asyncio.run`` raised (type, whether it is the tool's own object, the type of its
    ``__context__``), and the ordinary run's output.
    """
    from crewai.tools import tool

    outcomes: dict[int, Outcome] = {}
    sibling: list[str] = []
    # The ordinary run is inside its first model call until both interrupted loops ended.
    gate = provider.gate(f"{tag}sib")
    provider.script(Fault.hold(gate.name), key=f"{tag}sib")

    def interrupted(i: int) -> None:
        raised: list[BaseException] = []

        @tool("interrupting_lookup")
        def interrupting_lookup(query: str) -> str:
            """Look up facts about a topic."""
            exc = KeyboardInterrupt(f"stop {i}")
            raised.append(exc)
            raise exc

        crew = research_crew(lambda: make_llm(provider.base_url), tools=[interrupting_lookup])
        try:
            asyncio.run(crew.akickoff(inputs={"topic": f"[[{tag}ki{i}]]"}))
        except BaseException as exc:
            context = type(exc.__context__).__name__
            outcomes[i] = (type(exc).__name__, bool(raised) and exc is raised[0], context)
        else:
            outcomes[i] = ("nothing", False, "")

    def ordinary() -> None:
        crew = research_crew(lambda: make_llm(provider.base_url))
        sibling.append(asyncio.run(crew.akickoff(inputs={"topic": f"[[{tag}sib]]"})).raw)

    threads = [threading.Thread(target=interrupted, args=(i,)) for i in range(2)]
    ordinary_thread = threading.Thread(target=ordinary)
    ordinary_thread.start()
    try:
        gate.wait_parked(1, PARK_TIMEOUT)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        gate.open()
    ordinary_thread.join(timeout=30)
    return [outcomes[i] for i in range(2)], sibling[0]


def test_keyboard_interrupt_in_a_tool_under_akickoff_has_one_origin(
    tracked, fake_provider, metric_reader
):
    crew_otel.uninstrument()
    plain, plain_sibling = interrupted_loops(fake_provider, "plain")
    assert plain == [("KeyboardInterrupt", True, "NoneType")] * 2
    assert "[[plainsib]]" in plain_sibling
    tracked.instrument()
    fake_provider.reset()
    outcomes, sibling = interrupted_loops(fake_provider, "otel")
    assert outcomes == plain, "the caller gets the same as without instrumentation"
    assert "[[otelsib]]" in sibling

    spans = tracked.spans()
    assert_whole_trace(tracked, spans)
    flagged = [s for s in spans.all if attr(s, ORIGIN)]
    assert [s.name for s in flagged] == ["execute_tool interrupting_lookup"] * 2
    for origin in flagged:
        assert attr(origin, "error.type") == "KeyboardInterrupt"
        assert attr(origin, RECOVERED) is False, "CrewAI does not hand a BaseException back"
    for i in range(2):
        run = trace_of(spans, fake_provider, f"otelki{i}")
        assert sum(1 for s in run if attr(s, ORIGIN)) == 1
        (root,) = [s for s in run if s.name.startswith("invoke_workflow")]
        assert root.status.status_code is StatusCode.ERROR
    ordinary = trace_of(spans, fake_provider, "otelsib")
    assert [s.name for s in ordinary if s.status.status_code is StatusCode.ERROR] == []
    origin_points = points(metric_reader)[m.ERROR_ORIGINS]
    assert [(p.attributes, p.value) for p in origin_points] == [
        (
            {
                "crew_otel.origin.operation": "execute_tool",
                "error.type": "KeyboardInterrupt",
                "crew_otel.error.recovered": "false",
            },
            2,
        )
    ]
    assert active_kickoffs(metric_reader) == [0]
