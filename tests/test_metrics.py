"""Metrics: every instrument after a concurrent mixed run, exact in-flight counts, exemplars."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader

import crew_otel
from crew_otel import metrics as m
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID
from tests.support.metrics import points, total
from tests.workloads import mixed_workload

FAST = 0.01
ALLOWED_METRIC_ATTRIBUTES = {
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.token.type",
    "gen_ai.workflow.name",
    "gen_ai.agent.name",
    "gen_ai.tool.name",
    "error.type",
    "crew_otel.retry.layer",
    "crew_otel.origin.operation",
    "crew_otel.error.recovered",
    "crew_otel.shared_instance.kind",
    "crew_otel.failure.cause",  # one of a fixed set of causes (crew_otel.failures)
}


def test_every_instrument_after_a_concurrent_mixed_run(otel, fake_provider, metric_reader):
    mixed_workload(fake_provider)
    found = points(metric_reader)
    # (no run of this workload receives another's data: cross-talk has tests of its own)
    assert set(m.INSTRUMENT_NAMES) - {m.KICKOFF_QUEUE_WAIT, m.CROSSTALK} <= set(found)

    workflows = found[m.WORKFLOW_DURATION]
    assert total(workflows) == 6
    assert total(workflows, error__type="500") == 1
    assert total(workflows, gen_ai__workflow__name="research") == 4

    ops = found[m.OPERATION_DURATION]
    assert total(ops, error__type="500") == 3, "one failed model call per agent attempt"
    assert {p.attributes["gen_ai.provider.name"] for p in ops} == {"openai"}
    assert {p.attributes["gen_ai.operation.name"] for p in ops} == {"chat"}
    tokens = found[m.TOKEN_USAGE]
    assert {p.attributes["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    assert total(tokens, gen_ai__token__type="input") == total(ops) - total(ops, error__type="500")

    tools = found[m.TOOL_DURATION]
    assert total(tools, gen_ai__tool__name="flaky_api", error__type="RuntimeError") == 1
    assert total(tools, gen_ai__tool__name="lookup_facts") == 2, "the two successful runs"

    agents = found[m.AGENT_DURATION]
    assert total(agents, gen_ai__agent__name="Researcher", error__type="500") == 3

    retries = found[m.RETRIES]
    assert total(retries, crew_otel__retry__layer="http", error__type="500") == 6
    assert total(retries, crew_otel__retry__layer="agent", error__type="500") == 2

    origins = found[m.ERROR_ORIGINS]
    assert total(origins, crew_otel__origin__operation="http", error__type="500") == 9
    assert (
        total(origins, crew_otel__origin__operation="http", crew_otel__error__recovered="false")
        == 1
    )
    assert (
        total(
            origins,
            crew_otel__origin__operation="execute_tool",
            error__type="RuntimeError",
            crew_otel__error__recovered="true",
        )
        == 1
    )

    conflicts = found[m.SHARED_INSTANCE_CONFLICTS]
    assert total(conflicts, crew_otel__shared_instance__kind="agent") >= 1

    active = found[m.KICKOFFS_ACTIVE]
    assert sum(p.value for p in active) == 0, "nothing in flight afterwards"

    # cardinality guard: only bounded attributes, no request IDs or user text
    request_ids = {s.attributes.get(REQUEST_ID) for s in otel.get_finished_spans()}
    for name, data_points in found.items():
        for point in data_points:
            assert set(point.attributes) <= ALLOWED_METRIC_ATTRIBUTES, (name, point.attributes)
            for value in point.attributes.values():
                assert value not in request_ids
                assert "[[" not in str(value)


def test_histograms_use_the_genai_bucket_boundaries(otel, fake_provider, metric_reader):
    research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(inputs={"topic": "[[b]]"})
    found = points(metric_reader)
    for name in (m.OPERATION_DURATION, m.TOOL_DURATION):
        assert tuple(found[name][0].explicit_bounds) == m.DURATION_BUCKETS
    assert tuple(found[m.WORKFLOW_DURATION][0].explicit_bounds) == m.WORKFLOW_DURATION_BUCKETS
    # the conventions' text, spelled out (not the module's constant)
    agent = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4, 204.8, 409.6)
    assert tuple(found[m.AGENT_DURATION][0].explicit_bounds) == agent
    assert tuple(found[m.TOKEN_USAGE][0].explicit_bounds) == m.TOKEN_BUCKETS


# The workflow duration histogram as the GenAI semantic conventions name and describe it
# (open-telemetry/semantic-conventions-genai, gen-ai-metrics.md): renamed there from
# gen_ai.workflow.duration; attributes error.type (if it failed) and gen_ai.workflow.name.
INVOKE_WORKFLOW_DURATION = "gen_ai.invoke_workflow.duration"
OLD_WORKFLOW_DURATION = "gen_ai.workflow.duration"
INVOKE_WORKFLOW_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def test_invoke_workflow_duration_replaces_workflow_duration(otel, fake_provider, metric_reader):
    """Concurrent kickoffs (threads and asyncio, some failing) record the conventions' metric."""
    runs = 4  # per path; the last run of each path fails on a persistent provider 500
    for path in ("threads", "asyncio"):
        fake_provider.script(*[Fault.error(500, FAST)] * 9, key=f"wf-{path}-fail")

    def topic(path: str, i: int) -> dict[str, str]:
        return {"topic": f"[[wf-{path}-{'fail' if i == runs - 1 else i}]]"}

    def threaded(i: int) -> None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url), name="wf-threads")
        try:
            crew.kickoff(inputs=topic("threads", i))
        except Exception:  # the failure is the point
            pass

    async def concurrent() -> list[object]:
        crews = [
            research_crew(lambda: make_llm(fake_provider.base_url), name="wf-asyncio")
            for _ in range(runs)
        ]
        return await asyncio.gather(
            *(c.akickoff(inputs=topic("asyncio", i)) for i, c in enumerate(crews)),
            return_exceptions=True,
        )

    with ThreadPoolExecutor(max_workers=runs) as pool:
        list(pool.map(threaded, range(runs)))
    results = asyncio.run(concurrent())
    assert sum(isinstance(r, BaseException) for r in results) == 1

    data = metric_reader.get_metrics_data()
    metrics = {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        if scope.scope.name == "crew_otel"
        for metric in scope.metrics
    }
    assert OLD_WORKFLOW_DURATION not in metrics
    assert m.WORKFLOW_DURATION == INVOKE_WORKFLOW_DURATION
    metric = metrics[INVOKE_WORKFLOW_DURATION]
    assert metric.unit == "s"
    assert isinstance(metric.data, Histogram)
    found = list(metric.data.data_points)
    for point in found:
        assert set(point.attributes) in (
            {"gen_ai.workflow.name"},
            {"gen_ai.workflow.name", "error.type"},
        ), point.attributes
        assert tuple(point.explicit_bounds) == INVOKE_WORKFLOW_BUCKETS
    for name in ("wf-threads", "wf-asyncio"):
        assert total(found, gen_ai__workflow__name=name) == runs
        assert total(found, gen_ai__workflow__name=name, error__type="500") == 1
    assert total(found) == 2 * runs


