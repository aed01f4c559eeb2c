"""Side by side with other instrumentations: one span per thing, in either order.

The other instrumentations are real PyPI packages, installed by ``make test-coexist`` (a test
is skipped where its package is missing, unless ``CREW_OTEL_TEST_COEXIST`` is set):
OpenInference's CrewAI instrumentation, which wraps ``BaseTool.run``/``Tool.run`` and
``Crew.kickoff`` with spans of its own, and the three OpenAI SDK instrumentations
(``opentelemetry-instrumentation-openai-v2``, OpenLLMetry's
``opentelemetry-instrumentation-openai``, OpenInference's ``openinference-instrumentation-openai``),
which make an inference span (and, the first two, ``gen_ai.client.*`` points) per SDK call.
Each runs with crew_otel instrumented
first and last, with concurrent runs in threads and in asyncio, against the loopback provider.
They register ``opentelemetry_instrumentor`` entry points that ``opentelemetry-instrument`` would
load in the other test files, hence their own environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import crew_otel
from crew_otel import attributes as a
from crew_otel import metrics as m
from crew_otel.coexistence import KNOWN_INSTRUMENTATIONS, OPENAI_EMBEDDINGS_HOOKS, OPENAI_HOOKS
from crew_otel.config import CrewOtelConfig
from crew_otel.safety import reset_reported_errors
from crew_otel.testing.crews import make_failing_tool, make_llm, make_lookup_tool, research_crew
from crew_otel.testing.provider import Fault
from tests.spans import Spans, attr, traces_by_marker

#: name -> (module, instrumentor class)
OTHERS = {
    "openinference-crewai": ("openinference.instrumentation.crewai", "CrewAIInstrumentor"),
    "openai-v2": ("opentelemetry.instrumentation.openai_v2", "OpenAIInstrumentor"),
    "openllmetry-openai": ("opentelemetry.instrumentation.openai", "OpenAIInstrumentor"),
    "openinference-openai": ("openinference.instrumentation.openai", "OpenAIInstrumentor"),
}
PROVIDER_INSTRUMENTATIONS = ("openai-v2", "openllmetry-openai", "openinference-openai")
ORDERS = ("crew_otel-first", "crew_otel-last")
RUNS = 3  # concurrent kickoffs per mode (threads, asyncio)
#: crew_otel's instrumentation scope.
OURS = "crew_otel"


def instrumentor_of(name: str) -> Any:
    module, cls = OTHERS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError:
        if os.environ.get("CREW_OTEL_TEST_COEXIST"):  # set by make test-coexist: never skip
            raise
        pytest.skip(f"{name} is not installed (make test-coexist installs it)")


@contextlib.contextmanager
def side_by_side(
    other: str,
    order: str,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
    **options: Any,
) -> Iterator[Any]:
    """crew_otel and ``other`` instrumented in ``order``, removed in reverse order."""
    instrumentor = instrumentor_of(other)
    crew_otel.uninstrument()
    reset_reported_errors()

    def ours() -> None:
        crew_otel.instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider, **options
        )

    def theirs() -> None:
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)

    steps = [(ours, crew_otel.uninstrument), (theirs, instrumentor.uninstrument)]
    if order == "crew_otel-last":
        steps.reverse()
    done: list[Callable[[], None]] = []
    try:
        for install, remove in steps:
            install()
            done.append(remove)
        yield instrumentor
    finally:
        for remove in reversed(done):
            remove()
        strip_leftover_wrappers()


def strip_leftover_wrappers() -> None:
    """OpenLLMetry's ``uninstrument()`` leaves its wrappers on the openai SDK (its ``unwrap``
    calls name the module, not the class): remove them so the next test starts clean."""
    packages = [k.package for k in KNOWN_INSTRUMENTATIONS]
    for module_name, class_name, attribute in {*OPENAI_HOOKS, *OPENAI_EMBEDDINGS_HOOKS}:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        while cls is not None:
            current = cls.__dict__.get(attribute)
            module = getattr(getattr(current, "_self_wrapper", None), "__module__", "")
            if not any(module == p or module.startswith(p + ".") for p in packages):
                break
            setattr(cls, attribute, current.__wrapped__)


def run_concurrently(make_crew: Callable[[int], Any], prefix: str) -> list[str]:
    """RUNS kickoffs in threads, then RUNS in one event loop (akickoff and kickoff_async)."""

    def threaded(i: int) -> str:
        return make_crew(i).kickoff(inputs={"topic": f"[[{prefix}t{i}]]"}).raw

    with ThreadPoolExecutor(max_workers=RUNS) as pool:
        results = list(pool.map(threaded, range(RUNS)))

    async def in_loop() -> list[Any]:
        crews = [make_crew(RUNS + i) for i in range(RUNS)]
        return await asyncio.gather(
            *(
                (c.akickoff if i % 2 else c.kickoff_async)(inputs={"topic": f"[[{prefix}a{i}]]"})
                for i, c in enumerate(crews)
            )
        )

    results += [r.raw for r in asyncio.run(in_loop())]
    return results


def by_trace(spans: Spans) -> dict[int, list[ReadableSpan]]:
    return spans.traces()


def metric_counts(reader: InMemoryMetricReader) -> dict[str, Counter[str]]:
    """Histogram counts / counter sums by instrument name, then by instrumentation scope."""
    found: dict[str, Counter[str]] = defaultdict(Counter)
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "count", None)
                    if value is None:
                        value = getattr(point, "value", 0)
                    found[metric.name][scope.scope.name] += value
    return found


def origins(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if attr(s, a.ERROR_ORIGIN)]


# --- OpenInference's CrewAI instrumentation ---------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_openinference_crewai_one_tool_span_per_call(
    order: str,
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: Any,
) -> None:
    """One ``execute_tool`` span and one duration point per tool call, one kickoff span per
    kickoff; a tool error CrewAI hands back to the model is a recovered origin, not fatal.
    Every other run's tool fails."""

    def make_crew(i: int) -> Any:
        tools = [make_failing_tool() if i % 2 else make_lookup_tool()]
        return research_crew(lambda: make_llm(fake_provider.base_url), tools=tools)

    with side_by_side("openinference-crewai", order, otel_tracer_provider, meter_provider):
        results = run_concurrently(make_crew, "oi")
    assert len(results) == 2 * RUNS

    spans = Spans(span_exporter.get_finished_spans())
    traces = {
        trace_id: members
        for trace_id, members in by_trace(spans).items()
        if any(s.name.startswith("invoke_workflow") for s in members)
    }
    assert len(traces) == 2 * RUNS
    failing = 0
    for members in traces.values():
        names = Counter(s.name for s in members)
        assert names["invoke_workflow research"] == 1, names
        tool_spans = [s for s in members if s.name.startswith("execute_tool ")]
        assert len(tool_spans) == 1, names  # the provider asks for one tool call per kickoff
        their_tool_spans = [s for s in members if s.name.endswith(".run")]
        assert len(their_tool_spans) == 1, names  # OpenInference keeps its own span
        found = origins(members)
        if tool_spans[0].name == "execute_tool flaky_api":
            assert [s.name for s in found] == [tool_spans[0].name]
            assert attr(found[0], a.ERROR_RECOVERED) is True
            failing += 1
        else:
            assert found == []

    counts = metric_counts(metric_reader)
    assert sum(counts[m.TOOL_DURATION].values()) == 2 * RUNS
    assert sum(counts[m.WORKFLOW_DURATION].values()) == 2 * RUNS
    assert failing == RUNS
    assert counts[m.ERROR_ORIGINS]["crew_otel"] == RUNS


