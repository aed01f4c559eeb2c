"""Shared state outside CrewAI objects: globals, files, SQLite databases and resources that the
tool code of two requests touches at once.

Building every Crew, Agent, Task and tool per request is not enough when the tool code keeps
state elsewhere. While a tool runs, this module notes what the tool code writes and holds:

``global``
    module-level or class-level objects the tool's function (and the user's own functions it
    calls, a few levels deep) mutates, found once per code object in its bytecode
    (:mod:`crew_otel.diagnosis.mutations`) and resolved to the object at each call;
``file``
    paths opened for writing (``open``/``io.open`` in a write mode, ``os.open`` with write
    flags, ``Path.write_text``/``write_bytes`` on Python >= 3.11), seen by wrappers that
    crew_otel puts on those functions while instrumented;
``database``
    SQLite database files written (a statement that is not a read), seen through the
    connection's trace callback, which crew_otel sets on connections that ``sqlite3.connect``
    opens while instrumented and that only their own thread may use (a trace callback on a
    connection threads share can freeze the process: see :func:`_traced_connect`);
``resource``
    non-thread-safe objects (a ``sqlite3.Connection`` or ``Cursor``, an open file, a SQLAlchemy
    ``Session``) held by the tool instance's attributes, its function's closure, or a module
    global that the tool code (and the user's functions it calls) uses.

A thing counts as used by a request from the first time its tool code touches it until that
request's run ends (the state a tool writes is the run's until the run is over: the article's
``shared_context["ticket"]`` is written by one tool call and read by the next). When a second
request touches a thing another request in flight holds, the span of that tool call gets a
``crew_otel.shared_instance`` event naming the thing, as for a shared Agent. Reads are never
noted; per-request state (closures, unique paths, per-call connections) never collides.

Cost: outside tool calls, an ``open``/``os.open``/``sqlite3.connect`` pays one wrapper call and
one context look-up, and a SQLite statement on a connection opened while instrumented pays its
trace callback's context look-up. ``uninstrument()`` restores every wrapped function. (A Python
audit hook would see opens too, but it cannot be removed and makes every audited operation of
the process, ``id()`` included, a Python call: ``copy.deepcopy`` ran 2.2 x slower with one.)
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import sys
import threading
import types
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from crew_otel import internals
from crew_otel.attributes import DATABASE_LOCKED
from crew_otel.diagnosis.mutations import ToolGlobals, tool_globals
from crew_otel.diagnosis.sharing import (
    KIND_DATABASE,
    KIND_FILE,
    KIND_GLOBAL,
    KIND_RESOURCE,
    SharedInstanceDetector,
)

_logger = logging.getLogger("crew_otel")

TOOL_STATE_KEY = otel_context.create_key("crew_otel.tool_state")
"""Context key of the :class:`ToolScope` of the tool call in progress."""

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_READ_STATEMENTS = ("SELECT", "PRAGMA", "EXPLAIN", "BEGIN", "COMMIT", "END", "ROLLBACK")
#: What a "write" found in bytecode cannot change: immutable values, and modules and functions
#: whose methods (``os.remove``, ``json.dump``) the walker cannot tell from mutating ones.
_NOT_STATE = (
    int,
    float,
    complex,
    str,
    bytes,
    tuple,
    frozenset,
    bool,
    type(None),
    range,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
)
_MEMORY_DATABASES = ("", ":memory:")
_STANDARD_STREAMS = ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__")
_NO_GLOBALS = ToolGlobals([], [])


class RunHoldings:
    """What one run's tool code has touched so far; released (each usage handed back to the
    detector) when the run ends."""

    __slots__ = ("_exit_usage", "_lock", "_usages", "closed")

    def __init__(self, exit_usage: Callable[[Any], None]) -> None:
        self._exit_usage = exit_usage
        self._lock = threading.Lock()
        self._usages: dict[Hashable, Any] = {}
        self.closed = False

    def holds(self, key: Hashable) -> bool:
        return key in self._usages

    def add(self, key: Hashable, usage: Any) -> bool:
        """Keep ``usage`` until the run ends; False if the run already ended."""
        with self._lock:
            if self.closed:
                return False
            self._usages[key] = usage
            return True

    def release(self) -> None:
        """End the run: release every usage (once)."""
        with self._lock:
            self.closed = True
            usages, self._usages = list(self._usages.values()), {}
        for usage in usages:
            self._exit_usage(usage)


class ToolScope:
    """The tool call in progress, as the file and SQLite wrappers see it."""

    __slots__ = ("databases", "holdings", "request_id", "span", "watcher")

    def __init__(
        self, watcher: SharedStateWatcher, request_id: str, span: Span, holdings: RunHoldings
    ) -> None:
        self.watcher = watcher
        self.request_id = request_id
        self.span = span
        self.holdings = holdings
        #: SQLite databases this tool call connected to or wrote (to name a locked one).
        self.databases: list[str] = []

    def note(self, key: Hashable, kind: str, label: str, class_name: str) -> None:
        """This request's tool code touched ``key``: hold it for the run, flag a collision."""
        if self.holdings.holds(key):
            return
        sharing = self.watcher.sharing
        usage = sharing.enter_key(key, kind, self.request_id, self.span, label, class_name)
        if not self.holdings.add(key, usage):
            sharing.exit(usage)


