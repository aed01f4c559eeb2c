"""A service whose tools share one SQLite connection (``check_same_thread=False``), the seed's
own bug, run with or without crew_otel. It must always finish: ``tests/test_sqlite_freeze.py``
runs it in a child process under a watchdog.

``python -m tests.shared_connection_app MODE ROUNDS`` with MODE ``instrumented`` or ``plain``
runs 6 concurrent kickoffs in threads, then 6 ``akickoff`` in one event loop, then ROUNDS
rounds of threads inserting through one connection; prints one JSON line: per runner the
answers and the rows the tools wrote, the rows the rounds wrote and (instrumented) the shared
things named.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import sqlite3
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crew_otel.testing.crews import prepare_offline_environment
from tests.workloads import meet_in_tool

prepare_offline_environment()

#: A frozen process ends here with every thread's stack on stderr (the parent also gives up).
WATCHDOG_SECONDS = 240
REQUESTS = 6
ROWS_PER_TOOL_CALL = 50
ROWS_PER_THREAD = 200

CONNECTION: Any = None
_gate: dict[str, threading.Barrier] = {}


def record_ticket(query: str) -> str:
    """Record the ticket in the shared ledger."""
    for _ in range(ROWS_PER_TOOL_CALL):
        CONNECTION.execute("INSERT INTO tickets VALUES (?)", (query,))
    meet_in_tool(_gate.get("barrier"), timeout=60)  # every request is in its tool call
    return f"recorded {query}"


def _kickoffs(base_url: str, runner: str) -> list[str]:
    import crew_otel

    _gate["barrier"] = threading.Barrier(REQUESTS)
    from crew_otel.testing.crews import make_llm, research_crew

    def crew() -> Any:
        from crewai.tools import tool

        return research_crew(lambda: make_llm(base_url), tools=[tool("record")(record_ticket)])

    if runner == "threads":

        def run(i: int) -> str:
            with crew_otel.request(f"req-{i}"):
                return str(crew().kickoff(inputs={"topic": f"[[t{i}]]"}).raw)

        with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
            return list(pool.map(run, range(REQUESTS)))

    async def one(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            return str((await crew().akickoff(inputs={"topic": f"[[t{i}]]"})).raw)

    async def main() -> list[str]:
        return list(await asyncio.gather(*(one(i) for i in range(REQUESTS))))

    return asyncio.run(main())


def _hammer(path: str, rounds: int) -> int:
    """Threads inserting through one connection opened now, ``rounds`` times: the pattern that
    froze 3 of 3 plain-Python processes once the connection carried a trace callback."""
    written = 0
    for _ in range(rounds):
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        connection.execute("CREATE TABLE IF NOT EXISTS hammer (n INT)")

        def insert(connection: sqlite3.Connection = connection) -> None:
            for n in range(ROWS_PER_THREAD):
                connection.execute("INSERT INTO hammer VALUES (?)", (n,))

        threads = [threading.Thread(target=insert) for _ in range(REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        written += connection.execute("SELECT COUNT(*) FROM hammer").fetchone()[0]
        connection.execute("DELETE FROM hammer")
        connection.close()
    return written


def main(mode: str, rounds: int) -> dict[str, Any]:
    global CONNECTION  # noqa: PLW0603  (the module global every request's tool uses)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import crew_otel
    from crew_otel.testing import FakeOpenAIProvider

    exporter = InMemorySpanExporter()
    if mode == "instrumented":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        crew_otel.instrument(tracer_provider=provider)
    directory = tempfile.mkdtemp()
    # Opened while instrumented: the connection sqlite3.connect makes is crew_otel's to watch.
    CONNECTION = sqlite3.connect(
        os.path.join(directory, "ledger.sqlite"), check_same_thread=False, isolation_level=None
    )
    CONNECTION.execute("CREATE TABLE tickets (q TEXT)")
    runs: dict[str, Any] = {}
    with FakeOpenAIProvider() as fake:
        for runner in ("threads", "akickoff"):
            answers = _kickoffs(fake.base_url, runner)
            rows = CONNECTION.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]
            CONNECTION.execute("DELETE FROM tickets")
            runs[runner] = {"answers": len(answers), "rows": rows}
    hammered = _hammer(os.path.join(directory, "hammer.sqlite"), rounds)
    shared = sorted(
        {
            str((event.attributes or {}).get("crew_otel.shared_instance.name"))
            for span in exporter.get_finished_spans()
            for event in span.events
            if event.name == "crew_otel.shared_instance"
        }
    )
    return {**runs, "hammered": hammered, "shared": shared}


if __name__ == "__main__":
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
