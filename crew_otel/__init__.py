"""OpenTelemetry instrumentation for CrewAI that shows why a crew fails under concurrent load.

Usage::

    import crew_otel

    crew_otel.instrument()          # at start-up, after your OpenTelemetry SDK setup
    # or: crew_otel.configure(service_name="support-api")   # SDK + OTLP + instrument, one call

    with crew_otel.request(request_id):   # optional: your X-Request-ID for the runs inside
        crew.kickoff(inputs)

Every kickoff becomes one trace (kickoff > task > agent attempt > step > model call > HTTP
attempts, and tools) whose spans all carry ``crew_otel.request.id`` and the thread they ran on.
Errors are marked where they originated, retries are counted per layer, and objects shared by
concurrent requests are named.

Environment variables (an argument to :func:`instrument` wins over them):
``CREW_OTEL_CAPTURE_CONTENT`` / ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (record
prompts and tool data; off by default), ``CREW_OTEL_MAX_ATTRIBUTE_LENGTH``, ``CREW_OTEL_HTTP``,
``CREW_OTEL_THREADING``, ``CREW_OTEL_STRIP_CREWAI_BAGGAGE``,
``CREW_OTEL_DETECT_SHARED_INSTANCES``; ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=crew_otel``
turns :func:`instrument` into a no-op.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from crew_otel.version import __version__

if TYPE_CHECKING:
    from crew_otel import logs
    from crew_otel.context import request
    from crew_otel.instrumentor import CrewAIInstrumentor
    from crew_otel.sdk import configure

__all__ = [
    "CrewAIInstrumentor",
    "__version__",
    "configure",
    "instrument",
    "logs",
    "request",
    "uninstrument",
]

_logger = logging.getLogger("crew_otel")

ENTRY_POINT_NAME = "crew_otel"

#: The public names loaded on first access, from their modules: importing ``crew_otel`` (as the
#: pytest plugin and the entry points do) costs nothing until one is used; ``configure`` lives
#: with the SDK set-up, which a process that only instruments never imports.
_LAZY = {
    "CrewAIInstrumentor": ("crew_otel.instrumentor", "CrewAIInstrumentor"),
    "configure": ("crew_otel.sdk", "configure"),
    "logs": ("crew_otel.logs", None),
    "request": ("crew_otel.context", "request"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def _disabled_by_environment() -> bool:
    disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return ENTRY_POINT_NAME in {name.strip() for name in disabled.split(",")}


def instrument(
    tracer_provider: Any = None, meter_provider: Any = None, **options: Any
) -> CrewAIInstrumentor:
    """Instrument CrewAI (idempotent: a second call changes nothing).

    Args:
        tracer_provider: where spans go; the global provider when ``None``.
        meter_provider: where metrics go; the global provider when ``None``.
        **options: any field of :class:`crew_otel.config.CrewOtelConfig`, e.g.
            ``capture_content=True``, ``http=False``.

    Raises:
        TypeError: an unknown option name.
        ValueError: an option (or its ``CREW_OTEL_*`` variable) with an invalid value.
    """
    from crew_otel.instrumentor import CrewAIInstrumentor

    instrumentor = CrewAIInstrumentor()
    if _disabled_by_environment():
        _logger.info("crew_otel: disabled by OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
        return instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        _logger.debug("crew_otel: already instrumented (uninstrument() first to change options)")
        return instrumentor
    instrumentor.instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, **options
    )
    return instrumentor


def uninstrument() -> None:
    """Remove every hook crew_otel installed and restore CrewAI's original functions."""
    from crew_otel.instrumentor import CrewAIInstrumentor

    instrumentor = CrewAIInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
