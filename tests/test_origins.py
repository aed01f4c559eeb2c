"""Every failure that reaches the caller has exactly one fatal origin, whatever the exception
object is (shared, re-raised, hostile), and error texts carry no content by default."""

from __future__ import annotations

import asyncio
import importlib.metadata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import BaseModel

import crew_otel
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr
from tests.workloads import run_while_held

ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"
REQUEST_ID = "crew_otel.request.id"


def crewai_release() -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version("crewai").split(".")[:2])


def run_requests(fn: Any, n: int, first: int = 0) -> dict[str, BaseException | None]:
    """Run ``fn(i)`` for i in first..first+n-1 in threads, each in its own request (``req-i``);
    what each raised."""

    def one(i: int) -> tuple[str, BaseException | None]:
        request_id = f"req-{i}"
        with crew_otel.request(request_id):
            try:
                fn(i)
            except Exception as exc:  # the failure is the point
                return request_id, exc
        return request_id, None

    with ThreadPoolExecutor(max_workers=n) as pool:
        return dict(pool.map(one, range(first, first + n)))


def request_spans(spans: Spans, request_id: str) -> list[Any]:
    return [s for s in spans.all if attr(s, REQUEST_ID) == request_id]


def fatal_origins(spans: list[Any]) -> list[Any]:
    return [s for s in spans if attr(s, ORIGIN) and attr(s, RECOVERED) is False]


def exception_events(span: Any) -> list[Any]:
    return [e for e in span.events if e.name == "exception"]


def assert_one_fatal_origin_per_failure(
    spans: Spans, outcomes: dict[str, BaseException | None]
) -> int:
    failed = 0
    for request_id, exc in outcomes.items():
        fatal = fatal_origins(request_spans(spans, request_id))
        if exc is None:
            assert fatal == [], f"{request_id} succeeded but has a fatal origin"
            continue
        failed += 1
        assert len(fatal) == 1, (request_id, [(s.name, attr(s, "error.type")) for s in fatal])
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        assert any(
            e.attributes["exception.type"] == type(exc).__name__
            and e.attributes["exception.message"].startswith(first_line)
            for e in exception_events(fatal[0])
        ), "the fatal origin recorded the error the caller got"
    return failed


def test_agent_rerun_that_fails_again_is_the_one_fatal_origin(otel, fake_provider):
    """CrewAI re-runs the agent from the failed attempt's except block: the re-run's error is
    raised while the first is being handled, yet it is a new failure with its own origin."""
    from crewai import Crew, Task

    def run(i: int) -> None:
        fake_provider.script(Fault.empty(), Fault.empty(), key=f"twice{i}")
        agent = make_agent(make_llm(fake_provider.base_url), "Analyst", max_retry_limit=1)
        task = Task(description=f"Analyse [[twice{i}]]", expected_output="x", agent=agent)
        Crew(agents=[agent], tasks=[task]).kickoff()

    outcomes = run_requests(run, 4)
    assert all(isinstance(exc, ValueError) for exc in outcomes.values()), outcomes
    spans = Spans(otel.get_finished_spans())
    assert assert_one_fatal_origin_per_failure(spans, outcomes) == 4
    for request_id in outcomes:
        origins = [s for s in request_spans(spans, request_id) if attr(s, ORIGIN)]
        assert sorted(attr(s, RECOVERED) for s in origins) == [False, True], "retried, then not"


def test_shared_agent_failures_each_have_one_fatal_origin(otel, fake_provider):
    """The article's shared Agent under concurrent load (CrewAI >= 1.14 refuses the concurrent
    use with "Executor is already running", and the retry budget is shared too)."""
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "Support Analyst")

    def run(i: int) -> None:
        task = Task(description=f"Triage [[shared{i}]]", expected_output="x", agent=agent)
        Crew(agents=[agent], tasks=[task]).kickoff()

    # five requests run while the first one holds the agent (inside its model call)
    first, rest = run_while_held(
        fake_provider, "shared0", lambda: run_requests(run, 1), [lambda: run_requests(run, 5, 1)]
    )
    outcomes = {**first, **rest}
    spans = Spans(otel.get_finished_spans())
    failed = assert_one_fatal_origin_per_failure(spans, outcomes)
    if crewai_release() >= (1, 14):
        assert failed >= 1, "concurrent use of one Agent fails on this CrewAI version"