def test_exemplars_point_at_exported_traces(otel, fake_provider, metric_reader):
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(
            pool.map(
                lambda i: research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
                    inputs={"topic": f"[[x{i}]]"}
                ),
                range(3),
            )
        )
    spans = {(s.context.trace_id, s.context.span_id): s for s in otel.get_finished_spans()}
    trace_ids = {trace_id for trace_id, _ in spans}
    found = points(metric_reader)
    exemplars = [e for p in found[m.OPERATION_DURATION] for e in p.exemplars]
    assert exemplars, "duration points carry exemplars"
    for exemplar in exemplars:
        assert exemplar.trace_id in trace_ids
        assert spans[(exemplar.trace_id, exemplar.span_id)].name.startswith("chat ")
    workflow_exemplars = [e for p in found[m.WORKFLOW_DURATION] for e in p.exemplars]
    assert {spans[(e.trace_id, e.span_id)].name for e in workflow_exemplars} == {
        "invoke_workflow research"
    }


def in_flight(reader: InMemoryMetricReader) -> float:
    """crew_otel.kickoffs.active now."""
    return sum(p.value for p in points(reader).get(m.KICKOFFS_ACTIVE, []))


@pytest.mark.parametrize("n", [1, 5, 12])
def test_peak_in_flight_equals_concurrent_kickoffs_threads(otel, fake_provider, metric_reader, n):
    gate = fake_provider.gate("peak")
    for i in range(n):
        fake_provider.script(Fault.hold(gate.name), key=f"n{i}")

    def run(i: int) -> None:
        research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
            inputs={"topic": f"[[n{i}]]"}
        )

    with ThreadPoolExecutor(n) as pool:
        try:
            futures = [pool.submit(run, i) for i in range(n)]
            gate.wait_parked(n)  # every run is inside its first model call
            peak = in_flight(metric_reader)
        finally:
            gate.open()
        for future in futures:
            future.result()
    assert peak == n
    assert in_flight(metric_reader) == 0


