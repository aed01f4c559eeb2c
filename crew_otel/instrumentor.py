"""``CrewAIInstrumentor``: installs and removes every hook of the targets table.

Also wires the pieces around the CrewAI hooks: the request-stamping span processor, the
httpx/httpx2 instrumentation with crew_otel's HTTP attempt observers, the threading
instrumentation (context into threads started without a copy) and the baggage filter.

It is registered as the ``crew_otel`` entry point of ``opentelemetry_instrumentor``, so
``opentelemetry-instrument`` loads it without code changes, and
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=crew_otel`` turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Collection
from typing import Any

import wrapt
from opentelemetry import metrics, propagate, trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from crew_otel import targets as t
from crew_otel.config import CrewOtelConfig
from crew_otel.diagnosis import shared_state
from crew_otel.http import (
    HTTP_CLIENTS,
    AsyncHttpAttemptObserver,
    CrewAIBaggageFilter,
    HttpAttemptObserver,
)
from crew_otel.metrics import CrewOtelMetrics
from crew_otel.package import _instruments
from crew_otel.processor import RequestSpanProcessor
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.version import __version__
from crew_otel.wrappers.base import SpanWrapper
from crew_otel.wrappers.llm import ChatWrapper

_logger = logging.getLogger("crew_otel")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"
CREWAI_TELEMETRY_SERVICE = "crewAI-telemetry"

_AUTO_INSTRUMENTATION_LOADER = "opentelemetry.instrumentation.auto_instrumentation._load"
_ENTRY_POINT_GROUP = "opentelemetry_instrumentor"
_OWN_ENTRY_POINT = "crew_otel"

STATUS_INSTALLED = "installed"
STATUS_SKIPPED = "skipped"


@dataclasses.dataclass
class Hook:
    """One installed wrapper: ``owner.__dict__[name]`` was ``original``, now ``wrapper``."""

    key: str
    owner: Any
    name: str
    original: Any
    wrapper: Any


@dataclasses.dataclass(frozen=True)
class HookReport:
    """What happened to one row of the targets table (for ``crew-otel doctor``)."""

    key: str
    layer: str
    status: str
    detail: str = ""


# One span processor per tracer provider, re-enabled on re-instrumentation (the SDK has no way
# to remove a processor).
_processors: weakref.WeakKeyDictionary[Any, RequestSpanProcessor] = weakref.WeakKeyDictionary()
_processors_lock = threading.Lock()
# Instruments are created once per meter provider.
_metrics_by_provider: weakref.WeakKeyDictionary[Any, CrewOtelMetrics] = weakref.WeakKeyDictionary()


class CrewAIInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """OpenTelemetry instrumentor for CrewAI (see :func:`crew_otel.instrument`)."""

    def __init__(self) -> None:
        # BaseInstrumentor is a singleton: __init__ runs on every CrewAIInstrumentor() call.
        if not hasattr(self, "_hooks"):
            self._hooks: list[Hook] = []
            self._reports: list[HookReport] = []
            self._runtime: Runtime | None = None
            self._owned_instrumentors: list[Any] = []
            self._baggage_filter: CrewAIBaggageFilter | None = None
            self._llm_lock = threading.Lock()
            self._wrapped_llm_methods: set[tuple[int, str]] = set()

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    @property
    def runtime(self) -> Runtime | None:
        """The state shared by the installed wrappers (``None`` when not instrumented)."""
        return self._runtime

    @property
    def reports(self) -> list[HookReport]:
        """What happened to each hook at the last ``instrument()``."""
        return list(self._reports)

    # --- install -------------------------------------------------------------------------
    def _instrument(self, **kwargs: Any) -> None:
        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        config = CrewOtelConfig.resolve(kwargs)
        tracer = trace.get_tracer("crew_otel", __version__, tracer_provider, schema_url=SCHEMA_URL)
        runtime = Runtime.create(tracer, config, _metrics_for(meter_provider))
        self._runtime = runtime
        self._reports = []
        runtime.attach_processor = _processor_attacher(tracer_provider, runtime)
        _warn_if_crewai_owns_global_provider(tracer_provider)

        for target in t.TARGETS:
            self._install(target, runtime)
        self._wrap_llm_classes(runtime)
        runtime.refresh_llm_classes = lambda: self._wrap_llm_classes(runtime)
        safe_call(runtime.on_kickoff, default=None)

        if config.http:
            # In this thread, never in the background: importing the HTTP instrumentation
            # imports httpx2/httpcore2, and an import racing the application's own import of
            # the same modules can hand one of them a partially initialised module.
            safe_call(self._install_http, runtime, tracer_provider, meter_provider, default=None)
        if config.threading:
            self._install_threading(tracer_provider)
        if config.strip_crewai_baggage:
            self._install_baggage_filter()
        if config.detect_shared_instances:
            shared_state.activate(runtime.shared_state)

    def _install(self, target: t.Target, runtime: Runtime) -> None:
        try:
            resolved = t.resolve(target)
        except t.Unresolved as reason:
            _logger.debug("crew_otel: skipping %s: %s", target.key, reason)
            self._reports.append(HookReport(target.key, target.layer, STATUS_SKIPPED, str(reason)))
            return
        if any(h.owner is resolved.owner and h.name == resolved.name for h in self._hooks):
            self._reports.append(
                HookReport(target.key, target.layer, STATUS_SKIPPED, "same object as another row")
            )
            return
        wrapper = target.factory(runtime)
        self._apply(target.key, resolved, wrapper)
        self._reports.append(HookReport(target.key, target.layer, STATUS_INSTALLED, target.note))

    def _apply(self, key: str, resolved: t.Resolved, wrapper: Callable[..., Any]) -> None:
        if isinstance(wrapper, SpanWrapper):
            wrapper.is_async = resolved.is_async
        function_wrapper = wrapt.FunctionWrapper(resolved.original, wrapper)
        setattr(resolved.owner, resolved.name, function_wrapper)
        self._hooks.append(
            Hook(key, resolved.owner, resolved.name, resolved.original, function_wrapper)
        )

    def _wrap_llm_classes(self, runtime: Runtime) -> None:
        """Wrap ``call``/``acall`` of every BaseLLM subclass that defines them itself.

        Runs at ``instrument()`` and again at each kickoff, so provider classes imported
        later (CrewAI imports provider modules on first use) and custom LLMs are covered.
        """
        base = _find_class("crewai.llms.base_llm", "BaseLLM")
        if base is None:
            return
        pending = []
        for cls in _subclasses(base)[1:]:  # BaseLLM's own call/acall are abstract
            for name in ("call", "acall"):
                if name in cls.__dict__ and (id(cls), name) not in self._wrapped_llm_methods:
                    pending.append((cls, name))
        if not pending:
            return
        with self._llm_lock:
            # A kickoff that began before ``uninstrument()`` may get here after it: wrapping
            # then would leave hooks nothing removes (and a later instrument() would skip them).
            if not runtime.active or self._runtime is not runtime:
                return
            for cls, name in pending:
                if (id(cls), name) in self._wrapped_llm_methods:
                    continue
                self._wrapped_llm_methods.add((id(cls), name))
                if any(h.owner is cls and h.name == name for h in self._hooks):
                    continue  # a table row wrapped it already
                resolved = t.resolve_attribute(cls, name)
                key = f"{cls.__module__}:{cls.__qualname__}.{name}"
                self._apply(key, resolved, ChatWrapper(runtime, _has_rate_limit_layer()))
                self._reports.append(
                    HookReport(key, t.LAYER_LLM, STATUS_INSTALLED, "provider class")
                )

    def _install_http(self, runtime: Runtime, tracer_provider: Any, meter_provider: Any) -> None:
        try:
            http_instrumentation = importlib.import_module("opentelemetry.instrumentation.httpx")
        except ImportError:
            self._reports.append(
                HookReport(
                    "http",
                    "http",
                    STATUS_SKIPPED,
                    "opentelemetry-instrumentation-httpx is not installed",
                )
            )
            return
        for client, instrumentor_name, pool_module, sync_pool, async_pool in HTTP_CLIENTS:
            key = f"{client} (HTTP attempts)"
            try:
                importlib.import_module(client)
                pools = importlib.import_module(pool_module)
            except ImportError:
                self._reports.append(
                    HookReport(key, "http", STATUS_SKIPPED, f"{client} not installed")
                )
                continue
            instrumentor_cls = getattr(http_instrumentation, instrumentor_name, None)
            if instrumentor_cls is None:
                self._reports.append(
                    HookReport(
                        key,
                        "http",
                        STATUS_SKIPPED,
                        f"this opentelemetry-instrumentation-httpx has no {instrumentor_name}",
                    )
                )
                continue
            for cls_name, method, observer in (
                (sync_pool, "handle_request", HttpAttemptObserver(runtime)),
                (async_pool, "handle_async_request", AsyncHttpAttemptObserver(runtime)),
            ):
                cls = getattr(pools, cls_name, None)
                if cls is not None and method in cls.__dict__:
                    resolved = t.resolve_attribute(cls, method)
                    self._apply(f"{pool_module}:{cls_name}.{method}", resolved, observer)
            instrumentor = instrumentor_cls()
            if instrumentor.is_instrumented_by_opentelemetry:
                detail = "already instrumented by the application; crew_otel adds its observers"
            elif _left_to_auto_instrumentation(client):
                # opentelemetry-instrument loads that instrumentor next: instrumenting it here
                # would make its own instrument() call warn "already instrumented".
                detail = f"{instrumentor_name}, loaded by opentelemetry-instrument"
            else:
                instrumentor.instrument(
                    tracer_provider=tracer_provider, meter_provider=meter_provider
                )
                self._owned_instrumentors.append(instrumentor)
                detail = instrumentor_name
            self._reports.append(HookReport(key, "http", STATUS_INSTALLED, detail))

    def _install_threading(self, tracer_provider: Any) -> None:
        try:
            from opentelemetry.instrumentation.threading import ThreadingInstrumentor
        except ImportError:
            self._reports.append(
                HookReport(
                    "threading",
                    "context",
                    STATUS_SKIPPED,
                    "opentelemetry-instrumentation-threading missing",
                )
            )
            return
        from crew_otel.threads import ThreadContextHooks

        instrumentor = ThreadingInstrumentor()
        owned = not instrumentor.is_instrumented_by_opentelemetry and not (
            _left_to_auto_instrumentation("threading")
        )
        # The threading instrumentation (when crew_otel installs it) and, around its hooks, what
        # a new thread carries: a run's context only while the run is in flight.
        thread_hooks = ThreadContextHooks(instrumentor if owned else None)
        self._thread_hooks: ThreadContextHooks | None = thread_hooks
        thread_hooks.install(tracer_provider)
        self._reports.append(
            HookReport(
                "threading",
                "context",
                STATUS_INSTALLED,
                "a run's context carried into new threads while the run is in flight",
            )
        )

    def _install_baggage_filter(self) -> None:
        current = propagate.get_global_textmap()
        if isinstance(current, CrewAIBaggageFilter):
            return
        self._baggage_filter = CrewAIBaggageFilter(current)
        propagate.set_global_textmap(self._baggage_filter)
        self._reports.append(
            HookReport(
                "baggage", "privacy", STATUS_INSTALLED, "CrewAI baggage kept off outgoing requests"
            )
        )

    # --- remove --------------------------------------------------------------------------
    def _uninstrument(self, **kwargs: Any) -> None:
        # Under the locks the kickoff-time refreshes take, so none of them can re-wrap a class
        # or re-enable a processor after this point.
        with self._llm_lock:
            runtime, self._runtime = self._runtime, None
            if runtime is not None:
                runtime.active = False
                shared_state.deactivate(runtime.shared_state)
        with _processors_lock:
            for processor in list(_processors.values()):
                processor.enabled = False
        # The thread hooks and the threading instrumentation crew_otel installed under them.
        thread_hooks = getattr(self, "_thread_hooks", None)
        self._thread_hooks = None
        if thread_hooks is not None:
            safe_call(thread_hooks.uninstall, default=None)
        for instrumentor in reversed(self._owned_instrumentors):
            safe_call(instrumentor.uninstrument, default=None)
        self._owned_instrumentors = []
        with self._llm_lock:
            hooks, self._hooks = self._hooks, []
            self._wrapped_llm_methods = set()
        for hook in reversed(hooks):
            current = hook.owner.__dict__.get(hook.name)
            if current is hook.wrapper:
                setattr(hook.owner, hook.name, hook.original)
            else:
                # Someone wrapped on top of ours: leave the chain intact; ours passes through
                # because the runtime is inactive.
                _logger.debug("crew_otel: %s was re-wrapped by another library", hook.key)
        if self._baggage_filter is not None:
            if propagate.get_global_textmap() is self._baggage_filter:
                propagate.set_global_textmap(self._baggage_filter.inner)
            self._baggage_filter = None


def _left_to_auto_instrumentation(entry_point_name: str) -> bool:
    """Whether ``opentelemetry-instrument`` is loading instrumentors and will load this one next.

    The auto-instrumentation calls every ``opentelemetry_instrumentor`` entry point in turn;
    one that comes after ``crew_otel``, is not disabled and has no dependency conflict is
    instrumented by it, so crew_otel must leave it alone.
    """
    loader = sys.modules.get(_AUTO_INSTRUMENTATION_LOADER)
    if loader is None or not _called_from(loader.__dict__.get("_load_instrumentors")):
        return False
    disabled = {
        name.strip()
        for name in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")
    }
    if entry_point_name in disabled or "*" in disabled:
        return False
    names = [ep.name for ep in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP)]
    if _OWN_ENTRY_POINT not in names or entry_point_name not in names:
        return False
    if names.index(entry_point_name) < names.index(_OWN_ENTRY_POINT):
        return False  # already loaded (or skipped) before crew_otel
    return not _has_dependency_conflict(entry_point_name)


def _called_from(function: Any) -> bool:
    code = getattr(function, "__code__", None)
    frame = sys._getframe(1)
    while code is not None and frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _has_dependency_conflict(entry_point_name: str) -> bool:
    try:
        from opentelemetry.instrumentation.dependencies import get_dist_dependency_conflicts
    except ImportError:  # older opentelemetry-instrumentation: no per-distribution check
        return False
    for entry_point in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP):
        if entry_point.name == entry_point_name and entry_point.dist is not None:
            return get_dist_dependency_conflicts(entry_point.dist) is not None
    return False


def _find_class(module: str, name: str) -> type | None:
    try:
        cls = t.module_of(module).__dict__.get(name)
    except t.Unresolved:
        return None
    return cls if isinstance(cls, type) else None


def _subclasses(base: type) -> list[type]:
    found: list[type] = [base]
    index = 0
    while index < len(found):
        subclasses: list[type] = found[index].__subclasses__()
        for sub in subclasses:
            if sub not in found:
                found.append(sub)
        index += 1
    return found


def _has_rate_limit_layer() -> bool:
    try:
        t.module_of("crewai.llms.retry")
    except t.Unresolved:
        return False
    return True


def _metrics_for(meter_provider: Any) -> CrewOtelMetrics:
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


def _processor_attacher(tracer_provider: Any, runtime: Runtime) -> Callable[[], bool]:
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
                processor = RequestSpanProcessor()
                add(processor)
                _processors[provider] = processor
            processor.enabled = True
        return True

    return attach


def _warn_if_crewai_owns_global_provider(tracer_provider: Any) -> None:
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