BREAKER_OPEN = RuntimeError("circuit breaker open")


class BreakerOpen(Exception):
    """An application error raised as one shared instance."""


SHARED_BREAKER = BreakerOpen("payments API circuit open")


def _failing_callback(error: BaseException) -> Any:
    def callback(output: Any) -> None:
        raise error

    return callback


def test_one_exception_object_raised_in_many_requests_gets_an_origin_in_each(otel, fake_provider):
    from crewai import Crew, Task
    from crewai.tools import tool

    @tool("check_breaker")
    def check_breaker(query: str) -> str:
        """Checks the payments circuit breaker."""
        raise BREAKER_OPEN

    def run(i: int) -> None:
        agent = make_agent(make_llm(fake_provider.base_url), "Payments", tools=[check_breaker])
        task = Task(
            description=f"Check payments for [[breaker{i}]] using the tool",
            expected_output="x",
            agent=agent,
            callback=_failing_callback(SHARED_BREAKER),
        )
        Crew(agents=[agent], tasks=[task]).kickoff()

    # the same objects, in two rounds of concurrent requests
    outcomes = {**run_requests(run, 3), **run_requests(run, 3, first=3)}
    assert all(exc is SHARED_BREAKER for exc in outcomes.values()), outcomes
    spans = Spans(otel.get_finished_spans())
    assert assert_one_fatal_origin_per_failure(spans, outcomes) == 6
    for request_id in outcomes:
        tool_origins = [
            s
            for s in request_spans(spans, request_id)
            if s.name.startswith("execute_tool") and attr(s, ORIGIN)
        ]
        assert len(tool_origins) >= 1, f"{request_id}: the shared tool error has its origin"
        assert all(attr(s, RECOVERED) is True for s in tool_origins)
    assert vars(SHARED_BREAKER) == {}, "crew_otel keeps its bookkeeping off the app's objects"
    assert vars(BREAKER_OPEN) == {}


