"""A collector outage must not hurt the application: refused, black-holed and slow endpoints."""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import crew_otel
from crew_otel.export import DROPPED_SPANS
from crew_otel.testing.crews import make_llm, research_crew
from tests.support.otlp import OtlpReceiver
from tests.support.waiting import free_port

#: A bound against a broken test (an export that never arrives), not a measurement.
WAIT_S = 60.0


class BlackHole:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._accepted = threading.Event()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self._accepted.set()

    def wait_arrived(self) -> None:
        """Until an exporter connected (it waits for an answer that never comes)."""
        assert self._accepted.wait(WAIT_S), "no exporter connected"

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


def kickoffs(fake_provider, n: int = 12, threads: int = 4) -> None:
    """``n`` kickoffs in threads; each returns its own answer."""

    def run(i: int) -> None:
        result = research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
            inputs={"topic": f"[[o{i}]]"}
        )
        assert f"[[o{i}]]" in result.raw

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(run, i) for i in range(n)]:
            future.result(WAIT_S)  # a bound against a hang, not a measurement


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


def test_outages_do_not_block_or_break_the_application(
    outage_env, fake_provider, caplog, monkeypatch
):
    """The application's kickoffs return while the exporter is stuck on a collector that
    never answers (a black hole) or holds every export (too slow to answer), and shutdown
    returns (the time ran out) while it still is; a refused endpoint breaks nothing either."""
    refused = f"http://127.0.0.1:{free_port()}"
    hole = BlackHole()
    slow = OtlpReceiver(free_port(), hold=True)
    try:
        for name, endpoint, collector in (
            ("refused", refused, None),
            ("black hole", hole.endpoint, hole),
            ("slow", slow.endpoint, slow),
        ):
            if collector is not None:
                # an export waits for the collector's answer longer than the test runs
                monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "300")
            with caplog.at_level(logging.WARNING):
                setup, reader = outage_env(endpoint)
                kickoffs(fake_provider, n=1)  # spans to export
                if collector is not None:
                    collector.wait_arrived()  # the exporter waits for the collector now...
                kickoffs(fake_provider)  # ...and the application's kickoffs return meanwhile
            if collector is hole:
                assert len(hole.held) == 1, "the exporter is still on its first export"
            if collector is slow:
                assert slow.holding, "the export is still held"
                assert slow.span_count == 0
            returned_in_time = setup.shutdown(timeout_millis=1500)
            if collector is not None:
                assert returned_in_time is False, f"{name}: shutdown returns, the time ran out"
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
                slow.release()
                slow.wait_spans()  # the slow collector still receives the spans it held
            caplog.clear()
    finally:
        hole.close()
        slow.close()


def test_export_resumes_when_the_endpoint_returns(outage_env, fake_provider):
    port = free_port()
    setup, _ = outage_env(f"http://127.0.0.1:{port}")
    kickoffs(fake_provider, n=4)  # the collector is down: exports fail
    receiver = OtlpReceiver(port)
    try:
        kickoffs(fake_provider, n=4)
        setup.tracer_provider.force_flush(10_000)
        receiver.wait_spans()  # spans arrive once the collector is back
    finally:
        setup.shutdown(timeout_millis=2000)
        receiver.close()
