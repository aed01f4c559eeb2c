"""The request ID across a process boundary: an opt-in W3C baggage entry, Celery end to end.

The Celery test starts a real ``redis-server`` (the broker) and a real Celery worker on
127.0.0.1; the worker exports its spans over OTLP to a receiver in this process. This process
plays the web service: a server span, ``with crew_otel.request(...)``, then ``task.delay()``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

import crew_otel
from crew_otel import attributes as a
from crew_otel.context import REQUEST_ID_KEY
from crew_otel.safety import reset_reported_errors
from crew_otel.testing import FakeOpenAIProvider
from crew_otel.testing.crews import make_llm, research_crew
from tests.support.otlp import OtlpReceiver, string_attribute
from tests.support.processes import app_environment
from tests.support.waiting import free_port, wait_for

HERE = Path(__file__).resolve().parent
ENTRY = "crew_otel.request.id"
KICKOFF = "invoke_workflow research"


@pytest.fixture
def instrumented(
    otel_tracer_provider: TracerProvider, span_exporter: Any, meter_provider: Any
) -> Iterator[Any]:
    """CrewAI instrumented with the option given; the global propagator restored afterwards."""
    crew_otel.uninstrument()
    reset_reported_errors()

    def instrument(**options: Any) -> None:
        crew_otel.uninstrument()
        crew_otel.instrument(
            tracer_provider=otel_tracer_provider, meter_provider=meter_provider, **options
        )

    try:
        yield instrument
    finally:
        crew_otel.uninstrument()


def carrier_in(request_id: str) -> dict[str, str]:
    carrier: dict[str, str] = {}
    with crew_otel.request(request_id):
        propagate.inject(carrier)
    return carrier


def kickoff_spans(exporter: Any) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == KICKOFF]


# --- in one process: what is injected and extracted --------------------------------------------
def test_the_entry_crosses_only_when_opted_in(instrumented):
    instrumented()
    assert ENTRY not in carrier_in("web-off").get("baggage", "")
    ctx = propagate.extract({"baggage": f"{ENTRY}=from-elsewhere"})
    assert ctx.get(REQUEST_ID_KEY) is None

    instrumented(propagate_request_id=True)
    assert f"{ENTRY}=web-on" in carrier_in("web-on")["baggage"]
    assert "baggage" not in carrier_in_no_request()


def carrier_in_no_request() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def test_an_extracted_entry_becomes_the_request_id_of_every_kickoff_under_it(
    instrumented, span_exporter, fake_provider
):
    instrumented(propagate_request_id=True)
    carriers = [carrier_in(f"web-{i}") for i in range(4)]

    def worker(carrier: dict[str, str]) -> str:
        ctx = propagate.extract(carrier)
        assert baggage.get_baggage(ENTRY, ctx) is None  # moved out of the baggage
        token = otel_context.attach(ctx)
        try:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            return str(crew.kickoff(inputs={"topic": "[[x]]"}).raw)
        finally:
            otel_context.detach(token)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(worker, carriers))
    ids = sorted(string_of(s) for s in kickoff_spans(span_exporter))
    assert ids == [f"web-{i}" for i in range(4)]
    # inside the runs nothing carried the entry to the model provider
    assert fake_provider.requests
    assert all(ENTRY not in (r.baggage or "") for r in fake_provider.requests)


def string_of(span: Any) -> str:
    return str(span.attributes[a.REQUEST_ID])


def test_the_model_provider_never_sees_the_entry(instrumented, span_exporter, fake_provider):
    """Opted in, inside crew_otel.request(): outside a run the entry is injected, never inside."""
    instrumented(propagate_request_id=True)

    def run(i: int) -> None:
        with crew_otel.request(f"req-{i}"):
            ctx = baggage.set_baggage(ENTRY, "planted", otel_context.get_current())
            token = otel_context.attach(ctx)  # even if someone put it in the baggage
            try:
                research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
                    inputs={"topic": f"[[p{i}]]"}
                )
            finally:
                otel_context.detach(token)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, range(4)))
    assert len(fake_provider.requests) == 4 * 3
    assert all(r.traceparent for r in fake_provider.requests)
    assert [r.baggage for r in fake_provider.requests if ENTRY in (r.baggage or "")] == []
    assert sorted(string_of(s) for s in kickoff_spans(span_exporter)) == [
        f"req-{i}" for i in range(4)
    ]


# --- a real Celery worker and a real redis-server ----------------------------------------------
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (Debian package 'redis-server')"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: accepts_connections(port), 20, f"redis-server on port {port}")
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def worker_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def celery_worker(
    redis_url: str, worker_receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from tests import cross_process_app

    workdir = tmp_path_factory.mktemp("celery")
    env = app_environment(
        CROSS_PROCESS_WORKER="1",
        CELERY_BROKER_URL=f"{redis_url}/0",
        CELERY_RESULT_BACKEND=f"{redis_url}/1",
        CREW_OTEL_PROPAGATE_REQUEST_ID="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=worker_receiver.endpoint,
        OTEL_METRICS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    log = (workdir / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "tests.cross_process_app", "worker",
            "--pool=threads", "--concurrency=4", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel=WARNING",
        ],
        cwd=HERE.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    app = cross_process_app.app
    app.conf.update(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"]
    )
    try:
        yield cross_process_app
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=5)
        log.close()
        if worker.returncode not in (0, -15):
            print((workdir / "worker.log").read_text()[-3000:])


@pytest.fixture
def celery_instrumented(otel_tracer_provider: TracerProvider) -> Iterator[None]:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument(tracer_provider=otel_tracer_provider)
    try:
        yield
    finally:
        CeleryInstrumentor().uninstrument()


def worker_spans_of(receiver: OtlpReceiver, trace_id: bytes, timeout: float = 20) -> list[Any]:
    """The worker's spans of one trace, once its kickoff and Celery task span have arrived."""

    def arrived() -> list[Any]:
        spans = [s for s in receiver.spans() if s.trace_id == trace_id]
        names = {s.name for s in spans}
        return spans if KICKOFF in names and any(n.startswith("run/") for n in names) else []

    return receiver.wait_until(arrived, "the worker's kickoff and task spans of the trace", timeout)


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_a_celery_worker_continues_the_web_requests_trace_and_request_id(
    instrumented,
    celery_instrumented,
    celery_worker,
    worker_receiver,
    otel_tracer_provider,
    span_exporter,
):
    tracer = otel_tracer_provider.get_tracer("web")
    with FakeOpenAIProvider() as provider:

        def web_request(request_id: str) -> tuple[bytes, dict[str, Any]]:
            with (
                crew_otel.request(request_id),
                tracer.start_as_current_span("POST /tickets", kind=trace.SpanKind.SERVER) as span,
            ):
                trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
                result = celery_worker.run_crew.delay(provider.base_url, f"[[{request_id}]]")
            return trace_id, result.get(timeout=90)

        instrumented(propagate_request_id=True)
        with ThreadPoolExecutor(max_workers=3) as pool:
            crossed = list(pool.map(web_request, ["web-1", "web-2", "web-3"]))
        instrumented()  # the sender does not opt in: nothing crosses
        off_trace, off_result = web_request("web-off")

        for (trace_id, result), request_id in zip(crossed, ["web-1", "web-2", "web-3"]):
            assert f"[[{request_id}]]" in result["raw"]
            assert result["request_id_at_start"] == request_id
            spans = worker_spans_of(worker_receiver, trace_id)
            assert {string_attribute(s, a.REQUEST_ID) for s in spans} == {request_id}, [
                (s.name, string_attribute(s, a.REQUEST_ID)) for s in spans
            ]
            assert len([s for s in spans if s.name == "POST"]) == 3
        # the model provider received traceparents but never the request-ID entry
        assert len(provider.requests) == 4 * 3
        assert all(r.traceparent for r in provider.requests)
        assert [r.baggage for r in provider.requests if ENTRY in (r.baggage or "")] == []

    # option off on the sending side: the trace continues (Celery's propagation), the ID does not
    assert off_result["request_id_at_start"] is None
    spans = worker_spans_of(worker_receiver, off_trace)
    kickoff = next(s for s in spans if s.name == KICKOFF)
    assert string_attribute(kickoff, a.REQUEST_ID) not in (None, "web-off")
