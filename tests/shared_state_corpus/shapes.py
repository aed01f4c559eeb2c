"""The corpus: ordinary tool code, shared and correct, as a new user writes it.

Each :class:`Shape` is one tool (a plain function, or the logic of a ``BaseTool`` subclass)
and what the detector must say when 6 requests run it at once: the kind and name of the shared
thing, or nothing (``kind=None``). ``tests/test_shared_state_corpus.py`` runs every shape
through CrewAI; ``tests/test_shared_state_corpus_analysis.py`` checks the bytecode analysis of
each without CrewAI (the part that differs between Python versions).
"""

from __future__ import annotations

import collections
import contextvars
import functools
import heapq
import itertools
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tests.shared_state_corpus import helpers
from tests.shared_state_corpus.support import PLACE, meet, request_index

M = __name__
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """One shape of tool code: ``make(i)`` is request ``i``'s tool function (or, with
    ``tool_class``, the keyword arguments of its ``BaseTool``); ``kind``/``name`` are what must
    be reported (``None``: nothing)."""

    id: str
    make: Callable[[int], Any]
    kind: str | None = None
    name: str | Callable[[], str] | None = None
    tool_class: type | None = None
    #: Also run with ``akickoff``.
    asyncio: bool = False

    def expected_name(self) -> str | None:
        return self.name() if callable(self.name) else self.name


def per_request(function: Callable[[str], str]) -> Callable[[int], Callable[[str], str]]:
    """The same function for every request (its state lives elsewhere)."""
    return lambda i: function


def place(name: str) -> str:
    return os.path.join(PLACE["dir"], name)


# --- shared: module state written by name ----------------------------------------------------
COUNTS: dict[str, int] = {"n": 0}
ITEMS: list[str] = []
SEEN: set[str] = set()
RECENT: collections.deque[str] = collections.deque(maxlen=100)
NESTED: dict[str, dict[str, str]] = {"tickets": {}}
SETTINGS: dict[str, str] = {}
LAST = ""
COUNTER = 0
HEAP: list[str] = []
SESSIONS: dict[str, str] = {}
RESULTS: list[str] = []
LISTED: list[str] = []


class Registry:
    entries: ClassVar[list[str]] = []
    hits = 0


class Config:
    mode = "default"

    def __init__(self) -> None:
        self.mode = "default"


CONFIG_OBJECT = Config()


class Totals:
    def __init__(self) -> None:
        self.total = 0


TOTALS = Totals()


