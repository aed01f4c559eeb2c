"""``crew_otel.configure()``: optional one-call OpenTelemetry SDK setup.

Builds a TracerProvider (BatchSpanProcessor + OTLP exporter) and a MeterProvider (periodic OTLP
metric export) from the standard ``OTEL_*`` variables, sets them as the global providers and
instruments CrewAI. Nothing here runs on import. Applications that already configure the SDK
(or run under ``opentelemetry-instrument``) call :func:`crew_otel.instrument` instead.

Honoured variables include ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_PROTOCOL``
(``http/protobuf``, default, or ``grpc`` with the ``crew-otel[grpc]`` extra),
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console`` or ``none``),
``OTEL_BSP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``, and ``OTEL_SDK_DISABLED``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from crew_otel.export import DROPPED_SPANS, CountingBatchSpanProcessor

_logger = logging.getLogger("crew_otel")

DEFAULT_SERVICE_NAME = "crewai-service"
CREWAI_TELEMETRY_SERVICE = "crewAI-telemetry"
#: Upper bound for flushing at shutdown, so a dead collector cannot hang process exit.
DEFAULT_SHUTDOWN_TIMEOUT_MS = 5000
#: Export timeout when OTEL_EXPORTER_OTLP_TIMEOUT is not set (the SDK's default is 10 s).
DEFAULT_EXPORT_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Setup:
    """What :func:`configure` built (or found); :meth:`shutdown` flushes with a bounded wait.

    ``shutdown`` also runs at interpreter exit and when a ``multiprocessing`` worker forked
    from this process finishes (workers leave through ``os._exit``, which skips ``atexit``).
    """

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    span_processor: CountingBatchSpanProcessor | None = None
    #: False when the SDK was configured before ``configure()`` ran: ``shutdown`` only
    #: flushes, the providers' owner shuts them down.
    owned: bool = True
    _done: bool = dataclasses.field(default=False, repr=False)

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because the export queue was full (the collector was unreachable)."""
        return self.span_processor.dropped if self.span_processor is not None else 0

    def flush(self, timeout_millis: int = DEFAULT_SHUTDOWN_TIMEOUT_MS) -> bool:
        """Export every finished span and the current metrics, waiting at most ``timeout_millis``
        in total. Returns False when the time ran out."""
        return _bounded(self._flush, timeout_millis)

    def shutdown(self, timeout_millis: int = DEFAULT_SHUTDOWN_TIMEOUT_MS) -> bool:
        """Flush traces and metrics, then stop the providers, waiting at most ``timeout_millis``
        in total (a dead collector cannot hold the process). Call it in your server's shutdown.

        Returns False when the time ran out. Later calls do nothing.
        """
        if self._done:
            return True
        self._done = True
        return _bounded(self._shutdown, timeout_millis)

    def _flush(self, deadline: float) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(_remaining_ms(deadline))
        if self.meter_provider is not None:
            self.meter_provider.force_flush(_remaining_ms(deadline))

    def _shutdown(self, deadline: float) -> None:
        self._flush(deadline)
        if not self.owned:
            return
        if self.span_processor is not None:
            self.span_processor.shutdown(timeout_millis=_remaining_ms(deadline))
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=_remaining_ms(deadline))

    def _flush_at_worker_exit(self) -> None:
        """In a forked ``multiprocessing`` child: flush when the worker finishes."""
        from multiprocessing import util

        util.Finalize(None, self.shutdown, exitpriority=WORKER_EXIT_PRIORITY)


#: multiprocessing runs finalizers with a higher priority first; flush before the rest.
WORKER_EXIT_PRIORITY = 100


def _remaining_ms(deadline: float) -> int:
    return max(int((deadline - time.monotonic()) * 1000), 0)


