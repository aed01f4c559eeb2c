"""A collector outage must not hurt the application: refused, black-holed and slow endpoints."""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import crew_otel
from crew_otel.export import DROPPED_SPANS
from crew_otel.testing.crews import make_llm, research_crew
from tests.loopback import free_port


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that counts spans (optionally slowly)."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.spans = 0
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                time.sleep(delay)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests += 1
                receiver.spans += sum(
                    len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
                )
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def outage_env(monkeypatch):
    crew_otel.uninstrument()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "32")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    setups: list = []

    def configure(endpoint: str | None):
        if endpoint is None:
            monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        else:
            monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        reader = InMemoryMetricReader()
        setup = crew_otel.configure(
            service_name="outage-test",
            endpoint=endpoint,
            set_global=False,
            metric_readers=[reader],
        )
        setups.append(setup)
        return setup, reader

    yield configure
    crew_otel.uninstrument()
    for setup in setups:
        setup.shutdown(timeout_millis=500)


def kickoff_latencies(fake_provider, n: int = 12, threads: int = 4) -> list[float]:
    def run(i: int) -> float:
        started = time.perf_counter()
        result = research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
            inputs={"topic": f"[[o{i}]]"}
        )
        assert f"[[o{i}]]" in result.raw
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(run, range(n)))


def dropped_metric(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    return sum(
        point.value
        for rm in (data.resource_metrics if data else ())
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == DROPPED_SPANS
        for point in metric.data.data_points
    )


def test_outages_do_not_slow_or_break_the_application(outage_env, fake_provider, caplog):
    setup, _ = outage_env(None)
    baseline = statistics.median(kickoff_latencies(fake_provider))
    crew_otel.uninstrument()

    refused = f"http://127.0.0.1:{free_port()}"
    hole = BlackHole()
    slow = Receiver(free_port(), delay=1.0)
    try:
        for name, endpoint in (
            ("refused", refused),
            ("black hole", f"http://127.0.0.1:{hole.port}"),
            ("slow", f"http://127.0.0.1:{slow.server.server_address[1]}"),
        ):
            with caplog.at_level(logging.WARNING):
                setup, reader = outage_env(endpoint)
                latency = statistics.median(kickoff_latencies(fake_provider))
            # a blocked export path would add seconds per kickoff; allow for machine noise
            assert latency < baseline * 2 + 0.25, (name, latency, baseline)
            started = time.perf_counter()
            setup.shutdown(timeout_millis=1500)
            assert time.perf_counter() - started < 4.0, f"{name}: shutdown is bounded"
            crew_otel.uninstrument()
            if name == "black hole":
                # the worker is stuck on the dead endpoint: the queue fills and spans are
                # dropped, counted and reported once
                assert setup.dropped_spans > 0
                assert dropped_metric(reader) == setup.dropped_spans
                warnings = [r for r in caplog.records if "export queue is full" in r.getMessage()]
                assert len(warnings) == 1
                assert not [r for r in caplog.records if "Queue full" in r.getMessage()]
            if name == "slow":
                assert slow.spans > 0, "the slow collector still received spans"
            caplog.clear()
    finally:
        hole.close()
        slow.close()


def test_export_resumes_when_the_endpoint_returns(outage_env, fake_provider):
    port = free_port()
    setup, _ = outage_env(f"http://127.0.0.1:{port}")
    kickoff_latencies(fake_provider, n=4)  # the collector is down: exports fail
    receiver = Receiver(port)
    try:
        kickoff_latencies(fake_provider, n=4)
        assert setup.tracer_provider.force_flush(10_000)
        deadline = time.monotonic() + 15
        while receiver.spans == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert receiver.spans > 0, "spans arrive once the collector is back"
    finally:
        setup.shutdown(timeout_millis=2000)
        receiver.close()
