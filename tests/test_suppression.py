"""Suppressed instrumentation and no-op providers: crew_otel records nothing, changes nothing.

As opentelemetry-python-contrib tests each instrumentation: inside
``suppress_instrumentation()`` no span, no metric point and no attribute on anyone's span; with
a ``NoOpTracerProvider``/``NoOpMeterProvider`` the instrumented calls still work. Every check
runs concurrent kickoffs (threads and asyncio) that exercise the hooks that make no span of
their own - the HTTP attempt observers (a 500 then a retry) and the context-window observer (a
``context_length_exceeded`` answer, summarised or ``SystemExit``) - inside a span of the
application's own, which is where a hook that ignores suppression would write. The application's
outcomes and its own spans must equal those of the same requests run uninstrumented.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import crew_otel
from crew_otel import safety
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm, research_crew

APP_SPAN = "app request"
MARKER = "app.marker"
FAST = 0.01  # retry-after seconds: the SDK's back-off stays short
#: One request of each kind per thread, and per asyncio task. ``exit`` (CrewAI's SystemExit)
#: only in threads: a SystemExit escaping an asyncio task stops the event loop itself.
THREAD_KINDS = ("retry", "summarise", "exit", "plain")
ASYNC_KINDS = ("retry", "summarise", "summarise", "plain")
HTTP_ATTEMPT_ATTRIBUTES = ("http.request.resend_count", "crew_otel.error.origin")


def _crew(provider: FakeOpenAIProvider, kind: str, marker: str) -> Any:
    """A small crew for ``kind``, with its provider fault scripted for ``marker``."""
    from crewai import Crew, Task

    if kind in ("retry", "plain"):
        if kind == "retry":
            provider.script(Fault.error(500, FAST), key=marker)
        return research_crew(lambda: make_llm(provider.base_url))
    provider.script(Fault.context_length_exceeded(), key=marker)
    agent = make_agent(
        make_llm(provider.base_url), "Writer", respect_context_window=kind == "summarise"
    )
    task = Task(description="Write about {topic}", expected_output="text", agent=agent)
    return Crew(agents=[agent], tasks=[task])


def _outcome(run: Callable[[], Any]) -> str:
    try:
        return str(run().raw)
    except SystemExit as exc:  # CrewAI's answer to an overflow it may not summarise
        return f"SystemExit({exc.code!r})"
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"


def _scope(suppress: bool) -> contextlib.AbstractContextManager[Any]:
    return suppress_instrumentation() if suppress else contextlib.nullcontext()


def _app_tracer(provider: TracerProvider) -> trace.Tracer:
    return provider.get_tracer("app")


def run_threads(
    provider: FakeOpenAIProvider, tracer: trace.Tracer, prefix: str, suppress: bool
) -> dict[str, str]:
    """The application: 4 concurrent threaded kickoffs, each inside a span of its own."""

    def request(i: int) -> tuple[str, str]:
        marker = f"{prefix}{i}"
        with tracer.start_as_current_span(APP_SPAN, attributes={MARKER: marker}), _scope(suppress):
            crew = _crew(provider, THREAD_KINDS[i], marker)
            return marker, _outcome(lambda: crew.kickoff(inputs={"topic": f"[[{marker}]]"}))

    with ThreadPoolExecutor(max_workers=len(THREAD_KINDS)) as pool:
        return dict(pool.map(request, range(len(THREAD_KINDS))))


def run_asyncio(
    provider: FakeOpenAIProvider, tracer: trace.Tracer, prefix: str, suppress: bool
) -> dict[str, str]:
    """The application: 4 concurrent ``akickoff``s, each inside a span of its own."""

    async def request(i: int) -> tuple[str, str]:
        marker = f"{prefix}{i}"
        with tracer.start_as_current_span(APP_SPAN, attributes={MARKER: marker}), _scope(suppress):
            crew = _crew(provider, ASYNC_KINDS[i], marker)
            try:
                result = await crew.akickoff(inputs={"topic": f"[[{marker}]]"})
            except Exception as exc:
                return marker, f"raised {type(exc).__name__}: {exc}"
            return marker, str(result.raw)

    async def main() -> dict[str, str]:
        return dict(await asyncio.gather(*(request(i) for i in range(len(ASYNC_KINDS)))))

    return asyncio.run(main())


RUNNERS = {"threads": run_threads, "asyncio": run_asyncio}


def app_spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {
        str((s.attributes or {})[MARKER]): s
        for s in exporter.get_finished_spans()
        if s.name == APP_SPAN
    }


def what_the_app_sees(span: ReadableSpan) -> tuple[set[str], list[str]]:
    """Its attribute keys and its event names (values such as times differ run to run)."""
    return set(span.attributes or {}), [e.name for e in span.events]


def crew_otel_points(reader: InMemoryMetricReader) -> list[str]:
    data = reader.get_metrics_data()
    found: list[str] = []
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "crew_otel":
                continue
            found.extend(m.name for m in scope.metrics if list(m.data.data_points))
    return found


@pytest.fixture
def baseline(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    fake_provider: FakeOpenAIProvider,
) -> Iterator[Callable[[str], tuple[dict[str, str], dict[str, Any], int]]]:
    """Runs the application uninstrumented: its outcomes, its spans, the provider requests."""

    def run(runner: str) -> tuple[dict[str, str], dict[str, Any], int]:
        crew_otel.uninstrument()
        span_exporter.clear()
        before = fake_provider.stats()["requests"]
        outcomes = RUNNERS[runner](
            fake_provider, _app_tracer(otel_tracer_provider), runner, suppress=False
        )
        seen = {m: what_the_app_sees(s) for m, s in app_spans(span_exporter).items()}
        span_exporter.clear()
        return outcomes, seen, fake_provider.stats()["requests"] - before

    yield run
    crew_otel.uninstrument()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_suppressed_kickoffs_record_nothing_and_change_nothing(
    runner: str,
    baseline: Callable[[str], tuple[dict[str, str], dict[str, Any], int]],
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: FakeOpenAIProvider,
) -> None:
    expected, expected_spans, expected_requests = baseline(runner)
    assert len(expected) == 4

    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    safety.reset_reported_errors()
    tracer = _app_tracer(otel_tracer_provider)
    before = fake_provider.stats()["requests"]
    outcomes = RUNNERS[runner](fake_provider, tracer, runner, suppress=True)

    assert outcomes == expected, "the application's results are those of uninstrumented runs"
    assert fake_provider.stats()["requests"] - before == expected_requests
    spans = span_exporter.get_finished_spans()
    assert [s.name for s in spans] == [APP_SPAN] * 4, "no crew_otel span, no HTTP span"
    seen = {m: what_the_app_sees(s) for m, s in app_spans(span_exporter).items()}
    for marker, (keys, events) in seen.items():
        assert not [k for k in keys if k.startswith("crew_otel.context.")], (marker, keys)
        assert not [e for e in events if e.startswith("crew_otel.")], (marker, events)
        assert not [k for k in keys if k in HTTP_ATTEMPT_ATTRIBUTES], (marker, keys)
    assert seen == expected_spans, "the application's own spans are untouched"
    assert crew_otel_points(metric_reader) == [], "no crew_otel metric point"
    assert safety._reported == set(), "no internal error"

    # The same requests unsuppressed: every hook above did run (the checks were not vacuous).
    span_exporter.clear()
    outcomes = RUNNERS[runner](fake_provider, tracer, runner, suppress=False)
    assert outcomes == expected
    spans = span_exporter.get_finished_spans()
    attributes = {k for s in spans for k in (s.attributes or {})}
    assert "crew_otel.context.summarized" in attributes, "the context-window observer ran"
    assert "http.request.resend_count" in attributes, "the HTTP attempt observer ran"
    assert "crew_otel.error.origin" in attributes
    assert set(crew_otel_points(metric_reader)) >= {
        "crew_otel.retries",
        "crew_otel.error.origins",
    }
    assert safety._reported == set()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_no_op_providers_change_nothing(
    runner: str,
    baseline: Callable[[str], tuple[dict[str, str], dict[str, Any], int]],
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    metric_reader: InMemoryMetricReader,
    meter_provider: MeterProvider,
    fake_provider: FakeOpenAIProvider,
) -> None:
    expected, expected_spans, expected_requests = baseline(runner)

    crew_otel.instrument(
        tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider()
    )
    safety.reset_reported_errors()
    before = fake_provider.stats()["requests"]
    outcomes = RUNNERS[runner](
        fake_provider, _app_tracer(otel_tracer_provider), runner, suppress=False
    )

    assert outcomes == expected, "the application's results are those of uninstrumented runs"
    assert fake_provider.stats()["requests"] - before == expected_requests
    assert safety._reported == set(), "no internal error"
    spans = span_exporter.get_finished_spans()
    assert [s.name for s in spans] == [APP_SPAN] * 4, "nothing reaches the application's provider"
    seen = {m: what_the_app_sees(s) for m, s in app_spans(span_exporter).items()}
    assert seen == expected_spans, "the application's own spans are untouched"
    assert crew_otel_points(metric_reader) == []


def test_the_hooks_suppression_check_agrees_with_opentelemetrys():
    """Every hook asks at every call whether instrumentation is suppressed, with a check of its
    own (one context look-up); it answers as ``is_instrumentation_enabled`` does in every
    state the instrumentation utilities can set, in threads as on the event loop."""
    import asyncio
    import threading

    from opentelemetry import context
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from crew_otel.context import current_context_reader
    from crew_otel.runtime import Runtime

    # ``Runtime.recording`` reads only these two fields of its runtime.
    runtime = SimpleNamespace(active=True, current_context=current_context_reader())
    recording = Runtime.recording.fget

    def both() -> tuple[bool, bool]:
        return recording(runtime), is_instrumentation_enabled()

    seen = [both()]
    with suppress_instrumentation():
        seen.append(both())
    token = context.attach(context.set_value("suppress_instrumentation", True))
    try:
        seen.append(both())
    finally:
        context.detach(token)
    with suppress_instrumentation():
        inner: list[tuple[bool, bool]] = []
        thread = threading.Thread(target=lambda: inner.append(both()))
        thread.start()
        thread.join()
        seen += inner

        async def on_loop() -> tuple[bool, bool]:
            return both()

        seen.append(asyncio.run(on_loop()))
    assert [a for a, _ in seen] == [b for _, b in seen]
    assert [a for a, _ in seen] == [True, False, False, True, False]
