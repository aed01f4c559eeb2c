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
    SQLite database files that requests contend for: tool code that connects to a database file
    holds it for its run, and a tool call that meets "database is locked" while other requests
    hold it reports it (nothing is set on the connection: see :func:`_traced_connect`);
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
one context look-up; SQLite statements pay nothing. ``uninstrument()`` restores every wrapped
function. (A Python
audit hook would see opens too, but it cannot be removed and makes every audited operation of
the process, ``id()`` included, a Python call: ``copy.deepcopy`` ran 2.2 x slower with one.)
"""

from __future__ import annotations

import collections
import fnmatch
import io
import itertools
import logging
import os
import sqlite3
import sys
import threading
import types
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from crew_otel import internals
from crew_otel.attributes import DATABASE_LOCKED
from crew_otel.config import CrewOtelConfig
from crew_otel.context import current_context_reader
from crew_otel.diagnosis import mutations, state_words
from crew_otel.diagnosis.mutations import ToolGlobals, tool_globals
from crew_otel.diagnosis.sharing import (
    KIND_DATABASE,
    KIND_FILE,
    KIND_GLOBAL,
    KIND_RESOURCE,
    ExpectedWrite,
    SharedInstanceDetector,
)
from crew_otel.hookset import HookSet

_logger = logging.getLogger("crew_otel")

TOOL_STATE_KEY = otel_context.create_key("crew_otel.tool_state")
"""Context key of the :class:`ToolScope` of the tool call in progress."""

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
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

    __slots__ = ("candidates", "databases", "files", "holdings", "request_id", "span", "watcher")

    def __init__(
        self, watcher: SharedStateWatcher, request_id: str, span: Span, holdings: RunHoldings
    ) -> None:
        self.watcher = watcher
        self.request_id = request_id
        self.span = span
        self.holdings = holdings
        #: SQLite databases this tool call connected to (to name a locked one).
        self.databases: list[str] = []
        #: Paths (as passed) this call already noted as opened for writing.
        self.files: set[object] = set()
        #: Writes found in the code, confirmed when the call ends (see :class:`_Candidate`).
        self.candidates: list[_Candidate] = []

    def note(
        self,
        key: Hashable,
        kind: str,
        label: str,
        class_name: str,
        advice: str | None = None,
        met: set[str] | None = None,
    ) -> None:
        """This request's tool code touched ``key``: hold it for the run, flag a collision
        (with the requests holding it now, and those in ``met``: see ``expect_key``)."""
        if self.holdings.holds(key) or self.watcher.ignores(label):
            return
        sharing = self.watcher.sharing
        usage = sharing.enter_key(
            key, kind, self.request_id, self.span, label, class_name, advice, met
        )
        if not self.holdings.add(key, usage):
            sharing.exit(usage)

    def hold(self, key: Hashable) -> None:
        """Hold ``key`` for the run without reporting (reported only on contention)."""
        if self.holdings.holds(key):
            return
        sharing = self.watcher.sharing
        usage = sharing.hold_key(key, self.request_id)
        if not self.holdings.add(key, usage):
            sharing.exit(usage)

    def expect(self, candidate: _Candidate) -> None:
        """A write the call may make: watch its object from now on (see ``expect_key``)."""
        self.candidates.append(candidate)
        if candidate.key is not None:
            candidate.expected = self.watcher.sharing.expect_key(candidate.key, self.request_id)

    def confirm(self) -> None:
        """The call ended: note the candidate writes that changed their object (what ran)."""
        candidates, self.candidates = self.candidates, []
        sharing = self.watcher.sharing
        for candidate in candidates:
            met = sharing.settle(candidate.expected) if candidate.expected is not None else None
            try:
                candidate.confirm(self, met)
            except Exception:
                _logger.debug("crew_otel: a write was not confirmed", exc_info=True)


class _Candidate:
    """A write found in tool code, resolved to its object when the call began, and the object's
    fingerprint then: the write counts only if the object changed by the time the call ended
    (a write in a branch that did not run changes nothing; nor does ``os.remove(p)``, which
    looks like a mutating call)."""

    __slots__ = ("before", "expected", "key", "label", "name", "target")

    def __init__(self, label: str, target: object, name: str | None) -> None:
        self.label = label
        self.target = target
        #: For ``global x; x = ...``: the name rebound in ``target`` (the module's namespace).
        self.name = name
        self.before: object = (
            target.get(name, _ABSENT) if name is not None else _fingerprint(target)  # type: ignore[attr-defined]
        )
        #: What a confirmed write holds (``None`` for ``os.environ``: one key per variable).
        self.key: Hashable | None = (
            (KIND_GLOBAL, id(target), name)
            if name is not None
            else None
            if isinstance(target, os._Environ)
            else (KIND_GLOBAL, id(target))
        )
        self.expected: ExpectedWrite | None = None

    def confirm(self, scope: ToolScope, met: set[str] | None = None) -> None:
        if self.name is not None:
            self._confirm_rebinding(scope, met)
        elif isinstance(self.target, os._Environ):
            self._confirm_environment(scope)
        elif _fingerprint(self.target) != self.before:
            target = self.target
            scope.note(self.key, KIND_GLOBAL, self.label, _class_name(target), met=met)

    def _confirm_rebinding(self, scope: ToolScope, met: set[str] | None) -> None:
        namespace: dict[str, Any] = self.target  # type: ignore[assignment]
        after = namespace.get(self.name, _ABSENT)  # type: ignore[arg-type]
        if after is self.before or self.before is None or self.before is _ABSENT:
            return  # not rebound, or set once (``if client is None: client = make()``)
        scope.note(
            (KIND_GLOBAL, id(namespace), self.name),
            KIND_GLOBAL,
            self.label,
            _class_name(after),
            advice=state_words.ADVICE_REBOUND,
            met=met,
        )

    def _confirm_environment(self, scope: ToolScope) -> None:
        before: dict[Any, Any] = self.before  # type: ignore[assignment]
        after = _environment_data(self.target)
        for key in set(before) | set(after):
            if before.get(key, _ABSENT) is after.get(key, _ABSENT):
                continue
            variable = os.fsdecode(key) if isinstance(key, bytes) else str(key)
            scope.note(
                (KIND_GLOBAL, "os.environ", variable),
                KIND_GLOBAL,
                f"os.environ[{variable!r}]",
                state_words.ENVIRON_CLASS,
                advice=state_words.ADVICE_ENVIRONMENT,
            )


_ABSENT = object()
#: Items of a container compared from each end (a change in the middle of a large container
#: that keeps its length is not seen).
_SAMPLE = 16


def _environment_data(environ: object) -> dict[Any, Any]:
    data = mutations.static_attribute(environ, "_data")
    return dict(data) if isinstance(data, dict) else {}


def _fingerprint(obj: object) -> object:
    """What changes when ``obj`` is written, cheaply: its length and the identities of the
    items (keys and values) at both ends; an object's attribute dict for other objects.
    ``None``: not an object whose changes can be seen (never counted as written)."""
    if isinstance(obj, os._Environ):
        return _environment_data(obj)
    if isinstance(obj, dict) or type(obj) is types.MappingProxyType:
        return _ends(obj.keys(), obj.values(), len(obj))
    if isinstance(obj, (list, collections.deque)):
        return _ends(obj, (), len(obj))
    if isinstance(obj, set):
        if len(obj) <= 2 * _SAMPLE:
            return (len(obj), frozenset(obj))
        return (len(obj), tuple(map(id, itertools.islice(obj, _SAMPLE))))
    if isinstance(obj, bytearray):
        return (len(obj), bytes(obj[:_SAMPLE]), bytes(obj[-_SAMPLE:]))
    attributes = mutations.static_attribute(obj, "__dict__")
    if isinstance(attributes, (dict, types.MappingProxyType)):
        return _ends(attributes.keys(), attributes.values(), len(attributes))
    return None


_CONTAINERS = (dict, list, set, collections.deque)


def _item(value: object) -> tuple[int, int]:
    """An item's identity, and its length if it is a container (``NESTED["a"][k] = v``)."""
    return (id(value), len(value) if isinstance(value, _CONTAINERS) else -1)


