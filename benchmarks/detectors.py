"""What the shared-state detectors cost, outside tool calls and inside them: pyperf, and
instruction counts (callgrind) of every operation.

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

Inside tool calls (:data:`IN_TOOL`), each value is one call of a CrewAI ``BaseTool``
(``tool.run()`` inside ``crew_otel.request()``, so that with the detectors on the call has a
request and the shared-state watcher's tool scope, as in a crew run) that does
:data:`TOOL_OPERATIONS` operations: small file writes (``open(path, "w")``, ``write``,
``close``) to one path; the same to a new path each time (each new path is noted and held
until the call ends: the expensive case); the same to ``os.devnull`` (the one-path case
without the kernel's work on a real file, which on a shared machine is noise far larger than
the wrappers' cost); and ``INSERT`` statements on a SQLite database file the tool connects
to. Values are per operation (the tool span and the connection amortised over them), in the
same four states.

The machine is shared, so CPU time moves with the load (the ``deepcopy`` control, which
nothing wrapped touches, has read 1.26 to 1.49 x its uninstrumented time): in the pyperf
manager, once the suite is done, every operation also runs under ``valgrind --tool=callgrind
--instr-atstart=no`` (``--callgrind-windows``: instrumentation switched on only around
:data:`OUTSIDE_CALLS` calls of an operation, or around one tool call, see
:mod:`benchmarks.callgrind`) and the executed instructions per operation go to
``<output stem>-instructions.json`` (``--no-instructions`` skips it; skipped without
valgrind). Callgrind counts the process's own instructions, not the kernel's: the added
instructions of a wrapper are exact, the ratio to an operation that is mostly system calls
(opening a file) overstates its share of the CPU time. ``--instructions -o FILE`` runs only
that pass. :func:`in_tool_rows` gives the figures per tool-call operation: detectors on minus
off, in µs and instructions, against :data:`BUDGET_US`.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
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
#: Operations inside a tool call: name -> what it is. One value is one tool call of
#: :data:`TOOL_OPERATIONS` of them.
IN_TOOL = {
    "tool open+write+close": ('open(path, "w"), write 1 byte, close(), one path, in a tool call',),
    "tool open+write+close, new path": (
        'open(path, "w"), write 1 byte, close(), a new path each time, in a tool call',
    ),
    "tool open+write+close, os.devnull": (
        'open(os.devnull, "w"), write 1 byte, close(), in a tool call (the one-path case with '
        "little kernel work: the wrappers' cost stands out of the noise)",
    ),
    "tool sqlite INSERT": (
        "one INSERT OR REPLACE on a database file the tool connected to, in a tool call",
    ),
}
#: Operations per tool call (and per value): pyperf's outer loop x the inner loops.
TOOL_OPERATIONS = 2000
#: Calls of each :data:`OPERATIONS` operation per callgrind window (after as many to warm up).
OUTSIDE_CALLS = 200
#: The budget of the detectors inside tool calls: µs per file open and per SQLite statement.
BUDGET_US = 1.0
#: What ``deepcopy`` copies.
_DATA = [{"id": i, "tags": ["a", "b"], "meta": {"source": "bench"}} for i in range(20)]
NAMES = tuple(f"{op}: {state}" for op in (*OPERATIONS, *IN_TOOL) for state in STATES)
#: pyperf's outer loop count (fixed: no calibration process per benchmark).
LOOPS = 1000
#: Seconds one value should take.
VALUE_SECONDS = 0.1


def split(name: str) -> tuple[str, str]:
    """(operation, state) of a benchmark name."""
    op, state = name.split(": ", 1)
    return op, state


def inner_loops(name: str) -> int:
    op = split(name)[0]
    if op in IN_TOOL:
        return TOOL_OPERATIONS // LOOPS
    _, estimate = OPERATIONS[op]
    return max(1, round(VALUE_SECONDS / (LOOPS * estimate)))


def tool_operations(operation: str, directory: str, first: int, count: int) -> int:
    """The body of the benchmark's tool: ``count`` of ``operation`` (an :data:`IN_TOOL` name)
    in ``directory`` (new paths numbered from ``first``); returns ``count``."""
    if operation == "tool sqlite INSERT":
        connection = sqlite3.connect(os.path.join(directory, "in-tool.db"))
        try:
            connection.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, n INT)")
            execute = connection.execute
            for index in range(count):
                execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (index % 100, index))
            connection.commit()
        finally:
            connection.close()
        return count
    if operation in ("tool open+write+close", "tool open+write+close, os.devnull"):
        path = os.path.join(directory, "in-tool.txt") if operation.endswith("close") else os.devnull
        for _ in range(count):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("x")
        return count
    for index in range(first, first + count):
        with open(os.path.join(directory, f"new-{index}.txt"), "w", encoding="utf-8") as handle:
            handle.write("x")
    return count


def _tool_class() -> type:
    """A CrewAI ``BaseTool`` whose ``_run`` is :func:`tool_operations` (after crewai's import)."""
    from crewai.tools import BaseTool

    class BenchmarkIoTool(BaseTool):  # type: ignore[misc]
        name: str = "benchmark_io"
        description: str = "Writes small files or SQLite rows (the detectors' benchmark)."

        def _run(self, operation: str, directory: str, first: int, count: int) -> int:
            return tool_operations(operation, directory, first, count)

    return BenchmarkIoTool


def _memory_directory() -> str | None:
    """``/dev/shm`` where it is a writable directory (Linux), else ``None`` (the default)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class Fixtures:
    """A temporary directory, the file connection, the benchmark tool, and the
    instrumentation state (``quiet_timers``: the SDK's export timers out of the way, for
    instruction counts that do not depend on when a timer fires)."""

    def __init__(self, quiet_timers: bool = False) -> None:
        from crew_otel.testing.crews import prepare_offline_environment

        prepare_offline_environment()
        import crewai  # noqa: F401

        import crew_otel

        self.crew_otel = crew_otel
        never = 10**9  # milliseconds
        self.pipeline = (
            common.Pipeline(
                set_global=False, metric_interval_millis=never, schedule_delay_millis=never
            )
            if quiet_timers
            else common.Pipeline(set_global=False)
        )
        self.directory = tempfile.mkdtemp(prefix="crew-otel-bench-detectors-")
        atexit.register(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "outside.txt")
        self.database = os.path.join(self.directory, "outside.db")
        self.connection: sqlite3.Connection | None = None
        self.state = NONE
        #: Where the tool writes: a memory file system when there is one (the kernel's part of
        #: a write on a disk file system moves by tens of µs on a shared machine).
        self.tool_directory = tempfile.mkdtemp(
            prefix="crew-otel-bench-detectors-tool-", dir=_memory_directory()
        )
        atexit.register(shutil.rmtree, self.tool_directory, True)
        self.tool = _tool_class()()
        #: The number of the next new path (unique across every tool call of the process).
        self.next_path = 0
        #: Whether the last tool call ran in the shared-state watcher's tool scope.
        self.in_scope = False

    def run_tool(self, operation: str, count: int) -> None:
        """One call of the benchmark tool doing ``count`` of ``operation``, in a request."""
        first, self.next_path = self.next_path, self.next_path + count
        with self.crew_otel.request("bench-detectors"):
            done = self.tool.run(
                operation=operation, directory=self.tool_directory, first=first, count=count
            )
        if done != count:
            raise RuntimeError(f"the benchmark tool did {done!r} of {count} {operation}")

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
        """A pyperf time function: process CPU seconds for ``loops`` x inner-loops calls (in
        one tool call for the :data:`IN_TOOL` operations)."""
        op = split(name)[0]
        inner = inner_loops(name)
        if op in IN_TOOL:

            def time_tool_call(loops: int) -> float:
                start = time.process_time()
                self.run_tool(op, loops * inner)
                return time.process_time() - start

            return time_tool_call
        call = self.call(op)

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
            "tool_call_in_scope": self._tool_call_in_scope(),
        }

    def _tool_call_in_scope(self) -> bool:
        """Whether a call of the benchmark tool runs in the watcher's tool scope (as in a run)."""
        from crew_otel.diagnosis import shared_state

        watcher = shared_state.SharedStateWatcher
        seen: list[bool] = []
        original = watcher.__dict__["file_opened"]

        def spy(scope: Any, path: object, mode: object, flags: object) -> None:
            seen.append(True)
            original.__func__(scope, path, mode, flags)

        watcher.file_opened = staticmethod(spy)  # type: ignore[method-assign,assignment]
        try:
            self.run_tool("tool open+write+close", 1)
        finally:
            watcher.file_opened = original  # type: ignore[method-assign]
        return bool(seen)


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
        for op in IN_TOOL:  # one tool call of TOOL_OPERATIONS per timing
            name = f"{op}: {state}"
            timer = fixtures.timer(name)
            timer(LOOPS)  # warm-up
            values = sorted(timer(LOOPS) / TOOL_OPERATIONS for _ in range(3))
            results[name] = {"value": values[1], "calls": 3 * TOOL_OPERATIONS, **fixtures.check()}
    return results


# --- instruction counts of the tool-call operations (callgrind) ---------------------------
def callgrind_windows(operations: int) -> dict[str, Any]:
    """In each state, :data:`OUTSIDE_CALLS` calls of each :data:`OPERATIONS` operation, and
    each :data:`IN_TOOL` operation as one tool call of ``operations`` of them, each a callgrind
    window of its own dumped under the benchmark's name, after as many calls to warm up.

    Run under ``valgrind --tool=callgrind --instr-atstart=no`` (:func:`measure_instructions`
    does); outside Valgrind it only makes the calls.
    """
    import gc

    from benchmarks import callgrind

    fixtures = Fixtures(quiet_timers=True)
    in_scope = {}
    for state in STATES:
        fixtures.set_state(state)
        in_scope[state] = fixtures.check()["tool_call_in_scope"]
        for op in OPERATIONS:
            call = fixtures.call(op)
            for _ in range(OUTSIDE_CALLS):  # warm-up
                call()
            gc.collect()
            callgrind.start_instrumentation()
            callgrind.zero_stats()
            for _ in range(OUTSIDE_CALLS):
                call()
            callgrind.dump_stats_at(f"{op}: {state}")
            callgrind.stop_instrumentation()
        for op in IN_TOOL:
            fixtures.run_tool(op, operations)  # warm-up: caches, first-call paths
            gc.collect()
            callgrind.start_instrumentation()
            callgrind.zero_stats()
            fixtures.run_tool(op, operations)
            callgrind.dump_stats_at(f"{op}: {state}")
            callgrind.stop_instrumentation()
    return {
        "operations": operations,
        "outside_calls": OUTSIDE_CALLS,
        "tool_call_in_scope": in_scope,
        "on_valgrind": callgrind.running_on_valgrind(),
    }


def measure_instructions(out: Path, operations: int = TOOL_OPERATIONS) -> dict[str, Any]:
    """:func:`callgrind_windows` in a process under callgrind; executed instructions per
    operation by benchmark name, written to ``out``."""
    from benchmarks.instructions import read_dumps, valgrind_prefix

    scratch = tempfile.mkdtemp(prefix="crew-otel-bench-detectors-callgrind-")
    try:
        out_file = os.path.join(scratch, "callgrind.out.detectors")
        command = [
            *valgrind_prefix(out_file, separate_threads=False),
            sys.executable,
            "-m",
            "benchmarks.detectors",
            "--callgrind-windows",
            str(operations),
        ]
        completed = subprocess.run(
            command, cwd=common.REPO_ROOT, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(f"callgrind run failed:\n{completed.stderr[-3000:]}")
        reply = json.loads(completed.stdout.strip().splitlines()[-1])
        if not reply.get("on_valgrind"):
            raise RuntimeError("the callgrind windows did not run under valgrind")
        totals = {
            dump["trigger"]: dump["instructions"]
            for dump in read_dumps(out_file)
            if dump.get("trigger") in NAMES and "instructions" in dump
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    calls = {op: reply["outside_calls"] for op in OPERATIONS}
    result = {
        "mode": "callgrind",
        "operations": operations,
        "outside_calls": reply["outside_calls"],
        "tool_call_in_scope": reply["tool_call_in_scope"],
        "per_operation": {
            name: totals[name] / calls.get(split(name)[0], operations)
            for name in NAMES
            if name in totals
        },
    }
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def instructions_path(output: str | Path) -> Path:
    """Where the instruction counts go, next to the pyperf or smoke output."""
    path = Path(output)
    return path.with_name(path.stem.removesuffix("-smoke") + "-instructions.json")


# --- the figures inside tool calls ----------------------------------------------------------
def in_tool_rows(
    timings: dict[str, dict[str, Any]], instructions: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Per :data:`IN_TOOL` operation: CPU µs with the detectors off and on, their difference
    and its noise (the two standard deviations), the instructions' difference when counted,
    and whether the difference is within :data:`BUDGET_US` (``yes``, ``within the noise``,
    ``no``). ``timings``: name -> ``{"median": s, "stdev": s}``, as ``report.py``'s
    ``load_detectors`` returns; ``instructions``: name -> instructions per operation."""
    rows = []
    for op, (description,) in IN_TOOL.items():
        off, on = timings.get(f"{op}: {OFF}"), timings.get(f"{op}: {ON}")
        if off is None or on is None:
            continue
        delta_us = (on["median"] - off["median"]) * 1e6
        noise_us = (on.get("stdev", 0.0) + off.get("stdev", 0.0)) * 1e6
        row: dict[str, Any] = {
            "operation": op,
            "description": description,
            "off_us": off["median"] * 1e6,
            "on_us": on["median"] * 1e6,
            "delta_us": delta_us,
            "noise_us": noise_us,
            "within_budget": (
                "yes"
                if delta_us <= BUDGET_US
                else "within the noise"
                if delta_us - BUDGET_US <= noise_us
                else "no"
            ),
        }
        if instructions and f"{op}: {OFF}" in instructions and f"{op}: {ON}" in instructions:
            row["off_instructions"] = instructions[f"{op}: {OFF}"]
            row["on_instructions"] = instructions[f"{op}: {ON}"]
            row["delta_instructions"] = row["on_instructions"] - row["off_instructions"]
        rows.append(row)
    return rows


def in_tool_markdown(
    timings: dict[str, dict[str, Any]], instructions: dict[str, float] | None = None
) -> list[str]:
    """:func:`in_tool_rows` as a Markdown table."""
    lines = [
        f"| operation (in a tool call, {TOOL_OPERATIONS} per call) | detectors off, µs "
        "| detectors on, µs | on - off, µs (± noise) | on - off, instructions "
        f"| within +{BUDGET_US:g} µs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in in_tool_rows(timings, instructions):
        counted = row.get("delta_instructions")
        lines.append(
            f"| {row['description']} | {row['off_us']:.2f} | {row['on_us']:.2f} "
            f"| {row['delta_us']:+.2f} (± {row['noise_us']:.2f}) "
            f"| {'-' if counted is None else f'{counted:+,.0f}'} | {row['within_budget']} |"
        )
    return lines


def _print_table(directory: Path) -> None:
    """The tool-call figures of a results directory as Markdown (``--in-tool-table DIR``)."""
    from benchmarks.report import load_detectors

    path = directory / "detectors.json"
    if not path.is_file():
        path = directory / "detectors-smoke.json"
    counts_path = instructions_path(path)
    counts = (
        json.loads(counts_path.read_text(encoding="utf-8"))["per_operation"]
        if counts_path.is_file()
        else None
    )
    print("\n".join(in_tool_markdown(load_detectors(path), counts)))


def main() -> None:
    if "--callgrind-windows" in sys.argv:
        operations = int(sys.argv[sys.argv.index("--callgrind-windows") + 1])
        print(json.dumps(callgrind_windows(operations)))
        return
    if "--in-tool-table" in sys.argv:
        _print_table(Path(sys.argv[sys.argv.index("--in-tool-table") + 1]))
        return
    if "--instructions" in sys.argv:
        out = Path(sys.argv[sys.argv.index("-o") + 1])
        print(json.dumps(measure_instructions(out), indent=1))
        return
    if "--smoke" in sys.argv:
        out = sys.argv[sys.argv.index("-o") + 1]
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"mode": "smoke", "benchmarks": smoke()}, handle, indent=1)
        return

    import pyperf

    runner = pyperf.Runner(loops=LOOPS, program_args=("-m", "benchmarks.detectors"))
    runner.argparser.add_argument(
        "--no-instructions",
        action="store_true",
        help="skip the callgrind pass over the tool-call operations (run after the suite, "
        "into <output stem>-instructions.json, when valgrind is installed)",
    )
    runner.argparser.epilog = (
        "Other modes: --smoke -o FILE (one timing each, in this process); --instructions -o "
        "FILE (only the callgrind pass); --in-tool-table DIR (the tool-call figures of a "
        "results directory as Markdown); --callgrind-windows N (the windows themselves, run "
        "under valgrind by --instructions)."
    )
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
        description = f"{(OPERATIONS.get(op) or IN_TOOL[op])[0]}; {state}"
        ours = fixtures is not None and name == name_of_worker
        time_func = fixtures.timer(name) if ours else _never_called  # type: ignore[union-attr]
        runner.bench_time_func(
            name, time_func, inner_loops=inner_loops(name), metadata={"description": description}
        )
    if not args.worker and args.output and not args.no_instructions and shutil.which("valgrind"):
        measure_instructions(instructions_path(args.output))


def _never_called(loops: int) -> float:
    raise RuntimeError("only pyperf workers time benchmarks")


if __name__ == "__main__":
    main()
