"""A trace file that cannot be written, and a trace file that cannot keep up.

A ``trace_file`` / ``CREW_OTEL_TRACES_FILE`` in a missing directory is created; one that is a
directory, sits under a regular file or in a read-only directory is one error line naming the
option and the path, and the application, its kickoffs and every other exporter go on as
before, in ``configure()`` and under ``opentelemetry-instrument``. A span queue that overflows
while writing a trace file says so (not "is the collector reachable?"), counts the drops in
``crew_otel.spans.dropped`` and shows them in ``crew-otel doctor`` run in the process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rich.console import Console

import crew_otel
from crew_otel.cli import doctor
from crew_otel.export import DROPPED_SPANS, CountingBatchSpanProcessor, ExportDestination
from crew_otel.metrics import WORKFLOW_DURATION
from crew_otel.otlp_json import OTLPJsonFileExporter
from crew_otel.testing.crews import make_llm, research_crew
from tests.support.otlp import OtlpReceiver
from tests.support.processes import app_environment

HERE = Path(__file__).resolve().parent
KICKOFF = "invoke_workflow research"
TOPIC = "[[paths]]"
UNWRITABLE = ("a directory", "under a file", "in a read-only directory")


def unwritable_path(case: str, tmp_path: Path) -> Path:
    """A trace-file path that cannot be opened for appending, even by root."""
    if case == "a directory":
        path = tmp_path / "traces.jsonl"
        path.mkdir()
        return path
    if case == "under a file":
        (tmp_path / "notes.txt").write_text("a regular file\n")
        return tmp_path / "notes.txt" / "traces.jsonl"
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):
        return read_only / "traces.jsonl"
    # root writes into a 0o555 directory; sysfs refuses new files even to root
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root and no sysfs: no directory is read-only here")
    return Path("/sys/crew-otel-traces.jsonl")


def kickoff(base_url: str) -> str:
    return str(research_crew(lambda: make_llm(base_url)).kickoff(inputs={"topic": TOPIC}).raw)


def span_names(path: Path) -> list[str]:
    """The names of the spans in a trace file (one OTLP/JSON request per line)."""
    return [
        span["name"]
        for line in path.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    ]


def crew_otel_records(records: Sequence[logging.LogRecord], text: str) -> list[logging.LogRecord]:
    return [r for r in records if r.name.startswith("crew_otel") and text in r.getMessage()]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


@pytest.fixture
def configure_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``crew_otel.configure`` with its own providers; nothing is exported on a timer."""
    crew_otel.uninstrument()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    setups: list[Any] = []

    def configure(**kwargs: Any) -> Any:
        setup = crew_otel.configure(service_name="paths-test", set_global=False, **kwargs)
        setups.append(setup)
        return setup

    yield configure
    crew_otel.uninstrument()
    for setup in setups:
        setup.shutdown(timeout_millis=2000)


# --- item 4: a bad trace file ----------------------------------------------------------------
@pytest.mark.parametrize("case", UNWRITABLE)
@pytest.mark.parametrize("source", ["argument", "environment"])
def test_an_unwritable_trace_file_is_one_error_and_everything_else_works(
    case, source, receiver, configure_sdk, fake_provider, tmp_path, monkeypatch, caplog
) -> None:
    baseline = kickoff(fake_provider.base_url)  # not instrumented
    path = unwritable_path(case, tmp_path)
    if source == "argument":
        option, kwargs = "trace_file", {"trace_file": path}
    else:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "crew_otel_file")
        monkeypatch.setenv("CREW_OTEL_TRACES_FILE", str(path))
        option, kwargs = "CREW_OTEL_TRACES_FILE", {}
    otlp_traces = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
    with caplog.at_level(logging.WARNING):
        setup = configure_sdk(endpoint=receiver.endpoint, span_exporters=[otlp_traces], **kwargs)
        assert kickoff(fake_provider.base_url) == baseline
        assert setup.flush(timeout_millis=5000)

    (error,) = crew_otel_records(caplog.records, str(path))
    assert error.levelno == logging.ERROR
    assert option in error.getMessage()
    assert error.exc_info is None, "one line, no traceback"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r is not error]
    assert len([s for s in receiver.spans() if s.name == KICKOFF]) == 1, "OTLP traces go on"
    (duration,) = receiver.last_metrics()[WORKFLOW_DURATION]
    assert duration.count == 1, "metrics go on"
    assert path.is_dir() or not path.exists()


