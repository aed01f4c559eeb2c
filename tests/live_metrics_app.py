"""A concurrent mixed CrewAI workload exposing crew_otel's metrics on a Prometheus endpoint.

Run by test_prometheus_live.py in a subprocess: ``python tests/live_metrics_app.py PORT``.
Prints ``READY`` when the workload has finished, then keeps serving /metrics until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
import threading

from crew_otel.testing.crews import prepare_offline_environment

prepare_offline_environment()

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from prometheus_client import start_http_server  # noqa: E402
from workloads import mixed_workload  # noqa: E402 - this script's directory is on sys.path

import crew_otel  # noqa: E402
from crew_otel.testing import FakeOpenAIProvider, Fault, RandomFaults  # noqa: E402
from crew_otel.testing.crews import make_llm, research_crew  # noqa: E402

#: The seed's bug: the ticket being looked up, kept in a module global.
CURRENT_TICKET = {"ticket": ""}


def crosstalk(provider: FakeOpenAIProvider) -> None:
    """Two requests whose tool keeps the current ticket in a module global: both write it,
    then (a barrier: both have written) each reads it back, so one of them answers with the
    other's ticket (crew_otel.crosstalk, CrewOtelCrossTalk)."""
    from crewai.tools import tool

    barrier = threading.Barrier(2)

    @tool("lookup_ticket")
    def lookup_ticket(query: str) -> str:
        """Look a support ticket up."""
        CURRENT_TICKET["ticket"] = query
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        return f"Status of {CURRENT_TICKET['ticket']}: open"

    def one(i: int) -> None:
        with crew_otel.request(f"crosstalk-{i}"):
            crew = research_crew(lambda: make_llm(provider.base_url), tools=[lookup_ticket])
            crew.kickoff(inputs={"topic": f"[[TCK-{48210 + i}]]"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def workload(provider: FakeOpenAIProvider) -> None:
    """The shared mixed workload, plus a 429 the rate-limit layer retries, async kickoffs and
    two requests sharing a ticket through a module global."""
    provider.script(Fault.error(429, 0.01), key="limited")

    def rate_limited() -> None:
        crew = research_crew(lambda: make_llm(provider.base_url, max_retries=0))
        crew.kickoff(inputs={"topic": "[[limited]]"})

    async def async_kickoffs() -> None:
        crews = [research_crew(lambda: make_llm(provider.base_url)) for _ in range(4)]
        await asyncio.gather(
            *(c.kickoff_async(inputs={"topic": f"[[as{i}]]"}) for i, c in enumerate(crews)),
            research_crew(lambda: make_llm(provider.base_url)).akickoff(inputs={"topic": "[[ak]]"}),
        )

    mixed_workload(
        provider,
        extra_jobs=[
            rate_limited,
            lambda: asyncio.run(async_kickoffs()),
            lambda: crosstalk(provider),
        ],
    )


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
