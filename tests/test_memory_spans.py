"""Memory, knowledge and embeddings spans under concurrent requests.

Each scenario runs 8 requests at once (4 threads calling ``kickoff``, 4 ``akickoff`` on one
event loop), each with its own crew, unified memory (its own storage path) and a knowledge
source, against the loopback provider: the GenAI conventions' memory operations
(``search_memory``, ``upsert_memory``), ``crewai.memory.extract`` and ``retrieval
{data source}`` spans with their model and ``embeddings`` calls below them, the
HTTP attempts of each embeddings call below it (a 429 is the origin there), the request ID on
every span of a run, no orphans; then again uninstrumented: the caller gets the same answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import crew_otel
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import REQUEST_ID, Spans, attr, traces_by_marker, whole_run
from tests.workloads import kickoff_concurrently, outcome_summary

KEY = "sk-fake-key-for-the-loopback-provider"
N_THREADS = 4
N_ASYNC = 4
MARKERS = [f"m{i}" for i in range(N_THREADS + N_ASYNC)]
SEARCH = "search_memory"
SAVE = "upsert_memory"
EXTRACT = "crewai.memory.extract"
KNOWLEDGE = "retrieval"
#: The crews' knowledge collection (``Crew.knowledge`` is named "crew").
DATA_SOURCE = "knowledge_crew"
KNOWLEDGE_ADD = "crewai.knowledge.add"
STORE_SPANS = (SEARCH, SAVE, EXTRACT, KNOWLEDGE)
ORIGIN = "crew_otel.error.origin"
RECOVERED = "crew_otel.error.recovered"


def embedder(fake_provider: Any) -> dict[str, Any]:
    return {"provider": "openai", "config": {"api_key": KEY, "api_base": fake_provider.base_url}}


def memory_crew(fake_provider: Any, marker: str, memory: Any) -> Any:
    """One agent, one task, unified memory and a knowledge source (the same text for every
    crew: CrewAI keeps one knowledge collection for all crews of a process)."""
    from crewai import Crew, Task
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource

    agent = make_agent(make_llm(fake_provider.base_url), "Researcher")
    task = Task(
        name="research",
        description=f"Research [[{marker}]].",
        expected_output="facts",
        agent=agent,
    )
    return Crew(
        name="remembering",
        agents=[agent],
        tasks=[task],
        memory=memory,
        embedder=embedder(fake_provider),
        knowledge_sources=[StringKnowledgeSource(content="Refunds take 5 days.")],
    )


def own_memory(fake_provider: Any, path: Path) -> Any:
    from crewai.memory.unified_memory import Memory

    # the memory's own model calls go to the loopback provider too
    return Memory(
        llm=make_llm(fake_provider.base_url), embedder=embedder(fake_provider), storage=str(path)
    )


def run_all(make_crew: Callable[[str], Any]) -> dict[str, Any]:
    return kickoff_concurrently(make_crew, MARKERS, N_THREADS)


#: The knowledge markers an answer quotes: which chunks a search returns depends on what the
#: concurrent crews have ingested into the shared knowledge collection by then (timing).
KNOWLEDGE_MARKER = re.compile(r"\[\[k\d+\]\] ?")


def summary(outcome: Any) -> tuple[str, str]:
    """What the caller got, but for the knowledge chunks the answer happened to quote."""
    status, text = outcome_summary(outcome)
    return status, KNOWLEDGE_MARKER.sub("", text)


def run_traces(spans: Spans, fake_provider: Any, markers: list[str]) -> dict[str, Spans]:
    return traces_by_marker(spans, fake_provider, markers)


def check_whole(run: Spans) -> ReadableSpan:
    """One root, every span carries its request ID, no orphans; returns the root."""
    return whole_run(run, "invoke_workflow remembering")


def status_code(span: ReadableSpan) -> Any:
    """The HTTP status of an attempt span (new or old semantic conventions)."""
    return attr(span, "http.response.status_code") or attr(span, "http.status_code")


def is_http(span: ReadableSpan) -> bool:
    return span.kind is SpanKind.CLIENT and span.name.split(" ")[0] in ("POST", "GET")


def under_store_span(run: Spans, span: ReadableSpan) -> bool:
    return any(a.name.split(" ")[0] in (*STORE_SPANS, KNOWLEDGE_ADD) for a in run.ancestors(span))


def check_run(run: Spans, on_loop: bool) -> None:
    check_whole(run)
    (agent,) = run.named("invoke_agent Researcher")
    for name in STORE_SPANS:
        found = run.named(name)
        assert found, f"no {name} span"
        for span in found:
            assert agent in run.ancestors(span), f"{name} outside the agent"
            # a knowledge query is a retrieval CLIENT span; memory runs in the process
            assert span.kind is (SpanKind.CLIENT if name == KNOWLEDGE else SpanKind.INTERNAL)
    for span in run.named(SEARCH) + run.named(SAVE):
        assert span.name in (SEARCH, SAVE)  # the span name is the operation
        assert attr(span, "gen_ai.operation.name") == span.name
        assert attr(span, "crewai.memory.type") == "unified"
        assert attr(span, "crewai.memory.storage") == "LanceDBStorage"
        assert attr(span, "gen_ai.memory.store.id") == attr(span, "crewai.memory.storage.path")
        count = attr(span, "crewai.memory.result_count")
        assert isinstance(count, int)
        assert attr(span, "gen_ai.memory.record.count") == count
    for span in run.named(SEARCH):
        assert attr(span, "crewai.memory.limit") > 0
    for span in run.named(SAVE):
        assert [s for s in run.descendants(span) if s.name.startswith("embeddings ")]
    for span in run.named(KNOWLEDGE):
        assert span.name == f"retrieval {DATA_SOURCE}"
        assert attr(span, "gen_ai.operation.name") == "retrieval"
        assert attr(span, "gen_ai.data_source.id") == DATA_SOURCE
        assert attr(span, "gen_ai.request.top_k") > 0
        assert attr(agent, "gen_ai.data_source.id") == DATA_SOURCE
        assert attr(span, "crewai.knowledge.storage") == "KnowledgeStorage"
        assert isinstance(attr(span, "crewai.knowledge.result_count"), int)
        if not on_loop:  # CrewAI 1.15's aquery fails before embedding (see below)
            assert [s for s in run.descendants(span) if s.name.startswith("embeddings ")]
    # the memory's own model calls nest under its spans
    for name in (SAVE, EXTRACT):
        chats = [s for span in run.named(name) for s in run.descendants(span)]
        assert [s for s in chats if s.name.startswith("chat ")], f"no model call under {name}"
    embeddings = run.named("embeddings")
    assert embeddings
    for span in embeddings:
        assert span.kind is SpanKind.CLIENT
        assert attr(span, "gen_ai.operation.name") == "embeddings"
        assert attr(span, "gen_ai.provider.name") == "openai"
        assert span.name == f"embeddings {attr(span, 'gen_ai.request.model')}"
        assert attr(span, "gen_ai.usage.input_tokens") > 0
        assert under_store_span(run, span), [a.name for a in run.ancestors(span)]
        assert [k for k in run.kids(span) if is_http(k)], "no HTTP attempt under embeddings"
    # every HTTP attempt to the embeddings endpoint is under an embeddings span
    for span in run.all:
        if is_http(span) and str(attr(span, "url.full") or attr(span, "http.url")).endswith(
            "/embeddings"
        ):
            parent = run.parent(span)
            assert parent is not None
            assert parent.name.startswith("embeddings ")


def test_memory_knowledge_and_embeddings_spans_under_concurrent_requests(
    otel, fake_provider, tmp_path
):
    # one request's first embeddings call inside its run is rate-limited once (the SDK retries)
    limited = MARKERS[N_THREADS + 1]
    fake_provider.script(Fault.error(429), key=limited, endpoint="embeddings")

    memories = []

    def make_crew(marker: str) -> Any:
        memories.append(own_memory(fake_provider, tmp_path / marker))
        return memory_crew(fake_provider, marker, memories[-1])

    outcomes = run_all(make_crew)
    for memory in memories:  # CrewAI 1.12's akickoff returns before its background saves end
        memory.drain_writes()
    for marker in MARKERS:
        assert f"[[{marker}]]" in summary(outcomes[marker])[1], outcomes[marker]
    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    runs = run_traces(spans, fake_provider, MARKERS)
    for marker, run in runs.items():
        check_run(run, on_loop=marker in MARKERS[N_THREADS:])
        failed = [s for s in run.all if status_code(s) == 429]
        if marker != limited:
            assert failed == [], marker
            continue
        (attempt,) = failed
        parent = run.parent(attempt)
        assert parent is not None
        assert parent.name.startswith("embeddings ")
        assert attr(attempt, ORIGIN) is True
        assert attr(attempt, RECOVERED) is True
        assert parent.status.status_code is not StatusCode.ERROR  # the SDK's retry succeeded
        retried = [k for k in run.kids(parent) if attr(k, "http.request.resend_count") == 1]
        assert len(retried) == 1
    # the knowledge ingestion at crew construction (outside any request) has its spans too
    ingestions = [s for s in spans.roots() if s.name == KNOWLEDGE_ADD]
    assert len(ingestions) >= len(MARKERS)
    for span in ingestions:
        assert attr(span, REQUEST_ID) is None
        assert spans.kids(span, "embeddings")

    crew_otel.uninstrument()
    fake_provider.script(Fault.error(429), key=limited, endpoint="embeddings")
    baseline_dir = tmp_path / "baseline"

    def make_plain_crew(marker: str) -> Any:
        return memory_crew(fake_provider, marker, own_memory(fake_provider, baseline_dir / marker))

    baseline = run_all(make_plain_crew)
    assert {m: summary(o) for m, o in outcomes.items()} == {
        m: summary(o) for m, o in baseline.items()
    }


def test_a_memory_shared_by_two_requests_is_flagged_on_its_spans(otel, fake_provider, tmp_path):
    shared = own_memory(fake_provider, tmp_path / "shared")
    markers = ["s0", "s1"]
    # A run's first embeddings request of its own is its memory search's: both requests are
    # inside a search of the shared memory at once.
    gate = fake_provider.gate("searching")
    for marker in markers:
        fake_provider.script(Fault.hold(gate.name), key=marker, endpoint="embeddings")
    crews = {m: memory_crew(fake_provider, m, shared) for m in markers}
    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            futures = {m: pool.submit(crews[m].kickoff) for m in markers}
            gate.wait_parked(len(markers))
        finally:
            gate.open()
        results = {m: future.result() for m, future in futures.items()}
    for marker in markers:
        assert f"[[{marker}]]" in results[marker].raw
    spans = Spans(otel.get_finished_spans())
    flagged = [
        s
        for s in spans.all
        if s.name in (SEARCH, SAVE, EXTRACT) and attr(s, "crew_otel.shared_instance") is True
    ]
    assert flagged, "the shared memory storage is not named"
    for span in flagged:
        (event,) = [e for e in span.events if e.name == "crew_otel.shared_instance"]
        assert event.attributes["crew_otel.shared_instance.kind"] == "memory"
        assert event.attributes["crew_otel.shared_instance.class"].endswith("LanceDBStorage")
    # each crew's own knowledge storage is used by one request only: never flagged
    knowledge = spans.named(KNOWLEDGE)
    assert knowledge
    assert not [s for s in knowledge if attr(s, "crew_otel.shared_instance")]
