"""Serve one example service for the demo (run as a subprocess by the demo driver).

``python -m crew_otel.demo.serve --service broken --port 8001 --provider-url URL --trace-file F``

Sets CrewAI up offline and the SDK with :func:`crew_otel.configure` (spans to ``--trace-file``
as OTLP/JSON lines, and optionally traces and metrics to an OTLP endpoint), then serves the
example app with uvicorn on 127.0.0.1 until SIGTERM, and flushes the spans before exiting.
The example runs from a copy in ``--workdir`` (the trace file's directory by default), where
it also writes its files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from crew_otel.demo.options import ServeOptions
from crew_otel.demo.services import SERVICE_NAMESPACE, service_name
from crew_otel.testing.crews import prepare_offline_environment

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

    import crew_otel
    from crew_otel.otlp_json import OTLPJsonFileExporter

    telemetry = crew_otel.configure(
        service_name(options.service),
        endpoint=options.otlp_endpoint,
        resource_attributes={"service.namespace": SERVICE_NAMESPACE},
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
    try:
        uvicorn.Server(config).run()
    finally:
        telemetry.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
