"""The report on shared state outside CrewAI objects: globals, files, databases, resources.

The traces here are written with the OpenTelemetry SDK using the public span, attribute and
event names of DESIGN.md (a web request > kickoff > tool call, a ``crew_otel.shared_instance``
event on the tool span), exported as OTLP/JSON by crew_otel's own exporter, and read back by
``crew-otel report``: the report must name each shared thing once, with the requests that
shared it and what to change, and say nothing about shared state when no such event exists.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from rich.console import Console

from crew_otel import attributes as a
from crew_otel import report
from crew_otel.otlp_json import encode

SERVICE = "support-api-halffixed"
GLOBAL = "halffixed_service.shared_context"
MS = 1_000_000


class Traces:
    """Writes request traces the way an instrumented FastAPI + CrewAI service does."""

    def __init__(self, process: str | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        resource = {"service.name": SERVICE}
        if process is not None:  # one worker process of the service
            resource["service.instance.id"] = process
        self.provider = TracerProvider(resource=Resource.create(resource))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def request(
        self,
        request_id: str,
        start_ms: int,
        end_ms: int,
        events: list[dict[str, Any]] = (),  # type: ignore[assignment]
        tool_error: str | None = None,
    ) -> None:
        """POST /tickets > invoke_workflow > execute_tool, with ``events`` on the tool span."""
        start, end = start_ms * MS, end_ms * MS
        status = 500 if tool_error else 200
        server = self.tracer.start_span(
            "POST /tickets",
            kind=SpanKind.SERVER,
            start_time=start,
            attributes={a.HTTP_STATUS_CODE: status},
        )
        with _current(server):
            kickoff = self.tracer.start_span(
                f"{a.SPAN_WORKFLOW} crew", start_time=start + MS, attributes=_rid(request_id)
            )
            with _current(kickoff):
                tool = self.tracer.start_span(
                    "execute_tool ticket_history",
                    start_time=start + 2 * MS,
                    attributes={**_rid(request_id), "gen_ai.operation.name": "execute_tool"},
                )
                for event in events:
                    tool.set_attribute(a.SHARED_INSTANCE, True)
                    tool.add_event(a.EVENT_SHARED_INSTANCE, event, timestamp=start + 3 * MS)
                if tool_error:
                    tool.set_attributes({a.ERROR_TYPE: tool_error, a.ERROR_ORIGIN: True})
                    tool.set_status(Status(StatusCode.ERROR))
                tool.end(end_time=end - 2 * MS)
            if tool_error:
                kickoff.set_attribute(a.ERROR_TYPE, tool_error)
                kickoff.set_status(Status(StatusCode.ERROR))
            kickoff.end(end_time=end - MS)
        server.end(end_time=end)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


class _current:
    """``with`` a span as the parent of the spans started inside, without ending it."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def __enter__(self) -> None:
        from opentelemetry import context, trace

        self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc: object) -> None:
        from opentelemetry import context

        context.detach(self._token)


def _rid(request_id: str) -> dict[str, str]:
    return {a.REQUEST_ID: request_id}


def event(kind: str, name: str, class_name: str, *others: str) -> dict[str, Any]:
    return {
        a.SHARED_INSTANCE_KIND: kind,
        a.SHARED_INSTANCE_NAME: name,
        a.SHARED_INSTANCE_CLASS: class_name,
        a.SHARED_INSTANCE_OTHER_REQUEST_IDS: tuple(others),
    }


@pytest.fixture
def traces() -> Iterator[Traces]:
    made = Traces()
    yield made
    made.provider.shutdown()