class Store:
    """A module-level service object whose methods keep rows on itself."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def record(self, row: str) -> None:
        self.rows.append(row)


STORE = Store()


def counts_dict(query: str) -> str:
    COUNTS["n"] += 1
    meet()
    return f"n={COUNTS['n']}"


def appends_list(query: str) -> str:
    ITEMS.append(query)
    meet()
    return f"{len(ITEMS)} items"


def adds_to_set(query: str) -> str:
    SEEN.add(query)
    meet()
    return f"{len(SEEN)} seen"


def appends_deque(query: str) -> str:
    RECENT.append(query)
    meet()
    return "recent"


def writes_nested_item(query: str) -> str:
    NESTED["tickets"][query] = "open"
    meet()
    return "nested"


def updates_dict(query: str) -> str:
    SETTINGS.update(last=query)
    meet()
    return "updated"


def rebinds_global(query: str) -> str:
    global LAST  # noqa: PLW0603 - the pattern under test
    LAST = query
    meet()
    return f"last={LAST}"


def increments_global_int(query: str) -> str:
    global COUNTER  # noqa: PLW0603 - the pattern under test
    COUNTER += 1
    meet()
    return f"counter={COUNTER}"


def class_attribute_by_name(query: str) -> str:
    Registry.entries.append(query)
    meet()
    return "registered"


def sets_environment(query: str) -> str:
    os.environ["CREW_OTEL_CORPUS_TICKET"] = query
    meet()
    return "exported"


def method_of_module_object(query: str) -> str:
    STORE.record(query)
    meet()
    return "stored"


def helper_module_attribute(query: str) -> str:
    helpers.save(query)
    meet()
    return "saved"


def _helper(query: str) -> None:
    COUNTS[query] = 1


def _deeper(query: str) -> None:
    _helper(query)


def helpers_two_calls_deep(query: str) -> str:
    _deeper(query)
    meet()
    return "deep"


def audited(function: Callable[[str], str]) -> Callable[[str], str]:
    @functools.wraps(function)
    def wrapper(query: str) -> str:
        _logger.debug("tool called")
        return function(query)

    return wrapper


@audited
def decorated_tool(query: str) -> str:
    """A tool wrapped by an ordinary functools.wraps decorator."""
    LISTED.append(query)
    meet()
    return "decorated"


def local_alias(query: str) -> str:
    sessions = SESSIONS
    sessions[query] = "active"
    meet()
    return "aliased"


def pushes_heap(query: str) -> str:
    heapq.heappush(HEAP, query)
    meet()
    return "pushed"


def setattr_on_config(query: str) -> str:
    setattr(CONFIG_OBJECT, "mode", query)  # noqa: B010 - the pattern under test
    meet()
    return "configured"


def attribute_of_module_object(query: str) -> str:
    TOTALS.total += 1
    meet()
    return "counted"


def write_in_comprehension(query: str) -> str:
    [ITEMS.append(part) for part in query.split()]
    meet()
    return "comprehended"


def captured_module_list() -> Callable[[int], Callable[[str], str]]:
    def make(i: int) -> Callable[[str], str]:
        results = RESULTS

        def closure_tool(query: str) -> str:
            results.append(query)
            meet()
            return "captured"

        return closure_tool

    return make


# --- shared: files ----------------------------------------------------------------------------
def fixed_file(query: str) -> str:
    with open(place("report.json"), "w", encoding="utf-8") as handle:
        json.dump({"ticket": query}, handle)
    meet()
    return "reported"


def appended_log_file(query: str) -> str:
    with open(place("audit.log"), "a", encoding="utf-8") as handle:
        handle.write(query + "\n")
    meet()
    return "logged"


def os_open_fixed_path(query: str) -> str:
    fd = os.open(place("state.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, query.encode())
    finally:
        os.close(fd)
    meet()
    return "written"


def path_write_text(query: str) -> str:
    Path(place("summary.txt")).write_text(query, encoding="utf-8")
    meet()
    return "summarised"


def module_file_handle(query: str) -> str:
    LOG.write(query + "\n")
    meet()
    return "appended"


LOG: Any = None  # opened by open_module_resources()
CONNECTION: Any = None


def module_connection(query: str) -> str:
    CONNECTION.execute("SELECT 1").fetchall()
    meet()
    return "queried"


def open_module_resources() -> None:
    """The module-level file handle and connection, made as a module does at import."""
    global LOG, CONNECTION  # noqa: PLW0603
    LOG = open(place("module.log"), "a", encoding="utf-8")  # noqa: SIM115
    CONNECTION = sqlite3.connect(":memory:", check_same_thread=False)
    SHARED_CONNECTION["c"] = sqlite3.connect(":memory:", check_same_thread=False)


def close_module_resources() -> None:
    for resource in (LOG, CONNECTION):
        if resource is not None:
            resource.close()


# --- shared: SQLite contention -------------------------------------------------------------------
def contended_database(query: str) -> str:
    """Request 0 holds the write lock while the others try to write: they find it locked."""
    connection = sqlite3.connect(place("tickets.sqlite"), timeout=0.05, isolation_level=None)
    try:
        if request_index(query) == 0:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO tickets VALUES (?)", (query,))
            meet()
            meet()
            connection.execute("COMMIT")
            return "written first"
        meet()
        try:
            connection.execute("INSERT INTO tickets VALUES (?)", (query,))
        finally:
            meet()
        return "written"
    finally:
        connection.close()


# --- shared: BaseTool shapes (logic mixed into a BaseTool subclass) ----------------------------
class ClassLevelCache:
    """``self.cache[k] = v`` on a class attribute: every instance writes the same dict."""

    cache: ClassVar[dict[str, str]] = {}

    def _run(self, query: str) -> str:
        self.cache[query] = "seen"
        meet()
        return "cached"


class HeldConnection:
    """A tool attribute holding one connection, given to every request's tool."""

    def _run(self, query: str) -> str:
        self.connection.execute("SELECT 1").fetchall()  # type: ignore[attr-defined]
        meet()
        return "ledger"


SHARED_CONNECTION: dict[str, sqlite3.Connection] = {}


def shared_connection_kwargs(i: int) -> dict[str, Any]:
    """Every request's tool gets the one connection (made by open_module_resources())."""
    return {"connection": SHARED_CONNECTION["c"]}


class OwnCache:
    """Correct: the cache is the instance's own (built per request)."""

    def _run(self, query: str) -> str:
        self.seen[query] = "seen"  # type: ignore[attr-defined]
        meet()
        return "own"


# --- correct code ---------------------------------------------------------------------------------
READ_ONLY = {"greeting": "hello", "limit": 3}
PATTERN = re.compile(r"\[\[(\w+)\]\]")
TICKETS = itertools.count()
LOCAL = threading.local()
_REQUEST_DATA: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "request_data", default=None
)
CLIENT: dict[str, Any] = {}
LOCK = threading.Lock()
LAZY: Any = None
NEVER: dict[str, str] = {}


