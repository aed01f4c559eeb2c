"""The report on cross-talk: answers that carried another request's data, where it entered, why.

The traces are written with the OpenTelemetry SDK using the public names of DESIGN.md (a web
request > kickoff > tool call and model call; ``crew_otel.crosstalk`` events where foreign data
entered, ``crew_otel.crosstalk=true`` on the run's kickoff span, ``crew_otel.shared_instance``
events on the tool span), exported as OTLP/JSON by crew_otel's own exporter and read back by
``crew-otel report``. An *answer* is a run (an outermost kickoff span) that ended without
error; a failed run carrying foreign data is counted apart, as it answered nobody.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from rich.console import Console

from crew_otel import attributes as a
from crew_otel import report
from crew_otel.otlp_json import encode, read_requests
from crew_otel.report.analysis import Analysis, summary

SERVICE = "support-api-halffixed"
GLOBAL = "halffixed_service.shared_context"
MS = 1_000_000
TOOL, MODEL, OUTPUT = a.CROSSTALK_TOOL_RESULT, a.CROSSTALK_MODEL_INPUT, a.CROSSTALK_OUTPUT


def crosstalk(source: str, *others: str, marks: int = 1) -> tuple[str, dict[str, Any]]:
    """A ``crew_otel.crosstalk`` event: foreign data of ``others`` entered at ``source``."""
    return source, {
        a.CROSSTALK_SOURCE: source,
        a.CROSSTALK_OTHER_REQUEST_IDS: list(others),
        a.CROSSTALK_MARKS: marks,
    }


def shared(kind: str, name: str, class_name: str, *others: str) -> dict[str, Any]:
    """A ``crew_otel.shared_instance`` event naming the other requests in flight."""
    return {
        a.SHARED_INSTANCE_KIND: kind,
        a.SHARED_INSTANCE_NAME: name,
        a.SHARED_INSTANCE_CLASS: class_name,
        a.SHARED_INSTANCE_OTHER_REQUEST_IDS: list(others),
    }


class Traces:
    """Writes request traces the way an instrumented FastAPI + CrewAI service does."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def request(
        self,
        request_id: str,
        start_ms: int,
        end_ms: int,
        crosstalk: Sequence[tuple[str, dict[str, Any]]] = (),
        shared: Sequence[dict[str, Any]] = (),
        failed_first: Sequence[tuple[str, dict[str, Any]]] | None = None,
        fails: bool = False,
    ) -> None:
        """POST /tickets > invoke_workflow > (invoke_workflow >) execute_tool, chat: each
        cross-talk event on the span of its source, ``shared`` events on the tool span. With
        ``failed_first``, a first kickoff fails (with those cross-talk events) and a second
        one in the same trace answers (an application-level retry)."""
        start, end = start_ms * MS, end_ms * MS
        server = self.tracer.start_span(
            "POST /tickets",
            kind=SpanKind.SERVER,
            start_time=start,
            attributes={a.HTTP_STATUS_CODE: 500 if fails else 200},
        )
        with _current(server):
            if failed_first is not None:
                self._run(request_id, start + MS, start + 3 * MS, failed_first, (), failed=True)
            self._run(request_id, start + 4 * MS, end - MS, crosstalk, shared, failed=fails)
        server.end(end_time=end)

    def _run(
        self,
        request_id: str,
        start: int,
        end: int,
        crosstalk: Sequence[tuple[str, dict[str, Any]]],
        shared: Sequence[dict[str, Any]],
        failed: bool,
    ) -> None:
        rid = {a.REQUEST_ID: request_id}
        kickoff = self.tracer.start_span(
            f"{a.SPAN_WORKFLOW} Flow", start_time=start, attributes=rid
        )
        with _current(kickoff):  # a flow kicking off a crew: the run is the outermost kickoff
            crew = self.tracer.start_span(
                f"{a.SPAN_WORKFLOW} crew", start_time=start + 1, attributes=rid
            )
            with _current(crew):
                tool = self.tracer.start_span(
                    "execute_tool ticket_history", start_time=start + 2, attributes=rid
                )
                chat = self.tracer.start_span(
                    "chat gpt-4o-mini", start_time=start + 3, attributes=rid
                )
            spans: dict[str, Span] = {TOOL: tool, MODEL: chat, OUTPUT: kickoff}
            for source, attrs in crosstalk:
                spans[source].add_event(a.EVENT_CROSSTALK, attrs, timestamp=start + 4)
                kickoff.set_attribute(a.CROSSTALK, True)
            for event in shared:
                tool.set_attribute(a.SHARED_INSTANCE, True)
                tool.add_event(a.EVENT_SHARED_INSTANCE, event, timestamp=start + 4)
            tool.end(end_time=start + 5)
            chat.end(end_time=start + 6)
            crew.end(end_time=end - 1)
        if failed:
            kickoff.set_attribute(a.ERROR_TYPE, "RuntimeError")
            kickoff.set_status(Status(StatusCode.ERROR))
        kickoff.end(end_time=end)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


class _current:
    """``with`` a span as the parent of the spans started inside, without ending it."""

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


@pytest.fixture
def traces() -> Iterator[Traces]:
    made = Traces()
    yield made
    made.provider.shutdown()


