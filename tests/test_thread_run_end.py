"""A run's end is known from the run, and a shared worker records each item under its submitter.

A thread started inside a run carries the run's context while the run is in flight. Whether the
run is over is known from the run itself (its kickoff finished), never from its span: a
sampled-out run, or one traced by a provider whose spans are not SDK spans, ends for its threads
like any other. A long-lived worker thread that one run started and that takes work items from a
``queue.Queue`` records each item under the run that put it (or as a root without a request ID
when that cannot be known), never under the run that started the thread.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

import crew_otel
from crew_otel import logs
from crew_otel.context import KICKOFF_KEY
from crew_otel.safety import reset_reported_errors
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr
from tests.workloads import run_requests

LOG = logging.getLogger("tests.thread_run_end")
WAIT = 30.0


def fetch_tool(body: Callable[[], str]) -> Any:
    from crewai.tools import tool

    @tool("fetch_status")
    def fetch_status(query: str) -> str:
        """Fetch the status of the upstream service."""
        return body()

    return fetch_status


def kickoff_at_once(
    fake_provider: Any, bodies: dict[str, Callable[[], str]], on_loop: set[str]
) -> None:
    """One crew per tag, all at once, each inside ``crew_otel.request("req-TAG")``: tags in
    ``on_loop`` with ``akickoff`` on one event loop, the others with ``kickoff`` in threads."""
    threaded = [tag for tag in bodies if tag not in on_loop]
    run_requests(fake_provider, lambda tag: fetch_tool(bodies[tag]), threaded, sorted(on_loop))


# --- 1. a run ends for its threads whatever the sampler -----------------------------------------


class RecordedLogs(logging.Handler):
    """(message, request_id) of every record of the test's logger."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), str(getattr(record, "request_id", "?"))))


class HandOffWorker:
    """An application helper: one long-lived thread runs the jobs handed to it under a lock (a
    hand-off crew_otel cannot see)."""

    def __init__(self, name: str) -> None:
        self._jobs: list[Callable[[], None] | None] = []
        self._ready = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker's thread and wait for it."""
        done = threading.Event()

        def job_then_done() -> None:
            try:
                job()
            finally:
                done.set()

        self._hand_over(job_then_done)
        assert done.wait(WAIT), "the worker did not run the job"

    def stop(self) -> None:
        self._hand_over(None)
        self.thread.join(timeout=WAIT)

    def _hand_over(self, job: Callable[[], None] | None) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.pop(0)
            if job is None:
                return
            job()
            job = None


def warm_up_crewai(fake_provider: Any) -> None:
    """One run first: CrewAI creates its event bus's loop in the first run that emits an
    event, and asyncio keeps the creating thread's context in that loop's handles for good (one
    run's objects, kept alive by CrewAI whatever crew_otel does)."""
    research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(inputs={"topic": "[[W]]"})


def _recording() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider


#: Tracer providers under which the run's kickoff span is not an SDK span that ends.
UNSAMPLED_PROVIDERS: dict[str, Callable[[], Any]] = {
    "always_off": lambda: TracerProvider(sampler=ALWAYS_OFF),
    "parent_based_ratio_0": lambda: TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0))),
    "no_op": trace.NoOpTracerProvider,
    "recording": _recording,  # the baseline: the same holds when everything is recorded
}


@pytest.fixture(params=sorted(UNSAMPLED_PROVIDERS))
def instrumented_with(
    request: pytest.FixtureRequest, meter_provider: MeterProvider
) -> Iterator[Any]:
    """CrewAI instrumented with the tracer provider the test is parametrised with."""
    tracer_provider = UNSAMPLED_PROVIDERS[request.param]()
    crew_otel.uninstrument()
    reset_reported_errors()
    crew_otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield tracer_provider
    finally:
        crew_otel.uninstrument()


@pytest.fixture
def recorded_logs() -> Iterator[RecordedLogs]:
    handler = RecordedLogs()
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    logs.install()
    try:
        yield handler
    finally:
        logs.uninstall()
        LOG.removeHandler(handler)


def test_a_run_ends_for_the_threads_it_started_whatever_the_sampler(
    instrumented_with, recorded_logs, fake_provider
):
    """Two runs at once (a thread's ``kickoff``, an event loop's ``akickoff``), each starting a
    long-lived worker from its tool: once the runs are over, the workers carry neither their
    request IDs nor their objects, however the runs were sampled."""
    from crewai.events import crewai_event_bus

    tags = ("A", "B")
    both_in_flight = threading.Barrier(len(tags))
    workers: dict[str, HandOffWorker] = {}
    kickoffs: dict[str, weakref.ref[Any]] = {}

    def body_for(tag: str) -> Callable[[], str]:
        def body() -> str:
            if tag in workers:
                return "started already"
            kickoff = otel_context.get_value(KICKOFF_KEY)
            assert kickoff is not None, "the tool runs inside the kickoff"
            kickoffs[tag] = weakref.ref(kickoff)
            del kickoff
            worker = workers[tag] = HandOffWorker(f"worker-{tag}")
            worker.thread.start()  # inside the run: the worker carries the run's context
            worker.run(lambda: LOG.info("during %s", tag))
            both_in_flight.wait(timeout=WAIT)
            return "started"

        return body

    warm_up_crewai(fake_provider)
    try:
        kickoff_at_once(fake_provider, {tag: body_for(tag) for tag in tags}, on_loop={"B"})
        # CrewAI's event handlers run in its own threads, in a copy of the run's context.
        assert crewai_event_bus.flush(timeout=WAIT)
        gc.collect()
        for tag in tags:
            assert kickoffs[tag]() is None, f"the worker keeps run {tag}'s kickoff alive"
            workers[tag].run(lambda: LOG.info("after %s", tag))
    finally:
        for worker in workers.values():
            worker.stop()

    seen = dict(recorded_logs.seen)
    for tag in tags:
        assert seen[f"during {tag}"] == f"req-{tag}", "in flight, the worker is in the run"
        assert seen[f"after {tag}"] == logs.EMPTY, f"run {tag} is over for its worker"


