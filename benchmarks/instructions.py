"""Executed instructions per kickoff, counted by Valgrind's callgrind (``--only instructions``).

CPU time on a shared 2-core machine moves by 5-10 % between rounds; the number of executed
instructions does not depend on the load, so a 1 % regression shows. Each variant's worker
process (:mod:`benchmarks.worker`) runs under
``valgrind --tool=callgrind --instr-atstart=no``: start-up and warm-up run without
instrumentation, and the worker switches it on (a callgrind client request, see
:mod:`benchmarks.callgrind`) only around each measured window: ``K`` sequential kickoffs and
the span flush after them, every thread counted. Each window is written as a dump of its
own; this module reads the ``totals`` of each.

Under callgrind a kickoff takes 50-100 times longer than natively, so timers fire far more
often per kickoff than in production: the BatchSpanProcessor's 5 s schedule exports a few
spans at a time, and the PeriodicExportingMetricReader's 60 s collection, which natively
runs once per some hundred kickoffs, runs every few kickoffs. The worker therefore runs with
both timers out of the way (``--quiet-timers``: spans are exported only by the flush that
ends a window, metrics only by an explicit collection measured as a window of its own), so
the count is the same on a busy and on an idle machine. ``--timers`` keeps the SDK's
defaults, to show their effect.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import common
from benchmarks.hooks import FLOOR_SUFFIX, HISTOGRAM_POINT, HOOKS
from benchmarks.hooks import NAMES as _HOOK_NAMES
from benchmarks.worker import EXPORT_SUFFIX

#: Valgrind processes run at the same time.
PARALLEL = 2


def valgrind_prefix(out_file: str, separate_threads: bool) -> list[str]:
    """The command prefix that runs a worker under callgrind, instrumentation off at start."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)")
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--dump-instr=no",
        f"--separate-threads={'yes' if separate_threads else 'no'}",
        f"--callgrind-out-file={out_file}",
        "--log-file=" + out_file + ".log",
    ]


_HEADER = re.compile(rb"^(desc: Trigger: |totals: |thread: |pid: )(.*)$")


def read_dump(path: str) -> dict[str, Any]:
    """The trigger, thread, pid and total instructions (``totals:``) of one callgrind dump."""
    found: dict[str, Any] = {"file": os.path.basename(path)}
    with open(path, "rb") as handle:
        for line in handle:
            match = _HEADER.match(line.rstrip(b"\n"))
            if match is None:
                continue
            key, value = match.group(1).decode(), match.group(2).decode(errors="replace")
            if key.startswith("desc"):
                found["trigger"] = value.removeprefix("Client Request: ")
            elif key.startswith("totals"):
                found["instructions"] = int(value.split()[0])
            elif key.startswith("thread"):
                found["thread"] = int(value)
            elif key.startswith("pid"):
                found["pid"] = int(value)
    return found


def read_dumps(out_file: str) -> list[dict[str, Any]]:
    """Every dump written for ``out_file`` (``<out_file>[.N][-TT]``)."""
    return [read_dump(p) for p in sorted(glob.glob(out_file + "*")) if not p.endswith(".log")]


def annotate(path: str, threshold: int = 99, limit: int = 60) -> str:
    """``callgrind_annotate --inclusive=yes`` of one dump (the first ``limit`` lines)."""
    try:
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", f"--threshold={threshold}", path],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"callgrind_annotate failed: {exc}"
    return "\n".join(text.splitlines()[:limit])


def thread_roles(names: Sequence[str]) -> dict[int, str]:
    """Callgrind's thread numbers of the threads alive when the worker was ready.

    Valgrind numbers threads from 1 (the main thread), reusing the lowest free number; the
    threads alive when the worker is ready (the main thread, the span processor's and the
    metric reader's) keep their numbers 1..n for the life of the process (which of 2..n is
    which is not known: they are counted together). Any other number is a thread started
    later (CrewAI's, the HTTP client's), also counted together.
    """
    roles = {1: "main thread"}
    for index in range(2, len(names) + 1):
        roles[index] = "SDK export threads (" + ", ".join(sorted(names[1:])) + ")"
    return roles