def _ends(keys: Any, values: Any, length: int) -> tuple[Any, ...]:
    if length <= 2 * _SAMPLE:
        return (length, tuple(map(id, keys)), tuple(map(_item, values)))
    head = tuple(map(id, itertools.islice(keys, _SAMPLE))) + tuple(
        map(_item, itertools.islice(values, _SAMPLE))
    )
    tail = tuple(map(id, itertools.islice(reversed(keys), _SAMPLE))) + tuple(
        map(_item, itertools.islice(reversed(values), _SAMPLE))
    )
    return (length, head, tail)


class SharedStateWatcher:
    """Finds the shared state of tool calls for one instrumentation (see the module doc)."""

    def __init__(
        self, sharing: SharedInstanceDetector, config: CrewOtelConfig | None = None
    ) -> None:
        #: Where collisions are reported (the same detector as for shared Agents).
        self.sharing = sharing
        self._globals: weakref.WeakKeyDictionary[Any, ToolGlobals] = weakref.WeakKeyDictionary()
        self._writes_lock = threading.Lock()
        self._ignore = tuple(config.shared_state_ignore) if config is not None else ()
        self._apps = frozenset(config.app_packages) if config is not None else frozenset()
        self._ignored: dict[str, bool] = {}

    def ignores(self, label: str) -> bool:
        """Whether ``label`` matches a ``shared_state_ignore`` name or glob."""
        if not self._ignore:
            return False
        found = self._ignored.get(label)
        if found is None:
            found = any(fnmatch.fnmatchcase(label, pattern) for pattern in self._ignore)
            if len(self._ignored) < _MAX_IGNORED_LABELS:
                self._ignored[label] = found
        return found

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
        at_end: Callable[[Callable[[], None]], None] | None = None,
    ) -> otel_context.Context:
        """Note what ``tool`` holds, and resolve what its code writes (confirmed when the
        call ends: ``at_end`` registers that check); return ``ctx`` with the scope for the
        file and SQLite wrappers."""
        scope = ToolScope(self, request_id, span, holdings)
        globals_used = self._globals_of(tool)
        original = internals.TOOL_ORIGINAL_TOOL.read(tool) or tool
        for write in globals_used.writes:
            target = write.target(original)
            if target is None:
                continue
            if write.rebinds:
                scope.expect(_Candidate(write.label, target, write.path[0]))
            elif not isinstance(target, _NOT_STATE):
                candidate = _Candidate(write.label, target, None)
                if candidate.before is not None:
                    scope.expect(candidate)
        if scope.candidates:
            if at_end is not None:
                at_end(scope.confirm)
            else:
                scope.confirm()
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
            cached = tool_globals(function, owner, app_packages=self._apps)
            with self._writes_lock:
                self._globals[cache_key] = cached
        return cached

    # --- what the file and SQLite wrappers report -------------------------------------------
    @staticmethod
    def file_opened(scope: ToolScope, path: object, mode: object, flags: object) -> None:
        """Tool code opened ``path`` (not a temporary file: see the wrappers)."""
        if isinstance(path, int) or not _is_write(mode, flags):
            return
        if path in scope.files:
            return
        name = _absolute(path)
        scope.files.add(path)
        if name != os.devnull:  # a sink every request may write to
            scope.note((KIND_FILE, name), KIND_FILE, name, "file")

    @staticmethod
    def database_connected(scope: ToolScope, database: str) -> None:
        """Tool code connected to a SQLite database file: the run holds it (reported only
        when a request finds it locked, :meth:`database_locked`)."""
        if database not in scope.databases:
            scope.databases.append(database)
        scope.hold((KIND_DATABASE, database))

    def database_locked(self, ctx: otel_context.Context, span: Span) -> None:
        """A tool call failed on "database is locked": name the database on its span, and the
        other requests in flight that connected to it (they contend for its lock)."""
        scope = ctx.get(TOOL_STATE_KEY)
        if not isinstance(scope, ToolScope) or not scope.databases:
            return
        database = scope.databases[-1]
        if span.is_recording():
            span.set_attribute(DATABASE_LOCKED, database)
        key = (KIND_DATABASE, database)
        others = [rid for rid in self.sharing.users_of_key(key) if rid != scope.request_id]
        if others and not self.ignores(database):
            self.sharing.report_key(
                key, KIND_DATABASE, scope.request_id, others, span, database, "sqlite3.Connection"
            )