class SharedStateWatcher:
    """Finds the shared state of tool calls for one instrumentation (see the module doc)."""

    def __init__(self, sharing: SharedInstanceDetector) -> None:
        #: Where collisions are reported (the same detector as for shared Agents).
        self.sharing = sharing
        self._globals: weakref.WeakKeyDictionary[Any, ToolGlobals] = weakref.WeakKeyDictionary()
        self._writes_lock = threading.Lock()

    def new_holdings(self) -> RunHoldings:
        """What a run (or a tool called outside any run) holds; call ``release()`` at its end."""
        return RunHoldings(self.sharing.exit)

    # --- at each tool call -----------------------------------------------------------------
    def enter_tool(
        self,
        tool: object,
        request_id: str,
        span: Span,
        holdings: RunHoldings,
        ctx: otel_context.Context,
    ) -> otel_context.Context:
        """Note what ``tool`` writes and holds; return ``ctx`` with the scope for the hook."""
        scope = ToolScope(self, request_id, span, holdings)
        globals_used = self._globals_of(tool)
        for write in globals_used.writes:
            target = write.target()
            if target is None:
                continue
            if write.rebinds:
                key: Hashable = (KIND_GLOBAL, id(target), write.path)
                class_name = "module"
            elif isinstance(target, _NOT_STATE):
                continue  # ``os.remove(p)`` calls a module's function; it changes no state
            else:
                key = (KIND_GLOBAL, id(target))
                class_name = _class_name(target)
            scope.note(key, KIND_GLOBAL, write.label, class_name)
        for label, resource in _held_resources(tool, globals_used):
            scope.note((KIND_RESOURCE, id(resource)), KIND_RESOURCE, label, _class_name(resource))
        return otel_context.set_value(TOOL_STATE_KEY, scope, ctx)

    def _globals_of(self, tool: object) -> ToolGlobals:
        function, owner = _tool_function(tool)
        if function is None:
            return _NO_GLOBALS
        cache_key: Any = owner if owner is not None else function
        try:
            cached = self._globals.get(cache_key)
        except TypeError:
            return _NO_GLOBALS
        if cached is None:
            cached = tool_globals(function, owner)
            with self._writes_lock:
                self._globals[cache_key] = cached
        return cached

    # --- what the file and SQLite wrappers report -------------------------------------------
    @staticmethod
    def file_opened(path: object, mode: object, flags: object) -> None:
        scope = _current_scope()
        if scope is None or not _is_write(mode, flags) or isinstance(path, int):
            return
        name = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
        scope.note((KIND_FILE, name), KIND_FILE, name, "file")

    @staticmethod
    def database_connected(database: str) -> None:
        scope = _current_scope()
        if scope is not None and database not in scope.databases:
            scope.databases.append(database)

    @staticmethod
    def database_written(database: str) -> None:
        scope = _current_scope()
        if scope is not None:
            if database not in scope.databases:
                scope.databases.append(database)
            scope.note((KIND_DATABASE, database), KIND_DATABASE, database, "sqlite3.Connection")

    @staticmethod
    def database_locked(ctx: otel_context.Context, span: Span) -> None:
        """A tool call failed on "database is locked": name the database on its span (the
        requests holding it in this process are named by the shared-instance events)."""
        scope = ctx.get(TOOL_STATE_KEY)
        if isinstance(scope, ToolScope) and scope.databases and span.is_recording():
            span.set_attribute(DATABASE_LOCKED, scope.databases[-1])


def _current_scope() -> ToolScope | None:
    scope = otel_context.get_value(TOOL_STATE_KEY)
    return scope if isinstance(scope, ToolScope) else None