# --- provider SDK instrumentations ------------------------------------------------------------


def is_inference_span(span: ReadableSpan) -> bool:
    """An inference span by any of the conventions in use (GenAI, OpenLLMetry, OpenInference)."""
    return (
        span.name.startswith("chat ")
        or attr(span, a.GEN_AI_OPERATION_NAME) == a.OP_CHAT
        or attr(span, "llm.request.type") == "chat"
        or attr(span, "openinference.span.kind") == "LLM"
    )


def requests_by_trace(fake_provider: Any) -> Counter[int]:
    return Counter(int(r.traceparent.split("-")[1], 16) for r in fake_provider.requests)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("other", PROVIDER_INSTRUMENTATIONS)
def test_provider_instrumentation_one_chat_span_per_model_call(
    other: str,
    order: str,
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: Any,
) -> None:
    """One inference span and one set of ``gen_ai.client.*`` points per model call; crew_otel's
    model-call span still parents the provider's span and the HTTP attempts."""

    def make_crew(i: int) -> Any:
        return research_crew(lambda: make_llm(fake_provider.base_url))

    with side_by_side(other, order, otel_tracer_provider, meter_provider):
        run_concurrently(make_crew, other[:4])

    spans = Spans(span_exporter.get_finished_spans())
    sent = requests_by_trace(fake_provider)
    assert len(sent) == 2 * RUNS
    assert sum(sent.values()) == 3 * 2 * RUNS
    for trace_id, members in by_trace(spans).items():
        inference = [s for s in members if is_inference_span(s)]
        assert len(inference) == sent[trace_id], Counter(s.name for s in members)
        ours = [s for s in members if s.name.startswith(a.SPAN_LLM_CALL + " ")]
        assert len(ours) == sent[trace_id]
        for span in ours:
            assert attr(span, a.LLM_INFERENCE_BY)
            assert not [k for k in span.attributes or {} if k.startswith("gen_ai.")]
        for span in inference:  # the provider's span sits under crew_otel's model call
            assert spans.parent(span) in ours
        http = [s for s in members if s.name == "POST"]
        assert len(http) == sent[trace_id]
        for span in http:
            assert set(spans.ancestors(span)) & set(ours)

    model_calls = 3 * 2 * RUNS
    counts = metric_counts(metric_reader)
    durations, tokens = counts[m.OPERATION_DURATION], counts[m.TOKEN_USAGE]
    # One set of points: from one instrumentation (crew_otel's only if the other records none).
    assert list(durations.values()) == [model_calls], durations
    assert len([n for n in tokens.values() if n]) <= 1, tokens
    assert sum(tokens.values()) in (0, 2 * model_calls), tokens
    ours = "crew_otel" in durations
    assert ours == (other == "openinference-openai")  # it records no gen_ai.client.* points
    assert tokens["crew_otel"] == (2 * model_calls if ours else 0)