#: Labels whose ignore-list match is remembered (a bound: labels include file paths).
_MAX_IGNORED_LABELS = 4096


def _is_write(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        found = _WRITE_MODES.get(mode)
        if found is None:
            found = not _WRITE_MODE_LETTERS.isdisjoint(mode)
            if len(_WRITE_MODES) < _MAX_MODES:
                _WRITE_MODES[mode] = found
        return found
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


_WRITE_MODE_LETTERS = frozenset("wax+")
#: ``open`` modes seen, and whether each writes (a bound: a mode is any string).
_WRITE_MODES: dict[str, bool] = {}
_MAX_MODES = 64


def _absolute(path: object) -> str:
    """The absolute, normalised path of ``path`` (``os.path.abspath``, without its work for an
    absolute ``str`` path that is already normal: every new path a tool call opens)."""
    if (
        type(path) is str
        and path.startswith("/")
        and "//" not in path
        and "/." not in path
        and not path.endswith("/")
        and os.sep == "/"
    ):
        return path
    return os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]


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
        #: The wrappers on the openers (installed once per process while instrumented).
        self.hooks = HookSet("shared state")
        #: The current OpenTelemetry context (see :func:`crew_otel.context.current_context_reader`).
        self.current_context: Callable[[], otel_context.Context] = otel_context.get_current