def _is_write(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tool_function(tool: object) -> tuple[Callable[..., Any] | None, type | None]:
    """The code behind a tool: ``@tool``'s function, or the ``_run`` of a BaseTool subclass."""
    original = internals.TOOL_ORIGINAL_TOOL.read(tool)
    if original is not None:
        tool = original
    func = getattr(tool, "func", None)
    if callable(func):
        return func, None
    cls = type(tool)
    run = cls.__dict__.get("_run") or getattr(cls, "_run", None)
    if callable(run) and not getattr(run, "__isabstractmethod__", False):
        return run, cls
    return None, None


# --- resources held by tools ------------------------------------------------------------------
def _resource_types() -> tuple[type, ...]:
    types: list[type] = [sqlite3.Connection, sqlite3.Cursor, io.IOBase]
    orm = sys.modules.get("sqlalchemy.orm")
    session = getattr(orm, "Session", None)
    if isinstance(session, type):
        types.append(session)
    engine = sys.modules.get("sqlalchemy.engine")
    connection = getattr(engine, "Connection", None)
    if isinstance(connection, type):
        types.append(connection)
    return tuple(types)


def _held_resources(tool: object, globals_used: ToolGlobals) -> Iterator[tuple[str, object]]:
    """(``Class at Tool.attribute``, object) for each non-thread-safe object the tool holds:
    in its attributes, its function's closure, or a module global its code uses
    (``Class at module.NAME``)."""
    original = internals.TOOL_ORIGINAL_TOOL.read(tool)
    if original is not None:
        tool = original
    kinds = _resource_types()
    owner = type(tool).__name__
    for load in globals_used.loads:
        value = load.target()
        if isinstance(value, kinds) and not _closed(value) and not _is_standard_stream(value):
            yield f"{type(value).__module__}.{type(value).__qualname__} at {load.label}", value
    for attribute, value in _attributes(tool):
        if isinstance(value, kinds) and not _closed(value):
            yield (
                f"{type(value).__module__}.{type(value).__qualname__} at {owner}.{attribute}",
                value,
            )
    func = getattr(tool, "func", None)
    closure = getattr(func, "__closure__", None) or ()
    names = getattr(getattr(func, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, closure, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, kinds) and not _closed(value):
            label = getattr(func, "__qualname__", owner)
            yield f"{type(value).__module__}.{type(value).__qualname__} at {label}.{name}", value


def _attributes(tool: object) -> Iterator[tuple[str, object]]:
    values = getattr(tool, "__dict__", None)
    if isinstance(values, dict):
        yield from list(values.items())
    private = getattr(tool, "__pydantic_private__", None)
    if isinstance(private, dict):
        yield from list(private.items())


def _is_standard_stream(value: object) -> bool:
    """``sys.stdout`` and friends (``from sys import stdout``): shared by design."""
    return any(value is getattr(sys, name, None) for name in _STANDARD_STREAMS)


def _closed(value: object) -> bool:
    closed = getattr(value, "closed", False)
    return closed is True


# --- the process-wide wrappers of the file and SQLite openers ---------------------------------
class _Watching:
    """Which watcher the process-wide wrappers report to (``None``: they call straight
    through)."""

    def __init__(self) -> None:
        self.watcher: SharedStateWatcher | None = None


def _traced_open(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``open``/``io.open``: note a file opened for writing by tool code."""
    result = wrapped(*args, **kwargs)
    if _WATCHING.watcher is not None and otel_context.get_value(TOOL_STATE_KEY) is not None:
        try:
            path = args[0] if args else kwargs.get("file")
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            SharedStateWatcher.file_opened(path, mode, None)
        except Exception:
            _logger.debug("crew_otel: file write not noted", exc_info=True)
    return result


def _traced_os_open(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``os.open``: note a path opened with write flags by tool code."""
    result = wrapped(*args, **kwargs)
    if _WATCHING.watcher is not None and otel_context.get_value(TOOL_STATE_KEY) is not None:
        try:
            path = args[0] if args else kwargs.get("path")
            flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
            SharedStateWatcher.file_opened(path, None, flags)
        except Exception:
            _logger.debug("crew_otel: file write not noted", exc_info=True)
    return result


def _traced_connect(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``sqlite3.connect``: the connection as made; one that only its own thread may use gets
    a trace callback that notes writes made by tool code (the ``sqlite3.connect/handle`` audit
    event comes before the connection is set up, too early to set one).

    A connection that threads may share (``check_same_thread=False``) never gets one: SQLite
    calls a trace callback holding the connection's mutex, the callback needs the GIL, and
    another thread that holds the GIL while it waits for that mutex (CPython binds parameters
    and resets statements without releasing the GIL) never gets it: the process freezes. Such a
    connection, used by the tool code of two requests, is named as a ``resource`` instead.
    Nor does a connection made by the application's own ``factory`` (see :func:`_may_trace`).
    """
    connection = wrapped(*args, **kwargs)
    if _WATCHING.watcher is not None:
        try:
            if _may_trace(args, kwargs):
                _trace_writes(connection, args[0] if args else kwargs.get("database"))
        except Exception:
            _logger.debug("crew_otel: SQLite connection not watched", exc_info=True)
    return connection


#: Where ``sqlite3.connect`` takes these positionally (database, timeout, detect_types,
#: isolation_level, check_same_thread, factory, ...).
_CHECK_SAME_THREAD_POSITION = 4
_FACTORY_POSITION = 5


def _may_trace(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether crew_otel may set its trace callback on the connection being made.

    Only where no deadlock is possible and no callback of the application's is lost: the
    connection can be used by its own thread only (sqlite3 raises ``ProgrammingError`` in any
    other, so no other thread can wait for its mutex), it is not a shared-cache database (whose
    locks connections share), and it was not made by a connection factory of the application's
    (which may set its own trace callback, for SQL logging: it is kept).
    """

    def argument(position: int, name: str, default: object) -> object:
        return args[position] if len(args) > position else kwargs.get(name, default)

    check_same_thread = argument(_CHECK_SAME_THREAD_POSITION, "check_same_thread", True)
    if check_same_thread is not True and check_same_thread != 1:
        return False
    if argument(_FACTORY_POSITION, "factory", None) not in (None, sqlite3.Connection):
        return False
    database = args[0] if args else kwargs.get("database")
    name = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else ""
    return "cache=shared" not in name


def _trace_writes(connection: Any, database: object) -> None:
    """Note writes on ``connection`` made by tool code (the callback checks the context)."""
    if not isinstance(database, (str, bytes, os.PathLike)):
        return
    name = os.fsdecode(database)
    if name in _MEMORY_DATABASES or name.startswith("file::memory:") or "mode=memory" in name:
        return
    if name.startswith("file:"):
        name = name[len("file:") :].split("?", 1)[0]
    path = os.path.abspath(name)
    SharedStateWatcher.database_connected(path)

    def on_statement(statement: str) -> None:
        if _WATCHING.watcher is None or otel_context.get_value(TOOL_STATE_KEY) is None:
            return
        try:
            if statement.lstrip()[:8].upper().startswith(_READ_STATEMENTS):
                return
            SharedStateWatcher.database_written(path)
        except Exception:
            _logger.debug("crew_otel: SQLite write not noted", exc_info=True)

    connection.set_trace_callback(on_statement)


_WATCHING = _Watching()
#: (module, attribute, wrapper) of every function crew_otel wraps to see files and databases.
_WRAPPED: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    ("builtins", "open", _traced_open),
    ("io", "open", _traced_open),
    ("os", "open", _traced_os_open),
    ("sqlite3", "connect", _traced_connect),
    ("sqlite3.dbapi2", "connect", _traced_connect),
)


def activate(watcher: SharedStateWatcher) -> None:
    """Make ``watcher`` see file opens and SQLite writes: wraps ``open``, ``io.open``,
    ``os.open`` and ``sqlite3.connect`` (outside tool calls the wrappers add one context
    look-up to the call). Another library's wrapper there stays, inside crew_otel's."""
    _WATCHING.watcher = watcher
    for module_name, name, wrapper in _WRAPPED:
        module = sys.modules.get(module_name)
        current = getattr(module, name, None)
        if current is not None and not _holds_ours(current, wrapper):
            setattr(module, name, wrapt.FunctionWrapper(current, wrapper))


def deactivate(watcher: SharedStateWatcher) -> None:
    """Restore the wrapped functions (connections opened meanwhile keep a trace callback that
    returns at once). A function that another library wrapped after crew_otel keeps that
    wrapper, and crew_otel's inside it calls straight through from now on."""
    if _WATCHING.watcher is not watcher:
        return
    _WATCHING.watcher = None
    for module_name, name, wrapper in _WRAPPED:
        module = sys.modules.get(module_name)
        current = getattr(module, name, None)
        if _is_ours(current, wrapper):
            setattr(module, name, current.__wrapped__)  # type: ignore[union-attr]
        elif current is not None and _holds_ours(current, wrapper):
            _logger.debug(
                "crew_otel: %s.%s was wrapped again after crew_otel; its wrapper stays (inert)",
                module_name,
                name,
            )


def _is_ours(function: object, wrapper: Callable[..., Any]) -> bool:
    return (
        isinstance(function, wrapt.FunctionWrapper)
        and internals.WRAPT_WRAPPER.read(function) is wrapper
    )


def _holds_ours(function: object, wrapper: Callable[..., Any]) -> bool:
    """Whether ``function`` is crew_otel's ``wrapper`` or wraps it (another library wrapped
    it after crew_otel), following a bounded chain of ``__wrapped__``."""
    for _ in range(16):
        if function is None:
            return False
        if _is_ours(function, wrapper):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def is_locked_database_error(exc: BaseException) -> bool:
    """SQLite's "database is locked" (a writer elsewhere holds the database)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    try:
        return "locked" in str.__str__(str(exc.args[0])) if exc.args else False
    except Exception:
        return False
