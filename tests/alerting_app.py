"""One of the example services under steady load, its metrics on a Prometheus endpoint.

Run by test_alerting.py: ``python tests/alerting_app.py broken_service|fixed_service PORT``
with ``OPENAI_BASE_URL`` pointing at the test's loopback provider. Sets up the SDK (a
``PrometheusMetricReader`` served on 127.0.0.1:PORT), imports the example (which calls
``crew_otel.instrument()``), prints ``READY`` and posts tickets to it from a few threads until
stdin closes.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time

from crew_otel.testing.crews import prepare_offline_environment

_PROVIDER_URL = os.environ.get("OPENAI_BASE_URL", "")
prepare_offline_environment()  # drops OPENAI_BASE_URL: the examples read it, so it is put back
os.environ["OPENAI_BASE_URL"] = _PROVIDER_URL

from fastapi.testclient import TestClient  # noqa: E402
from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from prometheus_client import start_http_server  # noqa: E402

CLIENTS = 3
PAUSE_S = 0.5  # between one client's requests: steady load, not a CPU burner


def main() -> None:
    example, port = sys.argv[1], int(sys.argv[2])
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    trace.set_tracer_provider(TracerProvider())
    start_http_server(port, addr="127.0.0.1")
    service = importlib.import_module(f"examples.{example}")
    stop = threading.Event()

    def client(n: int) -> None:
        with TestClient(service.app, raise_server_exceptions=False) as http:
            i = 0
            while not stop.is_set():
                http.post("/tickets", json={"ticket": f"T-{n}-{i}"})
                i += 1
                stop.wait(PAUSE_S)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    sys.stdin.read()
    stop.set()
    deadline = time.monotonic() + 10
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))


if __name__ == "__main__":
    main()