def run_report(spans: list[ReadableSpan], tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``crew-otel report FILE --summary-json``: the text (borders folded away), the figures."""
    trace_file, figures = tmp_path / "spans.jsonl", tmp_path / "summary.json"
    trace_file.write_text("".join(json.dumps(encode([s])) + "\n" for s in spans))
    output = io.StringIO()
    assert report.run(trace_file, Console(file=output, width=200), summary_json=figures) == 0
    text = " ".join(output.getvalue().replace("│", " ").split())
    return text, json.loads(figures.read_text())["services"][SERVICE]


def halffixed(traces: Traces, path: str) -> None:
    """The half-fixed service: h-2 and h-3 wrote the shared global while h-4 was in flight
    (and h-3 the file); h-3 and h-4 answered with another request's ticket, h-5 too with no
    shared thing named (state crew_otel cannot see); h-6 failed with h-5's data."""
    traces.request("h-1", 0, 100)  # alone
    traces.request("h-2", 200, 400, shared=[shared("global", GLOBAL, "builtins.dict")])
    traces.request(
        "h-3",
        210,
        410,
        crosstalk=[
            crosstalk(TOOL, "h-2"),
            crosstalk(MODEL, "h-2"),
            crosstalk(OUTPUT, "h-2", marks=2),
        ],
        shared=[
            shared("global", GLOBAL, "builtins.dict", "h-2"),
            shared("file", path, "file", "h-4"),
        ],
    )
    traces.request(
        "h-4",
        220,
        420,
        crosstalk=[crosstalk(TOOL, "h-3", "h-2")],
        shared=[shared("global", GLOBAL, "builtins.dict", "h-2", "h-3")],
    )
    traces.request("h-5", 230, 430, crosstalk=[crosstalk(TOOL, "h-9")])
    traces.request("h-6", 240, 440, crosstalk=[crosstalk(MODEL, "h-5")], fails=True)


EXPECTED = {
    "answers": 5,
    "carrying": 3,
    "request_ids": ["h-3", "h-4", "h-5"],
    "by_source": {TOOL: 3, MODEL: 1, OUTPUT: 1},
    "causes": [
        {"kind": "global", "name": GLOBAL, "what": f"module global '{GLOBAL}'", "answers": 2},
    ],
    "no_cause": 1,
    "failed_runs": 1,
}


def test_answers_carrying_another_requests_data_where_it_entered_and_why(traces, tmp_path):
    path = str(tmp_path / "report.json")
    halffixed(traces, path)
    text, figures = run_report(traces.spans(), tmp_path)

    expected = dict(EXPECTED)
    expected["causes"] = [
        *EXPECTED["causes"],  # type: ignore[list-item]
        {"kind": "file", "name": path, "what": f"file '{path}'", "answers": 1},
    ]
    assert figures["crosstalk"] == expected
    assert figures["requests"] == 6
    assert figures["failed"] == 1

    assert "Answers carrying another request's data: 3 of 5" in text
    assert "entered at tool_result 3, model_input 1, output 1" in text
    assert f"both requests touched module global '{GLOBAL}' in 2, file '{path}' in 1" in text
    assert "no shared thing named in 1" in text
    assert "1 failed run also carried another request's data" in text
    assert figures["conclusion"].startswith(
        "1 of 6 requests failed; 3 of 5 answers carried another request's data (both requests "
        f"touched module global '{GLOBAL}' in 2, file '{path}' in 1; no shared thing named in "
        "1); "
    )
    assert figures["conclusion"] in text


def test_a_retried_request_answers_once_and_its_failed_run_is_no_answer(traces, tmp_path):
    """A first kickoff received h-1's data and failed; the retry in the same trace answered
    cleanly: no answer carried anything, one failed run did."""
    traces.request("r-1", 0, 300)
    traces.request("r-2", 10, 310, failed_first=[crosstalk(TOOL, "r-1")])
    text, figures = run_report(traces.spans(), tmp_path)
    assert figures["crosstalk"] == {
        "answers": 2,
        "carrying": 0,
        "request_ids": [],
        "by_source": {},
        "causes": [],
        "no_cause": 0,
        "failed_runs": 1,
    }
    assert "Answers carrying another request's data: 0 of 2" in text
    assert figures["conclusion"] == "All 2 requests succeeded."


def test_no_crosstalk_says_none_of_the_answers(traces, tmp_path):
    for i in range(4):  # overlapping, nothing shared, nothing foreign
        traces.request(f"f-{i}", 20 * i, 20 * i + 100)
    text, figures = run_report(traces.spans(), tmp_path)
    assert figures["crosstalk"]["answers"] == 4
    assert figures["crosstalk"]["carrying"] == 0
    assert "Answers carrying another request's data: 0 of 4" in text
    assert "entered at" not in text
    assert figures["conclusion"] == "All 4 requests succeeded."


def test_each_trace_is_dropped_when_complete_and_the_pairs_still_meet(traces, tmp_path):
    """Streamed with every trace finished as soon as read (and in reverse order: the flagged
    runs before the runs whose shared-instance events name them), the figures are those of
    holding every span to the end."""
    halffixed(traces, str(tmp_path / "report.json"))
    spans = traces.spans()
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    reverse = [s for trace_spans in reversed(list(by_trace.values())) for s in trace_spans]

    eager, holding = Analysis(settle_s=0), Analysis(settle_s=float("inf"))
    for span in read_requests([json.dumps(encode([s])) for s in reverse], "spans.jsonl"):
        eager.add(span)
        holding.add(span)
        eager.sweep()
        assert eager.held_spans <= 5  # one trace at most
    streamed = summary(eager.reports())["services"][SERVICE]  # type: ignore[index]
    assert streamed == summary(holding.reports())["services"][SERVICE]  # type: ignore[index]
    assert streamed["crosstalk"]["carrying"] == 3
    assert streamed["crosstalk"]["causes"][0]["answers"] == 2
