"""Process lifecycle: forked children, flushing at shutdown, running under opentelemetry-instrument.

Telemetry is received the way a collector receives it: a small OTLP/HTTP server on 127.0.0.1
that decodes every POST with opentelemetry-proto.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import INVALID_SPAN

import crew_otel
from crew_otel import attributes as a
from crew_otel.metrics import KICKOFFS_ACTIVE, WORKFLOW_DURATION
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_llm, research_crew
from tests.support.otlp import OtlpReceiver, string_attribute
from tests.support.processes import app_environment, console_spans
from tests.support.waiting import free_port

HERE = Path(__file__).resolve().parent
KICKOFF = "invoke_workflow research"
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


@pytest.fixture
def configure_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``crew_otel.configure`` with its own (non-global) providers; shut down after the test."""
    crew_otel.uninstrument()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    # Nothing is exported on a timer during a test: what arrives was flushed.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    setups: list[Any] = []

    def configure(endpoint: str) -> Any:
        setup = crew_otel.configure(
            service_name="lifecycle-test", endpoint=endpoint, set_global=False
        )
        setups.append(setup)
        return setup

    yield configure
    crew_otel.uninstrument()
    for setup in setups:
        setup.shutdown(timeout_millis=500)


def kickoff(base_url: str, i: int) -> str:
    result = research_crew(lambda: make_llm(base_url)).kickoff(inputs={"topic": f"[[p{i}]]"})
    assert f"[[p{i}]]" in result.raw
    return str(result.raw)


# --- 10. fork hygiene ----------------------------------------------------------------------
def _child_report(crew: Any, base_url: str) -> dict[str, Any]:
    runtime = crew_otel.CrewAIInstrumentor().runtime
    assert runtime is not None
    report: dict[str, Any] = {
        "in_flight": runtime.metrics.in_flight,
        "tracked": runtime.sharing.tracked_objects,
        "users": runtime.sharing.users_of(crew),
    }
    usage = runtime.sharing.enter(crew, "crew", "child-request", INVALID_SPAN, "research")
    report["conflicted"] = usage.conflicted
    runtime.sharing.exit(usage)
    return report


@needs_fork
def test_a_forked_child_inherits_no_runs_in_flight(otel, fake_provider, metric_reader):
    runtime = crew_otel.CrewAIInstrumentor().runtime
    assert runtime is not None
    crew = research_crew(lambda: make_llm(fake_provider.base_url))
    gate = fake_provider.gate("parent")
    fake_provider.script(Fault.hold(gate.name), key="slow")
    parent_run = threading.Thread(target=crew.kickoff, kwargs={"inputs": {"topic": "[[slow]]"}})
    parent_run.start()
    try:
        gate.wait_parked(1)  # the parent's kickoff is inside its first model call
        assert runtime.metrics.in_flight
        assert runtime.sharing.users_of(crew)
        raw, status = _fork_and_report(crew, fake_provider.base_url, metric_reader)
    finally:
        gate.open()
    parent_run.join(30)
    assert os.waitstatus_to_exitcode(status) == 0
    report = json.loads(raw)

    assert report["in_flight"] == 0, "the parent's kickoff is not running in the child"
    assert report["active"] == [0]
    assert report["tracked"] == 0
    assert report["users"] == []
    assert report["conflicted"] is False, "the parent's use is no conflict in the child"
    # the parent is unaffected and its kickoff was counted out
    assert runtime.metrics.in_flight == 0
    assert runtime.sharing.tracked_objects == 0


def _fork_and_report(crew: Any, base_url: str, metric_reader: Any) -> tuple[bytes, int]:
    """Fork; the child reports what it sees of the parent's run: (its report, wait status)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            report = _child_report(crew, base_url)
            data = metric_reader.get_metrics_data()
            report["active"] = [
                point.value
                for rm in data.resource_metrics
                for sm in rm.scope_metrics
                for metric in sm.metrics
                if metric.name == KICKOFFS_ACTIVE
                for point in metric.data.data_points
            ]
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        assert ready, "the forked child did not report"
        raw = os.read(read_end, 65536)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    return raw, status


POOL_JOB = """
import multiprocessing
import sys

import crew_otel
from crew_otel.testing.crews import make_llm, research_crew


def run(i):
    crew = research_crew(lambda: make_llm(sys.argv[2]))
    return crew.kickoff(inputs={"topic": f"[[p{i}]]"}).raw


if __name__ == "__main__":
    crew_otel.configure(service_name="batch-job", endpoint=sys.argv[1])
    pool = multiprocessing.get_context("fork").Pool(2)
    results = pool.map(run, range(int(sys.argv[3])), chunksize=1)
    pool.close()
    pool.join()
    assert all(f"[[p{i}]]" in r for i, r in enumerate(results)), results
    print("DONE", len(results), flush=True)
