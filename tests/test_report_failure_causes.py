"""The report on why runs failed: failed runs counted by ``crew_otel.failure.cause``.

Real CrewAI runs, concurrent (threads and ``akickoff``), against the loopback provider's
faults: the report read from their trace file counts the failed runs by cause exactly as the
``crew_otel.failures`` metric of the same runs does. Trace files written before the attribute
existed (made here with the SDK and the public names of DESIGN.md) are classified from their
error origins as before; where a run carries the attribute, the report says why from it,
naming the shared thing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from rich.console import Console

from crew_otel import attributes as a
from crew_otel import report
from crew_otel.otlp_json import encode, read_requests
from crew_otel.report.analysis import Analysis, summary
from crew_otel.testing import Fault
from tests.support.metrics import points, total
from tests.workloads import FAST, kickoff_concurrently, one_task_crew

SERVICE = "support-api-broken"
MS = 1_000_000


def run_report(spans: list[ReadableSpan], tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``crew-otel report FILE --summary-json``: the text (borders folded away), the figures
    of the file's one service."""
    trace_file, figures = tmp_path / "spans.jsonl", tmp_path / "summary.json"
    trace_file.write_text("".join(json.dumps(encode([s])) + "\n" for s in spans))
    output = io.StringIO()
    assert report.run(trace_file, Console(file=output, width=200), summary_json=figures) == 0
    text = " ".join(output.getvalue().replace("│", " ").split())
    (service,) = json.loads(figures.read_text())["services"].values()
    return text, service


# --- real runs: the report agrees with the metric ----------------------------------------------


def test_the_report_counts_failed_runs_by_cause_as_the_metric_does(
    otel, fake_provider, metric_reader, tmp_path
):
    """Two runs fail with 500s after their retries, one with 429s, two succeed; in threads and
    on one event loop at once."""
    markers = ["rc-500a", "rc-429", "rc-ok0", "rc-500b", "rc-ok1"]
    fake_provider.script(*[Fault.error(500, FAST)] * 4, key="rc-500a")
    fake_provider.script(*[Fault.error(500, FAST)] * 4, key="rc-500b")
    fake_provider.script(*[Fault.error(429, FAST)] * 12, key="rc-429")
    outcomes = kickoff_concurrently(
        lambda m: one_task_crew(fake_provider, m, llm={"max_retries": 1}), markers, 2
    )
    failed = {m for m, o in outcomes.items() if isinstance(o, BaseException)}
    assert failed == {"rc-500a", "rc-500b", "rc-429"}, outcomes

    text, figures = run_report(otel.get_finished_spans(), tmp_path)

    found = points(metric_reader)["crew_otel.failures"]
    metric = {
        cause: int(total(found, crew_otel__failure__cause=cause))
        for cause in {p.attributes[a.FAILURE_CAUSE] for p in found}
    }
    assert metric == {"provider_error": 2, "rate_limit": 1}
    assert figures["failed_runs_by_cause"] == metric
    assert list(figures["failed_runs_by_cause"]) == ["provider_error", "rate_limit"]  # most first
    assert figures["failure_shared"] == []
    assert figures["failed"] == 3
    assert "Failed runs by cause: provider_error 2, rate_limit 1" in text
    assert "failed runs by cause: provider_error 2, rate_limit 1" in figures["conclusion"]
    # every failed run says why: no sentence classified from the origins besides
    assert " began " not in figures["conclusion"]


# --- files with and without the attribute ------------------------------------------------------


