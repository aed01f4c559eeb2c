"""Shared state outside CrewAI objects: module globals, files, SQLite databases and resources
held by tools, touched by the tool code of two requests at once, are named like a shared Agent.

Every CrewAI object is built per request here: the state the tool code keeps elsewhere is the
only thing shared. A barrier inside the tools makes the requests' tool calls overlap for sure.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ConfigDict

import crew_otel
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr
from tests.test_metrics import points, total
from tests.workloads import meet_in_tool

EVENT = "crew_otel.shared_instance"
N = 6

# --- the article's half-fixed tool code: module state, one fixed path, one database -------------
SHARED_CONTEXT: dict[str, Any] = {"attempts": 0, "ticket": None}
CONFIG = {"greeting": "hello", "limit": 3}
PATHS: dict[str, str] = {}
_gate: dict[str, threading.Barrier] = {}


def _meet() -> None:
    """Wait until every request of the test is inside its tool call (bounded)."""
    meet_in_tool(_gate.get("barrier"), timeout=20)


def remember_ticket(query: str) -> str:
    """Remember the ticket being handled."""
    SHARED_CONTEXT["attempts"] += 1
    SHARED_CONTEXT["ticket"] = query
    _meet()
    return f"ticket {SHARED_CONTEXT['ticket']}"


def write_report(query: str) -> str:
    """Write the report file."""
    with open(PATHS["report"], "w", encoding="utf-8") as handle:
        json.dump({"ticket": query}, handle)
    _meet()
    return f"report for {query}"


def save_to_database(query: str) -> str:
    """Save the ticket in the database."""
    connection = sqlite3.connect(PATHS["database"], timeout=30)
    try:
        connection.execute("INSERT INTO tickets VALUES (?)", (query,))
        connection.commit()
    finally:
        connection.close()
    _meet()
    return f"saved {query}"


def read_only(query: str) -> str:
    """Read shared configuration and a template; log; change nothing."""
    with open(PATHS["template"], encoding="utf-8") as handle:
        template = handle.read()
    limit = CONFIG["limit"] + len(CONFIG)
    os.environ.get("HOME")
    _meet()
    return f"{template} {query} {limit}"


def make_per_request_tool(request_index: int) -> Callable[[str], str]:
    """The article's fixed pattern: state in a closure, a path of the request's own."""
    state = {"attempts": 0}
    own_path = os.path.join(PATHS["dir"], f"report-{request_index}.json")
    own_db = os.path.join(PATHS["dir"], f"db-{request_index}.sqlite")

    def handle_ticket(query: str) -> str:
        """Handle the ticket with per-request state."""
        state["attempts"] += 1
        with open(own_path, "w", encoding="utf-8") as handle:
            handle.write(query)
        connection = sqlite3.connect(own_db)
        try:
            connection.execute("CREATE TABLE IF NOT EXISTS t (q TEXT)")
            connection.execute("INSERT INTO t VALUES (?)", (query,))
            connection.commit()
        finally:
            connection.close()
        _meet()
        return f"handled {query}"

    return handle_ticket


def ledger_tool_class() -> type:
    from crewai.tools import BaseTool

    class LedgerTool(BaseTool):
        name: str = "ledger"
        description: str = "Record the ticket in the ledger."
        model_config = ConfigDict(arbitrary_types_allowed=True)
        connection: Any = None

        def _run(self, query: str) -> str:
            self.connection.execute("SELECT 1").fetchall()
            _meet()
            return f"ledger {query}"

    return LedgerTool


# --- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture
def paths(tmp_path):
    PATHS.clear()
    PATHS.update(
        dir=str(tmp_path),
        report=str(tmp_path / "report.json"),
        database=str(tmp_path / "tickets.sqlite"),
        template=str(tmp_path / "template.txt"),
    )
    (tmp_path / "template.txt").write_text("Dear customer,", encoding="utf-8")
    with sqlite3.connect(PATHS["database"]) as connection:
        connection.execute("CREATE TABLE tickets (q TEXT)")
    SHARED_CONTEXT.update(attempts=0, ticket=None)
    yield PATHS
    _gate.clear()


def function_tool(function: Callable[[str], str]) -> Any:
    from crewai.tools import tool

    return tool(function.__name__)(function)


def run_threads(fake_provider, make_tools: Callable[[int], list], n: int = N) -> list[str]:
    _gate["barrier"] = threading.Barrier(n)

    def run(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = research_crew(lambda: make_llm(fake_provider.base_url), tools=make_tools(i))
            return crew.kickoff(inputs={"topic": f"[[t{i}]]"}).raw

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def run_async(fake_provider, make_tools: Callable[[int], list], n: int = N) -> list[str]:
    _gate["barrier"] = threading.Barrier(n)

    async def one(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = research_crew(lambda: make_llm(fake_provider.base_url), tools=make_tools(i))
            return (await crew.akickoff(inputs={"topic": f"[[t{i}]]"})).raw

    async def main() -> list[str]:
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    return asyncio.run(main())


def events(spans: Spans, kind: str | None = None) -> list[tuple[Any, dict]]:
    found = [
        (span, dict(event.attributes or {}))
        for span in spans.all
        for event in span.events
        if event.name == EVENT
    ]
    if kind is None:
        return found
    return [(s, e) for s, e in found if e["crew_otel.shared_instance.kind"] == kind]


def assert_named(spans: Spans, kind: str, name: str, n: int = N) -> None:
    found = events(spans, kind)
    assert found, f"no {kind} conflict reported"
    request_ids = {f"req-{i}" for i in range(n)}
    for span, event in found:
        assert span.name.startswith("execute_tool"), span.name
        assert attr(span, "crew_otel.shared_instance") is True
        assert event["crew_otel.shared_instance.name"] == name
        others = set(event["crew_otel.shared_instance.other_request_ids"])
        assert others, "the other requests are named"
        assert attr(span, REQUEST_ID) not in others
        assert others <= request_ids
    # every request but the first to touch it collided with another
    assert len({attr(s, REQUEST_ID) for s, _ in found}) == n - 1


# --- the broken patterns are named ---------------------------------------------------------------
@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_module_global_mutated_by_tools_of_concurrent_requests(
    otel, fake_provider, metric_reader, paths, runner
):
    answers = runner(fake_provider, lambda i: [function_tool(remember_ticket)])
    assert len(answers) == N
    spans = Spans(otel.get_finished_spans())
    assert_named(spans, "global", f"{__name__}.SHARED_CONTEXT")
    assert {e["crew_otel.shared_instance.class"] for _, e in events(spans, "global")} == {
        "builtins.dict"
    }
    found = points(metric_reader)["crew_otel.shared_instance.conflicts"]
    assert total(found, crew_otel__shared_instance__kind="global") == N - 1
    assert total(found) == N - 1, "nothing else is reported"


@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_one_fixed_file_path_written_by_concurrent_requests(
    otel, fake_provider, metric_reader, paths, runner
):
    runner(fake_provider, lambda i: [function_tool(write_report)])
    spans = Spans(otel.get_finished_spans())
    assert_named(spans, "file", paths["report"])
    found = points(metric_reader)["crew_otel.shared_instance.conflicts"]
    assert total(found, crew_otel__shared_instance__kind="file") == N - 1
    assert total(found) == N - 1


def test_per_call_connections_to_one_sqlite_file_report_nothing_without_contention(
    otel, fake_provider, metric_reader, paths
):
    """A connection per call with a busy timeout is SQLite's recommended usage: writers take
    turns, nothing is shared until a request finds the database locked."""
    run_threads(fake_provider, lambda i: [function_tool(save_to_database)])
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("execute_tool")) >= N
    assert events(spans) == []
    assert total(points(metric_reader)["crew_otel.shared_instance.conflicts"]) == 0
    # every insert arrived: the outcome is the application's own
    with sqlite3.connect(paths["database"]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM tickets").fetchone() == (N,)


def test_one_connection_held_by_per_request_tool_instances(
    otel, fake_provider, metric_reader, paths
):
    ledger = ledger_tool_class()
    connection = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        run_threads(fake_provider, lambda i: [ledger(connection=connection)])
    finally:
        connection.close()
    spans = Spans(otel.get_finished_spans())
    assert_named(spans, "resource", "sqlite3.Connection at LedgerTool.connection")
    found = points(metric_reader)["crew_otel.shared_instance.conflicts"]
    assert total(found, crew_otel__shared_instance__kind="resource") == N - 1
    assert total(found, crew_otel__shared_instance__kind="tool") == 0, "tools are per request"


# --- per-request state and reads are never reported --------------------------------------------
@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_per_request_state_and_shared_reads_report_nothing(
    otel, fake_provider, metric_reader, paths, runner
):
    ledger = ledger_tool_class()

    def tools(i: int) -> list:
        own = sqlite3.connect(":memory:", check_same_thread=False)
        return [
            function_tool(make_per_request_tool(i)),
            function_tool(read_only),
            ledger(connection=own),
        ]

    runner(fake_provider, tools)
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("execute_tool")) >= N
    assert events(spans) == []
    assert total(points(metric_reader)["crew_otel.shared_instance.conflicts"]) == 0


def test_one_request_at_a_time_reports_nothing(otel, fake_provider, metric_reader, paths):
    for i in range(3):
        with crew_otel.request(f"seq-{i}"):
            crew = research_crew(
                lambda: make_llm(fake_provider.base_url),
                tools=[function_tool(remember_ticket)],
            )
            crew.kickoff(inputs={"topic": f"[[s{i}]]"})
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("execute_tool")) == 3
    assert events(spans) == []
    assert total(points(metric_reader)["crew_otel.shared_instance.conflicts"]) == 0


# --- the application sees the same outcome; switched off means off ------------------------------
def test_outcomes_identical_to_uninstrumented_runs(fake_provider, paths, otel):
    def tools(i: int) -> list:
        return [function_tool(save_to_database), function_tool(write_report)]

    instrumented = sorted(run_threads(fake_provider, tools, n=4))
    crew_otel.uninstrument()
    uninstrumented = sorted(run_threads(fake_provider, tools, n=4))
    assert [a.split(" based on ")[0] for a in instrumented] == [
        a.split(" based on ")[0] for a in uninstrumented
    ]
    with sqlite3.connect(paths["database"]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM tickets").fetchone() == (8,)


def test_detect_shared_instances_false_turns_it_all_off(
    otel_tracer_provider, span_exporter, meter_provider, metric_reader, fake_provider, paths
):
    crew_otel.uninstrument()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider,
        meter_provider=meter_provider,
        detect_shared_instances=False,
    )
    try:
        run_threads(
            fake_provider, lambda i: [function_tool(remember_ticket), function_tool(write_report)]
        )
    finally:
        crew_otel.uninstrument()
    spans = Spans(span_exporter.get_finished_spans())
    assert len(spans.named("execute_tool")) >= N
    assert events(spans) == []
    assert total(points(metric_reader)["crew_otel.shared_instance.conflicts"]) == 0


def test_uninstrument_restores_the_file_and_sqlite_functions(otel, fake_provider, paths):
    import builtins
    import io

    def wrapped() -> list[bool]:
        functions = (builtins.open, io.open, os.open, sqlite3.connect, sqlite3.dbapi2.connect)
        return [type(f).__name__ == "FunctionWrapper" for f in functions]

    assert wrapped() == [True] * 5
    crew_otel.uninstrument()
    assert wrapped() == [False] * 5
    with tempfile.TemporaryFile("w") as handle:  # opens go straight through
        handle.write("x")


def hold_the_database_lock(query: str) -> str:
    """Write while holding the database's write lock until every request arrived."""
    connection = sqlite3.connect(PATHS["database"], timeout=0.05, isolation_level=None)
    try:
        if query.endswith("0]]"):
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO tickets VALUES (?)", (query,))
            _meet()  # the others write now, and find the database locked
            _meet()
            connection.execute("COMMIT")
            return "written first"
        _meet()
        try:
            connection.execute("INSERT INTO tickets VALUES (?)", (query,))
        finally:
            _meet()
        return "written"
    finally:
        connection.close()