class HostileError(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


def test_exception_with_a_raising_str_gets_one_origin_and_no_internal_error(otel, fake_provider):
    """A tool raises an exception whose ``__str__`` raises: crew_otel records it (an origin on
    the tool span, an empty message) without an internal error, and whatever CrewAI then makes
    of it (its own ``str(e)`` raises while handling it) has its one fatal origin."""
    from crewai import Crew, Task
    from crewai.tools import tool

    @tool("hostile_lookup")
    def hostile_lookup(query: str) -> str:
        """Looks things up."""
        raise HostileError()

    async def run_all() -> dict[str, BaseException | None]:
        async def one(i: int) -> tuple[str, BaseException | None]:
            agent = make_agent(make_llm(fake_provider.base_url), "Analyst", tools=[hostile_lookup])
            task = Task(
                description=f"Analyse [[hostile{i}]] using the tool",
                expected_output="x",
                agent=agent,
            )
            with crew_otel.request(f"req-{i}"):
                try:
                    await Crew(agents=[agent], tasks=[task]).kickoff_async()
                except Exception as exc:
                    return f"req-{i}", exc
            return f"req-{i}", None

        return dict(await asyncio.gather(*(one(i) for i in range(4))))

    outcomes = asyncio.run(run_all())
    assert all(exc is not None for exc in outcomes.values())
    spans = Spans(otel.get_finished_spans())
    assert assert_one_fatal_origin_per_failure(spans, outcomes) == 4


def test_recorder_takes_one_hostile_exception_object_in_many_traces(otel_tracer_provider):
    """The same instance (its ``__str__`` raising) recorded by 16 threads, each in its own
    trace: one origin in each, an empty message, nothing stored on the object."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from crew_otel.diagnosis.errors import ErrorRecorder
    from crew_otel.metrics import CrewOtelMetrics

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    recorder = ErrorRecorder(CrewOtelMetrics(MeterProvider().get_meter("test")))
    shared = HostileError()

    def one(i: int) -> list[bool]:
        with tracer.start_as_current_span("root") as root:
            with tracer.start_as_current_span("inner") as inner:
                first = recorder.record(inner, shared, "execute_tool")
            return [first, recorder.record(root, shared, "invoke_workflow")]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [[True, False]] * 16
    assert vars(shared) == {}
    inner_spans = [s for s in exporter.get_finished_spans() if s.name == "inner"]
    assert len(inner_spans) == 16
    for span in inner_spans:
        (event,) = exception_events(span)
        assert event.attributes["exception.type"] == "HostileError"
        assert event.attributes["exception.message"] == ""


class Ticket(BaseModel):
    priority: int
    summary: str


def _structured_output_runs(fake_provider: Any, n: int) -> dict[str, BaseException | None]:
    from crewai import Crew, Task

    def run(i: int) -> None:
        fake_provider.script(*[Fault.invalid_json()] * 8, key=f"private-ticket-{i}")
        agent = make_agent(make_llm(fake_provider.base_url), "Triage", max_retry_limit=0)
        task = Task(
            description=f"Triage the ticket [[private-ticket-{i}]]",
            expected_output="a ticket",
            agent=agent,
            output_pydantic=Ticket,
        )
        Crew(agents=[agent], tasks=[task]).kickoff()

    return run_requests(run, n)


def _error_texts(spans: Spans) -> list[str]:
    texts = []
    for span in spans.all:
        if span.status.description:
            texts.append(span.status.description)
        for event in exception_events(span):
            texts.extend(str(v) for v in event.attributes.values())
    return texts


def test_completion_quoted_by_a_validation_error_stays_out_by_default(otel, fake_provider):
    """The model's answer fails structured-output parsing: pydantic quotes it in its message;
    with content capture off, no span status or exception event carries it."""
    outcomes = _structured_output_runs(fake_provider, 3)
    failures = [exc for exc in outcomes.values() if exc is not None]
    assert failures, "the non-JSON answer fails parsing"
    assert any("private-ticket" in str(exc) for exc in failures), "the error quotes the answer"
    spans = Spans(otel.get_finished_spans())
    texts = _error_texts(spans)
    assert texts, "the failures are recorded"
    assert not [t for t in texts if "private-ticket" in t]
    # what stays: the type, where it was raised and what went wrong
    assert any("ValidationError" in t and "json_invalid" in t for t in texts)
    assert any("input_value=<omitted>" in t for t in texts)
    assert any('File "' in t for t in texts), "the stack frames are kept"
    assert_one_fatal_origin_per_failure(spans, outcomes)


def test_completion_in_error_texts_is_recorded_when_content_capture_is_on(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider
):
    crew_otel.uninstrument()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider, meter_provider=meter_provider, capture_content=True
    )
    try:
        _structured_output_runs(fake_provider, 2)
    finally:
        crew_otel.uninstrument()
    texts = _error_texts(Spans(span_exporter.get_finished_spans()))
    assert [t for t in texts if "private-ticket" in t], "capture on: the quoted answer is kept"


@pytest.mark.parametrize("capture", [False, True])
def test_error_text_helpers_never_raise(capture: bool) -> None:
    from crew_otel.diagnosis import error_text

    def raise_chained() -> None:
        try:
            value = ", ".join("ab")
            raise ValueError(f"input_value={value!r} with [brackets], input_type=str] tail")
        except ValueError as inner:
            raise HostileError() from inner

    with pytest.raises(HostileError) as caught:
        raise_chained()
    exc = caught.value
    trace_text = error_text.stacktrace(exc, capture)
    assert error_text.message(exc, capture) == ""
    assert error_text.status_description(exc, capture) == "HostileError"
    assert "direct cause" in trace_text
    assert ("'a, b'" in trace_text) is capture
    assert ("input_value=<omitted>, input_type=str] tail" in trace_text) is not capture
