"""Privacy: nothing of the user's content by default; redaction when capture is on; no headers;
CrewAI's baggage never reaches the provider."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

import crew_otel
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import Spans
from tests.workloads import mixed_workload

SENTINEL = "SENTINEL-7f3a9c"


def every_text(spans, reader) -> list[str]:
    """Every span name, attribute key/value, event name/attribute and metric attribute."""
    texts: list[str] = []
    for span in spans:
        texts.append(span.name)
        texts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        texts.append(span.status.description or "")
        for event in span.events:
            texts.append(event.name)
            texts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    texts.extend(f"{k}={v}" for k, v in point.attributes.items())
    return texts


def test_no_content_by_default_in_spans_events_metrics_and_logs(
    otel, fake_provider, metric_reader, caplog
):
    crew_otel.logs.install()
    try:
        with caplog.at_level(logging.DEBUG):
            mixed_workload(fake_provider, prefix=SENTINEL)
    finally:
        crew_otel.logs.uninstall()
    assert any(SENTINEL in m for r in fake_provider.requests for m in r.markers), "it was sent"
    spans = otel.get_finished_spans()
    leaks = [t for t in every_text(spans, metric_reader) if SENTINEL in t]
    assert leaks == []
    ours = [r for r in caplog.records if r.name.startswith("crew_otel")]
    assert ours, "crew_otel did log (the shared agent warning)"
    for record in ours:
        assert SENTINEL not in record.getMessage()
        assert SENTINEL not in str(getattr(record, "request_id", ""))
    # and no HTTP header is recorded on the HTTP attempt spans
    for span in Spans(spans).named("POST"):
        assert not [k for k in span.attributes if ".header." in k], span.attributes


SECRETS = {
    "openai": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789",
    "anthropic": "sk-ant-api03-ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
    "password": "hunter2-correct-horse",
    "basic": "dXNlcjpzdXBlcnNlY3JldHBhc3M=",
}


def test_captured_content_is_redacted_and_truncated(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider
):
    crew_otel.uninstrument()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider,
        meter_provider=meter_provider,
        capture_content=True,
        max_attribute_length=512,
    )
    try:
        from crewai.tools import tool

        @tool("leaky_lookup")
        def leaky_lookup(query: str) -> str:
            """Returns data with credentials in it."""
            return (
                f"FACTS about {query}; Authorization: Bearer {SECRETS['bearer']} "
                f"api_key={SECRETS['openai']} " + "x" * 5000
            )

        @tool("leaky_failure")
        def leaky_failure(query: str) -> str:
            """Fails with a key in its message."""
            raise PermissionError(f"invalid key {SECRETS['anthropic']}")

        topic = (
            f"[[leak]] key {SECRETS['openai']} anthropic {SECRETS['anthropic']} "
            f"password={SECRETS['password']} Authorization: Basic {SECRETS['basic']}"
        )

        def run(tools) -> None:
            research_crew(lambda: make_llm(fake_provider.base_url), tools=tools).kickoff(
                inputs={"topic": topic}
            )

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run, [[leaky_lookup], [leaky_failure]]))
    finally:
        crew_otel.uninstrument()

    spans = span_exporter.get_finished_spans()
    texts = [f"{k}={v}" for s in spans for k, v in s.attributes.items()]
    texts += [f"{k}={v}" for s in spans for e in s.events for k, v in e.attributes.items()]
    for name, secret in SECRETS.items():
        assert not [t for t in texts if secret in t], f"{name} secret leaked"
    captured = {
        k: v
        for s in spans
        for k, v in s.attributes.items()
        if k
        in (
            "crewai.kickoff.inputs",
            "crewai.task.description",
            "gen_ai.input.messages",
            "gen_ai.output.messages",
            "gen_ai.tool.call.arguments",
            "gen_ai.tool.call.result",
        )
    }
    assert set(captured) == {
        "crewai.kickoff.inputs",
        "crewai.task.description",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    }
    assert all(len(v) <= 512 for v in captured.values())
    assert any("[REDACTED]" in v for v in captured.values())
    assert any("[[leak]]" in v for v in captured.values()), "content itself is kept"
    failure = [
        e
        for s in spans
        for e in s.events
        if e.name == "exception" and "PermissionError" in e.attributes["exception.type"]
    ]
    assert failure
    assert "[REDACTED]" in failure[0].attributes["exception.message"]


@pytest.mark.parametrize("strip", [True, False])
def test_crewai_baggage_never_reaches_the_provider(
    otel_tracer_provider, span_exporter, fake_provider, strip
):
    from crewai.flow.flow import Flow, start

    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, strip_crewai_baggage=strip)
    try:

        class TicketFlow(Flow):
            @start()
            def triage(self):
                return (
                    research_crew(lambda: make_llm(fake_provider.base_url))
                    .kickoff(inputs={"topic": "[[flow]]"})
                    .raw
                )

        def run(i: int) -> None:
            TicketFlow().kickoff(inputs={"api_token": f"tok_SECRET_{i}"})

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run, range(2)))
    finally:
        crew_otel.uninstrument()
    headers = [r.baggage or "" for r in fake_provider.requests]
    assert len(headers) == 6
    leaked = [h for h in headers if "tok_SECRET" in h or "flow_inputs" in h]
    if strip:
        assert leaked == []
        assert all(r.traceparent for r in fake_provider.requests), "tracing still propagates"
    else:
        assert leaked, "without the filter CrewAI's flow inputs go out in the baggage header"


def test_the_applications_baggage_goes_out_without_crewais(otel, fake_provider):
    """Concurrent kickoffs, each with an entry of the application's own in its baggage beside
    CrewAI's ``crew_context``: every request carries its own run's entry, none of CrewAI's."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    def run(i: int) -> None:
        token = otel_context.attach(baggage.set_baggage("tenant", f"tenant-{i}"))
        try:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            crew.kickoff(inputs={"topic": f"[[tenant {i}]]"})
        finally:
            otel_context.detach(token)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, range(2)))
    headers = sorted(r.baggage or "" for r in fake_provider.requests)
    assert headers == ["tenant=tenant-0"] * 3 + ["tenant=tenant-1"] * 3