def test_in_flight_returns_to_zero_after_cancellations_and_base_exceptions(
    otel, fake_provider, metric_reader
):
    runs = 6
    gate = fake_provider.gate("cancel")
    for i in range(runs):
        fake_provider.script(Fault.hold(gate.name), key=f"can{i}")

    async def main() -> float:
        crews = [research_crew(lambda: make_llm(fake_provider.base_url)) for _ in range(runs)]
        tasks = [
            asyncio.create_task(c.akickoff(inputs={"topic": f"[[can{i}]]"}))
            for i, c in enumerate(crews)
        ]
        try:
            with ThreadPoolExecutor(1) as waiter:  # not the loop's executor: the runs use it
                await asyncio.get_running_loop().run_in_executor(waiter, gate.wait_parked, runs)
            peak = in_flight(metric_reader)  # every run is inside its first model call
            for task in tasks[:3]:
                task.cancel()
        finally:
            gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 3
        return peak

    def interrupted(inputs):
        raise KeyboardInterrupt

    # asyncio.run returns once the loop's worker threads (the cancelled runs' model calls
    # included) are done
    peak = asyncio.run(main())
    assert peak == runs
    with pytest.raises(TypeError):  # bad arguments to an async entry point
        asyncio.run(research_crew(lambda: make_llm(fake_provider.base_url)).akickoff(bogus=1))
    with pytest.raises(KeyboardInterrupt):
        research_crew(
            lambda: make_llm(fake_provider.base_url), before_kickoff_callbacks=[interrupted]
        ).kickoff(inputs={"topic": "[[kb]]"})
    assert in_flight(metric_reader) == 0


def test_instruments_are_created_once_per_meter_provider(otel_tracer_provider):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=provider)
    first = crew_otel.CrewAIInstrumentor().runtime.metrics
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=provider)
    assert crew_otel.CrewAIInstrumentor().runtime.metrics is first
    crew_otel.uninstrument()


def test_prometheus_exposition_uses_the_dashboard_names(otel_tracer_provider, fake_provider):
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=provider)
    try:
        mixed_workload(fake_provider)
        text = generate_latest(REGISTRY).decode()
    finally:
        crew_otel.uninstrument()
        provider.shutdown()  # also unregisters the reader's collector
    for name in (
        "gen_ai_client_operation_duration_seconds_bucket",
        "gen_ai_client_token_usage_bucket",
        "gen_ai_invoke_workflow_duration_seconds_bucket",
        "gen_ai_invoke_agent_duration_seconds_bucket",
        "gen_ai_execute_tool_duration_seconds_bucket",
        "crew_otel_kickoffs_active",
        "crew_otel_retries_total",
        "crew_otel_error_origins_total",
        "crew_otel_shared_instance_conflicts_total",
    ):
        assert re.search(rf"^{name}\{{", text, re.MULTILINE), name
    assert 'crew_otel_error_recovered="true"' in text
    assert 'crew_otel_retry_layer="http"' in text
