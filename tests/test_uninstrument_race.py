"""``uninstrument()`` racing a kickoff in flight: every original restored, and a later
``instrument()`` fully working.

The interleaving is forced: the kickoff is held inside its start-up housekeeping (after it
checked that crew_otel is active) while another thread calls ``uninstrument()``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import wrapt

import crew_otel
from crew_otel.providers import processor_attacher
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr


def _llm_classes() -> list[type]:
    from crewai.llms.base_llm import BaseLLM

    found: list[type] = []
    pending = [BaseLLM]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(c for c in cls.__subclasses__() if c not in found)
    return found


def _wrapped_llm_methods() -> list[str]:
    return [
        f"{cls.__qualname__}.{name}"
        for cls in _llm_classes()
        for name in ("call", "acall")
        if isinstance(cls.__dict__.get(name), wrapt.FunctionWrapper)
    ]


def test_uninstrument_racing_a_kickoff(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider
):
    crew_otel.uninstrument()
    instrumentor = crew_otel.instrument(
        tracer_provider=otel_tracer_provider, meter_provider=meter_provider
    )
    runtime = instrumentor.runtime
    assert runtime is not None
    assert _wrapped_llm_methods(), "model calls are hooked while instrumented"
    held, release = threading.Event(), threading.Event()
    attach = processor_attacher(otel_tracer_provider, runtime)

    def held_attach() -> bool:
        held.set()
        assert release.wait(timeout=30)
        return attach()  # runs after uninstrument(): must not re-enable anything

    runtime.attach_processor = held_attach
    crew = research_crew(lambda: make_llm(fake_provider.base_url))
    with ThreadPoolExecutor(max_workers=1) as pool:
        raced = pool.submit(crew.kickoff, inputs={"topic": "[[raced]]"})
        assert held.wait(timeout=30), "the kickoff reached its start-up housekeeping"
        crew_otel.uninstrument()
        release.set()
        assert "[[raced]]" in raced.result(timeout=60).raw

    try:
        assert _wrapped_llm_methods() == [], "a racing kickoff re-wrapped classes"
        # the request-stamping processor stays off once uninstrumented
        span_exporter.clear()
        with crew_otel.request("after-uninstrument"):
            otel_tracer_provider.get_tracer("app").start_span("app work").end()
        (app_span,) = span_exporter.get_finished_spans()
        assert attr(app_span, REQUEST_ID) is None

        # a later instrument() works fully: model calls traced in every concurrent kickoff
        span_exporter.clear()
        crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)

        def run(i: int) -> str:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            return crew.kickoff(inputs={"topic": f"[[again{i}]]"}).raw

        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(run, range(3)))
        spans = Spans(span_exporter.get_finished_spans())
        roots = spans.named("invoke_workflow")
        assert len(roots) == 3
        for root in roots:
            chats = [s for s in spans.named("chat") if s.context.trace_id == root.context.trace_id]
            assert len(chats) == 3, "every model call of every kickoff traced"
    finally:
        crew_otel.uninstrument()
    assert _wrapped_llm_methods() == []
