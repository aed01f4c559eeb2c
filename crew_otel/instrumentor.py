"""``CrewAIInstrumentor``: applies the plan (:mod:`crew_otel.plan`) and removes what it installed.

The plan lists every hook: the targets table, provider LLM classes, the httpx/httpx2
instrumentation with crew_otel's HTTP attempt observers on the connection pools, the threading
instrumentation (context into threads started without a copy), the baggage filter and the
shared-state watcher. Each row installs entirely or, failing, is reported and skipped; an
exception out of ``instrument()`` (strict mode) rolls back everything installed so far. The
request-stamping span processor attaches at the first kickoff with an SDK provider.

It is registered as the ``crew_otel`` entry point of ``opentelemetry_instrumentor``, so
``opentelemetry-instrument`` loads it without code changes, and
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=crew_otel`` turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

import wrapt
from opentelemetry import propagate
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from crew_otel import targets as t
from crew_otel.config import CrewOtelConfig
from crew_otel.diagnosis import shared_state
from crew_otel.hook_kinds import Layer, Source, Status
from crew_otel.hookset import Hook, HookSet
from crew_otel.http import (
    HTTP_CLIENTS,
    HTTP_HELPER_REPLACEMENTS,
    HTTP_INSTRUMENTATION,
    CrewAIBaggageFilter,
    HttpAttemptObserver,
    HttpClient,
)
from crew_otel.package import _instruments
from crew_otel.plan import (
    ASYNC_POOL_METHOD,
    LLM_CLASSES_KEY,
    Plan,
    PlanRow,
    build_plan,
    embedder_class_rows,
    findable,
    http_client_rows,
    initializing,
    left_to_auto_instrumentation,
    llm_class_rows,
    target_row,
)
from crew_otel.plan import imported as is_imported
from crew_otel.providers import (
    disable_processors,
    metrics_for,
    processor_attacher,
    tracer_for,
    warn_if_crewai_owns_global_provider,
)
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.llm import ChatWrapper

if TYPE_CHECKING:
    from crew_otel.threads import ThreadContextHooks

__all__ = ["CrewAIInstrumentor", "HookReport"]

_logger = logging.getLogger("crew_otel")


@dataclasses.dataclass(frozen=True)
class HookReport:
    """What happened to one row of the plan (see :mod:`crew_otel.plan`)."""

    key: str
    layer: Layer
    status: Status
    detail: str = ""


# Modules with crew_otel's post-import hook. wrapt's hooks cannot be removed: one per module
# per process, which installs only what the current instrumentation left pending (targets of
# modules CrewAI imports on first use, the HTTP layer).
_import_hooks: set[str] = set()
_import_hooks_lock = threading.Lock()


class CrewAIInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """OpenTelemetry instrumentor for CrewAI (see :func:`crew_otel.instrument`)."""

    def __init__(self) -> None:
        # BaseInstrumentor is a singleton: __init__ runs on every CrewAIInstrumentor() call.
        if not hasattr(self, "_hooks"):
            self._hooks = HookSet("instrument")
            self._reports: list[HookReport] = []
            self._runtime: Runtime | None = None
            self._owned_instrumentors: list[Any] = []
            self._baggage_filter: CrewAIBaggageFilter | None = None
            #: Guards the install state below against post-import hooks, kickoff-time
            #: refreshes and ``uninstrument()`` in other threads.
            self._install_lock = threading.Lock()
            self._http_pending: dict[str, _PendingHttp] = {}
            self._pending_targets: dict[str, list[tuple[t.Target, Runtime]]] = {}
            self._left_to_auto: dict[str, bool] = {}
            self._providers: tuple[Any, Any] = (None, None)
            self._thread_hooks: ThreadContextHooks | None = None

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

    def replaced_functions(self) -> list[tuple[str, Hook]]:
        """Every function crew_otel has replaced in this process now, with the component that
        replaced it: the plan's hooks, the thread hooks, the shared-state watcher's openers."""
        sets: list[HookSet] = [self._hooks, shared_state.hook_set()]
        thread_hooks = self._thread_hooks
        if thread_hooks is not None:
            sets.append(thread_hooks.hook_set)
        return [(hook_set.name, hook) for hook_set in sets for hook in hook_set.hooks()]

    # --- install -------------------------------------------------------------------------
    def _instrument(self, **kwargs: Any) -> None:
        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        config = CrewOtelConfig.resolve(kwargs)
        runtime = Runtime.create(tracer_for(tracer_provider), config, metrics_for(meter_provider))
        self._runtime = runtime
        self._reports = []
        self._providers = (tracer_provider, meter_provider)
        runtime.attach_processor = processor_attacher(tracer_provider, runtime)
        warn_if_crewai_owns_global_provider(tracer_provider)
        if config.http:
            safe_call(_import_peeked_modules, default=None)
        try:
            self._apply_plan(build_plan(config), runtime)
        except BaseException:
            # BaseInstrumentor marks us instrumented only once this returns: leave nothing
            # behind that a later uninstrument() (which will not run) would have to remove.
            self._uninstrument()
            raise

    def _apply_plan(self, plan: Plan, runtime: Runtime) -> None:
        """Install the plan's rows in order; pending rows install when their module arrives."""
        waited: list[str] = []
        for row in plan.rows:
            if row.status == Status.PENDING:
                self._wait_for_import(row, runtime)
                waited.extend(row.waits_for)
            else:
                self._reports.append(self._apply_row(row, runtime))
        runtime.refresh_llm_classes = lambda: self._refresh_llm_classes(runtime)
        safe_call(runtime.on_kickoff, default=None)
        for name in dict.fromkeys(waited):
            module = sys.modules.get(name)
            if module is None:
                _register_import_hook(name)
            elif initializing(module):
                importlib.import_module(name)  # another thread imports it: wait for it
        if self._http_pending:
            self._http_modules_imported(None)

    def _apply_row(self, row: PlanRow, runtime: Runtime) -> HookReport:
        """Install one row that is due now; a row that raises is skipped and reported."""
        if row.status != Status.INSTALLED:
            if row.status == Status.SKIPPED and row.target is not None:
                _logger.debug("crew_otel: skipping %s: %s", row.key, row.detail)
            return HookReport(row.key, row.layer, row.status, row.detail)
        try:
            detail = self._install_row(row, runtime)
        except Exception as exc:
            _logger.warning(
                "crew_otel: could not install %s (%s: %s); skipped it",
                row.key,
                type(exc).__name__,
                exc,
            )
            safe_call(_install_failed, exc, default=None)  # strict mode: roll everything back
            return HookReport(row.key, row.layer, Status.FAILED, f"{type(exc).__name__}: {exc}")
        return HookReport(row.key, row.layer, Status.INSTALLED, detail)

    def _install_row(self, row: PlanRow, runtime: Runtime) -> str:
        """Install ``row`` entirely or, raising, leave nothing of it installed."""
        installer = self._installers.get(row.source)
        if installer is None:
            raise ValueError(f"no installer for {row.source} row {row.key}")
        detail = installer(row, runtime)
        return detail if detail is not None else row.detail

    @functools.cached_property
    def _installers(self) -> dict[Source, Callable[[PlanRow, Runtime], str | None]]:
        """One installer per kind of row (a detail returned replaces the row's)."""
        return {
            Source.TARGET: self._install_target,
            Source.LLM_CLASS: self._install_llm_class,
            Source.HTTP_POOL: self._install_http_pool,
            Source.HTTP_CLIENT: self._install_http_client_row,
            Source.THREADING: lambda row, runtime: self._install_threading(),
            Source.BAGGAGE: lambda row, runtime: self._install_baggage_filter(runtime.config),
            Source.SHARED_STATE: lambda row, runtime: shared_state.activate(runtime.shared_state),
        }

    def _install_target(self, row: PlanRow, runtime: Runtime) -> None:
        target, resolved = _required(row.target, row), _required(row.resolved, row)
        self._apply(row.key, resolved, t.build_wrapper(target.factory, runtime, resolved))

    def _install_llm_class(self, row: PlanRow, runtime: Runtime) -> None:
        resolved = _required(row.resolved, row)
        chat = ChatWrapper(runtime, t.rate_limit_layer_present(), is_async=resolved.is_async)
        self._apply(row.key, resolved, chat)

    def _install_http_pool(self, row: PlanRow, runtime: Runtime) -> None:
        resolved = _required(row.resolved, row)
        is_async = resolved.name == ASYNC_POOL_METHOD
        self._apply(row.key, resolved, HttpAttemptObserver(runtime, is_async=is_async))

    def _install_http_client_row(self, row: PlanRow, runtime: Runtime) -> str:
        return self._install_http_instrumentor(_required(row.client, row))

    def _wait_for_import(self, row: PlanRow, runtime: Runtime) -> None:
        """Install ``row`` when its module is first imported, not import it now.

        CrewAI imports some modules only on first use (e.g. the deprecated ``LiteAgent``'s), and
        importing the HTTP clients and their pools is most of what ``instrument()`` used to
        cost (and importing them in a background thread raced the application's own import):
        a post-import hook installs the row in the importing thread, before the import returns.
        """
        self._reports.append(HookReport(row.key, row.layer, Status.PENDING, row.detail))
        with self._install_lock:
            if row.target is not None:
                self._pending_targets.setdefault(row.target.module, []).append(
                    (row.target, runtime)
                )
            elif row.source == Source.HTTP_CLIENT and row.client is not None:
                self._http_pending[row.client.module] = _PendingHttp(
                    row.client, runtime, left_to_auto_instrumentation(row.client.module)
                )
            # LLM classes are looked for at each kickoff; pool rows install with their client.

    def _module_imported(self, name: str) -> None:
        """Install what waited for ``name`` (its post-import hook runs)."""
        with self._install_lock:
            for target, runtime in self._pending_targets.pop(name, []):
                if runtime.active and self._runtime is runtime:
                    row = target_row(target, self._hooks.slots())
                    self._set_report(self._apply_row(row, runtime))
        self._http_modules_imported(name)

    def _apply(self, key: str, resolved: t.Resolved, wrapper: Callable[..., Any]) -> None:
        self._hooks.wrap(resolved.owner, resolved.name, wrapper, key=key)

    def _refresh_llm_classes(self, runtime: Runtime) -> None:
        """Wrap ``call``/``acall`` of the BaseLLM subclasses, and ``__call__`` of the embedding
        functions, defined since the last look.

        Runs at each kickoff, so provider classes imported later (CrewAI imports provider
        modules on first use), custom LLMs and custom embedders are covered.
        """
        taken = self._hooks.slots()
        found = (*llm_class_rows(taken), *embedder_class_rows(taken))
        rows = [r for r in found if r.status == Status.INSTALLED]
        if not rows:
            return
        with self._install_lock:
            # A kickoff that began before ``uninstrument()`` may get here after it: wrapping
            # then would leave hooks nothing removes (and a later instrument() would skip them).
            if not runtime.active or self._runtime is not runtime:
                return
            self._reports = [r for r in self._reports if r.key != LLM_CLASSES_KEY]
            for row in rows:
                if row.resolved is not None and not self._hooks.holds(
                    row.resolved.owner, row.resolved.name
                ):
                    self._set_report(self._apply_row(row, runtime))

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
            if not all(is_imported(name, imported) for name in names):
                continue
            if imported is not None and _other_http_import_in_progress(imported):
                # Installing imports the HTTP instrumentation, which imports every client: while
                # another thread imports one of them, that could close a cycle of import locks
                # (Python then hands one thread a half-initialised module). Install at the next
                # kickoff or model call instead, outside any import.
                pending.runtime.install_pending_http = self._install_deferred_http
                continue
            self._install_http_client(pending, imported)

    def _install_deferred_http(self) -> None:
        """Install the HTTP clients whose post-import hook deferred it (a client still being
        imported installs from its own hook)."""
        self._http_modules_imported(None)

    def _install_http_client(self, pending: _PendingHttp, imported: str | None) -> None:
        runtime, client = pending.runtime, pending.client
        if not runtime.active or self._runtime is not runtime:
            return
        # Imported outside the lock: an import may wait for another thread's import.
        importlib.import_module(HTTP_INSTRUMENTATION)
        with self._install_lock:
            # uninstrument() (or another hook) may have come first.
            if self._http_pending.get(client.module) is not pending or not runtime.active:
                return
            del self._http_pending[client.module]
            self._left_to_auto[client.module] = pending.left_to_auto_instrumentation
            for row in http_client_rows(client, imported):
                self._set_report(self._apply_row(row, runtime))

    def _install_http_instrumentor(self, client: HttpClient) -> str:
        """Instrument ``client`` with its OpenTelemetry instrumentor unless someone else does."""
        http_instrumentation = importlib.import_module(HTTP_INSTRUMENTATION)
        instrumentor_cls = getattr(http_instrumentation, client.instrumentor, None)
        if instrumentor_cls is None:
            raise LookupError(
                f"this opentelemetry-instrumentation-httpx has no {client.instrumentor}"
            )
        safe_call(self._replace_http_helpers, http_instrumentation, default=None)
        left_to_auto = self._left_to_auto.pop(client.module, None)
        if left_to_auto is None:  # installed at instrument(): decide now
            left_to_auto = left_to_auto_instrumentation(client.module)
        instrumentor = instrumentor_cls()
        if instrumentor.is_instrumented_by_opentelemetry:
            return "already instrumented by the application; crew_otel adds its observers"
        if left_to_auto:
            # opentelemetry-instrument loads that instrumentor itself: instrumenting it here
            # would make its own instrument() call warn "already instrumented".
            return f"{client.instrumentor}, loaded by opentelemetry-instrument"
        tracer_provider, meter_provider = self._providers
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        if instrumentor.is_instrumented_by_opentelemetry:
            self._owned_instrumentors.append(instrumentor)
        return client.instrumentor

    def _replace_http_helpers(self, http_instrumentation: Any) -> None:
        """Spare the HTTP instrumentation work whose result nothing reads, each only where
        checked (:data:`crew_otel.http.HTTP_HELPER_REPLACEMENTS`: its header dict while no
        header capture is configured, a second parse of each request's URL). Restored by
        ``uninstrument()`` with the other hooks; a helper already replaced (the other HTTP
        client shares the module) is left as it is."""
        for helper in HTTP_HELPER_REPLACEMENTS:
            if self._hooks.holds(http_instrumentation, helper.internal.function):
                continue
            if helper.applies(http_instrumentation):
                self._hooks.replace(
                    http_instrumentation, helper.internal.function, helper.build, key=helper.key
                )

    def _set_report(self, report: HookReport) -> None:
        """Replace the report of the same row (a pending one) or add it."""
        for index, existing in enumerate(self._reports):
            if existing.key == report.key:
                self._reports[index] = report
                return
        self._reports.append(report)

    def _install_threading(self) -> None:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        from crew_otel.threads import ThreadContextHooks

        instrumentor = ThreadingInstrumentor()
        owned = not instrumentor.is_instrumented_by_opentelemetry and not (
            left_to_auto_instrumentation("threading")
        )
        # The threading instrumentation (when crew_otel installs it) and, around its hooks, what
        # a new thread carries: a run's context only while the run is in flight.
        thread_hooks = ThreadContextHooks(instrumentor if owned else None)
        self._thread_hooks = thread_hooks
        try:
            thread_hooks.install(self._providers[0])
        except BaseException:
            self._thread_hooks = None
            thread_hooks.uninstall()
            raise

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

    # --- remove --------------------------------------------------------------------------
    def _uninstrument(self, **kwargs: Any) -> None:
        # Under the locks the kickoff-time refreshes take, so none of them can re-wrap a class
        # or re-enable a processor after this point.
        with self._install_lock:
            runtime, self._runtime = self._runtime, None
            # Their post-import hooks (wrapt's cannot be removed) now install nothing.
            self._http_pending = {}
            self._pending_targets = {}
            if runtime is not None:
                runtime.active = False
                shared_state.deactivate(runtime.shared_state)
        disable_processors()
        # The thread hooks and the threading instrumentation crew_otel installed under them.
        thread_hooks, self._thread_hooks = self._thread_hooks, None
        if thread_hooks is not None:
            safe_call(thread_hooks.uninstall, default=None)
        for instrumentor in reversed(self._owned_instrumentors):
            safe_call(instrumentor.uninstrument, default=None)
        self._owned_instrumentors = []
        with self._install_lock:
            self._left_to_auto = {}
        # A wrapper someone wrapped on top of stays in that chain; it passes through because
        # the runtime is inactive.
        self._hooks.remove_all()
        if self._baggage_filter is not None:
            if propagate.get_global_textmap() is self._baggage_filter:
                propagate.set_global_textmap(self._baggage_filter.inner)
            self._baggage_filter = None