# --- 2. a queue worker shared by two runs at once -----------------------------------------------

_QUEUE_URL = re.compile(r"/queue-(\w+)/models")


class QueueServer:
    """An application's module-level helper: one worker thread, started on first use, serves
    every caller's requests from one queue."""

    def __init__(self, jobs: queue.Queue[Any]) -> None:
        self.jobs = jobs
        self._order = itertools.count()  # a PriorityQueue's items never compare their payload
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="app-queue", daemon=True)
                self._thread.start()

    def fetch(self, url: str) -> int:
        done: queue.Queue[int | BaseException] = queue.Queue(maxsize=1)
        self.jobs.put((0, next(self._order), url, done))
        result = done.get(timeout=WAIT)
        if isinstance(result, BaseException):
            raise result
        return result

    def _serve(self) -> None:
        while True:
            _, _, url, done = self.jobs.get()
            if url is None:
                return
            try:
                done.put(httpx.get(url, timeout=WAIT).status_code)
            except Exception as exc:
                done.put(exc)

    def stop(self) -> None:
        if self._thread is not None:
            self.jobs.put((1, next(self._order), None, None))
            self._thread.join(timeout=WAIT)


def queue_gets(spans: Spans) -> dict[str, ReadableSpan]:
    found = {}
    for span in spans.named("GET"):
        match = _QUEUE_URL.search(str(attr(span, "url.full") or attr(span, "http.url") or ""))
        if match:
            found[match.group(1)] = span
    return found


def root_of(spans: Spans, tag: str) -> ReadableSpan:
    roots = [r for r in spans.named("invoke_workflow") if attr(r, REQUEST_ID) == f"req-{tag}"]
    assert len(roots) == 1, tag
    return roots[0]


@pytest.mark.parametrize(
    "starter_on_loop", [False, True], ids=["starter_threaded", "starter_async"]
)
@pytest.mark.parametrize("queue_type", [queue.Queue, queue.PriorityQueue])
def test_a_queue_worker_serving_two_runs_at_once_never_records_an_item_under_the_wrong_one(
    otel, fake_provider, queue_type, starter_on_loop
):
    """Run A2's tool starts the worker; run B2's tool, and code outside any run, hand it an
    item each while A2 is in flight.

    From a ``queue.Queue`` (first in, first out) the worker knows who put each item: B2's
    request is recorded under B2, the outside one as a root without a request ID. From a queue
    whose order crew_otel does not follow (a ``PriorityQueue``), which run an item came from is
    unknown: a root without a request ID. Never under A2.
    """
    server = QueueServer(queue_type())
    base = fake_provider.base_url
    a2_in_flight = threading.Event()
    b2_served = threading.Event()
    outside_served = threading.Event()

    def outside_any_run() -> None:
        if a2_in_flight.wait(WAIT):
            server.fetch(f"{base}/queue-outside/models")
            outside_served.set()

    outside = threading.Thread(target=outside_any_run, daemon=True)
    outside.start()

    def a2_body() -> str:
        server.ensure_started()
        status = server.fetch(f"{base}/queue-A2/models")
        a2_in_flight.set()
        # A2 stays in flight until then
        assert b2_served.wait(WAIT), "B2's item was not served"
        assert outside_served.wait(WAIT), "the outside item was not served"
        return f"status {status}"

    def b2_body() -> str:
        assert a2_in_flight.wait(WAIT), "A2 did not start the worker"
        status = server.fetch(f"{base}/queue-B2/models")
        b2_served.set()
        return f"status {status}"

    try:
        kickoff_at_once(
            fake_provider,
            {"A2": a2_body, "B2": b2_body},
            on_loop={"A2"} if starter_on_loop else {"B2"},
        )
    finally:
        a2_in_flight.set()
        outside.join(timeout=WAIT)
        server.stop()

    spans = Spans(otel.get_finished_spans())
    gets = queue_gets(spans)
    assert set(gets) == {"A2", "B2", "outside"}
    a2_trace = root_of(spans, "A2").context.trace_id
    for tag in ("B2", "outside"):
        assert attr(gets[tag], REQUEST_ID) != "req-A2", tag
        assert gets[tag].context.trace_id != a2_trace, tag
    roots = {"outside"} if queue_type is queue.Queue else {"A2", "B2", "outside"}
    for tag, get in gets.items():
        if tag in roots:
            assert get.parent is None, tag
            assert attr(get, REQUEST_ID) is None, tag
        else:
            assert attr(get, REQUEST_ID) == f"req-{tag}", tag
            assert get.context.trace_id == root_of(spans, tag).context.trace_id, tag
            assert any(p.name == "execute_tool fetch_status" for p in spans.ancestors(get)), tag


def test_uninstrument_restores_queue_functions_hooked_once_a_thread_was_bound_to_a_run(
    otel_tracer_provider,
):
    names = ("_put", "_get", "get")
    before = {name: queue.Queue.__dict__[name] for name in names}
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        assert {name: queue.Queue.__dict__[name] for name in names} == before, "not yet"
        with crew_otel.request("binds-a-thread"):
            bound = threading.Thread(target=lambda: None)
            bound.start()
            bound.join()
        assert all(queue.Queue.__dict__[name] is not before[name] for name in names)
    finally:
        crew_otel.uninstrument()
    assert all(queue.Queue.__dict__[name] is before[name] for name in names)