def per_thread(dumps: list[dict[str, Any]], roles: dict[int, str]) -> dict[str, int]:
    """Instructions per thread role over every dump of a ``--separate-threads=yes`` process."""
    totals: dict[str, int] = {}
    for dump in dumps:
        role = roles.get(dump.get("thread", 0), "threads started by the run")
        totals[role] = totals.get(role, 0) + int(dump.get("instructions", 0))
    return totals


def measure(bench: Any) -> dict[str, Any]:
    """The ``instructions`` section of :mod:`benchmarks.run` (``bench`` is its ``Bench``)."""
    from benchmarks.run import Worker

    s = bench.settings
    scratch = tempfile.mkdtemp(prefix="crew-otel-bench-callgrind-")
    results: dict[str, Any] = {
        "settings": {
            "warmup_kickoffs": s.instructions_warmup,
            "windows": list(s.instructions_windows),
            "processes_per_variant": s.instructions_processes,
            "timers": "default" if bench.instructions_timers else "quiet",
            "valgrind": _valgrind_version(),
        },
        "variants": {},
        "threads": {},
    }
    try:
        # Two processes at a time (the counts do not depend on the load, see above).
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            processes = range(1, s.instructions_processes + 1)
            variants = {
                v: [pool.submit(_variant, bench, Worker, v, scratch, p) for p in processes]
                for v in bench.variants_with_floor_in_place()
            }
            threads = {
                v: pool.submit(_threads, bench, Worker, v, scratch)
                for v in (common.BASELINE, common.CREW_OTEL)
            }
            hooks = pool.submit(_hooks, bench, scratch)
            detectors = {
                name: pool.submit(_detector_window, bench, Worker, name, overlay, scratch)
                for name, overlay in DETECTOR_VARIANTS.items()
            }
            results["variants"] = {
                v: median_process([future.result() for future in futures])
                for v, futures in variants.items()
            }
            results["threads"] = {v: future.result() for v, future in threads.items()}
            results["hooks"] = hooks.result()
            results["detectors"] = {
                "concurrency": DETECTOR_CONCURRENCY,
                "kickoffs": DETECTOR_KICKOFFS,
                "per_kickoff": {name: future.result() for name, future in detectors.items()},
            }
        crew_otel = results["variants"].get(common.CREW_OTEL, {})
        if crew_otel.get("dump_of_longest_window"):
            text = annotate(crew_otel["dump_of_longest_window"])
            (bench.out / "instructions-annotate.txt").write_text(
                common.scrub(text) + "\n", encoding="utf-8"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in results["variants"].values():
        entry.pop("dump_of_longest_window", None)
        for process in entry.get("processes", []):
            process.pop("dump_of_longest_window", None)
    bench.write("instructions.json", results)
    return results


#: crew_otel with each detector switched off, against all on: concurrent kickoffs, so the
#: cross-talk checks scan what enters each run (a run alone skips them) and the shared-state
#: bookkeeping sees requests in flight together.
DETECTOR_VARIANTS: dict[str, dict[str, str]] = {
    "all_on": {},
    "crosstalk_off": {"CREW_OTEL_DETECT_CROSSTALK": "false"},
    "shared_instances_off": {"CREW_OTEL_DETECT_SHARED_INSTANCES": "false"},
}
DETECTOR_CONCURRENCY = 4
DETECTOR_KICKOFFS = 8


def _detector_window(
    bench: Any, worker_class: Any, name: str, overlay: dict[str, str], scratch: str
) -> float:
    """Instructions per kickoff of crew_otel with ``overlay`` in its environment."""
    out_file = os.path.join(scratch, f"callgrind.out.detectors-{name}")
    worker = worker_class(
        common.CREW_OTEL,
        bench.base_url,
        {**bench.env_for(common.CREW_OTEL), **SAME_HASHES, **overlay},
        bench.worker_log,
        prefix=valgrind_prefix(out_file, False),
        options=_worker_options(bench),
    )
    worker.wait_ready()
    try:
        worker.run("threads", DETECTOR_CONCURRENCY, DETECTOR_KICKOFFS)
        reply = worker.request(
            op="instructions",
            kickoffs=DETECTOR_KICKOFFS,
            concurrency=DETECTOR_CONCURRENCY,
            label="detectors",
        )
        _check(reply, f"crew_otel ({name})")
    finally:
        worker.close()
    total = sum(d.get("instructions", 0) for d in read_dumps(out_file))
    bench.log(f"instructions: detectors {name}: {total / DETECTOR_KICKOFFS / 1e6:.2f} M/kickoff")
    return total / DETECTOR_KICKOFFS


def _worker_options(bench: Any) -> list[str]:
    return [] if bench.instructions_timers else ["--quiet-timers"]


#: Every process counted runs with the same string-hash seed: set and dict layouts (and so the
#: instructions spent probing them) are then the same from one run to the next.
SAME_HASHES = {"PYTHONHASHSEED": "0"}


def _spawn(bench: Any, worker_class: Any, variant: str, prefix: list[str]) -> Any:
    worker = worker_class(
        variant,
        bench.base_url,
        {**bench.env_for(variant), **SAME_HASHES},
        bench.worker_log,
        prefix=prefix,
        options=_worker_options(bench),
    )
    worker.wait_ready()
    return worker


def _check(reply: dict[str, Any], variant: str) -> None:
    if reply.get("errors"):
        raise RuntimeError(f"{variant}: {reply['errors']} kickoffs failed:\n{reply['first_error']}")
    if not reply.get("on_valgrind"):
        raise RuntimeError(f"{variant}: the worker does not run under valgrind")


def median_process(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's result over its processes: the process whose representative window
    (:func:`benchmarks.common.representative_window`) is the median (the lower one of an even
    number), with every process's entry under ``processes``.

    Processes of the same variant, each agreeing with itself within about 1 M instructions per
    kickoff, can differ by 3 M from one another (the cause is not known), so a single process
    cannot decide a difference of that size between variants; the median of several can.
    """
    if len(entries) == 1:
        return entries[0]
    ranked = sorted(
        entries, key=lambda e: common.representative_window(e["windows"])["per_kickoff"]
    )
    return {**ranked[(len(ranked) - 1) // 2], "processes": entries}


def _variant(
    bench: Any, worker_class: Any, variant: str, scratch: str, process: int = 1
) -> dict[str, Any]:
    """Every window of one variant, in one process (all threads in one count)."""
    s = bench.settings
    # Two-digit process numbers: one process's dump names are no prefix of another's.
    out_file = os.path.join(scratch, f"callgrind.out.{variant}.process{process:02d}")
    worker = _spawn(bench, worker_class, variant, valgrind_prefix(out_file, False))
    windows = []
    try:
        worker.run("threads", 1, s.instructions_warmup)
        bench.log(f"instructions: {variant} warm ({s.instructions_warmup} kickoffs)")
        for index, kickoffs in enumerate(s.instructions_windows, start=1):
            label = f"window{index}-k{kickoffs}"
            reply = worker.request(op="instructions", kickoffs=kickoffs, label=label)
            _check(reply, variant)
            windows.append(reply)
            bench.log(f"instructions: {variant}, {kickoffs} kickoffs ({reply['wall']:.0f} s)")
        for what in ("metrics", "gc"):
            _check(worker.request(op="instructions", what=what, label=what), variant)
    finally:
        worker.close()
    dumps = {d.get("trigger"): d for d in read_dumps(out_file)}
    entry: dict[str, Any] = {"windows": []}
    for reply in windows:
        run = dumps[reply["label"]]["instructions"]
        export = dumps[reply["label"] + EXPORT_SUFFIX]["instructions"]
        total = run + export
        entry["windows"].append(
            {
                "kickoffs": reply["kickoffs"],
                "instructions": total,
                "per_kickoff": total / reply["kickoffs"],
                "span_export_per_kickoff": export / reply["kickoffs"],
                "spans_per_kickoff": reply["spans"] / reply["kickoffs"],
                "wall_s": round(reply["wall"], 1),
                "gc_collections": reply.get("gc_collections"),
                "gc_tracked_objects": reply.get("gc_objects"),
            }
        )
    entry["metric_collection"] = dumps["metrics"]["instructions"]
    entry["full_gc"] = dumps["gc"]["instructions"]
    entry["dump_of_longest_window"] = next(
        (
            os.path.join(scratch, d["file"])
            for d in dumps.values()
            if d.get("trigger") == windows[-1]["label"]
        ),
        None,
    )
    bench.log(
        f"instructions: {variant} (process {process}): "
        + ", ".join(
            f"{w['per_kickoff'] / 1e6:.1f} M/kickoff over {w['kickoffs']}" for w in entry["windows"]
        )
        + f"; one metric collection {entry['metric_collection'] / 1e6:.1f} M"
        + f", one full garbage collection {entry['full_gc'] / 1e6:.0f} M"
    )
    return entry


def _threads(bench: Any, worker_class: Any, variant: str, scratch: str) -> dict[str, Any]:
    """One window of the shortest length in a ``--separate-threads=yes`` process."""
    s = bench.settings
    kickoffs = min(s.instructions_windows)
    out_file = os.path.join(scratch, f"callgrind.threads.{variant}")
    worker = _spawn(bench, worker_class, variant, valgrind_prefix(out_file, True))
    try:
        roles = thread_roles(worker.ready.get("threads", []))
        worker.run("threads", 1, s.instructions_warmup)
        reply = worker.request(op="instructions", kickoffs=kickoffs, label=f"k{kickoffs}")
        _check(reply, variant)
    finally:
        worker.close()  # threads that ended during the window are dumped at exit
    totals = per_thread(read_dumps(out_file), roles)
    bench.log(
        f"instructions by thread, {variant}: "
        + ", ".join(f"{role} {count / kickoffs / 1e6:.1f} M" for role, count in totals.items())
    )
    return {
        "kickoffs": kickoffs,
        "threads_at_start": worker.ready.get("threads", []),
        "per_kickoff": {role: count / kickoffs for role, count in totals.items()},
    }


#: Calls per hook in the per-hook windows (after as many warm-up calls).
HOOK_CALLS = 200


def _hooks(bench: Any, scratch: str) -> dict[str, Any]:
    """Instructions per call of each crew_otel hook (:func:`benchmarks.hooks.instruction_windows`),
    the plain method call subtracted, next to the bare SDK span (the floor)."""
    import json

    out_file = os.path.join(scratch, "callgrind.hooks")
    completed = subprocess.run(
        [
            *valgrind_prefix(out_file, False),
            sys.executable,
            "-m",
            "benchmarks.hooks",
            "--callgrind",
            str(HOOK_CALLS),
        ],
        capture_output=True,
        text=True,
        env={**bench.env, **SAME_HASHES},
        cwd=common.REPO_ROOT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmarks.hooks --callgrind failed:\n{completed.stderr[-2000:]}")
    reply = json.loads(completed.stdout.strip().splitlines()[-1])
    dumps = {d.get("trigger"): d for d in read_dumps(out_file)}
    names = (*_HOOK_NAMES, *(hook + FLOOR_SUFFIX for hook in HOOKS), HISTOGRAM_POINT)
    per_call = {name: dumps[name]["instructions"] / HOOK_CALLS for name in dumps if name in names}
    bare = per_call.get("bare call", 0.0)
    hooks = {
        name: {
            "per_call": value,
            "net_per_call": value - bare,
            "spans_per_call": reply["spans_per_call"].get(name, 0.0),
        }
        for name, value in per_call.items()
        if not name.endswith(FLOOR_SUFFIX) and name != HISTOGRAM_POINT
    }
    bench.log(
        "instructions per hook call (k, net of a plain call): "
        + ", ".join(f"{n} {h['net_per_call'] / 1e3:.0f}" for n, h in hooks.items())
    )
    return {
        "calls": HOOK_CALLS,
        "per_hook": hooks,
        "breakdown": hook_breakdown(per_call),
        "histogram_point": per_call.get(HISTOGRAM_POINT, 0.0) - per_call.get("bare call", 0.0),
    }


def hook_breakdown(per_call: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each hook's instructions per call split into wrapt (its pass-through wrapper, net of a
    plain call), the SDK floor (the same spans made by the bare SDK, export included) and
    crew_otel's own (the rest: its Python, context attach/detach and its metric points)."""
    bare = per_call.get("bare call", 0.0)
    wrapt = per_call.get("wrapt pass-through", bare) - bare
    result = {}
    for hook in HOOKS:
        floor = per_call.get(hook + FLOOR_SUFFIX)
        total = per_call.get(hook)
        if floor is None or total is None:
            continue
        result[hook] = {
            "net_per_call": total - bare,
            "wrapt": wrapt,
            "sdk_floor": floor,
            "crew_otel": total - bare - wrapt - floor,
        }
    return result


def _valgrind_version() -> str | None:
    try:
        return subprocess.run(
            ["valgrind", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return None