def test_a_missing_directory_is_created(
    configure_sdk, fake_provider, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    path = tmp_path / "not" / "yet" / "traces.jsonl"
    with caplog.at_level(logging.WARNING):
        setup = configure_sdk(trace_file=path)
        kickoff(fake_provider.base_url)
        assert setup.shutdown(timeout_millis=5000)
    assert not crew_otel_records(caplog.records, str(path))
    assert span_names(path).count(KICKOFF) == 1


def test_under_opentelemetry_instrument_the_other_exporters_keep_working(
    tmp_path, receiver
) -> None:
    command = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert command, "opentelemetry-instrument is installed with the test dependencies"
    path = unwritable_path("under a file", tmp_path)
    env = app_environment(
        tmp_path,
        checkout_on_path=False,
        OTEL_TRACES_EXPORTER="crew_otel_file,otlp",
        CREW_OTEL_TRACES_FILE=str(path),
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_SERVICE_NAME="auto-app",
    )
    result = subprocess.run(
        [command, sys.executable, str(HERE / "auto_instrumented_app.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=HERE.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[[auto0]]" in result.stdout
    assert "[[auto1]]" in result.stdout
    stderr = result.stderr
    assert "Failed to auto initialize" not in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if str(path) in line]
    assert "CREW_OTEL_TRACES_FILE" in line
    kickoffs = [s for s in receiver.spans() if s.name == KICKOFF]
    assert len(kickoffs) == 2, "the OTLP traces exporter next to the file still exports"
    (duration,) = receiver.last_metrics()[WORKFLOW_DURATION]
    assert duration.count == 2, "metrics are configured too"


# --- item 7: a trace file that cannot keep up ------------------------------------------------
class GatedFileExporter(OTLPJsonFileExporter):
    """A trace-file exporter whose writes wait for ``release``: a disk that stalls."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(60)
        return super().export(spans)


class GatedExporter(SpanExporter):
    """An exporter whose export waits for ``release``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(60)
        return SpanExportResult.SUCCESS


QUEUE = 4


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


def test_a_trace_file_that_cannot_keep_up_says_so_counts_and_shows_in_doctor(
    configure_sdk, fake_provider, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", str(QUEUE))
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    path = tmp_path / "traces.jsonl"
    stalled = GatedFileExporter(path)
    reader = InMemoryMetricReader()
    setup = configure_sdk(span_exporters=[stalled], metric_readers=[reader])
    try:
        # the worker takes the first span and stalls on the disk: the queue cannot drain
        setup.tracer_provider.get_tracer("test").start_span("first").end()
        assert stalled.entered.wait(30)
        every_span = InMemorySpanExporter()
        setup.tracer_provider.add_span_processor(SimpleSpanProcessor(every_span))
        with caplog.at_level(logging.WARNING):
            kickoff(fake_provider.base_url)
            assert not setup.flush(timeout_millis=100)

        dropped = len(every_span.get_finished_spans()) - QUEUE
        assert dropped > 0
        assert setup.dropped_spans == dropped
        assert dropped_metric(reader) == dropped
        (warning,) = crew_otel_records(caplog.records, "export queue is full")
        message = warning.getMessage()
        assert f"the trace file {path}" in message
        assert "cannot keep up" in message
        assert "collector" not in message
        (flush,) = crew_otel_records(caplog.records, "flush did not finish")
        assert str(path) in flush.getMessage()
        assert "collector" not in flush.getMessage()

        out = io.StringIO()
        doctor.run(Console(file=out, width=400))
        (row,) = [line for line in out.getvalue().splitlines() if str(path) in line]
        assert f"{dropped} dropped" in row
    finally:
        stalled.release.set()
    assert setup.shutdown(timeout_millis=5000)
    assert len(span_names(path)) == 1 + QUEUE, "the spans the queue held reach the file"


def test_a_collector_that_cannot_keep_up_is_named_without_credentials(caplog) -> None:
    stalled = GatedExporter()
    endpoint = "http://user:s3cret@127.0.0.1:4318/v1/traces?api_key=k3y#frag"
    processor = CountingBatchSpanProcessor(
        stalled,
        max_queue_size=2,
        max_export_batch_size=1,
        destination=ExportDestination.collector(endpoint),
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    try:
        tracer.start_span("first").end()
        assert stalled.entered.wait(30)
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                tracer.start_span(f"s{i}").end()
        assert processor.dropped == 3
        (warning,) = crew_otel_records(caplog.records, "export queue is full")
        message = warning.getMessage()
        assert "is the collector at http://127.0.0.1:4318/v1/traces reachable?" in message
        for secret in ("user", "s3cret", "api_key", "k3y", "frag"):
            assert secret not in message
    finally:
        stalled.release.set()
        provider.shutdown()


@pytest.mark.parametrize(
    ("endpoint", "variable"),
    [
        ("http://user:s3cret@127.0.0.1:4318", None),
        (None, "http://user:s3cret@127.0.0.1:4318/v1/traces?token=s3cret"),
    ],
)
def test_configure_names_its_otlp_endpoint_without_credentials(
    endpoint, variable, configure_sdk, monkeypatch
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    if variable is not None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", variable)
    setup = configure_sdk(endpoint=endpoint)
    assert setup.span_processor is not None
    assert str(setup.span_processor.destination) == (
        "the collector at http://127.0.0.1:4318/v1/traces"
    )