"""


def run_script(tmp_path: Path, source: str, *args: str, **extra_env: str) -> str:
    script = tmp_path / "job.py"
    script.write_text(source)
    env = app_environment(tmp_path, **extra_env)
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@needs_fork
def test_multiprocessing_pool_workers_lose_no_spans(tmp_path, receiver, fake_provider):
    """Pool workers leave through os._exit (no atexit): configure() flushes them anyway.

    In a fresh process, as a batch job runs: CrewAI's event bus threads do not survive a fork,
    so a process that kicked off crews itself cannot fork workers that kick off crews.
    """
    runs = 4
    stdout = run_script(
        tmp_path,
        POOL_JOB,
        receiver.endpoint,
        fake_provider.base_url,
        str(runs),
        # nothing is exported on a timer: what arrives was flushed when the workers ended
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_METRIC_EXPORT_INTERVAL="60000",
    )
    assert f"DONE {runs}" in stdout
    spans = receiver.spans()
    kickoffs = [s for s in spans if s.name == KICKOFF]
    assert len(kickoffs) == runs, f"{len(kickoffs)} of {runs} kickoffs arrived"
    assert len({string_attribute(s, a.REQUEST_ID) for s in kickoffs}) == runs
    http = [s for s in spans if s.name == "POST"]
    assert len(http) == fake_provider.stats()["requests"] == runs * 3
    assert {s.trace_id for s in spans} == {s.trace_id for s in kickoffs}


# --- 11. one call flushes traces and metrics, within a bound ---------------------------------
def test_flush_exports_traces_and_final_metrics(configure_sdk, receiver, fake_provider):
    setup = configure_sdk(receiver.endpoint)
    runs = 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: kickoff(fake_provider.base_url, i), range(runs)))

    assert setup.flush(timeout_millis=5000)
    assert len([s for s in receiver.spans() if s.name == KICKOFF]) == runs
    points = receiver.last_metrics()
    (active,) = points[KICKOFFS_ACTIVE]
    assert active.as_int == 0, "the final export shows no kickoff in flight"
    assert string_attribute(active, a.GEN_AI_WORKFLOW_NAME) == "research"
    assert sum(point.count for point in points[WORKFLOW_DURATION]) == runs

    received = len(receiver.metrics)
    assert setup.shutdown(timeout_millis=5000)
    assert len(receiver.metrics) > received, "shutdown flushes metrics too"


def test_shutdown_returns_within_its_bound_when_the_collector_is_down(
    configure_sdk, fake_provider, monkeypatch
):
    """A collector that never answers (it holds every export) cannot hold the process:
    shutdown returns, reporting that its one wait for traces and metrics ran out, while the
    collector still holds the export it started."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "300")  # the exporter would wait that long
    collector = OtlpReceiver(free_port(), hold=True)
    try:
        setup = configure_sdk(collector.endpoint)
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda i: kickoff(fake_provider.base_url, i), range(2)))
        assert setup.shutdown(timeout_millis=1000) is False
        collector.wait_arrived()  # the flush did reach the collector...
        assert collector.holding, "...which has not answered"
    finally:
        collector.close()


# --- 12. under opentelemetry-instrument ------------------------------------------------------
APP_CALLING_CONFIGURE = """
from concurrent.futures import ThreadPoolExecutor

import crew_otel
from crew_otel.testing import FakeOpenAIProvider
from crew_otel.testing.crews import make_llm, research_crew

setup = crew_otel.configure(service_name="left-in-the-code")

with FakeOpenAIProvider() as provider:

    def run(i):
        crew = research_crew(lambda: make_llm(provider.base_url))
        return crew.kickoff(inputs={"topic": f"[[auto{i}]]"}).raw

    with ThreadPoolExecutor(max_workers=2) as pool:
        print("RESULTS", list(pool.map(run, range(2))), flush=True)
setup.shutdown()
"""


def test_under_opentelemetry_instrument_configure_reuses_the_sdk(tmp_path):
    command = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert command, "opentelemetry-instrument is installed with the test dependencies"
    app = tmp_path / "app.py"
    app.write_text(APP_CALLING_CONFIGURE)
    env = app_environment(
        tmp_path,
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="auto-app",
    )
    result = subprocess.run(
        [command, sys.executable, str(app)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=HERE.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = result.stderr
    assert "Attempting to instrument while already instrumented" not in stderr, stderr[-3000:]
    assert "Overriding of current TracerProvider is not allowed" not in stderr, stderr[-3000:]
    assert stderr.count("the OpenTelemetry SDK is already configured") == 1, stderr[-3000:]

    spans = console_spans(result.stdout)
    kickoffs = [s for s in spans if s["name"] == KICKOFF]
    assert len(kickoffs) == 2
    assert {s["resource"]["attributes"]["service.name"] for s in kickoffs} == {"auto-app"}
    http = [s for s in spans if s["name"] == "POST"]
    assert len(http) == 6, "one HTTP span per attempt: httpx instrumented exactly once"
    assert all(s["attributes"].get(a.REQUEST_ID) for s in http)