def test_database_is_locked_is_attributed_to_the_shared_database(otel, fake_provider, paths):
    n = 3
    run_threads(fake_provider, lambda i: [function_tool(hold_the_database_lock)], n=n)
    spans = Spans(otel.get_finished_spans())
    locked = [s for s in spans.named("execute_tool") if attr(s, "crew_otel.database.locked")]
    assert len(locked) == n - 1, "each writer that found the database locked names it"
    for span in locked:
        assert attr(span, "crew_otel.database.locked") == paths["database"]
        assert attr(span, "error.type") == "OperationalError"
    assert {attr(s, REQUEST_ID) for s in locked} == {"req-1", "req-2"}
    # the requests contended for it: each locked-out request names the holder among the others
    found = events(spans, "database")
    assert {attr(s, REQUEST_ID) for s, _ in found} == {"req-1", "req-2"}
    for span, event in found:
        assert event["crew_otel.shared_instance.name"] == paths["database"]
        others = set(event["crew_otel.shared_instance.other_request_ids"])
        assert "req-0" in others
        assert attr(span, REQUEST_ID) not in others


# --- the detector never runs the application's code, nor replaces its SQLite hooks ---------------
class Registry:
    """A module-level object whose ``items`` is a property (it could query a database)."""

    reads = 0

    def __init__(self) -> None:
        self._items: dict[str, int] = {}

    @property
    def items(self) -> dict[str, int]:
        Registry.reads += 1
        return self._items