@dataclasses.dataclass(frozen=True)
class _PendingHttp:
    """An HTTP client whose layer installs once the client and its pool module are imported."""

    client: HttpClient
    runtime: Runtime
    #: opentelemetry-instrument loads this client's instrumentor itself (decided at instrument()).
    left_to_auto_instrumentation: bool


_T = TypeVar("_T")


def _required(value: _T | None, row: PlanRow) -> _T:
    """A part the row's kind always has (a row built without it is a bug in the plan)."""
    if value is None:
        raise ValueError(f"plan row {row.key} ({row.source}) lacks a part its installer needs")
    return value


#: Modules that libraries look up in ``sys.modules`` without importing them (openai >= 2 peeks
#: at ``httpx2`` in every client it builds) and that the HTTP instrumentation imports.
_PEEKED_MODULES = ("httpx2",)


def _import_peeked_modules() -> None:
    """Import the peeked modules now, in the thread that calls ``instrument()``, when installed.

    The HTTP layer installs later (at the first model call, or when the HTTP client is imported),
    and importing the HTTP instrumentation imports ``httpx2``: in one thread while another builds
    an OpenAI client, that client would find ``httpx2`` half-initialised in ``sys.modules`` and
    fail (``partially initialized module 'httpx2' has no attribute 'URL'``).
    """
    for name in _PEEKED_MODULES:
        if name not in sys.modules and findable(name):
            importlib.import_module(name)


def _install_failed(exc: Exception) -> None:
    """Re-raise a row's installation error (through ``safe_call``: raised in strict mode only)."""
    raise exc


def _other_http_import_in_progress(hooked: str) -> bool:
    """Whether an HTTP client module or pool other than ``hooked`` is being imported now."""
    for client in HTTP_CLIENTS:
        for name in (client.module, client.pool_module):
            module = sys.modules.get(name)
            if name != hooked and module is not None and initializing(module):
                return True
    return False


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
