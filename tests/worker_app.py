"""A FastAPI service that test_workers.py runs under ``uvicorn --workers 2`` and
``gunicorn --preload -w 2``.

``crew_otel.configure()`` runs at import (in the gunicorn master with ``--preload``, in each
worker under uvicorn) and exports over OTLP to the test's receiver. With ``METRICS_PORT`` set,
each worker also exposes ``/metrics`` the way the README's Prometheus snippet does: the first
free port from ``METRICS_PORT`` on.
"""

from __future__ import annotations

from crew_otel.testing.crews import make_llm, prepare_offline_environment, research_crew

prepare_offline_environment()

import os  # noqa: E402

from fastapi import FastAPI, Header  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import crew_otel  # noqa: E402

metric_readers = []
if os.environ.get("METRICS_PORT"):
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    first = int(os.environ["METRICS_PORT"])
    for port in range(first, first + 16):  # the README's pattern: one port per worker
        try:
            start_http_server(port, addr="127.0.0.1")
            break
        except OSError:  # taken by another worker of this server
            continue
    metric_readers.append(PrometheusMetricReader())

crew_otel.configure(service_name="support-api", metric_readers=metric_readers)
PROVIDER_URL = os.environ["PROVIDER_URL"]
app = FastAPI()


@app.post("/run/{topic}")
def run(topic: str, x_request_id: str = Header()) -> dict[str, object]:
    """Kick off a crew in this worker; say which worker and instance ran it."""
    with crew_otel.request(x_request_id):
        result = research_crew(lambda: make_llm(PROVIDER_URL)).kickoff(
            inputs={"topic": f"[[{topic}]]"}
        )
    provider = trace.get_tracer_provider()
    resource = provider.resource if isinstance(provider, TracerProvider) else None
    return {
        "raw": str(result.raw),
        "pid": os.getpid(),
        "instance": resource.attributes.get("service.instance.id") if resource else None,
    }
