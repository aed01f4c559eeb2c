"""Serve one example service for the demo (run as a subprocess by the demo driver).

``python -m crew_otel.demo.serve --service broken --port 8001 --provider-url URL --trace-file F``

Sets CrewAI up offline, an SDK tracer provider whose spans go to ``--trace-file`` (OTLP/JSON
lines) and optionally to an OTLP endpoint, then serves the example app with uvicorn on
127.0.0.1 until SIGTERM, and flushes the spans before exiting. The example runs from a copy in
``--workdir`` (the trace file's directory by default), where it also writes its files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from crew_otel.demo.services import SERVICES
from crew_otel.testing.crews import prepare_offline_environment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crew_otel.demo.serve")
    parser.add_argument("--service", choices=tuple(SERVICES), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--provider-url", required=True)
    parser.add_argument("--trace-file", required=True)
    parser.add_argument("--otlp-endpoint")
    parser.add_argument("--llm-timeout", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, help="default: the trace file's directory")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir or Path(args.trace_file).resolve().parent

    prepare_offline_environment()
    os.environ["OPENAI_BASE_URL"] = args.provider_url
    os.environ["LLM_TIMEOUT"] = str(args.llm_timeout)
    os.environ["REPORT_DIR"] = str(workdir)  # where the half-fixed service writes report.json

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from crew_otel.otlp_json import OTLPJsonFileExporter

    resource = Resource.create(
        {"service.name": f"support-api-{args.service}", "service.namespace": "crew-otel-demo"}
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPJsonFileExporter(args.trace_file), schedule_delay_millis=500)
    )
    readers = []
    if args.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        base = args.otlp_endpoint.rstrip("/")
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=5))
        )
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics", timeout=5),
                export_interval_millis=5000,
            )
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)

    import uvicorn

    from crew_otel.demo.services import load_service

    app = load_service(args.service, workdir).app
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown(timeout_millis=5000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