class RequestContext:
    """The per-request store web apps use: ``context["k"] = v`` goes to a context variable."""

    def _data(self) -> dict[str, str]:
        data = _REQUEST_DATA.get()
        if data is None:
            data = {}
            _REQUEST_DATA.set(data)
        return data

    def __setitem__(self, key: str, value: str) -> None:
        self._data()[key] = value

    def __getitem__(self, key: str) -> str:
        return self._data()[key]


context = RequestContext()


@functools.lru_cache(maxsize=64)
def _classify(query: str) -> str:
    return query.upper()


def reads_config(query: str) -> str:
    limit = READ_ONLY["limit"] + len(READ_ONLY)
    meet()
    return f"{READ_ONLY['greeting']} {query} {limit}"


def uses_lru_cache(query: str) -> str:
    meet()
    return _classify(query)


def logs(query: str) -> str:
    _logger.info("handling %s", query)
    meet()
    return "logged"


def http_client_get(query: str) -> str:
    client = CLIENT["client"]
    client.get(CLIENT["url"])
    meet()
    return "fetched"


def compiled_regex(query: str) -> str:
    meet()
    return ",".join(PATTERN.findall(query))


def reads_environment(query: str) -> str:
    home = os.environ.get("HOME", "")
    meet()
    return f"{len(home)}"


def makes_mkstemp(query: str) -> str:
    fd, path = tempfile.mkstemp(dir=PLACE["dir"])
    with os.fdopen(fd, "w") as handle:
        handle.write(query)
    os.remove(path)
    meet()
    return "mkstemp"


def named_temporary_file(query: str) -> str:
    with tempfile.NamedTemporaryFile("w", dir=PLACE["dir"]) as handle:
        handle.write(query)
    meet()
    return "named"


def temporary_file(query: str) -> str:
    with tempfile.TemporaryFile("w+") as handle:
        handle.write(query)
    meet()
    return "anonymous"


def spooled_temporary_file(query: str) -> str:
    with tempfile.SpooledTemporaryFile(max_size=4, mode="w+") as handle:
        handle.write(query * 8)  # rolled over to a real temporary file
    meet()
    return "spooled"


