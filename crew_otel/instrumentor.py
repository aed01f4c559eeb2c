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
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

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
    HTTP_INSTRUMENTATION,
    AsyncHttpAttemptObserver,
    CrewAIBaggageFilter,
    HttpAttemptObserver,
    HttpClient,
)
from crew_otel.metrics import CrewOtelMetrics
from crew_otel.package import _instruments
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.version import __version__
from crew_otel.wrappers.base import SpanWrapper
from crew_otel.wrappers.llm import ChatWrapper

if TYPE_CHECKING:
    from crew_otel.processor import RequestSpanProcessor

_logger = logging.getLogger("crew_otel")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"
CREWAI_TELEMETRY_SERVICE = "crewAI-telemetry"

_AUTO_INSTRUMENTATION_LOADER = "opentelemetry.instrumentation.auto_instrumentation._load"
_ENTRY_POINT_GROUP = "opentelemetry_instrumentor"
_OWN_ENTRY_POINT = "crew_otel"

STATUS_INSTALLED = "installed"
STATUS_SKIPPED = "skipped"
#: Installs when its module is first imported (see ``_defer`` and ``_install_http``).
STATUS_PENDING = "pending"


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
# Modules with crew_otel's post-import hook. wrapt's hooks cannot be removed: one per module
# per process, which installs only what the current instrumentation left pending (targets of
# modules CrewAI imports on first use, the HTTP layer).
_import_hooks: set[str] = set()
_import_hooks_lock = threading.Lock()
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
            self._http_pending: dict[str, _PendingHttp] = {}
            self._pending_targets: dict[str, list[tuple[t.Target, Runtime]]] = {}

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _check_dependency_conflicts(self) -> Any:
        # The base class reads crewai's distribution metadata (a large file, parsed as an
        # e-mail message: a third of instrument()'s time); an imported crewai has its version.
        version = getattr(sys.modules.get("crewai"), "__version__", None)
        if not isinstance(version, str):
            return super()._check_dependency_conflicts()
        from opentelemetry.instrumentation.dependencies import DependencyConflict
        from packaging.requirements import Requirement

        for required in _instruments:
            if not Requirement(required).specifier.contains(version, prereleases=True):
                return DependencyConflict(required, f"crewai {version}")
        return None

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
            safe_call(self._install_http, runtime, tracer_provider, meter_provider, default=None)
        if config.threading:
            self._install_threading(tracer_provider)
        if config.strip_crewai_baggage or config.propagate_request_id:
            self._install_baggage_filter(config)
        if config.detect_shared_instances:
            shared_state.activate(runtime.shared_state)

    def _install(self, target: t.Target, runtime: Runtime) -> None:
        if target.module not in sys.modules and _findable(target.module):
            self._defer(target, runtime)
            return
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

    def _defer(self, target: t.Target, runtime: Runtime) -> None:
        """Install ``target`` when its module is first imported, not import it now.

        CrewAI imports some modules only on first use (e.g. the deprecated ``LiteAgent``'s):
        importing them here would make every ``instrument()`` pay for them.
        """
        with self._llm_lock:
            self._pending_targets.setdefault(target.module, []).append((target, runtime))
        detail = f"installs when {target.module} is imported"
        self._reports.append(HookReport(target.key, target.layer, STATUS_PENDING, detail))
        _register_import_hook(target.module)

    def _module_imported(self, name: str) -> None:
        """Install what waited for ``name`` (its post-import hook runs)."""
        with self._llm_lock:
            for target, runtime in self._pending_targets.pop(name, []):
                if runtime.active and self._runtime is runtime:
                    self._reports = [r for r in self._reports if r.key != target.key]
                    self._install(target, runtime)
        self._http_modules_imported(name)

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
        """Install each HTTP client's layer now if it is imported, else when it is imported.

        Importing the httpx instrumentation imports httpx, httpx2 and their connection pools
        (most of what ``instrument()`` used to cost), and importing them in a background thread
        could race the application's own import of the same modules and hand one of them a
        partially initialised module. So nothing is imported here: a post-import hook installs
        a client's layer in the thread that imports the client or its pool module, once both
        are fully imported, before that import returns to anyone.
        """
        if importlib.util.find_spec(HTTP_INSTRUMENTATION) is None:
            self._reports.append(
                HookReport(
                    "http",
                    "http",
                    STATUS_SKIPPED,
                    "opentelemetry-instrumentation-httpx is not installed",
                )
            )
            return
        for client in HTTP_CLIENTS:
            if importlib.util.find_spec(client.module) is None:
                self._reports.append(
                    HookReport(client.key, "http", STATUS_SKIPPED, f"{client.module} not installed")
                )
                continue
            pending = _PendingHttp(
                client,
                runtime,
                tracer_provider,
                meter_provider,
                _left_to_auto_instrumentation(client.module),
            )
            with self._llm_lock:
                self._http_pending[client.module] = pending
            self._reports.append(
                HookReport(
                    client.key,
                    "http",
                    STATUS_PENDING,
                    f"installs when {client.module} and {client.pool_module} are imported",
                )
            )
            for name in (client.module, client.pool_module):
                module = sys.modules.get(name)
                if module is None:
                    _register_import_hook(name)
                elif _initializing(module):
                    importlib.import_module(name)  # another thread imports it: wait for it
        self._http_modules_imported(None)

    def _http_modules_imported(self, imported: str | None) -> None:
        """Install each pending HTTP client whose module and pool module are imported now.

        ``imported`` is the module whose post-import hook runs (fully executed, though the
        import system still marks it as initialising); ``None`` at ``instrument()``.
        """
        for pending in list(self._http_pending.values()):
            client = pending.client
            names = (client.module, client.pool_module)
            if imported is not None and imported not in names:
                continue
            if all(_imported(name, imported) for name in names):
                self._install_http_client(pending)

    def _install_http_client(self, pending: _PendingHttp) -> None:
        runtime, client = pending.runtime, pending.client
        if not runtime.active or self._runtime is not runtime:
            return
        # Imports outside the lock: an import may wait for another thread's import.
        http_instrumentation = importlib.import_module(HTTP_INSTRUMENTATION)
        pools = sys.modules[client.pool_module]
        instrumentor_cls = getattr(http_instrumentation, client.instrumentor, None)
        with self._llm_lock:
            # uninstrument() (or another hook) may have come first.
            if self._http_pending.get(client.module) is not pending or not runtime.active:
                return
            del self._http_pending[client.module]
            if instrumentor_cls is None:
                self._set_report(
                    HookReport(
                        client.key,
                        "http",
                        STATUS_SKIPPED,
                        f"this opentelemetry-instrumentation-httpx has no {client.instrumentor}",
                    )
                )
                return
            for cls_name, method, observer in (
                (client.sync_pool, "handle_request", HttpAttemptObserver(runtime)),
                (client.async_pool, "handle_async_request", AsyncHttpAttemptObserver(runtime)),
            ):
                cls = getattr(pools, cls_name, None)
                if cls is not None and method in cls.__dict__:
                    resolved = t.resolve_attribute(cls, method)
                    self._apply(f"{client.pool_module}:{cls_name}.{method}", resolved, observer)
            instrumentor = instrumentor_cls()
            if instrumentor.is_instrumented_by_opentelemetry:
                detail = "already instrumented by the application; crew_otel adds its observers"
            elif pending.left_to_auto_instrumentation:
                # opentelemetry-instrument loads that instrumentor itself: instrumenting it here
                # would make its own instrument() call warn "already instrumented".
                detail = f"{client.instrumentor}, loaded by opentelemetry-instrument"
            else:
                instrumentor.instrument(
                    tracer_provider=pending.tracer_provider, meter_provider=pending.meter_provider
                )
                self._owned_instrumentors.append(instrumentor)
                detail = client.instrumentor
            self._set_report(HookReport(client.key, "http", STATUS_INSTALLED, detail))

    def _set_report(self, report: HookReport) -> None:
        """Replace the report of the same row (a pending one) or add it."""
        for index, existing in enumerate(self._reports):
            if existing.key == report.key:
                self._reports[index] = report
                return
        self._reports.append(report)

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

    def _install_baggage_filter(self, config: CrewOtelConfig) -> None:
        current = propagate.get_global_textmap()
        if isinstance(current, CrewAIBaggageFilter):
            current.strip_crewai = config.strip_crewai_baggage
            current.propagate_request_id = config.propagate_request_id
            return
        self._baggage_filter = CrewAIBaggageFilter(
            current,
            strip_crewai=config.strip_crewai_baggage,
            propagate_request_id=config.propagate_request_id,
        )
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
            # Their post-import hooks (wrapt's cannot be removed) now install nothing.
            self._http_pending = {}
            self._pending_targets = {}
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


