"""A concurrent mixed CrewAI workload exposing crew_otel's metrics on a Prometheus endpoint.

Run by test_prometheus_live.py in a subprocess: ``python tests/live_metrics_app.py PORT``.
Prints ``READY`` when the workload has finished, then keeps serving /metrics until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

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


def workload(provider: FakeOpenAIProvider) -> None:
    """The shared mixed workload, plus a 429 the rate-limit layer retries and async kickoffs."""
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

    mixed_workload(provider, extra_jobs=[rate_limited, lambda: asyncio.run(async_kickoffs())])


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