def is_embeddings_span(span: ReadableSpan) -> bool:
    """An embeddings span by any of the conventions in use (GenAI, OpenLLMetry, OpenInference)."""
    return (
        attr(span, a.GEN_AI_OPERATION_NAME) == a.OP_EMBEDDINGS
        or attr(span, "llm.request.type") == "embedding"
        or attr(span, "openinference.span.kind") == "EMBEDDING"
    )


def embeddings_points(reader: InMemoryMetricReader, name: str) -> Counter[str]:
    """Histogram counts of instrument ``name`` for embeddings operations, by scope."""
    found: Counter[str] = Counter()
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    operation = (point.attributes or {}).get(a.GEN_AI_OPERATION_NAME)
                    if operation == a.OP_EMBEDDINGS:
                        found[scope.scope.name] += getattr(point, "count", 0)
    return found


def is_embeddings_attempt(span: ReadableSpan) -> bool:
    """An HTTP attempt to the embeddings endpoint (new or old HTTP conventions)."""
    url = attr(span, "url.full") or attr(span, "http.url")
    return span.name == "POST" and str(url).endswith("/embeddings")


def status_code(span: ReadableSpan) -> Any:
    return attr(span, "http.response.status_code") or attr(span, "http.status_code")


def first_embeddings_requests_by_trace(fake_provider: Any) -> Counter[int]:
    """Embeddings calls sent, by trace (an SDK retry of one is not another call)."""
    return Counter(
        int(r.traceparent.split("-")[1], 16)
        for r in fake_provider.requests
        if r.path.endswith("/embeddings") and r.retry_count == 0 and r.traceparent
    )


#: Where an SDK instrumentation may hook an embedding function's call (the synchronous client).
EMBEDDINGS_CALL_PATH = (
    ("openai.resources.embeddings", "Embeddings", "create"),
    ("openai", "OpenAI", "request"),
)


