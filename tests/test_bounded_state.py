"""Bounded metric state for unbounded names (``ticket-{id}`` flows, per-request tool names).

Real CrewAI Flows named per request, each calling a real CrewAI tool named per request, run
concurrently: the in-flight bookkeeping must not keep an entry per name once its kickoffs end
(each series reports 0 once, then disappears), and metric attribute values derived from names
are capped per attribute (the first ``MAX_NAME_VALUES`` keep their name, later ones become
``OVERFLOW_VALUE``).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from crew_otel import metrics as m
from tests.support.metrics import points

FLOWS = m.MAX_NAME_VALUES + 20


#: Flows that wait in their tool until the test sets their gate, by ticket number.
_GATES: dict[int, threading.Event] = {}


@functools.cache
def _ticket_flow_class() -> Any:
    """A Flow whose step runs a tool named ``lookup-{number}`` (real CrewAI classes)."""
    from crewai.flow.flow import Flow, start
    from crewai.tools import BaseTool

    class Lookup(BaseTool):
        name: str = "lookup"
        description: str = "Looks a ticket up."

        def _run(self, number: int) -> str:
            gate = _GATES.get(number)
            if gate is not None:
                assert gate.wait(30), "the test never released the flow"
            return f"ticket {number}"

    class TicketFlow(Flow):  # type: ignore[type-arg]
        @start()
        def answer(self) -> str:
            number = self.state["number"]
            return str(Lookup(name=f"lookup-{number}").run(number=number))

    return TicketFlow


def _kickoff(number: int, name: str | None = None) -> object:
    """Kick off a Flow named ``ticket-{number}`` (or ``name``)."""
    flow = _ticket_flow_class()()
    flow.name = name or f"ticket-{number}"
    return flow.kickoff(inputs={"number": number})


def otel_runtime() -> Any:
    """The runtime of the instrumentation the ``otel`` fixture installed."""
    import crew_otel

    runtime = crew_otel.CrewAIInstrumentor().runtime
    assert runtime is not None
    return runtime


def test_idle_workflows_report_zero_until_their_series_expires(otel, metric_reader):
    """Dashboards see the count go back to 0; the series goes once idle long enough."""
    runtime = otel_runtime()
    _kickoff(7, name="support")
    assert _active(metric_reader) == {"support": 0}
    assert _active(metric_reader) == {"support": 0}, "still reported while recently idle"
    runtime.metrics.idle_series_seconds = 0.0
    assert _active(metric_reader) == {}, "expired"
    _kickoff(8, name="support")
    assert _active(metric_reader) == {"support": 0}, "a name that runs again gets its series"


def _active(reader: InMemoryMetricReader) -> dict[str, float]:
    """``crew_otel.kickoffs.active`` series in one collection: workflow name -> value."""
    return {
        str(p.attributes["gen_ai.workflow.name"]): p.value
        for p in points(reader).get(m.KICKOFFS_ACTIVE, [])
    }


def _counts_by_name(data_points: list[Any], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for point in data_points:
        name = str(point.attributes[key])
        counts[name] = counts.get(name, 0) + point.count
    return counts


def test_ticket_flows_leave_no_series_behind_and_names_are_capped(otel, metric_reader):
    runtime = otel_runtime()
    assert runtime.metrics.idle_series_seconds == m.IDLE_SERIES_SECONDS
    runtime.metrics.idle_series_seconds = 0.0  # drop idle series at the next collection
    gate = _GATES[-1] = threading.Event()
    held = ThreadPoolExecutor(max_workers=1)
    try:
        # one flow stays in flight across the whole run: it must keep reporting 1
        running = held.submit(_kickoff, -1)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(_kickoff, range(FLOWS)))

        first = _active(metric_reader)
        assert first.pop("ticket--1") == 1, "a flow still in flight keeps its series"
        assert set(first.values()) == {0}, "ended flows report 0 once (not their last value)"
        assert len(first) <= m.MAX_NAME_VALUES + 1, "one series per capped name at most"
        assert m.OVERFLOW_VALUE in first, "names beyond the cap share the overflow series"

        assert _active(metric_reader) == {"ticket--1": 1}, "series at 0 are dropped afterwards"
        gate.set()
        running.result(timeout=30)
        assert _active(metric_reader) == {"ticket--1": 0}
        assert _active(metric_reader) == {}, "nothing left once every kickoff ended"
    finally:
        gate.set()
        held.shutdown()
        del _GATES[-1]

    found = points(metric_reader)
    for instrument, key in (
        (m.WORKFLOW_DURATION, "gen_ai.workflow.name"),
        (m.TOOL_DURATION, "gen_ai.tool.name"),
    ):
        counts = _counts_by_name(found[instrument], key)
        assert sum(counts.values()) == FLOWS + 1, instrument
        assert len(counts) == m.MAX_NAME_VALUES + 1, (instrument, len(counts))
        # every flow has its own name: all beyond the first MAX_NAME_VALUES overflow
        assert counts[m.OVERFLOW_VALUE] == FLOWS + 1 - m.MAX_NAME_VALUES, instrument


def test_long_names_are_cut_to_the_length_cap(otel, metric_reader):
    """A name longer than the cap is cut, in metric attributes as in span names."""
    _kickoff(7, name="ticket-" + "x" * 300)
    found = points(metric_reader)
    names = {str(p.attributes["gen_ai.workflow.name"]) for p in found[m.WORKFLOW_DURATION]}
    assert names == {("ticket-" + "x" * 300)[: m.MAX_NAME_VALUE_LENGTH]}