def _bounded(work: Callable[[float], None], timeout_millis: int) -> bool:
    """Run ``work(deadline)`` in a daemon thread and wait for it until the deadline.

    Exporters and SDK versions differ in how well they honour a timeout; the thread makes
    the bound hold whatever they do.
    """
    deadline = time.monotonic() + timeout_millis / 1000

    def run() -> None:
        try:
            work(deadline)
        except Exception:  # an exporter failing at shutdown must not fail the application
            _logger.debug("crew_otel: telemetry flush failed", exc_info=True)

    thread = threading.Thread(target=run, name="crew-otel-flush", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if thread.is_alive():
        _logger.warning(
            "crew_otel: telemetry flush did not finish within %d ms (is the collector "
            "reachable?); the rest is dropped",
            timeout_millis,
        )
        return False
    return True


def _exporter_choice(variable: str, environ: Mapping[str, str]) -> str:
    value = environ.get(variable, "otlp").strip().lower() or "otlp"
    first = value.split(",")[0].strip()
    if first not in ("otlp", "console", "none"):
        raise ValueError(
            f"{variable}={value!r}: crew_otel.configure() supports otlp, console, none"
        )
    return first


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _timeout(environ: Mapping[str, str], signal: str) -> dict[str, Any]:
    if environ.get(f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT") or environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    ):
        return {}  # the exporter reads the variable itself
    return {"timeout": DEFAULT_EXPORT_TIMEOUT_S}


def _span_exporter(environ: Mapping[str, str], endpoint: str | None) -> SpanExporter | None:
    choice = _exporter_choice("OTEL_TRACES_EXPORTER", environ)
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    kwargs: dict[str, Any] = _timeout(environ, "TRACES")
    if _protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if endpoint:
            kwargs["endpoint"] = endpoint
        return OTLPSpanExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    if endpoint:
        kwargs["endpoint"] = endpoint.rstrip("/") + "/v1/traces"
    return HttpSpanExporter(**kwargs)


def _metric_exporter(environ: Mapping[str, str], endpoint: str | None) -> MetricExporter | None:
    choice = _exporter_choice("OTEL_METRICS_EXPORTER", environ)
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleMetricExporter()
    kwargs: dict[str, Any] = _timeout(environ, "METRICS")
    if _protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        if endpoint:
            kwargs["endpoint"] = endpoint
        return OTLPMetricExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    if endpoint:
        kwargs["endpoint"] = endpoint.rstrip("/") + "/v1/metrics"
    return HttpMetricExporter(**kwargs)


def configure(
    service_name: str | None = None,
    *,
    endpoint: str | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    metric_readers: list[MetricReader] | None = None,
    set_global: bool = True,
    instrument: bool = True,
    **options: Any,
) -> Setup:
    """Set up the OpenTelemetry SDK for a CrewAI service and instrument CrewAI.

    Args:
        service_name: ``service.name``; defaults to ``OTEL_SERVICE_NAME``, then
            ``"crewai-service"``.
        endpoint: OTLP base endpoint (e.g. ``"http://127.0.0.1:4318"``); defaults to the
            ``OTEL_EXPORTER_OTLP_*`` variables.
        resource_attributes: extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES`` is read
            too).
        metric_readers: extra metric readers, e.g. ``PrometheusMetricReader()`` to expose a
            ``/metrics`` endpoint instead of (or besides) OTLP.
        set_global: make the providers the global ones.
        instrument: call :func:`crew_otel.instrument` with the new providers and ``options``.

    When the SDK is already configured (a real ``TracerProvider`` is the global one, e.g.
    under ``opentelemetry-instrument``), the arguments are ignored with one warning and CrewAI
    is instrumented with the existing providers.

    Returns:
        A :class:`Setup` holding the providers; its ``shutdown()`` flushes traces and metrics
        with a bounded wait.
    """
    environ = os.environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        _logger.info("crew_otel.configure(): OTEL_SDK_DISABLED=true, nothing configured")
        return Setup(None, None)
    existing = _configured_tracer_provider() if set_global else None
    if existing is not None:
        return _use_existing_sdk(existing, instrument, options)
    attributes: dict[str, Any] = dict(resource_attributes or {})
    name = service_name or environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    attributes["service.name"] = name
    resource = Resource.create(attributes)

    readers: list[MetricReader] = list(metric_readers or [])
    metric_exporter = _metric_exporter(environ, endpoint)
    if metric_exporter is not None:
        readers.append(
            PeriodicExportingMetricReader(
                metric_exporter, export_timeout_millis=DEFAULT_EXPORT_TIMEOUT_S * 1000
            )
        )
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, shutdown_on_exit=False
    )

    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    span_exporter = _span_exporter(environ, endpoint)
    processor = None
    if span_exporter is not None:
        dropped = meter_provider.get_meter("crew_otel").create_counter(
            DROPPED_SPANS, unit="{span}", description="Spans dropped on a full export queue."
        )
        processor = CountingBatchSpanProcessor(span_exporter, dropped_counter=dropped)
        tracer_provider.add_span_processor(processor)
    setup = Setup(tracer_provider, meter_provider, processor)
    _flush_at_exit(setup)

    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    if instrument:
        from crew_otel import instrument as instrument_crewai

        instrument_crewai(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    return setup


def _flush_at_exit(setup: Setup) -> None:
    """Flush at interpreter exit and when a forked ``multiprocessing`` worker finishes."""
    from multiprocessing import util

    atexit.register(setup.shutdown)
    # multiprocessing clears its finalizers in a new child and then runs the after-fork
    # hooks: the hook registers the flush that runs before the worker's os._exit().
    util.register_after_fork(setup, Setup._flush_at_worker_exit)


def _configured_tracer_provider() -> TracerProvider | None:
    """The global SDK TracerProvider when the application (or opentelemetry-instrument) set one.

    CrewAI's own telemetry provider (crewai < 1.15.15 installs it at import) does not count.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    service = provider.resource.attributes.get("service.name")
    if service == CREWAI_TELEMETRY_SERVICE:
        return None
    return provider


def _use_existing_sdk(
    tracer_provider: TracerProvider, instrument: bool, options: Mapping[str, Any]
) -> Setup:
    _logger.warning(
        "crew_otel.configure(): the OpenTelemetry SDK is already configured (the global tracer "
        "provider is %s, e.g. set by opentelemetry-instrument); configure()'s arguments are "
        "ignored and CrewAI is instrumented with the existing providers. Call "
        "crew_otel.instrument() instead.",
        tracer_provider.resource.attributes.get("service.name", "unnamed"),
    )
    meter_provider = metrics.get_meter_provider()
    setup = Setup(
        tracer_provider,
        meter_provider if isinstance(meter_provider, MeterProvider) else None,
        owned=False,
    )
    _flush_at_exit(setup)
    if instrument:
        from crew_otel import instrument as instrument_crewai

        instrument_crewai(**options)
    return setup
