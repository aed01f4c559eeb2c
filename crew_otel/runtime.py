"""What every wrapper shares: tracer, config, metrics and the diagnosis state.

One :class:`Runtime` is built per ``instrument()`` call and passed to each wrapper's constructor,
so wrappers have no module globals and a re-instrumentation with another provider is a clean
swap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry.instrumentation import utils as instrumentation_utils
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Tracer

from crew_otel.config import CrewOtelConfig
from crew_otel.context import (
    API_CONTEXT_SWITCH,
    ContextSwitch,
    context_switch,
    current_context_reader,
)
from crew_otel.diagnosis.crosstalk import CrosstalkDetector
from crew_otel.diagnosis.errors import ErrorRecorder
from crew_otel.diagnosis.shared_state import SharedStateWatcher
from crew_otel.diagnosis.sharing import SharedInstanceDetector
from crew_otel.metrics import CrewOtelMetrics


@dataclasses.dataclass
class Runtime:
    """State shared by the wrappers of one instrumentation."""

    tracer: Tracer
    config: CrewOtelConfig
    metrics: CrewOtelMetrics
    errors: ErrorRecorder
    sharing: SharedInstanceDetector
    #: Globals, files, databases and resources touched by tool code (reports to ``sharing``).
    shared_state: SharedStateWatcher
    #: Another in-flight run's data inside a run (``None``: ``detect_crosstalk=False``).
    crosstalk: CrosstalkDetector | None = None
    #: Switched off by ``uninstrument()``: wrappers still in flight call straight through.
    active: bool = True
    #: Attaches the request-stamping span processor once the tracer provider is a real SDK
    #: provider (``instrument()`` may run before the application sets its provider). Returns
    #: True once attached; cleared when done, so the hot path is one attribute check.
    attach_processor: Callable[[], bool] | None = None
    #: Wraps LLM classes defined since the last call (provider modules load on first use).
    refresh_llm_classes: Callable[[], None] | None = None
    #: Installs the HTTP layer a post-import hook deferred (see ``CrewAIInstrumentor``);
    #: cleared before it runs (a hook deferring meanwhile sets it again).
    install_pending_http: Callable[[], None] | None = None
    #: Reads the current context (:func:`crew_otel.context.current_context_reader`).
    current_context: Callable[[], otel_context.Context] = otel_context.get_current
    #: Attaches and detaches contexts (:func:`crew_otel.context.context_switch`).
    switch: ContextSwitch = API_CONTEXT_SWITCH

    @property
    def recording(self) -> bool:
        """Whether hooks record now: instrumented, and not inside ``suppress_instrumentation()``
        (what ``is_instrumentation_enabled`` answers, in one read of the current context:
        every hook asks at every call)."""
        if not self.active:
            return False
        if _SUPPRESS_KEYS_FOUND:
            ctx = self.current_context()
            return not (ctx.get(_SUPPRESS_KEY) or ctx.get(_SUPPRESS_KEY_PLAIN))
        return is_instrumentation_enabled()

    def on_kickoff(self) -> None:
        """Per-run housekeeping: attach the span processor if it is still pending, wrap
        LLM classes that appeared since the last kickoff."""
        attach = self.attach_processor
        if attach is not None and attach():
            self.attach_processor = None
        refresh = self.refresh_llm_classes
        if refresh is not None:
            refresh()
        self.before_model_call()

    def before_model_call(self) -> None:
        """Install the HTTP layer if a post-import hook deferred it (one attribute check)."""
        install = self.install_pending_http
        if install is not None:
            self.install_pending_http = None
            install()

    @classmethod
    def create(cls, tracer: Tracer, config: CrewOtelConfig, metrics: CrewOtelMetrics) -> Runtime:
        """Build the runtime and its diagnosis components."""
        sharing = SharedInstanceDetector(metrics)
        return cls(
            tracer=tracer,
            config=config,
            metrics=metrics,
            errors=ErrorRecorder(metrics, config.capture_content),
            sharing=sharing,
            shared_state=SharedStateWatcher(sharing, config),
            crosstalk=CrosstalkDetector(metrics.crosstalk) if config.detect_crosstalk else None,
            current_context=current_context_reader(),
            switch=context_switch(),
        )


#: The context keys ``suppress_instrumentation()`` sets (read in one context look-up instead of
#: ``is_instrumentation_enabled``'s four; that function where they are not found).
_SUPPRESS_KEYS = tuple(
    key
    for key in (
        getattr(instrumentation_utils, "_SUPPRESS_INSTRUMENTATION_KEY", None),
        getattr(instrumentation_utils, "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN", None),
    )
    if isinstance(key, str)
)


#: Both keys found: ``Runtime.recording`` reads them itself.
_SUPPRESS_KEYS_FOUND = len(_SUPPRESS_KEYS) == 2
_SUPPRESS_KEY, _SUPPRESS_KEY_PLAIN = _SUPPRESS_KEYS if _SUPPRESS_KEYS_FOUND else ("", "")