def run_report(spans: list[ReadableSpan], tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``crew-otel report FILE --summary-json``: the printed text and the service's figures."""
    trace_file, summary = tmp_path / "spans.jsonl", tmp_path / "summary.json"
    trace_file.write_text(json.dumps(encode(spans)) + "\n")
    output = io.StringIO()
    console = Console(file=output, width=200, no_color=True)
    assert report.run(trace_file, console, summary_json=summary) == 0
    figures = json.loads(summary.read_text())["services"][SERVICE]
    return output.getvalue(), figures


def one_line(text: str) -> str:
    """The report with the panel's borders and line breaks folded away."""
    return " ".join(text.replace("│", " ").split())


# --- a module global and one fixed file path (the article's half-fixed service) -------------
def test_report_names_the_shared_global_and_file_with_requests_and_advice(traces, tmp_path):
    path = str(tmp_path / "report.json")
    traces.request("h-000", 0, 100)  # alone: nothing shared
    traces.request("h-001", 200, 400)
    traces.request(
        "h-002",
        210,
        410,
        [event("global", GLOBAL, "builtins.dict", "h-001"), event("file", path, "file", "h-001")],
    )
    traces.request(
        "h-003",
        220,
        420,
        [
            # the same global once mutated, once rebound (``global x; x = ...``): one thing
            event("global", GLOBAL, "module", "h-001", "h-002"),
            event("file", path, "file", "h-001", "h-002"),
        ],
    )
    text, figures = run_report(traces.spans(), tmp_path)

    # one row per thing (kind + name), whatever class each event saw
    assert len(figures["conflicts"]) == 2, figures["conflicts"]
    conflicts = {(c["kind"], c["name"]): c for c in figures["conflicts"]}
    assert set(conflicts) == {("global", GLOBAL), ("file", path)}
    for conflict in conflicts.values():
        assert conflict["request_ids"] == ["h-001", "h-002", "h-003"]
        assert conflict["at_once"] == 3
    assert figures["failed"] == 0

    flat = one_line(text)
    assert f"module global '{GLOBAL}'" in flat
    assert f"file '{path}'" in flat
    assert "h-001, h-002, h-003" in flat
    assert figures["conclusion"] == (
        "All 4 requests succeeded, but the tool code shares state between concurrent requests: "
        f"a module global '{GLOBAL}' written by the tool code of 3 requests at once; keep tool "
        f"state per request; a file '{path}' written by the tool code of 3 requests at once; "
        "give each request its own path."
    )
    assert figures["conclusion"] in flat


# --- a database and a resource; a failure that began in a tool sharing them --------------------
def test_report_names_a_shared_database_and_resource_and_blames_the_failure(traces, tmp_path):
    database = str(tmp_path / "tickets.sqlite")
    resource = "sqlite3.Connection at LedgerTool.connection"
    traces.request("r-1", 0, 300)
    traces.request(
        "r-2",
        10,
        310,
        [
            event("database", database, "sqlite3.Connection", "r-1"),
            event("resource", resource, "sqlite3.Connection", "r-1"),
        ],
        tool_error="OperationalError",
    )
    text, figures = run_report(traces.spans(), tmp_path)

    assert [(c["kind"], c["name"]) for c in figures["conflicts"]] == [
        ("database", database),
        ("resource", resource),
    ]
    assert figures["causes"] == {
        f"a shared SQLite database '{database}' contended for by 2 requests at once": 1
    }
    assert figures["conclusion"] == (
        f"1 of 2 requests failed; 1 failure began in a shared SQLite database '{database}' "
        "contended for by 2 requests at once; the tool code shares state between concurrent "
        f"requests: a SQLite database '{database}' contended for by the tool code of 2 requests "
        "at once; open connections with a busy timeout and keep write transactions short, or "
        f"give each request its own database; a shared {resource} held by the tools of 2 "
        "requests at once; open connections, sessions and files per request."
    )
    assert figures["conclusion"] in one_line(text)


# --- CrewAI objects keep their wording; nothing shared means nothing said ---------------------
def test_shared_agent_is_still_an_object_grouped_by_class(traces, tmp_path):
    traces.request("b-1", 0, 300)
    traces.request(
        "b-2", 10, 310, [event("agent", "Support Analyst", "crewai.agent.core.Agent", "b-1")]
    )
    text, figures = run_report(traces.spans(), tmp_path)
    assert [(c["kind"], c["class"], c["name"]) for c in figures["conflicts"]] == [
        ("agent", "crewai.agent.core.Agent", "Support Analyst")
    ]
    assert figures["conclusion"] == (
        "All 2 requests succeeded, but 1 shared object(s) were used by concurrent requests."
    )
    assert "Agent 'Support Analyst'" in one_line(text)
    assert "tool code shares state" not in text


def test_trace_without_shared_state_events_says_nothing_about_them(traces, tmp_path):
    for i in range(4):
        traces.request(f"f-{i}", 20 * i, 20 * i + 100)  # overlapping, nothing shared
    text, figures = run_report(traces.spans(), tmp_path)
    assert figures["requests"] == 4
    assert figures["conflicts"] == []
    assert figures["conclusion"] == "All 4 requests succeeded."
    flat = one_line(text)
    assert "Shared instances and state: none" in flat
    for word in ("module global", "tool code shares state", "own path", "report.json"):
        assert word not in flat


# --- one service, several processes: each thing said once, with the table's process labels ---
@pytest.fixture
def workers() -> Iterator[list[Traces]]:
    made = [Traces("worker-1"), Traces("worker-2"), Traces("worker-3")]
    yield made
    for traces in made:
        traces.provider.shutdown()


def test_state_shared_in_several_processes_is_one_sentence_naming_them(workers, tmp_path):
    """Each worker has its own module global (two requests at once in worker-1, three in
    worker-2); the database file is one thing on the machine; worker-3 shares nothing. The
    conclusion names the global once, with the labels the table uses (p1, p2)."""
    path = str(tmp_path / "tickets.sqlite")
    one, two, three = workers
    one.request("w1-a", 0, 200)
    one.request("w1-b", 10, 210, [event("global", GLOBAL, "builtins.dict", "w1-a")])
    two.request("w2-a", 0, 300)
    two.request("w2-b", 10, 310)
    two.request(
        "w2-c",
        20,
        320,
        [
            event("global", GLOBAL, "builtins.dict", "w2-a", "w2-b"),
            event("database", path, "sqlite3.Connection", "w1-a"),
        ],
    )
    three.request("w3-a", 0, 100)
    text, figures = run_report([s for w in workers for s in w.spans()], tmp_path)

    assert sorted((c["kind"], c["process"]) for c in figures["conflicts"]) == [
        ("database", ""),
        ("global", "worker-1"),
        ("global", "worker-2"),
    ]
    flat = one_line(text)
    assert f"module global '{GLOBAL}' in p1" in flat  # the table's rows
    assert f"module global '{GLOBAL}' in p2" in flat
    assert "p1 = process worker-1, p2 = process worker-2, p3 = process worker-3" in flat
    assert figures["conclusion"] == (
        "All 6 requests succeeded, but the tool code shares state between concurrent requests: "
        f"a module global '{GLOBAL}' in each of p1 and p2 written by the tool code of up to 3 "
        f"requests at once; keep tool state per request; a SQLite database '{path}' contended "
        "for by the tool code of 2 requests at once; open connections with a busy timeout and "
        "keep write transactions short, or give each request its own database."
    )
    assert figures["conclusion"] in flat


def test_state_shared_in_one_of_several_processes_names_that_process(workers, tmp_path):
    one, two, _ = workers
    one.request("w1-a", 0, 200)
    two.request("w2-a", 0, 300)
    two.request("w2-b", 10, 310, [event("global", GLOBAL, "builtins.dict", "w2-a")])
    _, figures = run_report([s for w in workers for s in w.spans()], tmp_path)
    assert figures["conclusion"] == (
        "All 3 requests succeeded, but the tool code shares state between concurrent requests: "
        f"a module global '{GLOBAL}' in p2 written by the tool code of 2 requests at once; keep "
        "tool state per request."
    )
