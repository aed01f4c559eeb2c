"""``crew_otel.configure()``: optional one-call OpenTelemetry SDK setup.

Builds a TracerProvider (BatchSpanProcessor + OTLP exporter) and a MeterProvider (periodic OTLP
metric export) from the standard ``OTEL_*`` variables, sets them as the global providers and
instruments CrewAI. Nothing here runs on import. Applications that already configure the SDK
(or run under ``opentelemetry-instrument``) call :func:`crew_otel.instrument` instead.

Honoured variables include ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_PROTOCOL``
(``http/protobuf``, default, with the ``crew-otel[otlp]`` extra, which CrewAI's own
dependencies include, or ``grpc`` with the ``crew-otel[grpc]`` extra),
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console`` or ``none``;
for traces also ``crew_otel_file``: OTLP/JSON lines in the file ``CREW_OTEL_TRACES_FILE`` names,
which ``crew-otel report`` reads), ``OTEL_BSP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``, and
``OTEL_SDK_DISABLED``.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from crew_otel.export import DROPPED_SPANS, CountingBatchSpanProcessor, ExportDestination

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
    #: The processor of the exporter ``OTEL_TRACES_EXPORTER`` (or ``trace_file``) selects.
    span_processor: CountingBatchSpanProcessor | None = None
    #: False when the SDK was configured before ``configure()`` ran: ``shutdown`` only
    #: flushes, the providers' owner shuts them down.
    owned: bool = True
    #: Every span processor ``configure()`` made (also those of ``span_exporters``).
    span_processors: tuple[CountingBatchSpanProcessor, ...] = ()
    #: Where traces and metrics go, for the flush warning.
    destinations: tuple[ExportDestination, ...] = ()
    _done: bool = dataclasses.field(default=False, repr=False)

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because an export queue was full (the exporter could not keep up: an
        unreachable collector, a slow disk), in every processor ``configure()`` made."""
        processors = self.span_processors or (
            (self.span_processor,) if self.span_processor is not None else ()
        )
        return sum(processor.dropped for processor in processors)

    def flush(self, timeout_millis: int = DEFAULT_SHUTDOWN_TIMEOUT_MS) -> bool:
        """Export every finished span and the current metrics, waiting at most ``timeout_millis``
        in total. Returns False when the time ran out."""
        return _bounded(self._flush, timeout_millis, self._destination_text())

    def shutdown(self, timeout_millis: int = DEFAULT_SHUTDOWN_TIMEOUT_MS) -> bool:
        """Flush traces and metrics, then stop the providers, waiting at most ``timeout_millis``
        in total (a dead collector cannot hold the process). Call it in your server's shutdown.

        Returns False when the time ran out. Later calls do nothing.
        """
        if self._done:
            return True
        self._done = True
        return _bounded(self._shutdown, timeout_millis, self._destination_text())

    def _destination_text(self) -> str:
        return ", ".join(map(str, self.destinations)) or "the application's exporters"

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


def _bounded(work: Callable[[float], None], timeout_millis: int, destination: str) -> bool:
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
            "crew_otel: telemetry flush did not finish within %d ms (exporting to %s); "
            "the rest is dropped",
            timeout_millis,
            destination,
        )
        return False
    return True


#: ``OTEL_TRACES_EXPORTER`` value (and ``opentelemetry_traces_exporter`` entry point) that writes
#: OTLP/JSON lines to the file ``CREW_OTEL_TRACES_FILE`` names: no Collector needed.
FILE_EXPORTER = "crew_otel_file"

_E = TypeVar("_E", SpanExporter, MetricExporter)


@dataclasses.dataclass(frozen=True)
class _Signal(Generic[_E]):
    """What differs between the span and the metric exporter that :func:`configure` builds."""

    name: str  # as in OTEL_{name}_EXPORTER and OTEL_EXPORTER_OTLP_{name}_*
    path: str  # OTLP/HTTP path under the base endpoint
    otlp_module: str  # module under opentelemetry.exporter.otlp.proto.{http,grpc}
    otlp_class: str
    console: Callable[[], _E]
    file: Callable[[str | None], _E] | None = None