class Traces:
    """Writes kickoff traces the way an instrumented service does: a kickoff, its agent span
    where the failure began (flagged shared, with the other request named)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def run(
        self,
        request_id: str,
        start_ms: int,
        *,
        fails: bool = True,
        other: str | None = None,
        cause: dict[str, str] | None = None,
    ) -> None:
        start, end = start_ms * MS, (start_ms + 100) * MS
        rid = {a.REQUEST_ID: request_id}
        kickoff = self.tracer.start_span(
            f"{a.SPAN_WORKFLOW} crew", start_time=start, attributes=rid
        )
        token = otel_context.attach(trace.set_span_in_context(kickoff))
        try:
            agent = self.tracer.start_span(
                "invoke_agent Support Analyst", start_time=start + MS, attributes=rid
            )
        finally:
            otel_context.detach(token)
        if other is not None:
            agent.set_attribute(a.SHARED_INSTANCE, True)
            agent.add_event(
                a.EVENT_SHARED_INSTANCE,
                {
                    a.SHARED_INSTANCE_KIND: "agent",
                    a.SHARED_INSTANCE_NAME: "Support Analyst",
                    a.SHARED_INSTANCE_CLASS: "crewai.agent.core.Agent",
                    a.SHARED_INSTANCE_OTHER_REQUEST_IDS: [other],
                },
                timestamp=start + 2 * MS,
            )
        if fails:
            for span in (agent, kickoff):
                span.set_attribute(a.ERROR_TYPE, "RuntimeError")
                span.set_status(Status(StatusCode.ERROR))
            agent.set_attributes({a.ERROR_ORIGIN: True, a.ERROR_RECOVERED: False})
            kickoff.set_attributes(cause or {})
        agent.end(end_time=end - MS)
        kickoff.end(end_time=end)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def traces() -> Iterator[Traces]:
    made = Traces()
    yield made
    made.provider.shutdown()


SHARED_AGENT = {
    a.FAILURE_CAUSE: "shared_instance",
    a.FAILURE_ORIGIN: "invoke_agent Support Analyst",
    a.FAILURE_SHARED_KIND: "agent",
    a.FAILURE_SHARED_NAME: "Support Analyst",
}


def broken(traces: Traces, cause: dict[str, str] | None) -> None:
    """b-1 alone and fine; b-2 and b-3 met the shared Agent busy and failed; b-4 failed with
    an error of its own (no sharing)."""
    traces.run("b-1", 0, fails=False)
    traces.run("b-2", 200, other="b-3", cause=cause)
    traces.run("b-3", 210, other="b-2", cause=cause)
    own = (
        {a.FAILURE_CAUSE: "application_error", a.FAILURE_ORIGIN: "invoke_agent"} if cause else None
    )
    traces.run("b-4", 400, cause=own)


def test_a_file_without_the_attribute_is_classified_from_its_origins(traces, tmp_path):
    broken(traces, None)
    text, figures = run_report(traces.spans(), tmp_path)
    assert figures["failed_runs_by_cause"] == {}
    assert "Failed runs by cause" not in text
    assert figures["conclusion"] == (
        "3 of 4 requests failed; 2 failures began in a shared Agent 'Support Analyst' used by "
        "2 requests at once; 1 failure began with RuntimeError in invoke_agent 'Support Analyst'."
    )


def test_the_attribute_says_why_and_names_the_shared_thing(traces, tmp_path):
    broken(traces, SHARED_AGENT)
    text, figures = run_report(traces.spans(), tmp_path)
    assert figures["failed_runs_by_cause"] == {"shared_instance": 2, "application_error": 1}
    assert figures["failure_shared"] == [
        {"cause": "shared_instance", "what": "Agent 'Support Analyst'", "runs": 2}
    ]
    line = "Failed runs by cause: shared_instance 2 (Agent 'Support Analyst'), application_error 1"
    assert line in text
    assert figures["conclusion"] == (
        "3 of 4 requests failed; failed runs by cause: shared_instance 2 "
        "(Agent 'Support Analyst'), application_error 1."
    )
    # where each failure began is still counted, for every failed request
    assert sum(figures["causes"].values()) == 3


def test_a_file_mixing_both_prefers_the_attribute_where_present(traces, tmp_path):
    """Spans of an older and a newer process in one file: each failed run is counted once,
    by its attribute where it has one, from its origins where not."""
    broken(traces, None)
    traces.run("n-1", 600, other="n-2", cause=SHARED_AGENT)
    traces.run("n-2", 610, other="n-1", cause=SHARED_AGENT)
    traces.run("n-3", 620, cause={a.FAILURE_CAUSE: "x" * 500})  # a hostile value: cut
    _, figures = run_report(traces.spans(), tmp_path)
    assert figures["failed_runs_by_cause"] == {"shared_instance": 2, "x" * 64: 1}
    assert figures["conclusion"] == (
        "6 of 7 requests failed; failed runs by cause: shared_instance 2 "
        f"(Agent 'Support Analyst'), {'x' * 64} 1; 2 failures began in a shared Agent "
        "'Support Analyst' used by 2 requests at once; 1 failure began with RuntimeError in "
        "invoke_agent 'Support Analyst'."
    )


def test_causes_are_counted_per_run_as_the_file_streams(traces, tmp_path):
    """Finished as soon as read, one trace at a time: the same counts as holding every span."""
    broken(traces, SHARED_AGENT)
    lines = [json.dumps(encode([s])) for s in traces.spans()]
    eager, holding = Analysis(settle_s=0), Analysis(settle_s=float("inf"))
    for span in read_requests(lines, "spans.jsonl"):
        eager.add(span)
        holding.add(span)
        eager.sweep()
        assert eager.held_spans <= 2  # one trace at most
    streamed = summary(eager.reports())["services"][SERVICE]  # type: ignore[index]
    assert streamed == summary(holding.reports())["services"][SERVICE]  # type: ignore[index]
    assert streamed["failed_runs_by_cause"] == {"shared_instance": 2, "application_error": 1}
