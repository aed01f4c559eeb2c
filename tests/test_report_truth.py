"""``crew-otel report`` tells the truth about a service run by two worker processes.

Real crews run concurrently against the loopback provider; their spans come from two SDK tracer
providers with two resources (``service.instance.id`` ``worker-1`` and ``worker-2``: the two
processes of one service), chosen per request by the OTel context, as two workers behind one
load balancer would make them. The spans go through crew_otel's OTLP/JSON encoder into a file
and ``crew-otel report`` reads it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rich.console import Console

import crew_otel
from crew_otel import report
from crew_otel.otlp_json import encode
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm

SERVICE = "support-api"
WORKERS = ("worker-1", "worker-2")
_WORKER_KEY = otel_context.create_key("test.report_truth.worker")
WAIT = 30.0


class _WorkerTracer(trace.Tracer):
    """Starts each span with the tracer of the worker named in the span's context."""

    def __init__(self, tracers: dict[str, trace.Tracer]) -> None:
        self._tracers = tracers

    def _pick(self, context: otel_context.Context | None) -> trace.Tracer:
        worker = otel_context.get_value(_WORKER_KEY, context)
        return self._tracers[worker if isinstance(worker, str) else WORKERS[0]]

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._pick(context).start_span(name, context, *args, **kwargs)

    @contextlib.contextmanager  # type: ignore[override]
    def start_as_current_span(
        self, name: str, context: Any = None, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        with self._pick(context).start_as_current_span(name, context, *args, **kwargs) as span:
            yield span


class TwoWorkers(trace.TracerProvider):
    """One service, two processes: an SDK tracer provider (own resource) per worker."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.providers = {
            worker: TracerProvider(
                resource=Resource.create({"service.name": SERVICE, "service.instance.id": worker})
            )
            for worker in WORKERS
        }
        for provider in self.providers.values():
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _WorkerTracer(
            {worker: p.get_tracer(*args, **kwargs) for worker, p in self.providers.items()}
        )

    def add_span_processor(self, processor: SpanProcessor) -> None:
        for provider in self.providers.values():
            provider.add_span_processor(processor)

    def shutdown(self) -> None:
        for provider in self.providers.values():
            provider.shutdown()


@contextlib.contextmanager
def in_worker(worker: str, request_id: str | None = None) -> Iterator[None]:
    """Run the block as ``worker`` (and inside ``crew_otel.request(request_id)``)."""
    token = otel_context.attach(otel_context.set_value(_WORKER_KEY, worker))
    try:
        with crew_otel.request(request_id) if request_id else contextlib.nullcontext():
            yield
    finally:
        otel_context.detach(token)


@pytest.fixture
def workers() -> Iterator[TwoWorkers]:
    made = TwoWorkers()
    meter_provider = MeterProvider()
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=made, meter_provider=meter_provider)
    try:
        yield made
    finally:
        crew_otel.uninstrument()
        made.shutdown()
        meter_provider.shutdown()


def run_report(workers: TwoWorkers, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``crew-otel report FILE --summary-json``: the text (one line) and the service's figures."""
    trace_file, summary = tmp_path / "spans.jsonl", tmp_path / "summary.json"
    trace_file.write_text(json.dumps(encode(workers.exporter.get_finished_spans())) + "\n")
    output = io.StringIO()
    console = Console(file=output, width=220, no_color=True)
    assert report.run(trace_file, console, summary_json=summary) == 0
    figures = json.loads(summary.read_text())["services"][SERVICE]
    return " ".join(output.getvalue().replace("│", " ").split()), figures


def gated_tool(wait: Callable[[], object], name: str = "lookup_facts") -> Any:
    """A ``@tool`` that calls ``wait()`` before answering (keeps its request in flight)."""
    from crewai.tools import tool

    def lookup(query: str) -> str:
        """Look up facts about a topic."""
        wait()
        return f"FACTS about {query}"

    lookup.__name__ = name
    return tool(name)(lookup)


def _crew(provider: FakeOpenAIProvider, wait: Callable[[], object]) -> Any:
    """A one-agent crew per request; its tool call waits on ``wait()``."""
    from crewai import Crew, Task

    agent = make_agent(make_llm(provider.base_url), "Researcher", [gated_tool(wait)])
    task = Task(description="Research {topic}.", expected_output="Facts.", agent=agent)
    return Crew(name="support", agents=[agent], tasks=[task])


def _request_id(worker: str, number: int) -> str:
    return f"C-halffixed-{worker[-1]}w-{number:02d}"


# --- overlap per process, labels, every diagnosis in the conclusion --------------------------
ROUNDS = 2


def _worker_run(
    worker: str, provider: FakeOpenAIProvider, rounds: list[threading.Barrier], done: Any
) -> None:
    """A long request in flight throughout, beside ROUNDS rounds of two requests at once."""
    started = threading.Event()

    def long_wait() -> None:
        started.set()
        assert done.wait(WAIT)

    def run(number: int, wait: Callable[[], object]) -> None:
        with in_worker(worker, _request_id(worker, number)):
            _crew(provider, wait).kickoff(inputs={"topic": f"[[{worker}-{number}]]"})

    with ThreadPoolExecutor(max_workers=3) as pool:
        long_run = pool.submit(run, 0, long_wait)
        assert started.wait(WAIT)
        for index, barrier in enumerate(rounds):
            pair = [
                pool.submit(run, 1 + 2 * index + k, lambda b=barrier: b.wait(WAIT))
                for k in range(2)
            ]
            for future in pair:
                future.result(WAIT)
        done.wait_for_rounds()
        long_run.result(WAIT)


class _Done:
    """Set once both workers finished their rounds: the long requests may end then."""

    def __init__(self) -> None:
        self._finished = threading.Barrier(len(WORKERS))
        self._event = threading.Event()

    def wait_for_rounds(self) -> None:
        self._finished.wait(WAIT)
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def test_report_counts_requests_in_flight_per_process_and_says_everything(
    workers, fake_provider, tmp_path
):
    rounds = [threading.Barrier(2 * len(WORKERS)) for _ in range(ROUNDS)]
    done = _Done()
    with ThreadPoolExecutor(max_workers=len(WORKERS)) as pool:
        for future in [pool.submit(_worker_run, w, fake_provider, rounds, done) for w in WORKERS]:
            future.result(WAIT * 2)
    concurrent = len(WORKERS) * (1 + 2 * ROUNDS)

    # then, one at a time: a provider 500 the SDK retries (recovered), an overflowing context
    # (CrewAI summarises), and a crew kicked off synchronously inside an async endpoint
    fake_provider.script(Fault.error(500), key="r500")
    with in_worker(WORKERS[0], _request_id(WORKERS[0], 7)):
        _crew(fake_provider, lambda: None).kickoff(inputs={"topic": "[[r500]]"})
    fake_provider.script(Fault.context_length_exceeded(), key="cw")
    with in_worker(WORKERS[1], _request_id(WORKERS[1], 7)):
        _crew(fake_provider, lambda: None).kickoff(inputs={"topic": "[[cw]]"})

    async def endpoint() -> None:
        _crew(fake_provider, lambda: None).kickoff(inputs={"topic": "[[loop]]"})  # the bug

    with in_worker(WORKERS[1], _request_id(WORKERS[1], 8)), contextlib.suppress(RuntimeError):
        asyncio.run(endpoint())  # CrewAI >= 1.14 refuses it; older versions block the loop

    text, figures = run_report(workers, tmp_path)
    assert figures["requests"] == concurrent + 3
    # the long request of each worker saw at most itself and one round (two) in its process:
    # never the requests that ran before or after each other, never the other worker's
    assert figures["concurrency_scope"] == "process"
    assert figures["processes"] == list(WORKERS)
    by_level = {int(level): counts for level, counts in figures["by_concurrency"].items()}
    assert set(by_level) == {1, 3}, by_level
    assert by_level[3] == [concurrent, 0]
    assert by_level[1][0] == 3
    assert "peak requests in flight (in its process)" in text

    # every request's label keeps what tells it apart (the shared prefix is elided)
    for worker in WORKERS:
        for number in range(1 + 2 * ROUNDS):
            assert f"…-{worker[-1]}w-{number:02d}" in text

    conclusion = figures["conclusion"]
    assert conclusion in text
    assert "1 request kicked off a crew synchronously inside a running event loop" in conclusion
    assert "the context window overflowed in 1 request: CrewAI summarised" in conclusion
    assert "recovered by a retry or CrewAI's own handling (" in conclusion
    assert "x 500 in HTTP attempt" in conclusion


# --- objects are per process ------------------------------------------------------------------
def test_each_workers_shared_agent_is_its_own_object(workers, fake_provider, tmp_path):
    """Each worker holds one module-level Agent used by two of its requests at once."""
    from crewai import Crew, Task

    for worker in WORKERS:
        in_tool, release = threading.Event(), threading.Event()
        calls: list[int] = []

        def hold_first_call(
            calls: list[int] = calls, in_tool: Any = in_tool, release: Any = release
        ) -> None:
            calls.append(1)
            if len(calls) == 1:
                in_tool.set()
                assert release.wait(WAIT)

        agent = make_agent(
            make_llm(fake_provider.base_url), "Support Analyst", [gated_tool(hold_first_call)]
        )

        def run(number: int, worker: str = worker, agent: Any = agent) -> None:
            task = Task(description="Answer about {topic}", expected_output="text", agent=agent)
            with in_worker(worker, _request_id(worker, number)):
                Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": f"[[{number}]]"})

        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(run, 0)
            assert in_tool.wait(WAIT)
            try:
                # CrewAI >= 1.14 refuses the concurrent use ("Executor is already running")
                with contextlib.suppress(Exception):
                    run(1)
            finally:
                release.set()
            with contextlib.suppress(Exception):
                first.result(WAIT)

    text, figures = run_report(workers, tmp_path)
    agents = [c for c in figures["conflicts"] if c["kind"] == "agent"]
    assert sorted(c["process"] for c in agents) == list(WORKERS), agents
    for conflict in agents:
        worker = conflict["process"]
        assert conflict["name"] == "Support Analyst"
        assert set(conflict["request_ids"]) == {_request_id(worker, 0), _request_id(worker, 1)}
    assert "Agent 'Support Analyst' in p1" in text
    assert "Agent 'Support Analyst' in p2" in text
    assert "p1 = process worker-1" in text
