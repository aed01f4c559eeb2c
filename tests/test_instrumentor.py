"""instrument()/uninstrument(): idempotent, reversible to the identical functions, skip cleanly."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import crew_otel
from crew_otel import targets
from crew_otel.hook_kinds import Layer, Status
from crew_otel.instrumentor import CrewAIInstrumentor
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import Spans


def kickoff(fake_provider, marker: str = "x") -> None:
    research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
        inputs={"topic": f"[[{marker}]]"}
    )


def concurrent_kickoffs(fake_provider, n: int = 4) -> None:
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda i: kickoff(fake_provider, f"c{i}"), range(n)))


def originals() -> dict[str, object]:
    """The current objects in every owner's __dict__ that crew_otel hooks."""
    found: dict[str, object] = {}
    for target in targets.TARGETS:
        try:
            resolved = targets.resolve(target)
        except targets.Unresolved:
            continue
        found[target.key] = resolved.original
    import httpcore
    from crewai.llms.providers.openai.completion import OpenAICompletion

    found["pool"] = httpcore.ConnectionPool.__dict__["handle_request"]
    found["openai.call"] = OpenAICompletion.__dict__["call"]
    return found


def test_instrument_twice_makes_no_duplicate_spans(otel, fake_provider, otel_tracer_provider):
    concurrent_kickoffs(fake_provider)
    once = len(otel.get_finished_spans())
    otel.clear()
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    crew_otel.instrument()
    concurrent_kickoffs(fake_provider)
    assert len(otel.get_finished_spans()) == once
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("invoke_workflow")) == 4


def test_uninstrument_restores_the_original_functions(
    otel_tracer_provider, span_exporter, fake_provider
):
    crew_otel.uninstrument()
    before = originals()
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    during = originals()
    changed = [key for key in before if during[key] is not before[key]]
    assert len(changed) == len(before), "every resolvable target is hooked"
    crew_otel.uninstrument()
    after = originals()
    assert all(after[key] is before[key] for key in before), "identity restored"

    concurrent_kickoffs(fake_provider)
    assert span_exporter.get_finished_spans() == (), "no spans once uninstrumented"


def test_reinstrument_after_uninstrument(otel_tracer_provider, span_exporter, fake_provider):
    for _ in range(2):
        crew_otel.instrument(tracer_provider=otel_tracer_provider)
        kickoff(fake_provider)
        crew_otel.uninstrument()
    spans = Spans(span_exporter.get_finished_spans())
    assert len(spans.named("invoke_workflow")) == 2
    assert len({s.attributes["crew_otel.request.id"] for s in spans.named("chat")}) == 2


def test_a_target_missing_from_the_installed_crewai_is_skipped(
    monkeypatch, otel_tracer_provider, span_exporter, fake_provider, caplog
):
    from crewai import Crew

    crew_otel.uninstrument()
    monkeypatch.delattr(Crew, "akickoff_for_each")
    monkeypatch.setattr(
        targets,
        "TARGETS",
        (
            *targets.TARGETS,
            targets.Target(
                "crewai.not_a_module", "Thing.run", targets.TARGETS[0].factory, Layer.KICKOFF
            ),
        ),
    )
    with caplog.at_level(logging.DEBUG, logger="crew_otel"):
        instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        reports = {r.key: r for r in instrumentor.reports}
        assert reports["crewai.crew:Crew.akickoff_for_each"].status == Status.SKIPPED
        assert "not defined" in reports["crewai.crew:Crew.akickoff_for_each"].detail
        assert reports["crewai.not_a_module:Thing.run"].status == Status.SKIPPED
        assert reports["crewai.crew:Crew.kickoff"].status == Status.INSTALLED
        assert any("skipping crewai.crew:Crew.akickoff_for_each" in m for m in caplog.messages)
        concurrent_kickoffs(fake_provider, 2)
        assert len(Spans(span_exporter.get_finished_spans()).named("invoke_workflow")) == 2
    finally:
        crew_otel.uninstrument()
    assert "akickoff_for_each" not in Crew.__dict__


def test_disabled_by_otel_python_disabled_instrumentations(
    monkeypatch, otel_tracer_provider, span_exporter, fake_provider
):
    crew_otel.uninstrument()
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "redis, crew_otel")
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    assert not CrewAIInstrumentor().is_instrumented_by_opentelemetry
    kickoff(fake_provider)
    assert span_exporter.get_finished_spans() == ()


def test_unknown_option_and_bad_environment_are_clear_errors(monkeypatch):
    crew_otel.uninstrument()
    with pytest.raises(TypeError, match="captur_content"):
        crew_otel.instrument(captur_content=True)
    monkeypatch.setenv("CREW_OTEL_CAPTURE_CONTENT", "maybe")
    with pytest.raises(ValueError, match="CREW_OTEL_CAPTURE_CONTENT"):
        crew_otel.instrument()
    assert not CrewAIInstrumentor().is_instrumented_by_opentelemetry


def test_registered_as_opentelemetry_instrumentor_entry_point():
    (entry,) = [
        e
        for e in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
        if e.name == "crew_otel"
    ]
    assert entry.load() is CrewAIInstrumentor
    assert CrewAIInstrumentor().instrumentation_dependencies() == ("crewai >= 1.12",)


def test_instrument_before_the_sdk_provider_is_set_attaches_at_first_kickoff(
    fake_provider, span_exporter, otel_tracer_provider, monkeypatch
):
    """With no SDK provider at instrument() time, the stamping processor attaches later."""
    from opentelemetry import trace

    crew_otel.uninstrument()
    proxy = trace.ProxyTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: proxy)
    crew_otel.instrument(tracer_provider=None)
    runtime = CrewAIInstrumentor().runtime
    assert runtime is not None
    assert runtime.attach_processor is not None
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel_tracer_provider)

    async def main() -> None:
        await asyncio.gather(
            *(
                research_crew(lambda: make_llm(fake_provider.base_url)).akickoff(
                    inputs={"topic": f"[[late{i}]]"}
                )
                for i in range(2)
            )
        )

    try:
        asyncio.run(main())
    finally:
        crew_otel.uninstrument()
    assert runtime.attach_processor is None


def test_http_is_instrumented_when_instrument_returns_and_no_thread_is_started(
    otel_tracer_provider,
):
    """instrument() imports and installs everything in the calling thread: an import in a
    background thread racing the application's own imports of httpx2 once handed the
    application a partially initialised module."""
    import httpcore
    import wrapt

    crew_otel.uninstrument()
    threads_before = set(threading.enumerate())
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        assert set(threading.enumerate()) <= threads_before
        assert isinstance(httpcore.ConnectionPool.__dict__["handle_request"], wrapt.FunctionWrapper)
        http_reports = [r for r in CrewAIInstrumentor().reports if r.layer == "http"]
        assert any(r.status == Status.INSTALLED for r in http_reports)
    finally:
        crew_otel.uninstrument()