def hooks_embeddings(other: str) -> bool:
    """Whether ``other``'s wrapper is on the SDK's embeddings call path now (openai-v2 2.1
    instruments chat completions only)."""
    package = OTHERS[other][0]
    for module_name, class_name, attribute in EMBEDDINGS_CALL_PATH:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        obj = getattr(cls, "__dict__", {}).get(attribute)
        while obj is not None:
            module = getattr(getattr(obj, "_self_wrapper", None), "__module__", "")
            if module == package or module.startswith(package + "."):
                return True
            obj = getattr(obj, "__wrapped__", None)
    return False


def memory_crew(fake_provider: Any, storage: Any) -> Any:
    """The research crew with a unified memory of its own at ``storage``: its recalls and
    saves embed through the openai SDK (chromadb's OpenAI embedding function)."""
    from crewai.memory.unified_memory import Memory

    base_url = fake_provider.base_url
    embedder = {"provider": "openai", "config": {"api_key": "sk-loopback", "api_base": base_url}}
    memory = Memory(llm=make_llm(base_url), embedder=embedder, storage=str(storage))
    return research_crew(lambda: make_llm(base_url), memory=memory, embedder=embedder)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("other", PROVIDER_INSTRUMENTATIONS)
def test_provider_instrumentation_one_embeddings_span_per_embeddings_call(
    other: str,
    order: str,
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: Any,
    tmp_path: Any,
) -> None:
    """The memory's embeddings calls (recall and save, through the openai SDK) beside a
    provider instrumentation: one embeddings span per call and one set of ``gen_ai.client.*``
    embeddings points. Where the instrumentation hooks the embeddings call, the span is its
    own, under crew_otel's ``crewai.embeddings {model}`` (no ``gen_ai.*``, the request ID,
    parent of the HTTP attempts); where it does not (openai-v2 2.1), crew_otel's
    ``embeddings`` span stays. A rate-limited attempt the SDK retries stays the recovered
    origin."""
    crews: list[Any] = []

    def make_crew(i: int) -> Any:
        crews.append(memory_crew(fake_provider, tmp_path / str(i)))
        return crews[-1]

    prefix = f"e{other[:4]}"
    limited = f"{prefix}t1"  # its first embeddings call is rate-limited once
    fake_provider.script(Fault.error(429), key=limited, endpoint="embeddings")
    with side_by_side(other, order, otel_tracer_provider, meter_provider):
        hooked = hooks_embeddings(other)
        run_concurrently(make_crew, prefix)
        for crew in crews:  # CrewAI 1.12's akickoff returns before its saves end
            crew.memory.drain_writes()

    spans = Spans(span_exporter.get_finished_spans())
    sent = first_embeddings_requests_by_trace(fake_provider)
    runs = {
        trace_id: members
        for trace_id, members in by_trace(spans).items()
        if any(s.name.startswith("invoke_workflow") for s in members)
    }
    assert len(runs) == 2 * RUNS
    assert set(sent) <= set(runs)
    for trace_id, members in runs.items():
        assert sent[trace_id], "no embeddings call in the run"
        inference = [s for s in members if is_embeddings_span(s)]
        assert len(inference) == sent[trace_id], Counter(s.name for s in members)
        assert {s.instrumentation_scope.name == OURS for s in inference} == {not hooked}
        ours = [s for s in members if s.name.startswith(a.SPAN_EMBEDDINGS_CALL + " ")]
        if not hooked:
            assert ours == []
            ours = inference
        assert len(ours) == sent[trace_id]
        for span in ours if hooked else ():
            assert attr(span, a.LLM_INFERENCE_BY)
            assert attr(span, a.CREWAI_LLM_MODEL)
            assert attr(span, a.REQUEST_ID)
            assert not [k for k in span.attributes or {} if k.startswith("gen_ai.")]
        for span in inference if hooked else ():  # the provider's, under crew_otel's call
            assert spans.parent(span) in ours
        http = [s for s in members if is_embeddings_attempt(s)]
        assert len(http) >= sent[trace_id]
        for span in http:
            assert set(spans.ancestors(span)) & set(ours)
        failed = [s for s in http if status_code(s) == 429]
        for span in failed:
            assert attr(span, a.ERROR_ORIGIN) is True
            assert attr(span, a.ERROR_RECOVERED) is True
    rate_limited = [s for s in spans.all if is_embeddings_attempt(s) and status_code(s) == 429]
    assert len(rate_limited) == 1

    calls = sum(sent.values())
    durations = embeddings_points(metric_reader, m.OPERATION_DURATION)
    tokens = embeddings_points(metric_reader, m.TOKEN_USAGE)
    # One set of points: from one instrumentation (crew_otel's only if the other records none).
    assert list(durations.values()) == [calls], durations
    assert len([n for n in tokens.values() if n]) == 1, tokens
    ours_recorded = not hooked or other == "openinference-openai"  # it records no points
    assert (OURS in durations) == ours_recorded, durations
    assert (OURS in tokens) == ours_recorded, tokens


