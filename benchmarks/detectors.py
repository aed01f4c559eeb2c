"""What the shared-state detectors cost code that runs outside tool calls: pyperf.

With ``detect_shared_instances=True`` (the default) ``crew_otel.instrument()`` wraps
``builtins.open``, ``io.open``, ``os.open``, ``sqlite3.connect`` and ``sqlite3.dbapi2.connect``
(wrapt ``FunctionWrapper``: outside tool calls, one wrapper call and one OpenTelemetry context
look-up per call). It sets nothing on SQLite connections (no trace callback): a statement costs
nothing more, in tool calls or not. ``uninstrument()`` restores every wrapped function. Each
operation below runs outside any crew run, in four states:

``none``
    crewai and crew_otel imported, the SDK providers set up, nothing instrumented;
``detectors off``
    ``crew_otel.instrument(detect_shared_instances=False)`` (the rest of the instrumentation,
    to tell the detectors' cost from the effect of instrumenting at all);
``detectors on``
    ``crew_otel.instrument(detect_shared_instances=True)``;
``after uninstrument()``
    ``instrument()`` then ``uninstrument()``: every wrapped function restored.

The operations: ``open(path, "w")`` + ``close()`` (the ``open`` wrapper);
``sqlite3.connect(":memory:")`` + a ``CREATE TABLE`` + an ``INSERT`` + ``close()`` (the
``connect`` wrapper; crew_otel sets no trace callback on in-memory databases); one
``INSERT OR REPLACE`` on a connection to a database file kept open (opened, in the two
instrumented states, while instrumented); and, as a
control that nothing wrapped touches, ``copy.deepcopy()`` of a small structure.

``python -m benchmarks.detectors -o FILE [pyperf options]`` runs them under pyperf (a worker
process per benchmark and run; each worker sets up its state alone). ``--smoke`` times each once
in this process instead, the states one after the other (``detectors off`` is uninstrumented
before ``detectors on``), for ``run.py --quick``: numbers, not statistics.
Values are process CPU seconds per operation.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import wrapt

from benchmarks import common

NONE = "none"
OFF = "detectors off"
ON = "detectors on"
AFTER = "after uninstrument()"
STATES = (NONE, OFF, ON, AFTER)

#: Operations in report order: name -> (what it is, rough seconds per call on a slow core,
#: used only to size the inner loop so that one value takes about 0.1 s).
OPERATIONS = {
    "open+close": ('open(path, "w") then close(), a file outside any run', 2.5e-5),
    "sqlite :memory:": (
        'sqlite3.connect(":memory:"), CREATE TABLE, INSERT, close(), outside any run',
        2e-4,
    ),
    "sqlite statement": (
        "one INSERT OR REPLACE on a database-file connection opened while instrumented",
        3e-6,
    ),
    "deepcopy": ("copy.deepcopy() of 20 small dicts (control: nothing wrapped)", 1.5e-4),
}
#: What ``deepcopy`` copies.
_DATA = [{"id": i, "tags": ["a", "b"], "meta": {"source": "bench"}} for i in range(20)]
NAMES = tuple(f"{op}: {state}" for op in OPERATIONS for state in STATES)
#: pyperf's outer loop count (fixed: no calibration process per benchmark).
LOOPS = 1000
#: Seconds one value should take.
VALUE_SECONDS = 0.1


def split(name: str) -> tuple[str, str]:
    """(operation, state) of a benchmark name."""
    op, state = name.split(": ", 1)
    return op, state


def inner_loops(name: str) -> int:
    _, estimate = OPERATIONS[split(name)[0]]
    return max(1, round(VALUE_SECONDS / (LOOPS * estimate)))


class Fixtures:
    """A temporary directory, the file connection, and the instrumentation state."""

    def __init__(self) -> None:
        from crew_otel.testing.crews import prepare_offline_environment

        prepare_offline_environment()
        import crewai  # noqa: F401

        import crew_otel

        self.crew_otel = crew_otel
        self.pipeline = common.Pipeline(set_global=False)
        self.directory = tempfile.mkdtemp(prefix="crew-otel-bench-detectors-")
        self.path = os.path.join(self.directory, "outside.txt")
        self.database = os.path.join(self.directory, "outside.db")
        self.connection: sqlite3.Connection | None = None
        self.state = NONE

    def set_state(self, state: str) -> None:
        """Go to ``state``, forwards only (none -> detectors off -> on -> after)."""
        if STATES.index(state) < STATES.index(self.state):
            raise RuntimeError(f"cannot go from {self.state!r} back to {state!r}")
        if state == self.state:
            return
        if state == OFF:
            self._instrument(detect=False)
        else:
            if self.state == OFF:
                self.crew_otel.uninstrument()
            if self.state != ON:
                self._instrument(detect=True)
                self._reconnect()  # a connection opened while instrumented
            if state == AFTER:
                self.crew_otel.uninstrument()
        self.state = state

    def _instrument(self, detect: bool) -> None:
        self.crew_otel.instrument(
            tracer_provider=self.pipeline.tracer_provider,
            meter_provider=self.pipeline.meter_provider,
            detect_shared_instances=detect,
        )

    def _reconnect(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = sqlite3.connect(self.database, check_same_thread=False)
        self.connection.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, n INT)")
        self.connection.commit()

    def call(self, op: str) -> Callable[[], Any]:
        if op == "open+close":
            path = self.path

            def open_close() -> None:
                open(path, "w", encoding="utf-8").close()

            return open_close
        if op == "sqlite :memory:":

            def memory() -> None:
                connection = sqlite3.connect(":memory:")
                connection.execute("CREATE TABLE t (x INT)")
                connection.execute("INSERT INTO t VALUES (1)")
                connection.close()

            return memory
        if op == "deepcopy":
            deepcopy = copy.deepcopy

            def copy_data() -> None:
                deepcopy(_DATA)

            return copy_data
        if op == "sqlite statement":
            if self.connection is None:
                self._reconnect()
            execute = self.connection.execute  # type: ignore[union-attr]

            def statement() -> None:
                execute("INSERT OR REPLACE INTO t VALUES (1, 1)")

            return statement
        raise KeyError(op)

    def timer(self, name: str) -> Callable[[int], float]:
        """A pyperf time function: process CPU seconds for ``loops`` x inner-loops calls."""
        call = self.call(split(name)[0])
        inner = inner_loops(name)

        def time_calls(loops: int) -> float:
            total = loops * inner
            start = time.process_time()
            for _ in range(total):
                call()
            return time.process_time() - start

        return time_calls

    def check(self) -> dict[str, Any]:
        """Which functions crew_otel has wrapped in this state, and whether its wrappers
        report to a watcher."""
        from crew_otel.diagnosis import shared_state

        wrapped = []
        for module_name, name, _wrapper in shared_state._WRAPPED:
            current = getattr(sys.modules.get(module_name), name, None)
            if isinstance(current, wrapt.FunctionWrapper):
                wrapped.append(f"{module_name}.{name}")
        return {
            "wrapped": ", ".join(wrapped) or "none",
            "watching": shared_state._WATCHING.watcher is not None,
        }


def smoke(seconds: float = 0.03) -> dict[str, Any]:
    """Each benchmark timed in this process (median of 3 timings of at least ``seconds``),
    the states one after the other."""
    fixtures = Fixtures()
    results: dict[str, Any] = {}
    for state in STATES:
        fixtures.set_state(state)
        for op in OPERATIONS:
            name = f"{op}: {state}"
            timer = fixtures.timer(name)
            timer(5)  # warm-up
            loops = 5
            while timer(loops) < seconds and loops < LOOPS:
                loops *= 4
            calls = loops * inner_loops(name)
            values = sorted(timer(loops) / calls for _ in range(3))
            results[name] = {"value": values[1], "calls": calls, **fixtures.check()}
    return results


def main() -> None:
    if "--smoke" in sys.argv:
        out = sys.argv[sys.argv.index("-o") + 1]
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"mode": "smoke", "benchmarks": smoke()}, handle, indent=1)
        return

    import pyperf

    runner = pyperf.Runner(loops=LOOPS, program_args=("-m", "benchmarks.detectors"))
    args = runner.parse_args()
    fixtures = None
    name_of_worker = None
    if args.worker:
        # Only this worker's benchmark is timed: set up its state alone.
        name_of_worker = NAMES[args.worker_task]
        fixtures = Fixtures()
        fixtures.set_state(split(name_of_worker)[1])
        runner.metadata.update(fixtures.check())
    for name in NAMES:
        op, state = split(name)
        description = f"{OPERATIONS[op][0]}; {state}"
        ours = fixtures is not None and name == name_of_worker
        time_func = fixtures.timer(name) if ours else _never_called  # type: ignore[union-attr]
        runner.bench_time_func(
            name, time_func, inner_loops=inner_loops(name), metadata={"description": description}
        )


def _never_called(loops: int) -> float:
    raise RuntimeError("only pyperf workers time benchmarks")


if __name__ == "__main__":
    main()