def _traced_open(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``open``/``io.open``: note a file opened for writing by tool code. With an ``opener``
    (``tempfile``'s files) the first argument need not be the path written: the opener's own
    ``os.open`` is seen instead. A path this tool call already noted costs a set lookup."""
    result = wrapped(*args, **kwargs)
    if _WATCHING.watcher is None:
        return result
    scope: ToolScope | None = _WATCHING.current_context().get(TOOL_STATE_KEY)  # type: ignore[assignment]
    if scope is None or len(args) > _OPENER_POSITION:
        return result
    try:
        if kwargs:
            if kwargs.get("opener") is not None:
                return result
            path = args[0] if args else kwargs.get("file")
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        else:
            path = args[0]
            mode = args[1] if len(args) > 1 else "r"
        if path not in scope.files:
            SharedStateWatcher.file_opened(scope, path, mode, None)
    except Exception:
        _logger.debug("crew_otel: file write not noted", exc_info=True)
    return result


#: Where ``open`` takes ``opener`` positionally (file, mode, buffering, encoding, errors,
#: newline, closefd, opener).
_OPENER_POSITION = 7
#: ``os.open(directory, O_TMPFILE)``: an unnamed file in that directory, never shared.
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def _traced_os_open(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``os.open``: note a path opened with write flags by tool code (not an unnamed
    ``O_TMPFILE`` file: its path is a directory)."""
    result = wrapped(*args, **kwargs)
    if _WATCHING.watcher is not None:
        scope = _WATCHING.current_context().get(TOOL_STATE_KEY)
        if scope is not None:
            try:
                path = args[0] if args else kwargs.get("path")
                flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
                if not (_O_TMPFILE and isinstance(flags, int) and flags & _O_TMPFILE == _O_TMPFILE):
                    SharedStateWatcher.file_opened(scope, path, None, flags)  # type: ignore[arg-type]
            except Exception:
                _logger.debug("crew_otel: file write not noted", exc_info=True)
    return result


def _traced_connect(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``sqlite3.connect``: tool code connecting to a database file holds it for its run.

    Nothing is set on the connection: no trace callback (SQLite calls one holding the
    connection's mutex, and with a Python callback on a connection threads share CPython can
    freeze; an application's own callback would be replaced), and no statement is watched. A
    database is reported only when a request finds it locked while other requests hold it
    (:meth:`SharedStateWatcher.database_locked`); a connection object that the tool code of
    two requests uses is named as a ``resource``.
    """
    connection = wrapped(*args, **kwargs)
    if _WATCHING.watcher is not None:
        scope = _WATCHING.current_context().get(TOOL_STATE_KEY)
        if scope is not None:
            try:
                database = _database_path(args[0] if args else kwargs.get("database"))
                if database is not None:
                    SharedStateWatcher.database_connected(scope, database)  # type: ignore[arg-type]
            except Exception:
                _logger.debug("crew_otel: SQLite connection not noted", exc_info=True)
    return connection


def _database_path(database: object) -> str | None:
    """The absolute path of a database file (``None`` for an in-memory database)."""
    if not isinstance(database, (str, bytes, os.PathLike)):
        return None
    name = os.fsdecode(database)
    if name in _MEMORY_DATABASES or name.startswith("file::memory:") or "mode=memory" in name:
        return None
    if name.startswith("file:"):
        name = name[len("file:") :].split("?", 1)[0]
    return os.path.abspath(name)


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
    """Make ``watcher`` see file opens and SQLite connections: wraps ``open``, ``io.open``,
    ``os.open`` and ``sqlite3.connect`` (outside tool calls the wrappers add one context
    look-up to the call). Another library's wrapper there stays, inside crew_otel's."""
    _WATCHING.watcher = watcher
    _WATCHING.current_context = current_context_reader()
    for module_name, name, wrapper in _WRAPPED:
        module = sys.modules.get(module_name)
        if module is not None:
            _WATCHING.hooks.wrap(module, name, wrapper, key=f"{module_name}.{name}")


def deactivate(watcher: SharedStateWatcher) -> None:
    """Restore the wrapped functions. A function that another library wrapped after crew_otel
    keeps that wrapper, and crew_otel's inside it calls straight through from now on (and
    comes back to life at the next ``activate``, instead of being wrapped twice)."""
    if _WATCHING.watcher is not watcher:
        return
    _WATCHING.watcher = None
    _WATCHING.hooks.remove_all()


def hook_set() -> HookSet:
    """The wrappers on the openers (``crew-otel doctor`` lists them)."""
    return _WATCHING.hooks


def is_locked_database_error(exc: BaseException) -> bool:
    """SQLite's "database is locked" (a writer elsewhere holds the database)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    try:
        return "locked" in str.__str__(str(exc.args[0])) if exc.args else False
    except Exception:
        return False