@contextlib.contextmanager
def embeddings_hook_removed(instrumentation: str) -> Iterator[None]:
    """The wrapper of ``instrumentation`` (a key of :data:`OTHERS`) taken off the SDK's
    ``Embeddings.create`` (its chat hooks stay), as with a version that does not instrument
    embeddings; put back after."""
    from openai.resources.embeddings import Embeddings

    package = OTHERS[instrumentation][0]
    hooked = Embeddings.__dict__["create"]
    module = getattr(getattr(hooked, "_self_wrapper", None), "__module__", "")
    assert module.startswith(package + "."), f"not the outermost wrapper: {module}"
    Embeddings.create = hooked.__wrapped__  # type: ignore[method-assign]
    try:
        yield
    finally:
        Embeddings.create = hooked  # type: ignore[method-assign]


def test_embeddings_defer_only_where_the_embeddings_call_is_hooked(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: Any,
    tmp_path: Any,
) -> None:
    """What is hooked on the embeddings call path decides, per call: OpenLLMetry with its
    embeddings hook makes the embeddings spans (crew_otel's is ``crewai.embeddings``); without
    it (its chat hooks still there, as with openai-v2 2.1), crew_otel's ``embeddings`` span
    and points are back while its model calls still leave the inference span to OpenLLMetry."""
    other = "openllmetry-openai"
    with side_by_side(other, "crew_otel-first", otel_tracer_provider, meter_provider):
        assert hooks_embeddings(other)
        hooked = memory_crew(fake_provider, tmp_path / "hooked")
        hooked.kickoff(inputs={"topic": "[[h1]]"})
        hooked.memory.drain_writes()
        with embeddings_hook_removed(other):
            unhooked = memory_crew(fake_provider, tmp_path / "unhooked")
            unhooked.kickoff(inputs={"topic": "[[h2]]"})
            unhooked.memory.drain_writes()

    spans = Spans(span_exporter.get_finished_spans())
    runs = traces_by_marker(spans, fake_provider, ["h1", "h2"])
    sent = first_embeddings_requests_by_trace(fake_provider)
    found: dict[str, set[str]] = {}
    for marker, run in runs.items():
        embeddings = [s for s in run.all if is_embeddings_span(s)]
        assert embeddings
        assert len(embeddings) == sent[embeddings[0].context.trace_id]  # one span per call
        found[marker] = {s.instrumentation_scope.name for s in embeddings}
        ours = {s.name.split(" ")[0] for s in run.all if s.instrumentation_scope.name == OURS}
        assert a.SPAN_LLM_CALL in ours  # the model calls still defer
        assert a.SPAN_CHAT not in ours
    (theirs,) = found["h1"]
    assert theirs.startswith(OTHERS[other][0])
    assert len(runs["h1"].named(a.SPAN_EMBEDDINGS_CALL)) == sent[runs["h1"].all[0].context.trace_id]
    assert found["h2"] == {OURS}
    assert not runs["h2"].named(a.SPAN_EMBEDDINGS_CALL)
    durations = embeddings_points(metric_reader, m.OPERATION_DURATION)
    assert durations[OURS] == len([s for s in runs["h2"].all if is_embeddings_span(s)])


