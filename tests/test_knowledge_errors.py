"""A knowledge storage error is the origin on the knowledge span, though CrewAI hides it.

CrewAI's ``KnowledgeStorage.search`` turns every exception into an empty result, so a broken
knowledge store is invisible: the agent just answers without its knowledge. Here the store
really fails: the crew's knowledge collection was filled with 1536-dimension embeddings (an
earlier deployment's embedding model) and the crews of 8 concurrent requests (4 threads, 4 on
an event loop) embed with 8 dimensions, so Chroma rejects every query. Each request's
``retrieval knowledge_crew`` span carries the error (``error.type``, exception event) as an origin
CrewAI handled (``crew_otel.error.recovered=true``), no span claims a fatal origin, and the
callers get what they get without instrumentation.

The embedder config names its model with ``model_name``: CrewAI 1.12 validates a crew's
``embedder`` against its provider's typed config and drops a ``model`` key, and its default
model (``text-embedding-ada-002``) is sent no ``dimensions``, so the queries would not fail.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import StatusCode

import crew_otel
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr, traces_by_marker, whole_run
from tests.workloads import kickoff_concurrently, outcome_summary

KEY = "sk-fake-key-for-the-loopback-provider"
N_THREADS = 4
MARKERS = [f"k{i}" for i in range(8)]
KNOWLEDGE = "retrieval"
#: Chroma's error for a query vector of the wrong size (sync path); CrewAI's async path
#: fails before embedding (``asearch`` needs Chroma's async client, CrewAI builds a sync one).
STORAGE_ERRORS = {"InvalidArgumentError", "TypeError"}


def embedder(fake_provider: Any, **config: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "config": {
            "api_key": KEY,
            "api_base": fake_provider.base_url,
            "model_name": "text-embedding-3-small",
            **config,
        },
    }


def ingest_old_knowledge(fake_provider: Any, collection: str = "crew") -> None:
    """A knowledge collection (the crews' by default), filled with the full-size embeddings."""
    from crewai.knowledge.knowledge import Knowledge
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource

    knowledge = Knowledge(
        sources=[StringKnowledgeSource(content="Refunds take 5 days.")],
        embedder=embedder(fake_provider),
        collection_name=collection,
    )
    knowledge.add_sources()
    assert knowledge.query(["refunds"]), "the stored knowledge is searchable"


def knowledge_crew(fake_provider: Any, marker: str) -> Any:
    from crewai import Crew, Task
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource

    agent = make_agent(make_llm(fake_provider.base_url), "Clerk")
    task = Task(
        name="answer", description=f"Answer [[{marker}]].", expected_output="an answer", agent=agent
    )
    return Crew(
        name="knowing",
        agents=[agent],
        tasks=[task],
        embedder=embedder(fake_provider, dimensions=8),
        knowledge_sources=[StringKnowledgeSource(content="Refunds take 5 days.")],
    )


def origin_points(reader: InMemoryMetricReader) -> list[Any]:
    data = reader.get_metrics_data()
    return [
        point
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "crew_otel.error.origins"
        for point in metric.data.data_points
        if point.attributes.get("crew_otel.origin.operation") == "retrieval"
    ]


def test_a_knowledge_storage_error_is_the_origin_on_the_knowledge_span(
    otel, fake_provider, metric_reader
):
    ingest_old_knowledge(fake_provider)
    outcomes = kickoff_concurrently(lambda m: knowledge_crew(fake_provider, m), MARKERS, N_THREADS)
    for marker in MARKERS:
        assert f"[[{marker}]]" in outcome_summary(outcomes[marker])[1], outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    runs = traces_by_marker(spans, fake_provider, MARKERS)
    for marker, run in runs.items():
        whole_run(run, "invoke_workflow knowing")
        queries = run.named(KNOWLEDGE)
        assert queries, marker
        for span in queries:
            assert span.name == "retrieval knowledge_crew"
            assert span.status.status_code is StatusCode.ERROR, marker
            assert attr(span, "error.type") in STORAGE_ERRORS, marker
            assert attr(span, "crew_otel.error.origin") is True
            assert attr(span, "crew_otel.error.recovered") is True
            assert attr(span, "crewai.knowledge.result_count") == 0
            (event,) = [e for e in span.events if e.name == "exception"]
            if attr(span, "error.type") == "InvalidArgumentError":
                assert "dimension" in event.attributes["exception.message"]
        if marker in MARKERS[:N_THREADS]:  # kickoff in a thread: the sync search
            assert {attr(s, "error.type") for s in queries} == {"InvalidArgumentError"}
        # CrewAI handled it: no fatal origin. (CrewAI 1.15 re-ingests the crew's knowledge
        # during the kickoff and logs that failure too: a handled origin on the ingestion span.)
        for span in run.named("crewai.knowledge.add"):
            assert attr(span, "crew_otel.error.origin") is True, marker
            assert attr(span, "crew_otel.error.recovered") is True, marker
        fatal = [
            s
            for s in run.all
            if attr(s, "crew_otel.error.origin") and not attr(s, "crew_otel.error.recovered")
        ]
        assert fatal == [], [s.name for s in fatal]
    handled = [
        p
        for p in origin_points(metric_reader)
        if p.attributes["crew_otel.error.recovered"] == "true"
    ]
    assert sum(p.value for p in handled) >= len(MARKERS)
    assert {p.attributes["error.type"] for p in handled} <= STORAGE_ERRORS

    crew_otel.uninstrument()
    baseline = kickoff_concurrently(lambda m: knowledge_crew(fake_provider, m), MARKERS, N_THREADS)
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }


def agent_knowledge_crew(fake_provider: Any, marker: str) -> Any:
    """A crew whose agent has the knowledge (collection: the agent's role)."""
    from crewai import Crew, Task
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource

    agent = make_agent(
        make_llm(fake_provider.base_url),
        "Librarian",
        knowledge_sources=[StringKnowledgeSource(content=f"Refunds take 5 days. [[{marker}]]")],
    )
    task = Task(description="Answer.", expected_output="an answer", agent=agent)
    return Crew(
        name="reading", agents=[agent], tasks=[task], embedder=embedder(fake_provider, dimensions=8)
    )


def test_an_agents_knowledge_ingestion_error_is_the_fatal_origin(otel, fake_provider):
    """The other ingestion path: an Agent's knowledge is ingested at kickoff and CrewAI raises
    its error to the caller, so there ``crewai.knowledge.add`` is the fatal origin."""
    ingest_old_knowledge(fake_provider, collection="Librarian")
    markers = ["a0", "a1"]  # one kickoff in a thread, one on an event loop
    outcomes = kickoff_concurrently(lambda m: agent_knowledge_crew(fake_provider, m), markers, 1)
    for marker in markers:
        assert isinstance(outcomes[marker], Exception), outcomes[marker]
        assert "dimension" in str(outcomes[marker])  # Chroma's error, as CrewAI passes it on
    spans = Spans(otel.get_finished_spans())
    for marker, run in traces_by_marker(spans, fake_provider, markers).items():
        whole_run(run, "invoke_workflow reading")
        origins = [s for s in run.all if attr(s, "crew_otel.error.origin")]
        assert [s.name for s in origins] == ["crewai.knowledge.add"], marker
        assert attr(origins[0], "crew_otel.error.recovered") is False
        assert attr(origins[0], "error.type") == type(outcomes[marker]).__name__

    crew_otel.uninstrument()
    baseline = kickoff_concurrently(lambda m: agent_knowledge_crew(fake_provider, m), markers, 1)
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }
