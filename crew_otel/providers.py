"""The SDK side of ``instrument()``: crew_otel's tracer and instruments, and the request
processor attached once per tracer provider.

The request-stamping processor (:class:`~crew_otel.processor.RequestSpanProcessor`) attaches at
the first kickoff that finds an SDK provider; the SDK cannot remove a processor, so
``uninstrument()`` disables it and a later ``instrument()`` enables it again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from crew_otel.metrics import CrewOtelMetrics
from crew_otel.version import __version__

if TYPE_CHECKING:
    from crew_otel.processor import RequestSpanProcessor
    from crew_otel.runtime import Runtime

__all__ = [
    "SCHEMA_URL",
    "disable_processors",
    "metrics_for",
    "processor_attacher",
    "tracer_for",
    "warn_if_crewai_owns_global_provider",
]

_logger = logging.getLogger("crew_otel")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"
CREWAI_TELEMETRY_SERVICE = "crewAI-telemetry"

# One span processor per tracer provider, re-enabled on re-instrumentation (the SDK has no way
# to remove a processor).
_processors: weakref.WeakKeyDictionary[Any, RequestSpanProcessor] = weakref.WeakKeyDictionary()
_processors_lock = threading.Lock()
# Instruments are created once per meter provider.
_metrics_by_provider: weakref.WeakKeyDictionary[Any, CrewOtelMetrics] = weakref.WeakKeyDictionary()


def tracer_for(tracer_provider: Any) -> trace.Tracer:
    """crew_otel's tracer from ``tracer_provider`` (the global one when ``None``)."""
    return trace.get_tracer("crew_otel", __version__, tracer_provider, schema_url=SCHEMA_URL)


def disable_processors() -> None:
    """Switch off every request processor attached so far (``uninstrument()``)."""
    with _processors_lock:
        for processor in list(_processors.values()):
            processor.enabled = False


def metrics_for(meter_provider: Any) -> CrewOtelMetrics:
    """crew_otel's instruments on ``meter_provider`` (the global one when ``None``), made once."""
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    try:
        cached = _metrics_by_provider.get(provider)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    meter = metrics.get_meter("crew_otel", __version__, provider, schema_url=SCHEMA_URL)
    created = CrewOtelMetrics(meter)
    with contextlib.suppress(TypeError):
        _metrics_by_provider[provider] = created
    return created


def processor_attacher(tracer_provider: Any, runtime: Runtime) -> Callable[[], bool]:
    """A callable that adds the request processor to the provider once it is a real one.

    It does nothing once ``runtime`` is switched off: a kickoff that began before
    ``uninstrument()`` must not re-enable the processor after it.
    """

    def attach() -> bool:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            return False  # no SDK provider yet; try again at the next kickoff
        add = getattr(provider, "add_span_processor", None)
        if not callable(add):
            _logger.warning(
                "crew_otel: the tracer provider %s is not an SDK TracerProvider; spans will not "
                "carry crew_otel.request.id and thread.* (pass an SDK TracerProvider)",
                type(provider).__name__,
            )
            return True
        with _processors_lock:
            if not runtime.active:
                return True
            processor = _processors.get(provider)
            if processor is None:
                # Imported here: it subclasses the SDK's SpanProcessor, and an SDK provider
                # (hence the SDK) is present by now; ``import crew_otel`` needs only the API.
                from crew_otel.processor import RequestSpanProcessor

                processor = RequestSpanProcessor()
                add(processor)
                _processors[provider] = processor
            processor.enabled = True
        return True

    return attach


def warn_if_crewai_owns_global_provider(tracer_provider: Any) -> None:
    """crewai < 1.15.15 installs its own telemetry provider as the global one at import."""
    if tracer_provider is not None:
        return
    provider = trace.get_tracer_provider()
    resource = getattr(provider, "resource", None)
    service = getattr(resource, "attributes", {}).get("service.name")
    if service == CREWAI_TELEMETRY_SERVICE:
        _logger.warning(
            "crew_otel: the global tracer provider is CrewAI's own telemetry provider (crewai < "
            "1.15.15 installs it at import), so your spans would go to CrewAI, not to you. Set "
            "CREWAI_DISABLE_TELEMETRY=true before importing crewai, or pass your provider: "
            "crew_otel.instrument(tracer_provider=...)."
        )
