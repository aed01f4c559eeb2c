"""Cross-talk: a run that received another in-flight request's data is flagged where the data
entered (a tool result, a model request, the output), whatever carried it there.

Every CrewAI object is built per request unless a test shares one on purpose; overlap comes from
barriers in tool code and gates in the loopback provider, never from timing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import crew_otel
from crew_otel.diagnosis.crosstalk import CrosstalkDetector, marks_in_text, marks_in_value
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr
from tests.support.metrics import points, total
from tests.workloads import meet_in_tool, wait_parked_or_done

EVENT = "crew_otel.crosstalk"
N = 8
_TICKET = re.compile(r"TCK-\d{5}")


# --- the rule: what is a mark ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "token",
    [
        "TCK-48213",
        "ORD-5566-A",
        "jane.doe@example.com",
        "550e8400-e29b-41d4-a716-446655440000",
        "1234567890",
        "ACC/2024/99812",
    ],
)
def test_identifiers_are_marks(token):
    assert len(marks_in_text(f"Customer wrote about {token}, please help.")) == 1


@pytest.mark.parametrize(
    "token", ["2026-12-06", "06.12.2026", "1.15.30", "3.14159", "2024", "gpt-4o-mini", "AB-12"]
)
def test_dates_versions_short_numbers_and_words_are_not(token):
    assert marks_in_text(f"As of {token} the customer asked for help.") == set()


def test_marks_are_found_through_nested_inputs_and_compared_case_blind():
    inputs = {
        "ticket": {"id": "TCK-48213", "history": ["ORD-5566-A", ("x", 12345678)]},
        "customer": "Jane <JANE.DOE@example.com>",
    }
    found = marks_in_value(inputs)
    assert len(found) == 4
    assert marks_in_text("tck-48213 jane.doe@EXAMPLE.com") <= found


# --- the detector on its own: in flight only, nobody's marks, what it keeps ---------------------
@pytest.fixture
def spans_and_tracer():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("test")


def test_detector_flags_only_data_of_a_run_in_flight_at_the_same_time(spans_and_tracer):
    exporter, tracer = spans_and_tracer
    counted: list[tuple[str, str]] = []
    detector = CrosstalkDetector(lambda source, workflow: counted.append((source, workflow)))
    a_span, b_span, c_span = (tracer.start_span(f"invoke_workflow {n}") for n in "abc")
    end_a = detector.start_run("a", {"t": "TCK-10001", "p": "ACME-2000X"}, a_span, "wf")
    end_b = detector.start_run("b", {"t": "TCK-10002", "p": "ACME-2000X"}, b_span, "wf")
    tool = tracer.start_span("execute_tool")
    # a's ticket in b's tool result: foreign; the product both carry: nobody's; b's own: fine
    detector.check("b", ["TCK-10001 ACME-2000X TCK-10002"], "tool_result", tool)
    detector.check("b", ["again TCK-10001"], "tool_result", tool)
    tool.end()
    end_a()
    assert detector.runs_tracked == 2, "a ended, but b overlapped it and is in flight"
    end_b()
    assert detector.runs_tracked == 0, "nothing is kept once no overlapping run is in flight"
    # c starts after a ended: a's data in c is not cross-talk between runs in flight
    end_a2 = detector.start_run("a", {"t": "TCK-10001"}, a_span, "wf")
    end_a2()
    end_c = detector.start_run("c", {"t": "TCK-10003"}, c_span, "wf")
    detector.check("c", ["TCK-10001"], "output", c_span)
    end_c()
    for span in (a_span, b_span, c_span):
        span.end()
    events = [(s.name, e) for s in exporter.get_finished_spans() for e in s.events]
    assert [name for name, _ in events] == ["execute_tool", "execute_tool"]
    for _, event in events:
        assert event.name == EVENT
        assert dict(event.attributes or {}) == {
            "crew_otel.crosstalk.source": "tool_result",
            "crew_otel.crosstalk.other_request_ids": ("a",),
            "crew_otel.crosstalk.marks": 1,
        }
    flagged = {s.name: attr(s, "crew_otel.crosstalk") for s in exporter.get_finished_spans()}
    assert flagged["invoke_workflow b"] is True
    assert flagged["invoke_workflow a"] is None
    assert flagged["invoke_workflow c"] is None
    assert counted == [("tool_result", "wf")], "counted once per run and source"


def test_a_run_alone_is_never_checked(spans_and_tracer):
    exporter, tracer = spans_and_tracer
    detector = CrosstalkDetector()
    span = tracer.start_span("invoke_workflow")
    end = detector.start_run("a", {"t": "TCK-10001"}, span, "wf")
    detector.check("a", ["TCK-99999 TCK-10001"], "output", span)
    detector.check(None, ["TCK-10001"], "output", span)
    end()
    span.end()
    assert [e for s in exporter.get_finished_spans() for e in s.events] == []


# --- real CrewAI: the seed's bug, a shared crew, the fixed service -------------------------------
CURRENT_TICKET: dict[str, str | None] = {"ticket": None}
_gate: dict[str, threading.Barrier] = {}
RETURNED: dict[str, str] = {}


def handle_ticket(query: str) -> str:
    """Look the ticket up (the seed's bug: the current ticket lives in a module variable)."""
    CURRENT_TICKET["ticket"] = query
    meet_in_tool(_gate.get("barrier"))  # every request wrote; each now reads the last one's
    answer = f"Status of {CURRENT_TICKET['ticket']}: open"
    own = _TICKET.search(query)
    if own is not None:
        RETURNED[own.group(0)] = answer
    return answer


def own_ticket_only(query: str) -> str:
    """The fixed tool: per-call state only."""
    meet_in_tool(_gate.get("barrier"))
    return f"Status of {query}: open"


def function_tool(function: Callable[[str], str]) -> Any:
    from crewai.tools import tool

    return tool(function.__name__)(function)


def _ticket(i: int) -> str:
    return f"TCK-{48210 + i}"


def _inputs(i: int, extra: str = "") -> dict[str, str]:
    return {"topic": f"[[{_ticket(i)}]]{extra}"}


def run_threads(fake_provider, tool: Callable[[str], str], extra: str = "") -> list[str]:
    _gate["barrier"] = threading.Barrier(N)

    def run(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = research_crew(
                lambda: make_llm(fake_provider.base_url), tools=[function_tool(tool)]
            )
            return str(crew.kickoff(inputs=_inputs(i, extra)).raw)

    with ThreadPoolExecutor(max_workers=N) as pool:
        return list(pool.map(run, range(N)))


def run_async(fake_provider, tool: Callable[[str], str], extra: str = "") -> list[str]:
    _gate["barrier"] = threading.Barrier(N)

    async def one(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = research_crew(
                lambda: make_llm(fake_provider.base_url), tools=[function_tool(tool)]
            )
            return str((await crew.akickoff(inputs=_inputs(i, extra))).raw)

    async def main() -> list[str]:
        # CrewAI runs agent steps (and tools) in the loop's default executor: room for all N
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=N))
        return list(await asyncio.gather(*(one(i) for i in range(N))))

    return asyncio.run(main())


def crosstalk_events(spans: Spans, source: str | None = None) -> list[tuple[Any, dict]]:
    found = [
        (span, dict(event.attributes or {}))
        for span in spans.all
        for event in span.events
        if event.name == EVENT
    ]
    return [(s, e) for s, e in found if source is None or e["crew_otel.crosstalk.source"] == source]


def _owner(ticket: str) -> str:
    return f"req-{int(ticket[4:]) - 48210}"


@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_a_ticket_kept_in_a_module_variable_flags_exactly_the_runs_it_reached(
    otel, fake_provider, metric_reader, caplog, runner
):
    RETURNED.clear()
    with caplog.at_level(logging.WARNING, logger="crew_otel"):
        answers = runner(fake_provider, handle_ticket)
    assert len(answers) == N
    # Which runs got another's ticket back is the application's own outcome: read it off the tool.
    expected: dict[str, set[str]] = {}
    for own, answer in RETURNED.items():
        theirs = set(_TICKET.findall(answer)) - {own}
        if theirs:
            expected[_owner(own)] = {_owner(t) for t in theirs}
    if runner is run_threads:
        assert len(expected) == N - 1, "the barrier makes every request but the last read another's"
    spans = Spans(otel.get_finished_spans())
    flagged = {}
    for span, event in crosstalk_events(spans, "tool_result"):
        assert span.name == "execute_tool handle_ticket"
        flagged[attr(span, REQUEST_ID)] = set(event["crew_otel.crosstalk.other_request_ids"])
        assert event["crew_otel.crosstalk.marks"] == 1
    assert flagged == expected
    kickoffs = {attr(s, REQUEST_ID): s for s in spans.named("invoke_workflow")}
    assert {r for r, s in kickoffs.items() if attr(s, "crew_otel.crosstalk")} == set(expected)
    found = points(metric_reader).get("crew_otel.crosstalk", [])
    assert total(found, crew_otel__crosstalk__source="tool_result") == len(expected)
    # Nothing identifying leaves the process: no ticket in any event, attribute or log line.
    for span in spans.all:
        for event in span.events:
            assert not _TICKET.search(str(dict(event.attributes or {})))
    warnings = [m for m in caplog.messages if "received data of request" in m]
    assert len(warnings) == sum(len(v) for v in expected.values())
    assert not [m for m in warnings if _TICKET.search(m)]


@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_the_fixed_service_with_shared_words_is_never_flagged(
    otel, fake_provider, metric_reader, runner
):
    answers = runner(fake_provider, own_ticket_only, extra=" for the ACME-2000X router v1.15.30")
    assert len(answers) == N
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("execute_tool")) >= N
    assert crosstalk_events(spans) == []
    assert not [s for s in spans.all if attr(s, "crew_otel.crosstalk")]
    assert "crew_otel.crosstalk" not in points(metric_reader)


