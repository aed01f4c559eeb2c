"""crew_otel never freezes an application that shares one SQLite connection between threads.

CPython's sqlite3 deadlocks when threads share a connection that has a Python trace callback
(SQLite calls it holding the connection's mutex; it needs the GIL, which a thread waiting for
that mutex holds). crew_otel sets no trace callback on any connection: a database is reported
when a tool call meets "database is locked" while other requests hold it, and a connection
threads share is named as a ``resource`` when the tool code of two requests uses it.

A freeze cannot be caught inside the process that froze, so the shared-connection service runs
in a child process under a watchdog (``faulthandler`` ends it with every thread's stack), with
and without crew_otel, and the outcomes must match.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import wrapt

import crew_otel
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import Spans
from tests.test_shared_state import (
    N,
    _meet,
    assert_named,
    events,
    function_tool,
    paths,  # noqa: F401  (the fixture, used by every test below that runs tools)
    run_async,
    run_threads,
)

HERE = Path(__file__).parent
#: Rounds of 6 threads x 200 inserts through one connection opened while instrumented: with a
#: trace callback on it, plain Python froze in the first round 3 times out of 3.
ROUNDS = 3

#: A module-level connection every request's tool uses, opened before ``instrument()`` (the
#: usual order: the app's modules are imported, then ``main`` instruments).
LEDGER = sqlite3.connect(":memory:", check_same_thread=False)

pytestmark = pytest.mark.usefixtures("paths")


def _run_app(mode: str) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.pop("CREW_OTEL_STRICT", None)
    result = subprocess.run(
        [sys.executable, "-m", "tests.shared_connection_app", mode, str(ROUNDS)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=HERE.parent,
        check=False,
    )
    assert result.returncode == 0, f"the {mode} service did not finish:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_connection_threads_share_never_freezes_the_process():
    plain = _run_app("plain")
    instrumented = _run_app("instrumented")
    for runner in ("threads", "akickoff"):
        assert plain[runner] == instrumented[runner] == {"answers": 6, "rows": 6 * 50}
    assert plain["hammered"] == instrumented["hammered"] == ROUNDS * 6 * 200
    assert plain["shared"] == []
    # The shared connection is still named: the tool code of every request uses it.
    assert instrumented["shared"] == ["sqlite3.Connection at __main__.CONNECTION"]


# --- a module-level connection opened before instrument() is named as a resource ---------------
def use_the_ledger(query: str) -> str:
    """Look the ticket up in the shared ledger."""
    LEDGER.execute("SELECT 1").fetchall()
    _meet()
    return f"ledger {query}"


@pytest.mark.parametrize("runner", [run_threads, run_async], ids=["threads", "akickoff"])
def test_module_level_connection_opened_before_instrument_is_named(otel, fake_provider, runner):
    answers = runner(fake_provider, lambda i: [function_tool(use_the_ledger)])
    assert len(answers) == N
    spans = Spans(otel.get_finished_spans())
    assert_named(spans, "resource", f"sqlite3.Connection at {__name__}.LEDGER")
    assert {e["crew_otel.shared_instance.kind"] for _, e in events(spans)} == {"resource"}


def print_a_line(query: str) -> str:
    """Print the ticket (standard streams are shared by design)."""
    from sys import stdout

    stdout.write("")
    _meet()
    return f"printed {query}"


def test_standard_streams_are_not_shared_state(otel, fake_provider):
    run_threads(fake_provider, lambda i: [function_tool(print_a_line)])
    assert events(Spans(otel.get_finished_spans())) == []


# --- another library's wrapper on open() and sqlite3.connect() ------------------------------------
def _foreign(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return wrapped(*args, **kwargs)


_WRAPPED_FUNCTIONS = (
    (builtins, "open"),
    (io, "open"),
    (os, "open"),
    (sqlite3, "connect"),
    (sqlite3.dbapi2, "connect"),
)


def write_report(query: str) -> str:
    """Write the one report file."""
    with open(os.path.join(tempfile.gettempdir(), "crew-otel-foreign-report.json"), "w") as f:
        f.write(query)
    _meet()
    return f"report {query}"


@pytest.fixture
def foreign_wrappers():
    """Another library (an APM agent, a test double) wrapped the functions crew_otel watches."""
    originals = [getattr(module, name) for module, name in _WRAPPED_FUNCTIONS]
    for module, name in _WRAPPED_FUNCTIONS:
        setattr(module, name, wrapt.FunctionWrapper(getattr(module, name), _foreign))
    foreign = [getattr(module, name) for module, name in _WRAPPED_FUNCTIONS]
    try:
        yield foreign
    finally:
        for (module, name), original in zip(_WRAPPED_FUNCTIONS, originals, strict=True):
            setattr(module, name, original)


def test_detection_works_beside_a_foreign_wrapper_and_removes_only_its_own(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider, foreign_wrappers
):
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    try:
        installed = [getattr(module, name) for module, name in _WRAPPED_FUNCTIONS]
        # crew_otel's wrapper is outermost, the other library's inside it, untouched.
        assert [f.__wrapped__ for f in installed] == foreign_wrappers
        run_threads(fake_provider, lambda i: [function_tool(write_report)])
        spans = Spans(span_exporter.get_finished_spans())
        path = os.path.join(tempfile.gettempdir(), "crew-otel-foreign-report.json")
        assert_named(spans, "file", os.path.abspath(path))
    finally:
        crew_otel.uninstrument()
    assert [getattr(module, name) for module, name in _WRAPPED_FUNCTIONS] == foreign_wrappers


def test_a_wrapper_added_after_instrument_stays_and_crew_otel_goes_quiet(
    otel_tracer_provider, span_exporter, meter_provider, fake_provider
):
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    ours = builtins.open
    later = wrapt.FunctionWrapper(ours, _foreign)
    builtins.open = later
    try:
        crew_otel.uninstrument()
        assert builtins.open is later, "the other library's wrapper is not removed"
        crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
        assert builtins.open is later, "crew_otel's inner wrapper serves again, not a second one"
        run_threads(fake_provider, lambda i: [function_tool(write_report)])
        assert events(Spans(span_exporter.get_finished_spans()), "file")
        crew_otel.uninstrument()
        span_exporter.clear()
        # Inert now: tool code opening the file under the old wrapper reports nothing.
        crew_otel.instrument(
            tracer_provider=otel_tracer_provider,
            meter_provider=meter_provider,
            detect_shared_instances=False,
        )
        research = research_crew(
            lambda: make_llm(fake_provider.base_url), tools=[function_tool(write_report)]
        )
        research.kickoff(inputs={"topic": "[[t0]]"})
        assert events(Spans(span_exporter.get_finished_spans())) == []
    finally:
        crew_otel.uninstrument()
        builtins.open = ours.__wrapped__