def per_request_path(query: str) -> str:
    path = place(f"report-{uuid.uuid4().hex}.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(query)
    os.remove(path)
    meet()
    return "unique"


def per_request_database(query: str) -> str:
    connection = sqlite3.connect(place(f"db-{request_index(query)}.sqlite"))
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS t (q TEXT)")
        connection.execute("INSERT INTO t VALUES (?)", (query,))
        connection.commit()
    finally:
        connection.close()
    meet()
    return "own database"


def per_call_connections_one_file(query: str) -> str:
    connection = sqlite3.connect(place("shared.sqlite"), timeout=30)
    try:
        connection.execute("INSERT INTO tickets VALUES (?)", (query,))
        connection.commit()
    finally:
        connection.close()
    meet()
    return "saved"


def lock_guarded_per_call_dict(query: str) -> str:
    with LOCK:
        data = dict(READ_ONLY)
        data["query"] = query
    meet()
    return json.dumps(data)


def counts_with_itertools(query: str) -> str:
    number = next(TICKETS)
    meet()
    return f"ticket {number}"


def thread_local(query: str) -> str:
    LOCAL.query = query
    meet()
    return f"local {LOCAL.query}"


def context_variable_store(query: str) -> str:
    context["ticket"] = query
    meet()
    return f"context {context['ticket']}"


def lazy_initialisation(query: str) -> str:
    global LAZY  # noqa: PLW0603 - the pattern under test
    if LAZY is None:
        LAZY = {"client": "ready"}
    meet()
    return LAZY["client"]


def write_never_runs(query: str) -> str:
    if query == "never":
        NEVER[query] = "written"
    meet()
    return "checked"


def reads_module_list(query: str) -> str:
    total = len(ITEMS) + sum(1 for item in RESULTS if item)
    meet()
    return f"{total}"


def removes_own_file(query: str) -> str:
    path = place(f"scratch-{request_index(query)}.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(query)
    os.remove(path)
    meet()
    return "removed"


def writes_devnull(query: str) -> str:
    """Output thrown away (a quiet subprocess, a library that wants a stream): no state."""
    with open(os.devnull, "w", encoding="utf-8") as sink:
        sink.write(query)
    meet()
    return "discarded"


def closure_state_per_request() -> Callable[[int], Callable[[str], str]]:
    def make(i: int) -> Callable[[str], str]:
        state = {"attempts": 0}

        def article_fix(query: str) -> str:
            state["attempts"] += 1
            meet()
            return f"attempt={state['attempts']}"

        return article_fix

    return make


def _tmp(name: str) -> Callable[[], str]:
    return lambda: os.path.abspath(place(name))


SHAPES: tuple[Shape, ...] = (
    # shared
    Shape("module dict by name", per_request(counts_dict), "global", f"{M}.COUNTS", asyncio=True),
    Shape("module list append", per_request(appends_list), "global", f"{M}.ITEMS"),
    Shape("module set add", per_request(adds_to_set), "global", f"{M}.SEEN"),
    Shape("module deque append", per_request(appends_deque), "global", f"{M}.RECENT"),
    Shape("nested item", per_request(writes_nested_item), "global", f"{M}.NESTED"),
    Shape("dict update", per_request(updates_dict), "global", f"{M}.SETTINGS"),
    Shape("global rebound", per_request(rebinds_global), "global", f"{M}.LAST"),
    Shape("global int", per_request(increments_global_int), "global", f"{M}.COUNTER"),
    Shape(
        "class attribute", per_request(class_attribute_by_name), "global", f"{M}.Registry.entries"
    ),
    Shape(
        "os.environ write",
        per_request(sets_environment),
        "global",
        "os.environ['CREW_OTEL_CORPUS_TICKET']",
    ),
    Shape(
        "module object method",
        per_request(method_of_module_object),
        "global",
        f"{M}.STORE.rows",
        asyncio=True,
    ),
    Shape(
        "helpers.save",
        per_request(helper_module_attribute),
        "global",
        f"{helpers.__name__}.SAVED",
    ),
    Shape("helpers two deep", per_request(helpers_two_calls_deep), "global", f"{M}.COUNTS"),
    Shape("functools.wraps tool", per_request(decorated_tool), "global", f"{M}.LISTED"),
    Shape("local alias", per_request(local_alias), "global", f"{M}.SESSIONS"),
    Shape("heapq.heappush", per_request(pushes_heap), "global", f"{M}.HEAP"),
    Shape("setattr", per_request(setattr_on_config), "global", f"{M}.CONFIG_OBJECT"),
    Shape(
        "module object attribute", per_request(attribute_of_module_object), "global", f"{M}.TOTALS"
    ),
    Shape("comprehension write", per_request(write_in_comprehension), "global", f"{M}.ITEMS"),
    Shape("closure of module list", captured_module_list(), "global", f"{M}.RESULTS"),
    Shape(
        "class-level state via self",
        lambda i: {},
        "global",
        f"{M}.ClassLevelCache.cache",
        tool_class=ClassLevelCache,
    ),
    Shape("fixed file", per_request(fixed_file), "file", _tmp("report.json"), asyncio=True),
    Shape("appended log file", per_request(appended_log_file), "file", _tmp("audit.log")),
    Shape("os.open fixed path", per_request(os_open_fixed_path), "file", _tmp("state.bin")),
    Shape("Path.write_text", per_request(path_write_text), "file", _tmp("summary.txt")),
    Shape(
        "module file handle",
        per_request(module_file_handle),
        "resource",
        f"_io.TextIOWrapper at {M}.LOG",
    ),
    Shape(
        "module sqlite connection",
        per_request(module_connection),
        "resource",
        f"sqlite3.Connection at {M}.CONNECTION",
    ),
    Shape(
        "tool attribute connection",
        shared_connection_kwargs,
        "resource",
        "sqlite3.Connection at HeldConnectionTool.connection",
        tool_class=HeldConnection,
    ),
    Shape(
        "database is locked", per_request(contended_database), "database", _tmp("tickets.sqlite")
    ),
    # correct
    Shape("read-only config", per_request(reads_config), asyncio=True),
    Shape("lru_cache", per_request(uses_lru_cache)),
    Shape("module logger", per_request(logs)),
    Shape("httpx.Client GET", per_request(http_client_get)),
    Shape("re.compile", per_request(compiled_regex)),
    Shape("os.environ.get", per_request(reads_environment)),
    Shape("mkstemp", per_request(makes_mkstemp)),
    Shape("NamedTemporaryFile", per_request(named_temporary_file), asyncio=True),
    Shape("TemporaryFile", per_request(temporary_file)),
    Shape("SpooledTemporaryFile", per_request(spooled_temporary_file)),
    Shape("per-request path", per_request(per_request_path)),
    Shape("per-request database", per_request(per_request_database)),
    Shape("per-call connections, one file", per_request(per_call_connections_one_file)),
    Shape("lock-guarded per-call dict", per_request(lock_guarded_per_call_dict)),
    Shape("itertools.count", per_request(counts_with_itertools)),
    Shape("threading.local", per_request(thread_local), asyncio=True),
    Shape("contextvars store", per_request(context_variable_store), asyncio=True),
    Shape("lazy initialisation", per_request(lazy_initialisation)),
    Shape("write that never runs", per_request(write_never_runs), asyncio=True),
    Shape("reads module list", per_request(reads_module_list)),
    Shape("os.remove own file", per_request(removes_own_file)),
    Shape("writes os.devnull", per_request(writes_devnull)),
    Shape("closure state per request", closure_state_per_request(), asyncio=True),
    Shape("own instance cache", lambda i: {"seen": {}}, tool_class=OwnCache),
)
