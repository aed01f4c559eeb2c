"""pytest plugin: fixtures for testing CrewAI services against the fault-injecting provider.

Loaded automatically when crew-otel is installed (entry point ``pytest11``). Fixtures:

``fake_provider``
    A running :class:`~crew_otel.testing.FakeOpenAIProvider` on 127.0.0.1 (fresh per test);
    script faults with ``fake_provider.script(Fault.error(500), ...)``.
``otel_tracer_provider`` (session)
    An SDK ``TracerProvider`` exporting to an in-memory exporter (made the global provider
    if the process has none yet).
``span_exporter``
    That in-memory exporter, emptied before each test: ``span_exporter.get_finished_spans()``.
``instrumented_crewai``
    CrewAI instrumented with ``otel_tracer_provider`` for the test, uninstrumented after.

CrewAI writes files and may phone home at import: call
``crew_otel.testing.crews.prepare_offline_environment()`` at the top of your ``conftest.py``,
before anything imports crewai.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures on use: loading the plugin imports nothing heavy
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from crew_otel.testing.provider import FakeOpenAIProvider

_EXPORTER_ATTRIBUTE = "_crew_otel_test_exporter"


@pytest.fixture
def fake_provider() -> Iterator[FakeOpenAIProvider]:
    """A fault-injecting OpenAI-compatible provider on 127.0.0.1, stopped after the test."""
    from crew_otel.testing.provider import FakeOpenAIProvider

    with FakeOpenAIProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def otel_tracer_provider() -> TracerProvider:
    """A session TracerProvider with an in-memory exporter (global if none was set)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    current: Any = trace.get_tracer_provider()
    if isinstance(current, TracerProvider) and hasattr(current, _EXPORTER_ATTRIBUTE):
        return current
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    setattr(provider, _EXPORTER_ATTRIBUTE, exporter)
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    return provider


@pytest.fixture
def span_exporter(otel_tracer_provider: TracerProvider) -> InMemorySpanExporter:
    """The in-memory exporter of ``otel_tracer_provider``, emptied for this test."""
    exporter: InMemorySpanExporter = getattr(otel_tracer_provider, _EXPORTER_ATTRIBUTE)
    exporter.clear()
    return exporter


@pytest.fixture
def instrumented_crewai(otel_tracer_provider: TracerProvider) -> Iterator[Any]:
    """CrewAI instrumented for the duration of the test."""
    import crew_otel

    crew_otel.uninstrument()
    instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        yield instrumentor
    finally:
        crew_otel.uninstrument()