def _trace_file_exporter(path: str | None) -> SpanExporter:
    """The trace-file exporter: ``path`` is configure()'s ``trace_file``, else
    ``CREW_OTEL_TRACES_FILE`` names the file. A file that cannot be written is one error line
    naming that setting, not an exception: the application and the other exporters go on."""
    from crew_otel.otlp_json import OTLPJsonFileExporter

    return OTLPJsonFileExporter(path, setting="trace_file" if path is not None else None)


_TRACES = _Signal[SpanExporter](
    "TRACES",
    "v1/traces",
    "trace_exporter",
    "OTLPSpanExporter",
    ConsoleSpanExporter,
    _trace_file_exporter,
)
_METRICS = _Signal[MetricExporter](
    "METRICS", "v1/metrics", "metric_exporter", "OTLPMetricExporter", ConsoleMetricExporter
)


def _exporter(
    signal: _Signal[_E],
    environ: Mapping[str, str],
    endpoint: str | None,
    file: str | None = None,
) -> _E | None:
    """The exporter ``OTEL_{signal}_EXPORTER`` selects (``file``, when given, wins for traces)."""
    if file is not None and signal.file is not None:
        return signal.file(file)
    variable = f"OTEL_{signal.name}_EXPORTER"
    supported = ("otlp", "console", "none") + ((FILE_EXPORTER,) if signal.file else ())
    value = environ.get(variable, "otlp").strip().lower() or "otlp"
    choice = value.split(",")[0].strip()
    if choice not in supported:
        raise ValueError(
            f"{variable}={value!r}: crew_otel.configure() supports {', '.join(supported)}"
        )
    if choice == "none":
        return None
    if choice == "console":
        return signal.console()
    if choice == FILE_EXPORTER and signal.file is not None:
        return signal.file(None)
    grpc = _protocol(environ, signal.name) == "grpc"
    module_name = f"opentelemetry.exporter.otlp.proto.{'grpc' if grpc else 'http'}"
    try:
        module = importlib.import_module(f"{module_name}.{signal.otlp_module}")
    except ImportError as exc:
        extra = "grpc" if grpc else "otlp"
        raise ModuleNotFoundError(
            f"crew_otel.configure(): OTLP export needs {module_name} "
            f'(pip install "crew-otel[{extra}]"), or set {variable} to one of '
            f"{', '.join(s for s in supported if s != 'otlp')}"
        ) from exc
    kwargs: dict[str, Any] = _timeout(environ, signal.name)
    if endpoint:
        kwargs["endpoint"] = _signal_endpoint(signal, endpoint, grpc)
    exporter: _E = getattr(module, signal.otlp_class)(**kwargs)
    return exporter


def _signal_endpoint(signal: _Signal[Any], base: str, grpc: bool) -> str:
    return base if grpc else f"{base.rstrip('/')}/{signal.path}"


def _otlp_endpoint(signal: _Signal[Any], environ: Mapping[str, str], endpoint: str | None) -> str:
    """Where the OTLP exporter :func:`_exporter` builds sends, resolved as the exporter does."""
    grpc = _protocol(environ, signal.name) == "grpc"
    if endpoint:
        return _signal_endpoint(signal, endpoint, grpc)
    own = environ.get(f"OTEL_EXPORTER_OTLP_{signal.name}_ENDPOINT")
    if own:
        return own
    default = "http://localhost:4317" if grpc else "http://localhost:4318"
    return _signal_endpoint(signal, environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or default, grpc)


def _destination(
    signal: _Signal[Any], exporter: object, environ: Mapping[str, str], endpoint: str | None
) -> ExportDestination:
    """Where ``exporter``, built by :func:`_exporter`, sends (for log lines and doctor)."""
    otlp = type(exporter).__module__.startswith("opentelemetry.exporter.otlp.")
    return ExportDestination.of(
        exporter, _otlp_endpoint(signal, environ, endpoint) if otlp else None
    )


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