def test_a_run_that_ended_before_another_began_is_not_cross_talk(otel, fake_provider):
    RETURNED.clear()
    _gate.clear()
    for i in range(2):  # one after the other: the second reads the first's leftover ticket
        with crew_otel.request(f"req-{i}"):
            crew = research_crew(
                lambda: make_llm(fake_provider.base_url), tools=[function_tool(handle_ticket)]
            )
            crew.kickoff(inputs=_inputs(i))
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("invoke_workflow")) == 2
    assert crosstalk_events(spans) == []


def test_a_shared_crew_carries_the_other_requests_ticket_into_a_model_call(
    otel, fake_provider, metric_reader
):
    """One Crew object kicked off by two requests: the second interpolates its inputs into the
    shared tasks while the first is parked inside a model call; the first's later model calls
    and its answer carry the second's ticket."""
    shared = research_crew(lambda: make_llm(fake_provider.base_url))
    fake_provider.script(Fault.hold("first"), key=_ticket(1))
    fake_provider.script(Fault.hold("second"), key=_ticket(2))
    first_gate, second_gate = fake_provider.gate("first"), fake_provider.gate("second")

    def kickoff(i: int) -> object:
        with crew_otel.request(f"req-{i}"):
            return shared.kickoff(inputs=_inputs(i))

    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            first = pool.submit(kickoff, 1)
            first_gate.wait_parked(1)  # the first run is inside its first model call
            second = pool.submit(kickoff, 2)
            # The second has interpolated its inputs: it is parked in a model call of its own
            # (CrewAI 1.12) or has failed on the busy agent (>= 1.14).
            wait_parked_or_done(second_gate, [second])
        finally:
            first_gate.open()
            second_gate.open()
        first.result(timeout=120)
        try:
            second.result(timeout=120)
        except RuntimeError:
            pass  # "Executor is already running" (CrewAI >= 1.14)
    spans = Spans(otel.get_finished_spans())
    into_model = [
        (s, e) for s, e in crosstalk_events(spans, "model_input") if attr(s, REQUEST_ID) == "req-1"
    ]
    assert into_model, "the first run's model call carried the second's ticket"
    for span, event in into_model:
        assert span.name.startswith("chat ")
        assert event["crew_otel.crosstalk.other_request_ids"] == ("req-2",)
    kickoff_span = next(s for s in spans.named("invoke_workflow") if attr(s, REQUEST_ID) == "req-1")
    assert attr(kickoff_span, "crew_otel.crosstalk") is True
    found = points(metric_reader)["crew_otel.crosstalk"]
    assert total(found, crew_otel__crosstalk__source="model_input") >= 1


def test_detect_crosstalk_false_turns_it_off(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider
):
    crew_otel.uninstrument()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider, meter_provider=meter_provider, detect_crosstalk=False
    )
    try:
        run_threads(fake_provider, handle_ticket)
    finally:
        crew_otel.uninstrument()
    assert crosstalk_events(Spans(span_exporter.get_finished_spans())) == []
