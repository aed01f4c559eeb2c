"""The plan: every hook ``instrument()`` installs, and what it would do with each, as a dry run.

:func:`build_plan` lists one :class:`PlanRow` per hook - the rows of
:data:`crew_otel.targets.TARGETS`, the ``call``/``acall`` of each provider LLM class defined
now, each HTTP client's instrumentation and its connection pools, the thread hooks, the baggage
filter and the shared-state watcher - with the status ``instrument()`` would report for it:
installed, pending (installs when a module is first imported) or skipped (with the reason).

Building the plan imports nothing: a module that is not imported yet makes its rows pending.
:class:`~crew_otel.instrumentor.CrewAIInstrumentor` applies this plan and ``crew-otel doctor``
prints it, so both say the same thing.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Collection
from typing import Any

from crew_otel import targets as t
from crew_otel.config import CrewOtelConfig
from crew_otel.hook_kinds import Layer, Source, Status
from crew_otel.http import HTTP_CLIENTS, HTTP_INSTRUMENTATION, HttpClient

BASE_LLM_MODULE = "crewai.llms.base_llm"
LLM_METHODS = ("call", "acall")
THREADING_INSTRUMENTATION = "opentelemetry.instrumentation.threading"
SYNC_POOL_METHOD = "handle_request"
ASYNC_POOL_METHOD = "handle_async_request"

_AUTO_INSTRUMENTATION_LOADER = "opentelemetry.instrumentation.auto_instrumentation._load"
_ENTRY_POINT_GROUP = "opentelemetry_instrumentor"
_OWN_ENTRY_POINT = "crew_otel"


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One hook and what ``instrument()`` does with it."""

    key: str
    layer: Layer
    status: Status
    detail: str
    source: Source
    #: Pending rows: the modules that must be imported first.
    waits_for: tuple[str, ...] = ()
    #: Target rows: the row of the targets table.
    target: t.Target | None = None
    #: Rows that wrap ``owner.__dict__[name]`` (targets, LLM classes, pools) once resolved.
    resolved: t.Resolved | None = None
    #: HTTP rows: the client library.
    client: HttpClient | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every hook of one ``instrument()``, in installation order."""

    config: CrewOtelConfig
    rows: tuple[PlanRow, ...]

    def row(self, key: str) -> PlanRow | None:
        """The row named ``key``, if the plan has one."""
        return next((row for row in self.rows if row.key == key), None)


def build_plan(config: CrewOtelConfig | None = None) -> Plan:
    """What ``instrument(**options)`` would install here and now, without importing anything."""
    config = config if config is not None else CrewOtelConfig.resolve({})
    taken: set[tuple[int, str]] = set()
    rows: list[PlanRow] = [target_row(target, taken) for target in t.TARGETS]
    llm_rows = llm_class_rows(taken)
    taken.update((id(r.resolved.owner), r.resolved.name) for r in llm_rows if r.resolved)
    rows.extend(llm_rows)
    embedder_rows = embedder_class_rows(taken)
    taken.update((id(r.resolved.owner), r.resolved.name) for r in embedder_rows if r.resolved)
    rows.extend(embedder_rows)
    rows.extend(http_rows(config))
    rows.append(threading_row(config))
    rows.append(baggage_row(config))
    rows.append(shared_state_row(config))
    return Plan(config, tuple(rows))


# --- the targets table -------------------------------------------------------------------
def target_row(target: t.Target, taken: set[tuple[int, str]]) -> PlanRow:
    """A row of the targets table; ``taken`` holds the ``(id(owner), name)`` already hooked
    (the row's slot is added to it when the row installs)."""
    if target.module not in sys.modules:
        if findable(target.module):
            return _row(
                target,
                Status.PENDING,
                f"installs when {target.module} is imported",
                waits_for=(target.module,),
            )
        return _row(target, Status.SKIPPED, f"module {target.module} not importable (not found)")
    try:
        resolved = t.resolve(target)  # the module is imported: resolve() imports nothing
    except t.Unresolved as reason:
        return _row(target, Status.SKIPPED, str(reason))
    slot = (id(resolved.owner), resolved.name)
    if slot in taken:
        return _row(target, Status.SKIPPED, "same object as another row")
    taken.add(slot)
    return _row(target, Status.INSTALLED, target.note, resolved=resolved)


def _row(target: t.Target, status: Status, detail: str, **fields: Any) -> PlanRow:
    return PlanRow(target.key, target.layer, status, detail, Source.TARGET, target=target, **fields)


# --- provider LLM classes ----------------------------------------------------------------
LLM_CLASSES_KEY = f"{BASE_LLM_MODULE}:BaseLLM subclasses"


def llm_class_rows(taken: Collection[tuple[int, str]]) -> list[PlanRow]:
    """``call``/``acall`` of every BaseLLM subclass defining them itself, not in ``taken``.

    Classes defined later (CrewAI imports provider modules on first use, custom LLMs) are
    found again at each kickoff.
    """
    module = sys.modules.get(BASE_LLM_MODULE)
    base = module.__dict__.get("BaseLLM") if module is not None else None
    if not isinstance(base, type):
        if module is None and findable(BASE_LLM_MODULE):
            detail = f"found at each kickoff once {BASE_LLM_MODULE} is imported"
            waits = (BASE_LLM_MODULE,)
            return [
                PlanRow(LLM_CLASSES_KEY, Layer.LLM, Status.PENDING, detail, Source.LLM_CLASS, waits)
            ]
        detail = f"BaseLLM not in {BASE_LLM_MODULE}"
        return [PlanRow(LLM_CLASSES_KEY, Layer.LLM, Status.SKIPPED, detail, Source.LLM_CLASS)]
    rows = []
    for cls in subclasses(base)[1:]:  # BaseLLM's own call/acall are abstract
        for name in LLM_METHODS:
            if name not in cls.__dict__ or (id(cls), name) in taken:
                continue
            rows.append(
                PlanRow(
                    f"{cls.__module__}:{cls.__qualname__}.{name}",
                    Layer.LLM,
                    Status.INSTALLED,
                    "provider class",
                    Source.LLM_CLASS,
                    resolved=t.resolve_attribute(cls, name),
                )
            )
    return rows


def subclasses(base: type) -> list[type]:
    """``base`` and all its subclasses, breadth first."""
    found: list[type] = [base]
    # By identity: some metaclasses (typing_extensions' Protocol) hash in Python, and this
    # runs at every kickoff (new provider classes).
    seen = {id(base)}
    index = 0
    while index < len(found):
        subs: list[type] = found[index].__subclasses__()
        for sub in subs:
            if id(sub) not in seen:
                seen.add(id(sub))
                found.append(sub)
        index += 1
    return found


# --- embedder classes ----------------------------------------------------------------------
EMBEDDING_FUNCTION_MODULE = "chromadb.api.types"


def embedder_class_rows(taken: Collection[tuple[int, str]]) -> list[PlanRow]:
    """``__call__`` of every chromadb ``EmbeddingFunction`` subclass defined now (CrewAI's
    embedder providers build one of them: Ollama, Cohere, VoyageAI, HuggingFace, ...), as
    target rows of the embeddings wrapper; those in ``taken`` are left out.

    ``import crewai`` defines chromadb's and CrewAI's own; a subclass that inherits a wrapped
    ``__call__`` makes one span (the wrapper skips the nested call).
    """
    from crew_otel.wrappers.memory import EmbeddingsWrapper

    module = sys.modules.get(EMBEDDING_FUNCTION_MODULE)
    base = module.__dict__.get("EmbeddingFunction") if module is not None else None
    if not isinstance(base, type):
        return []
    rows = []
    for cls in subclasses(base)[1:]:  # the protocol's own __call__ is abstract
        if "__call__" not in cls.__dict__ or (id(cls), "__call__") in taken:
            continue
        target = t.Target(
            cls.__module__, f"{cls.__qualname__}.__call__", EmbeddingsWrapper, Layer.MEMORY
        )
        try:
            resolved = t.resolve_attribute(cls, "__call__")
        except t.Unresolved as reason:
            rows.append(_row(target, Status.SKIPPED, str(reason)))
            continue
        rows.append(_row(target, Status.INSTALLED, "embedder class", resolved=resolved))
    return rows


# --- HTTP clients and their connection pools ---------------------------------------------
def http_rows(config: CrewOtelConfig, hooked: str | None = None) -> list[PlanRow]:
    """Each HTTP client's instrumentation and the attempt observers on its pools."""
    if not config.http:
        return [PlanRow("http", Layer.HTTP, Status.SKIPPED, "http=False", Source.HTTP_CLIENT)]
    if not findable(HTTP_INSTRUMENTATION):
        detail = "opentelemetry-instrumentation-httpx is not installed"
        return [PlanRow("http", Layer.HTTP, Status.SKIPPED, detail, Source.HTTP_CLIENT)]
    rows: list[PlanRow] = []
    for client in HTTP_CLIENTS:
        rows.extend(http_client_rows(client, hooked))
    return rows


def http_client_rows(client: HttpClient, hooked: str | None = None) -> list[PlanRow]:
    """One client's row, then its pools' rows (``hooked``: see :func:`imported`)."""
    if not findable(client.module):
        detail = f"{client.module} not installed"
        return [
            PlanRow(
                client.key, Layer.HTTP, Status.SKIPPED, detail, Source.HTTP_CLIENT, client=client
            )
        ]
    instrumentation = sys.modules.get(HTTP_INSTRUMENTATION)
    if instrumentation is not None and not hasattr(instrumentation, client.instrumentor):
        detail = f"this opentelemetry-instrumentation-httpx has no {client.instrumentor}"
        return [
            PlanRow(key, Layer.HTTP, Status.SKIPPED, detail, source, client=client)
            for key, source in _client_keys(client)
        ]
    names = (client.module, client.pool_module)
    if not all(imported(name, hooked) for name in names):
        detail = f"installs when {client.module} and {client.pool_module} are imported"
        return [
            PlanRow(key, Layer.HTTP, Status.PENDING, detail, source, names, client=client)
            for key, source in _client_keys(client)
        ]
    rows = [
        PlanRow(
            client.key,
            Layer.HTTP,
            Status.INSTALLED,
            http_client_detail(client),
            Source.HTTP_CLIENT,
            client=client,
        )
    ]
    module = sys.modules[client.pool_module]
    for cls_name, method in pools(client):
        key = pool_key(client, cls_name, method)
        cls = module.__dict__.get(cls_name)
        if not isinstance(cls, type) or method not in cls.__dict__:
            detail = f"{cls_name}.{method} not in this {client.pool_module}"
            rows.append(
                PlanRow(key, Layer.HTTP, Status.SKIPPED, detail, Source.HTTP_POOL, client=client)
            )
            continue
        rows.append(
            PlanRow(
                key,
                Layer.HTTP,
                Status.INSTALLED,
                "HTTP attempt observer",
                Source.HTTP_POOL,
                resolved=t.resolve_attribute(cls, method),
                client=client,
            )
        )
    return rows


def _client_keys(client: HttpClient) -> list[tuple[str, Source]]:
    keys = [(client.key, Source.HTTP_CLIENT)]
    keys.extend((pool_key(client, cls, method), Source.HTTP_POOL) for cls, method in pools(client))
    return keys


def pools(client: HttpClient) -> tuple[tuple[str, str], ...]:
    """The ``(pool class, method)`` pairs a client's transport sends through."""
    return ((client.sync_pool, SYNC_POOL_METHOD), (client.async_pool, ASYNC_POOL_METHOD))


def pool_key(client: HttpClient, cls_name: str, method: str) -> str:
    """The row name of a pool method's attempt observer."""
    return f"{client.pool_module}:{cls_name}.{method}"


def http_client_detail(client: HttpClient) -> str:
    """Who instruments the client: crew_otel, the application or ``opentelemetry-instrument``.

    ``instrument()`` installs the HTTP rows after importing the instrumentation, which the dry
    run does not: there, an instrumentation not imported yet cannot have instrumented anything.
    """
    instrumentor_cls = getattr(sys.modules.get(HTTP_INSTRUMENTATION), client.instrumentor, None)
    if instrumentor_cls is not None and instrumentor_cls().is_instrumented_by_opentelemetry:
        return "already instrumented by the application; crew_otel adds its observers"
    if left_to_auto_instrumentation(client.module):
        return f"{client.instrumentor}, loaded by opentelemetry-instrument"
    return client.instrumentor


# --- threads, baggage, shared state ------------------------------------------------------
def threading_row(config: CrewOtelConfig) -> PlanRow:
    """The thread hooks (and the threading instrumentation, unless someone else installs it)."""
    if not config.threading:
        return PlanRow(
            "threading", Layer.CONTEXT, Status.SKIPPED, "threading=False", Source.THREADING
        )
    if not findable(THREADING_INSTRUMENTATION):
        detail = "opentelemetry-instrumentation-threading missing"
        return PlanRow("threading", Layer.CONTEXT, Status.SKIPPED, detail, Source.THREADING)
    detail = "a run's context carried into new threads while the run is in flight"
    return PlanRow("threading", Layer.CONTEXT, Status.INSTALLED, detail, Source.THREADING)


def baggage_row(config: CrewOtelConfig) -> PlanRow:
    """The propagator filter on the global textmap."""
    if not (config.strip_crewai_baggage or config.propagate_request_id):
        detail = "strip_crewai_baggage=False and propagate_request_id=False"
        return PlanRow("baggage", Layer.PRIVACY, Status.SKIPPED, detail, Source.BAGGAGE)
    detail = "CrewAI baggage kept off outgoing requests"
    if config.propagate_request_id:
        detail += "; request ID carried as baggage"
    return PlanRow("baggage", Layer.PRIVACY, Status.INSTALLED, detail, Source.BAGGAGE)


def shared_state_row(config: CrewOtelConfig) -> PlanRow:
    """The file and SQLite watchers of the shared-state diagnosis."""
    if not config.detect_shared_instances:
        detail = "detect_shared_instances=False"
        return PlanRow("shared state", Layer.DIAGNOSIS, Status.SKIPPED, detail, Source.SHARED_STATE)
    detail = "open, io.open, os.open and sqlite3.connect watched inside tool calls"
    return PlanRow("shared state", Layer.DIAGNOSIS, Status.INSTALLED, detail, Source.SHARED_STATE)


# --- imports, without importing ------------------------------------------------------------
def findable(name: str) -> bool:
    """Whether ``name`` can be imported, found without importing it or its parent packages."""
    return name in sys.modules or _spec(name) is not None


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    parent, _, _ = name.rpartition(".")
    try:
        if not parent or parent in sys.modules:
            return importlib.util.find_spec(name)  # imports nothing: the parent is imported
        parent_spec = _spec(parent)
        locations = parent_spec.submodule_search_locations if parent_spec is not None else None
        if not locations:
            return None
        return importlib.machinery.PathFinder.find_spec(name, list(locations))
    except (ImportError, ValueError):
        return None


def initializing(module: Any) -> bool:
    """Whether ``module`` is still executing (another thread may be importing it)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def imported(name: str, hooked: str | None) -> bool:
    """Whether ``name`` is fully imported (``hooked``: the module whose post-import hook runs)."""
    module = sys.modules.get(name)
    return module is not None and (name == hooked or not initializing(module))


def left_to_auto_instrumentation(entry_point_name: str) -> bool:
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