REGISTRY = Registry()


def register_rarely(query: str) -> str:
    """Register the ticket, in a branch that does not run here."""
    if query == "never":
        REGISTRY.items[query] = 1
    _meet()
    return f"checked {query}"


@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_resolving_a_write_never_runs_a_property(otel, fake_provider, paths, runner):
    Registry.reads = 0
    answers = runner(fake_provider, lambda i: [function_tool(register_rarely)])
    assert len(answers) == N
    assert len(Spans(otel.get_finished_spans()).named("execute_tool")) >= N
    assert Registry.reads == 0, "crew_otel evaluated the application's property"


class LoggingConnection(sqlite3.Connection):
    """An application's connection factory that logs its SQL through a trace callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[str] = []
        self.set_trace_callback(self.statements.append)


LOGGED: list[int] = []


def save_with_sql_logging(query: str) -> str:
    """Save the ticket with SQL logging on."""
    connection = sqlite3.connect(PATHS["database"], timeout=30, factory=LoggingConnection)
    try:
        connection.execute("INSERT INTO tickets VALUES (?)", (query,))
        connection.commit()
        LOGGED.append(len(connection.statements))
    finally:
        connection.close()
    _meet()
    return f"saved {query}"


def test_an_applications_own_trace_callback_is_kept(otel, fake_provider, paths):
    LOGGED.clear()
    run_threads(fake_provider, lambda i: [function_tool(save_with_sql_logging)])
    assert len(LOGGED) == N
    assert min(LOGGED) >= 2, "the application's SQL log saw its INSERT and COMMIT"
    with sqlite3.connect(paths["database"]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM tickets").fetchone() == (N,)


# --- an allow-list silences known-good names only ------------------------------------------------
def remember_and_report(query: str) -> str:
    """Remember the ticket, then write the report."""
    remember_ticket(query)
    return write_report(query)


@pytest.mark.parametrize("through", ["argument", "environment"])
def test_shared_state_ignore_silences_only_the_names_it_matches(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider, paths, monkeypatch, through
):
    crew_otel.uninstrument()
    pattern = f"{__name__}.SHARED_*"
    if through == "argument":
        options: dict[str, Any] = {"shared_state_ignore": [pattern]}
    else:
        monkeypatch.setenv("CREW_OTEL_SHARED_STATE_IGNORE", f" {pattern} , /nowhere/*")
        options = {}
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider, meter_provider=meter_provider, **options
    )
    try:
        run_threads(fake_provider, lambda i: [function_tool(remember_and_report)])
    finally:
        crew_otel.uninstrument()
    spans = Spans(span_exporter.get_finished_spans())
    assert events(spans, "global") == [], "the ignored global is silent"
    assert_named(spans, "file", paths["report"])  # everything else still reported


# --- a write confirmed after the other writer's run is over ---------------------------------------
def _run_on_own_loop(crew: Any, inputs: dict[str, str]) -> str:
    async def main() -> str:
        return (await crew.akickoff(inputs=inputs)).raw

    return asyncio.run(main())


@pytest.mark.parametrize("late_kickoff", ["kickoff", "akickoff"])
def test_a_write_confirmed_after_the_other_writers_run_ended_names_both(
    otel, fake_provider, metric_reader, paths, late_kickoff
):
    """A write counts when its tool call ends (what ran, not what the code could do). Here the
    late request's tool call starts, the early request writes the global and its whole run
    ends, and only then does the late call write and end: the two requests wrote the global
    while both were in flight, and the late call's span names the early request, although the
    early run no longer holds anything when the late write is confirmed."""
    late_in_tool, early_done = threading.Event(), threading.Event()

    def early_tool(query: str) -> str:
        """Note the ticket being handled (once the late request is in its tool call)."""
        late_in_tool.wait(timeout=30)
        SHARED_CONTEXT["ticket"] = query
        return f"ticket {query}"

    def late_tool(query: str) -> str:
        """Note the ticket being handled (once the early request's run is over)."""
        late_in_tool.set()
        early_done.wait(timeout=30)
        SHARED_CONTEXT["ticket"] = query
        return f"ticket {query}"

    def crew_with(function: Callable[[str], str]) -> Any:
        function.__name__ = "note_ticket"
        return research_crew(
            lambda: make_llm(fake_provider.base_url), tools=[function_tool(function)]
        )

    def early() -> str:
        with crew_otel.request("early"):
            answer = crew_with(early_tool).kickoff(inputs={"topic": "[[early]]"}).raw
        early_done.set()
        return answer

    def late() -> str:
        with crew_otel.request("late"):
            crew = crew_with(late_tool)
            inputs = {"topic": "[[late]]"}
            if late_kickoff == "akickoff":
                return _run_on_own_loop(crew, inputs)
            return crew.kickoff(inputs=inputs).raw

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(late), pool.submit(early)]
        answers = [f.result(timeout=120) for f in futures]
    assert len(answers) == 2
    assert late_in_tool.is_set()
    assert early_done.is_set()
    spans = Spans(otel.get_finished_spans())
    found = events(spans, "global")
    assert len(found) == 1, found
    span, event = found[0]
    assert attr(span, REQUEST_ID) == "late"
    assert span.name.startswith("execute_tool")
    assert event["crew_otel.shared_instance.name"] == f"{__name__}.SHARED_CONTEXT"
    assert tuple(event["crew_otel.shared_instance.other_request_ids"]) == ("early",)
    found_points = points(metric_reader)["crew_otel.shared_instance.conflicts"]
    assert total(found_points, crew_otel__shared_instance__kind="global") == 1