@dataclasses.dataclass(frozen=True)
class _PendingHttp:
    """An HTTP client whose layer installs once the client and its pool module are imported."""

    client: HttpClient
    runtime: Runtime
    tracer_provider: Any
    meter_provider: Any
    #: opentelemetry-instrument loads this client's instrumentor itself (decided at instrument()).
    left_to_auto_instrumentation: bool


def _register_import_hook(name: str) -> None:
    """Tell the instrumentor when ``name`` is first imported (one hook per module per process).

    wrapt runs the hook in the importing thread, once the module is executed and before the
    import returns to anyone (other threads importing it wait until then).
    """
    with _import_hooks_lock:
        if name in _import_hooks:
            return
        _import_hooks.add(name)
    wrapt.register_post_import_hook(functools.partial(_module_imported, name), name)


def _module_imported(name: str, module: Any) -> None:
    # Runs inside the application's import: an exception here would fail that import.
    safe_call(CrewAIInstrumentor()._module_imported, name, default=None)


def _findable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (its parents excepted)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _initializing(module: Any) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _imported(name: str, hooked: str | None) -> bool:
    """Whether ``name`` is fully imported (``hooked``: the module whose post-import hook runs)."""
    module = sys.modules.get(name)
    return module is not None and (name == hooked or not _initializing(module))


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
                # Imported here: it subclasses the SDK's SpanProcessor, and an SDK provider
                # (hence the SDK) is present by now; ``import crew_otel`` needs only the API.
                from crew_otel.processor import RequestSpanProcessor

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