@pytest.mark.parametrize("other", PROVIDER_INSTRUMENTATIONS)
def test_provider_instrumentation_failures_keep_one_fatal_origin(
    other: str,
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    fake_provider: Any,
) -> None:
    """A 500 the SDK retries and a 500 that fails the run: origins stay on the HTTP attempts,
    exactly one ``recovered=false`` per failed run; the provider's span is never an origin."""
    from crewai import Agent, Crew, Task

    def one_agent_crew() -> Any:
        llm = make_llm(fake_provider.base_url, max_retries=1)
        agent = Agent(role="Solo", goal="g", backstory="b", llm=llm, max_retry_limit=0)
        task = Task(description="Answer {topic}.", expected_output="x", agent=agent)
        return Crew(agents=[agent], tasks=[task])

    fake_provider.script(Fault.error(500), key="recovers")
    fake_provider.script(Fault.error(500), Fault.error(500), key="fails")
    with (
        side_by_side(other, "crew_otel-first", otel_tracer_provider, meter_provider),
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        ok = pool.submit(one_agent_crew().kickoff, inputs={"topic": "[[recovers]]"})
        bad = pool.submit(one_agent_crew().kickoff, inputs={"topic": "[[fails]]"})
        ok.result()
        with pytest.raises(Exception, match=r"500|Internal|error"):
            bad.result()

    spans = Spans(span_exporter.get_finished_spans())
    for members in by_trace(spans).values():
        found = origins(members)
        assert found
        assert all(s.name == "POST" for s in found)
        fatal = [s for s in found if attr(s, a.ERROR_RECOVERED) is False]
        failed = any(
            s.name.startswith("invoke_workflow") and s.status.status_code.name == "ERROR"
            for s in members
        )
        assert len(fatal) == (1 if failed else 0)


def test_switch_off_keeps_crew_otel_chat_span(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
    fake_provider: Any,
) -> None:
    """``defer_to_provider_instrumentation=False``: crew_otel keeps its ``chat`` span and its
    ``gen_ai.client.*`` points next to the provider's (the user asked for both)."""
    with side_by_side(
        "openai-v2",
        "crew_otel-first",
        otel_tracer_provider,
        meter_provider,
        defer_to_provider_instrumentation=False,
    ):
        research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(inputs={"topic": "[[s]]"})
    spans = Spans(span_exporter.get_finished_spans())
    ours = [s for s in spans.all if s.instrumentation_scope.name == "crew_otel"]
    assert len([s for s in ours if s.name.startswith("chat ")]) == 3
    assert metric_counts(metric_reader)[m.OPERATION_DURATION]["crew_otel"] == 3


def test_provider_instrumentation_removed_later_gives_the_chat_span_back(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    fake_provider: Any,
) -> None:
    """Detection happens per call: after the provider instrumentation is removed, crew_otel's
    model-call span is the ``chat`` span again."""
    with side_by_side("openai-v2", "crew_otel-first", otel_tracer_provider, meter_provider) as it:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        crew.kickoff(inputs={"topic": "[[r1]]"})
        it.uninstrument()
        research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(inputs={"topic": "[[r2]]"})
        it.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    spans = Spans(span_exporter.get_finished_spans())
    chats = [s for s in spans.all if is_inference_span(s)]
    assert len(chats) == 6
    ours = [s for s in chats if s.instrumentation_scope.name == "crew_otel"]
    assert len(ours) == 3  # the second kickoff's
    assert len({s.context.trace_id for s in ours}) == 1


def test_config_switch_from_environment() -> None:
    env = {"CREW_OTEL_DEFER_TO_PROVIDER_INSTRUMENTATION": "false"}
    assert CrewOtelConfig.resolve({}).defer_to_provider_instrumentation is True
    assert CrewOtelConfig.resolve({}, env).defer_to_provider_instrumentation is False
    resolved = CrewOtelConfig.resolve({"defer_to_provider_instrumentation": True}, env)
    assert resolved.defer_to_provider_instrumentation is True