def configure(
    service_name: str | None = None,
    *,
    endpoint: str | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    metric_readers: list[MetricReader] | None = None,
    set_global: bool = True,
    instrument: bool = True,
    trace_file: str | os.PathLike[str] | None = None,
    span_exporters: Sequence[SpanExporter] = (),
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
        trace_file: write the spans to this file as OTLP/JSON lines (what ``crew-otel report``
            reads) instead of exporting them over OTLP; several processes may append to one
            file. Same as ``OTEL_TRACES_EXPORTER=crew_otel_file`` with
            ``CREW_OTEL_TRACES_FILE``.
        span_exporters: more span exporters, each behind its own batch processor, besides the
            one ``OTEL_TRACES_EXPORTER`` (or ``trace_file``) selects: e.g. a local trace file
            next to OTLP export.

    The resource gets a ``service.instance.id`` unique to the process (a random UUID unless
    given): every worker of a multi-process server reports its own series, and a process
    forked after ``configure()`` (``gunicorn --preload``) gets a new one.

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
    resource = _per_process_resource(Resource.create(attributes))

    readers: list[MetricReader] = list(metric_readers or [])
    metric_exporter = _exporter(_METRICS, environ, endpoint)
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
    span_exporter = _exporter(
        _TRACES, environ, endpoint, os.fspath(trace_file) if trace_file is not None else None
    )
    exporters = [e for e in (span_exporter, *span_exporters) if e is not None]
    destinations = [
        _destination(_TRACES, e, environ, endpoint) if e is span_exporter else None
        for e in exporters
    ]
    processors: list[CountingBatchSpanProcessor] = []
    if exporters:
        dropped = meter_provider.get_meter("crew_otel").create_counter(
            DROPPED_SPANS, unit="{span}", description="Spans dropped on a full export queue."
        )
        processors = [
            CountingBatchSpanProcessor(e, dropped_counter=dropped, destination=d)
            for e, d in zip(exporters, destinations, strict=True)
        ]
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    # the selected exporter's processor (the others are shut down with the tracer provider)
    selected = processors[0] if span_exporter is not None else None
    metric_destination = (
        ()
        if metric_exporter is None
        else (_destination(_METRICS, metric_exporter, environ, endpoint),)
    )
    setup = Setup(
        tracer_provider,
        meter_provider,
        selected,
        span_processors=tuple(processors),
        destinations=tuple(p.destination for p in processors) + metric_destination,
    )
    _flush_at_exit(setup)

    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    if instrument:
        from crew_otel import instrument as instrument_crewai

        instrument_crewai(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    return setup


class _PerProcessResource(Resource):
    """A Resource whose ``service.instance.id`` is new in every forked child.

    Providers and tracers hold this one object, so replacing its attributes in the child
    (``os.register_at_fork``) relabels everything the child exports, on every SDK version:
    older SDK releases (1.34 among them) neither set ``service.instance.id`` nor refresh it
    after a fork; newer ones give their providers a fresh one after a fork themselves.
    """

    def __init__(self, attributes: Mapping[str, Any], schema_url: str | None = None) -> None:
        super().__init__(dict(attributes), schema_url)
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_in_child() -> None:
                resource = ref()
                if resource is not None:
                    resource._new_instance()

            os.register_at_fork(after_in_child=after_in_child)

    def _new_instance(self) -> None:
        attributes = {**self.attributes, SERVICE_INSTANCE_ID: _new_instance_id()}
        Resource.__init__(self, attributes, self.schema_url)


def _new_instance_id() -> str:
    return str(uuid.uuid4())


def _per_process_resource(resource: Resource) -> Resource:
    """``resource`` with a ``service.instance.id`` unique to this process, also after a fork.

    A ``service.instance.id`` given by the application (argument or
    ``OTEL_RESOURCE_ATTRIBUTES``) is kept in this process; forked children get a new random one,
    as newer SDK releases do.
    """
    attributes = dict(resource.attributes)
    attributes.setdefault(SERVICE_INSTANCE_ID, _new_instance_id())
    return _PerProcessResource(attributes, resource.schema_url)


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
