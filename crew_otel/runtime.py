"""What every wrapper shares: tracer, config, metrics and the diagnosis state.

One :class:`Runtime` is built per ``instrument()`` call and passed to each wrapper's constructor,
so wrappers have no module globals and a re-instrumentation with another provider is a clean
swap.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from opentelemetry.trace import Tracer

from crew_otel.config import CrewOtelConfig
from crew_otel.diagnosis.errors import ErrorRecorder
from crew_otel.diagnosis.sharing import SharedInstanceDetector
from crew_otel.metrics import CrewOtelMetrics

#: Longest a first kickoff waits for the HTTP instrumentation to be installed.
HTTP_SETUP_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Runtime:
    """State shared by the wrappers of one instrumentation."""

    tracer: Tracer
    config: CrewOtelConfig
    metrics: CrewOtelMetrics
    errors: ErrorRecorder
    sharing: SharedInstanceDetector
    #: Switched off by ``uninstrument()``: wrappers still in flight call straight through.
    active: bool = True
    #: Attaches the request-stamping span processor once the tracer provider is a real SDK
    #: provider (``instrument()`` may run before the application sets its provider). Returns
    #: True once attached; cleared when done, so the hot path is one attribute check.
    attach_processor: Callable[[], bool] | None = None
    #: Wraps LLM classes defined since the last call (provider modules load on first use).
    refresh_llm_classes: Callable[[], None] | None = None
    #: Set once the HTTP instrumentation (installed in the background) is in place.
    http_ready: threading.Event | None = None

    def wait_for_http(self) -> None:
        """Block until the background HTTP set-up is done (a no-op once it is)."""
        ready = self.http_ready
        if ready is not None:
            ready.wait(HTTP_SETUP_TIMEOUT_S)
            self.http_ready = None

    def on_kickoff(self) -> None:
        """Per-run housekeeping: attach the span processor if it is still pending, wrap
        LLM classes that appeared since the last kickoff, and make sure HTTP is instrumented."""
        self.wait_for_http()
        attach = self.attach_processor
        if attach is not None and attach():
            self.attach_processor = None
        refresh = self.refresh_llm_classes
        if refresh is not None:
            refresh()

    @classmethod
    def create(cls, tracer: Tracer, config: CrewOtelConfig, metrics: CrewOtelMetrics) -> Runtime:
        """Build the runtime and its diagnosis components."""
        return cls(
            tracer=tracer,
            config=config,
            metrics=metrics,
            errors=ErrorRecorder(metrics),
            sharing=SharedInstanceDetector(metrics),
        )
