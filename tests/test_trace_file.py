"""A trace file without a Collector: ``configure(trace_file=...)`` / ``OTEL_TRACES_EXPORTER=
crew_otel_file`` write OTLP/JSON lines that ``crew-otel report`` reads completely; the SDK's
console output is refused with an error that names the supported way."""

from __future__ import annotations

import io
import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from rich.console import Console

import crew_otel
from crew_otel import report
from crew_otel.otlp_json import OTLPJsonFileExporter, read_file
from crew_otel.testing.crews import make_llm, research_crew

RUNS = 6


@pytest.fixture
def file_setup(monkeypatch: pytest.MonkeyPatch):
    crew_otel.uninstrument()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")  # the argument wins over the variable
    setups = []

    def configure(**kwargs):
        setup = crew_otel.configure(service_name="file-test", set_global=False, **kwargs)
        setups.append(setup)
        return setup

    yield configure
    crew_otel.uninstrument()
    for setup in setups:
        setup.shutdown(timeout_millis=2000)


def _kickoffs(base_url: str) -> None:
    def run(i: int) -> None:
        with crew_otel.request(f"req-{i}"):
            research_crew(lambda: make_llm(base_url)).kickoff(inputs={"topic": f"t{i}"})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, range(RUNS)))


def _report(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=out, width=200)
    code = report.run(path, console, summary_json=path.with_suffix(".summary.json"))
    return code, out.getvalue(), err.getvalue()


def test_configure_trace_file_is_read_by_report(file_setup, fake_provider, tmp_path) -> None:
    path = tmp_path / "traces.jsonl"
    setup = file_setup(trace_file=path)
    _kickoffs(fake_provider.base_url)
    assert setup.shutdown(timeout_millis=5000)
    spans = read_file(path)
    request_ids = {s.attributes.get("crew_otel.request.id") for s in spans}
    assert {f"req-{i}" for i in range(RUNS)} <= request_ids
    assert len([s for s in spans if s.name.startswith("invoke_workflow")]) == RUNS
    code, out, _ = _report(path)
    assert code == 0
    assert "file-test" in out
    summary = json.loads(path.with_suffix(".summary.json").read_text())
    assert summary


def test_traces_exporter_variable_selects_the_file(
    file_setup, fake_provider, tmp_path, monkeypatch
) -> None:
    path = tmp_path / "env-traces.jsonl"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "crew_otel_file")
    monkeypatch.setenv("CREW_OTEL_TRACES_FILE", str(path))
    setup = file_setup()
    _kickoffs(fake_provider.base_url)
    assert setup.shutdown(timeout_millis=5000)
    assert len([s for s in read_file(path) if s.name.startswith("invoke_workflow")]) == RUNS


def test_entry_point_for_opentelemetry_instrument() -> None:
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="opentelemetry_traces_exporter", name="crew_otel_file")
    assert entry.load() is OTLPJsonFileExporter


def _append_batches(path: str, worker: int) -> None:
    provider = TracerProvider()
    exporter = OTLPJsonFileExporter(path)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for i in range(40):
        # attributes large enough that one line is several write buffers long
        with tracer.start_as_current_span(f"w{worker}-{i}", attributes={"big": "x" * 20000}):
            pass
    provider.shutdown()


def test_worker_processes_append_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "workers.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_batches, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    spans = read_file(path)
    assert len(spans) == 3 * 40


def test_report_names_the_supported_way_for_console_output(tmp_path: Path, capsys) -> None:
    path = tmp_path / "console.txt"
    with path.open("w") as handle:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=handle)))
        tracer = provider.get_tracer("t")
        for name in ("a", "b"):
            with tracer.start_as_current_span(name):
                pass
        provider.shutdown()
    code = report.run(path, Console(file=io.StringIO()))
    assert code == 2
    error = capsys.readouterr().err
    assert "console exporter" in error
    assert "OTEL_TRACES_EXPORTER=crew_otel_file" in error
    assert "Traceback" not in error
