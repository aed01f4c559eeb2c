"""A concurrent mixed CrewAI workload exposing crew_otel's metrics on a Prometheus endpoint.

Run by test_prometheus_live.py in a subprocess: ``python tests/live_metrics_app.py PORT``.
Prints ``READY`` when the workload has finished, then keeps serving /metrics until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from crew_otel.testing.crews import prepare_offline_environment

prepare_offline_environment()

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from prometheus_client import start_http_server  # noqa: E402

import crew_otel  # noqa: E402
from crew_otel.testing import FakeOpenAIProvider, Fault, RandomFaults  # noqa: E402
from crew_otel.testing.crews import (  # noqa: E402
    make_agent,
    make_failing_tool,
    make_llm,
    research_crew,
)


def workload(provider: FakeOpenAIProvider) -> None:
    from crewai import Crew, Task

    provider.script(*[Fault.error(500, 0.01)] * 9, key="fail")
    provider.script(Fault.error(429, 0.01), key="limited")
    provider.script(Fault.delay(1.0), key="share0")
    shared_agent = make_agent(make_llm(provider.base_url), "Support Analyst")

    def ok(i: int) -> None:
        research_crew(lambda: make_llm(provider.base_url)).kickoff(inputs={"topic": f"[[ok{i}]]"})

    def failing() -> None:
        try:
            research_crew(lambda: make_llm(provider.base_url)).kickoff(inputs={"topic": "[[fail]]"})
        except Exception:
            pass

    def rate_limited() -> None:
        crew = research_crew(lambda: make_llm(provider.base_url, max_retries=0))
        crew.kickoff(inputs={"topic": "[[limited]]"})

    def tool_error() -> None:
        research_crew(lambda: make_llm(provider.base_url), tools=[make_failing_tool()]).kickoff(
            inputs={"topic": "[[tool]]"}
        )

    def shared(i: int) -> None:
        time.sleep(0.3 * i)
        task = Task(description="Triage {topic}", expected_output="x", agent=shared_agent)
        try:
            Crew(agents=[shared_agent], tasks=[task]).kickoff(inputs={"topic": f"[[share{i}]]"})
        except RuntimeError:
            pass

    async def async_kickoffs() -> None:
        crews = [research_crew(lambda: make_llm(provider.base_url)) for _ in range(4)]
        await asyncio.gather(
            *(c.kickoff_async(inputs={"topic": f"[[as{i}]]"}) for i, c in enumerate(crews)),
            research_crew(lambda: make_llm(provider.base_url)).akickoff(inputs={"topic": "[[ak]]"}),
        )

    jobs = [
        lambda: ok(0),
        lambda: ok(1),
        failing,
        rate_limited,
        tool_error,
        lambda: shared(0),
        lambda: shared(1),
        lambda: asyncio.run(async_kickoffs()),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def main() -> None:
    port = int(sys.argv[1])
    resource = Resource.create({"service.name": "support-api"})
    reader = PrometheusMetricReader()
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    trace.set_tracer_provider(TracerProvider(resource=resource))
    start_http_server(port, addr="127.0.0.1")
    crew_otel.instrument()
    with FakeOpenAIProvider(random_faults=RandomFaults(latency=0.05)) as provider:
        workload(provider)
    print("READY", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
