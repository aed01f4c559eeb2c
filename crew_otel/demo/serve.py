"""Serve one example service for the demo (run as a subprocess by the demo driver).

``python -m crew_otel.demo.serve --service broken --port 8001 --provider-url URL --trace-file F``

Sets CrewAI up offline and the SDK with :func:`crew_otel.configure` (spans to ``--trace-file``
as OTLP/JSON lines, and optionally traces and metrics to an OTLP endpoint), then serves the
example app with uvicorn on 127.0.0.1 until SIGTERM, and flushes the spans before exiting. On
the way out it writes its ``crew_otel.failures`` counter, by cause, next to the trace file
(:func:`~crew_otel.demo.services.failures_file`): the demo checks the report against it.
The example runs from a copy in ``--workdir`` (the trace file's directory by default), where
it also writes its files.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crew_otel.demo.options import ServeOptions
from crew_otel.demo.services import SERVICE_NAMESPACE, failures_file, service_name
from crew_otel.testing.crews import prepare_offline_environment

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

#: The OpenTelemetry settings of a service process: its spans go to the trace file (and, with
#: an endpoint, traces and metrics over OTLP/HTTP too), whatever the caller's environment says.
_TELEMETRY_ENVIRONMENT = {
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_BSP_SCHEDULE_DELAY": "500",
    "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    "OTEL_SDK_DISABLED": "false",
}


def main(argv: Sequence[str] | None = None) -> int:
    options = ServeOptions.parse(argv)
    workdir = options.workdir or options.trace_file.resolve().parent

    prepare_offline_environment()
    os.environ["OPENAI_BASE_URL"] = options.provider_url
    os.environ["LLM_TIMEOUT"] = str(options.llm_timeout)
    os.environ["REPORT_DIR"] = str(workdir)  # where the half-fixed service writes report.json
    os.environ.update(_TELEMETRY_ENVIRONMENT)
    exporter = "otlp" if options.otlp_endpoint else "none"
    os.environ["OTEL_TRACES_EXPORTER"] = os.environ["OTEL_METRICS_EXPORTER"] = exporter

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import crew_otel
    from crew_otel.otlp_json import OTLPJsonFileExporter

    failures = InMemoryMetricReader()
    telemetry = crew_otel.configure(
        service_name(options.service),
        endpoint=options.otlp_endpoint,
        resource_attributes={"service.namespace": SERVICE_NAMESPACE},
        metric_readers=[failures],
        span_exporters=[OTLPJsonFileExporter(options.trace_file)],
    )

    import uvicorn

    from crew_otel.demo.services import load_service

    app = load_service(options.service, workdir).app
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=options.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    # uvicorn stops on SIGTERM, then raises it again with the handler it found: with the
    # default one the process would die there, before the flush below
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        write_failures(failures, failures_file(options.trace_file))
        telemetry.shutdown()
    return 0


def write_failures(reader: InMemoryMetricReader, path: Path) -> None:
    """The ``crew_otel.failures`` counter's values by ``crew_otel.failure.cause`` (summed over
    workflows), as JSON."""
    from crew_otel import attributes as a
    from crew_otel.metrics import FAILURES

    by_cause: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name != FAILURES:
                    continue
                for point in metric.data.data_points:
                    cause = str(point.attributes.get(a.FAILURE_CAUSE) if point.attributes else "")
                    by_cause[cause] = by_cause.get(cause, 0) + int(getattr(point, "value", 0))
    path.write_text(json.dumps(by_cause), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
