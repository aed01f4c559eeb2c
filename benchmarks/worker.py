"""One variant of the end-to-end workload, in a process of its own.

``python -m benchmarks.worker --variant NAME --base-url URL [--workload io|flow-memory]``
imports crewai, sets up the export pipeline (:class:`benchmarks.common.Pipeline`), installs the
variant's instrumentation, prints one JSON line (``ready``, with its start-up timings) and then
answers JSON commands, one per line on standard input, with one JSON line each:

``{"op": "run", "mode": "threads"|"async", "concurrency": C, "kickoffs": N}``
    N kickoffs, C at a time, each building its own crew (``research_crew``; with
    ``--workload io`` its tool writes a file and a SQLite database, see :func:`make_io_tool`;
    with ``--workload flow-memory`` each kickoff is a Flow whose listen step kicks off that crew
    with memory and knowledge, see :func:`flow_memory_class`); the spans are flushed (encoded)
    before the clock stops. Answers CPU and wall seconds per kickoff.
``{"op": "soak", "kickoffs": N, "every": E}``
    N sequential kickoffs, RSS and live objects sampled (after a GC) every E.
``{"op": "profile", "kickoffs": N, "out": PATH}``
    N kickoffs under cProfile, in every thread; writes crew_otel's top self-time functions.
``{"op": "exit"}``

Instrumentations cannot be removed cleanly, so each variant lives in its own process; the
parent interleaves the variants' rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import importlib
import json
import logging
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import common


def setup_variant(variant: str, pipeline: common.Pipeline) -> dict[str, Any]:
    """Install the variant's instrumentation the way its documentation says; return versions."""
    if variant in (common.BASELINE, common.SDK_FLOOR, common.SDK_FLOOR_IN_PLACE):
        return {}
    if variant in (common.CREW_OTEL, common.CREW_OTEL_NO_DETECT):
        import crew_otel

        if variant == common.CREW_OTEL:
            crew_otel.instrument()  # the global providers set by the pipeline
        else:
            crew_otel.instrument(detect_shared_instances=False)
        return common.versions(("crew-otel",))
    if variant == common.OPENINFERENCE:
        from openinference.instrumentation.crewai import CrewAIInstrumentor
        from openinference.instrumentation.openai import OpenAIInstrumentor

        CrewAIInstrumentor().instrument(tracer_provider=pipeline.tracer_provider)
        OpenAIInstrumentor().instrument(tracer_provider=pipeline.tracer_provider)
        return common.versions(
            (
                "openinference-instrumentation-crewai",
                "openinference-instrumentation-openai",
                "openinference-instrumentation",
                "openinference-semantic-conventions",
            )
        )
    if variant == common.OPENLLMETRY:
        from opentelemetry.instrumentation.crewai import CrewAIInstrumentor
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        kwargs = {
            "tracer_provider": pipeline.tracer_provider,
            "meter_provider": pipeline.meter_provider,
        }
        CrewAIInstrumentor().instrument(**kwargs)
        OpenAIInstrumentor().instrument(**kwargs)
        return common.versions(
            (
                "opentelemetry-instrumentation-crewai",
                "opentelemetry-instrumentation-openai",
                "opentelemetry-semantic-conventions-ai",
            )
        )
    raise SystemExit(f"unknown variant {variant!r}")


def make_io_tool(directory: str) -> Any:
    """A fresh ``@tool`` tool that does a service's per-request I/O: it writes a file of its
    own and a SQLite database file of its own (connect, create, insert, commit, close).

    The paths are unique per call, so nothing is shared between requests (the detectors must
    find nothing); the files are removed after each measurement, outside the tool.
    """
    from crewai.tools import tool

    def record_facts(query: str) -> str:
        """Record facts about a topic."""
        stem = os.path.join(directory, uuid.uuid4().hex)
        facts = f"FACTS about {query}"
        with open(stem + ".txt", "w", encoding="utf-8") as handle:
            handle.write(facts + "\n")
        connection = sqlite3.connect(stem + ".db")
        try:
            connection.execute("CREATE TABLE facts (topic TEXT, fact TEXT)")
            connection.execute("INSERT INTO facts VALUES (?, ?)", (query, facts))
            connection.commit()
        finally:
            connection.close()
        return facts

    return tool("record_facts")(record_facts)


#: The loopback provider takes any key; the embedder of the Flow + memory workload needs one.
FAKE_KEY = "sk-fake-key-for-the-loopback-provider"
#: The knowledge source of the Flow + memory workload (the same text for every crew: CrewAI
#: keeps one knowledge collection per storage directory).
KNOWLEDGE_TEXT = "Observability of a service means traces, metrics and logs of every request."


def flow_memory_class(base_url: str) -> type:
    """A Flow per request: ``begin`` (``@start``) -> ``choose`` (``@router``, label
    ``"deep"``) -> ``research`` (``@listen("deep")``), which builds ``research_crew`` with
    ``memory=True`` (CrewAI's unified memory over LanceDB; its own model calls go to the
    agents' loopback LLM), a ``StringKnowledgeSource`` (Chroma) and an OpenAI embedder pointed
    at the loopback provider, and kicks it off. The Flow returns the crew's answer.
    """
    from crewai.flow.flow import Flow, listen, router, start
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource

    from crew_otel.testing.crews import make_llm, research_crew

    embedder = {"provider": "openai", "config": {"api_key": FAKE_KEY, "api_base": base_url}}

    class ResearchFlow(Flow):  # type: ignore[type-arg]
        @start()
        def begin(self) -> str:
            return str(self.state["topic"])

        @router(begin)
        def choose(self) -> str:
            return "deep"

        @listen("deep")
        def research(self) -> str:
            crew = research_crew(
                lambda: make_llm(base_url),
                memory=True,
                embedder=embedder,
                knowledge_sources=[StringKnowledgeSource(content=KNOWLEDGE_TEXT)],
            )
            return str(crew.kickoff(inputs={"topic": self.state["topic"]}).raw)

    return ResearchFlow


def _answer(result: Any) -> str | None:
    """A crew's ``raw`` output, or the string a Flow returns."""
    return result if isinstance(result, str) else getattr(result, "raw", None)


class Workload:
    """Build a crew (or a Flow) per request and kick it off, sync or async."""

    def __init__(
        self, base_url: str, pipeline: common.Pipeline, workload: str = common.STANDARD
    ) -> None:
        from crew_otel.testing.crews import make_llm, research_crew

        self.pipeline = pipeline
        self.directory: str | None = None
        #: Builds what one request kicks off: a crew, or a Flow.
        self._make_crew: Callable[[], Any]
        if workload == common.IO:
            directory = self.directory = tempfile.mkdtemp(prefix="crew-otel-bench-io-")
            self._make_crew = lambda: research_crew(
                lambda: make_llm(base_url), tools=[make_io_tool(directory)]
            )
        elif workload == common.FLOW_MEMORY:
            self._make_crew = flow_memory_class(base_url)
        else:
            self._make_crew = lambda: research_crew(lambda: make_llm(base_url))
        self.errors = 0
        self.first_error: str | None = None
        #: Called after each kickoff that succeeded (the SDK floor's replay).
        self.after_kickoff: Callable[[], None] | None = None

    def clean(self) -> None:
        """Remove the files the I/O tool wrote (called between measurements, untimed)."""
        if self.directory is None:
            return
        for entry in os.scandir(self.directory):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)

    def _note_error(self) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = traceback.format_exc(limit=8)

    def kickoff(self) -> None:
        try:
            result = self._make_crew().kickoff(inputs=dict(common.INPUTS))
            if not _answer(result):
                raise RuntimeError("empty crew output")
            if self.after_kickoff is not None:
                self.after_kickoff()
        except Exception:
            self._note_error()

    async def akickoff(self) -> None:
        try:
            result = await self._make_crew().akickoff(inputs=dict(common.INPUTS))
            if not _answer(result):
                raise RuntimeError("empty crew output")
            if self.after_kickoff is not None:
                self.after_kickoff()
        except Exception:
            self._note_error()

    def run(self, mode: str, concurrency: int, kickoffs: int) -> None:
        if mode == "async":
            asyncio.run(self._run_async(concurrency, kickoffs))
        elif concurrency <= 1:
            for _ in range(kickoffs):
                self.kickoff()
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for future in [pool.submit(self.kickoff) for _ in range(kickoffs)]:
                    future.result()

    async def _run_async(self, concurrency: int, kickoffs: int) -> None:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with semaphore:
                await self.akickoff()

        await asyncio.gather(*(one() for _ in range(kickoffs)))


#: Thread roles in the per-thread CPU breakdown (:func:`thread_cpu`).
MAIN_THREAD = "main thread"
SPAN_EXPORT_THREAD = "span export thread (BatchSpanProcessor)"
METRIC_THREAD = "metric reader thread"
OTHER_THREADS = "threads started by the run (CrewAI's workers, ended or alive)"


def _thread_role(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return MAIN_THREAD
    if "BatchSpan" in thread.name or "BatchProcessor" in thread.name:
        return SPAN_EXPORT_THREAD
    if "MetricReader" in thread.name or "PeriodicExporting" in thread.name:
        return METRIC_THREAD
    return OTHER_THREADS


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds each live thread used since it started, with its role, by thread ident."""
    result = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError):  # ended meanwhile, or no per-thread clock
            continue
        result[thread.ident] = (_thread_role(thread), seconds)
    return result


def cpu_by_thread(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], process: float
) -> dict[str, float]:
    """CPU seconds per thread role between two :func:`thread_cpu` snapshots; what threads that
    ended meanwhile used (not visible at the end) is the process's CPU minus the live threads'."""
    roles: dict[str, float] = {}
    for ident, (role, seconds) in after.items():
        previous = before.get(ident)
        used = seconds - previous[1] if previous is not None else seconds
        roles[role] = roles.get(role, 0.0) + used
    roles[OTHER_THREADS] = roles.get(OTHER_THREADS, 0.0) + process - sum(roles.values())
    return roles


class CollectorMeter:
    """What the cyclic garbage collector did while it was installed (``gc.callbacks``): its
    collections by generation, the CPU they took (in the collecting thread) and the objects
    they freed; two calls per collection, a few collections per kickoff."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.cpu = 0.0
        self.collected = 0
        self._started: dict[int, float] = {}

    def __enter__(self) -> CollectorMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._started[ident] = time.thread_time()
            return
        started = self._started.pop(ident, None)
        if started is not None:
            self.cpu += time.thread_time() - started
        self.collections[min(info["generation"], 2)] += 1
        self.collected += info["collected"]


def process_counters(
    kickoffs: int, meter: CollectorMeter, before: Any, after: Any
) -> dict[str, Any]:
    """Per kickoff: the collector's work, and the kernel's page faults and context switches
    (``resource.getrusage`` snapshots): time that instruction counts do not show."""
    return {
        "gc_collections": [n / kickoffs for n in meter.collections],
        "gc_cpu": meter.cpu / kickoffs,
        "gc_collected": meter.collected / kickoffs,
        "minor_faults": (after.ru_minflt - before.ru_minflt) / kickoffs,
        "voluntary_switches": (after.ru_nvcsw - before.ru_nvcsw) / kickoffs,
        "involuntary_switches": (after.ru_nivcsw - before.ru_nivcsw) / kickoffs,
    }


def measure(workload: Workload, mode: str, concurrency: int, kickoffs: int) -> dict[str, Any]:
    """CPU (all threads of this process, and per thread role) and wall time per kickoff, span
    export included; what the garbage collector and the kernel did meanwhile."""
    exporter = workload.pipeline.span_exporter
    spans_before, bytes_before = exporter.spans, exporter.bytes
    errors_before = workload.errors
    threads0 = thread_cpu()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    with CollectorMeter() as collector:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        workload.run(mode, concurrency, kickoffs)
        workload.pipeline.flush()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    threads = cpu_by_thread(threads0, thread_cpu(), cpu)
    workload.clean()
    return {
        "process": process_counters(kickoffs, collector, usage0, usage),
        "cpu": cpu / kickoffs,
        "wall": wall / kickoffs,
        # The kernel's split of the process's CPU (in clock ticks, scaled to the exact total).
        "user": (usage.ru_utime - usage0.ru_utime) / kickoffs,
        "sys": (usage.ru_stime - usage0.ru_stime) / kickoffs,
        "kickoffs": kickoffs,
        "cpu_by_thread": {role: seconds / kickoffs for role, seconds in threads.items()},
        "spans": (exporter.spans - spans_before) / kickoffs,
        "otlp_bytes": (exporter.bytes - bytes_before) / kickoffs,
        "errors": workload.errors - errors_before,
        "first_error": workload.first_error,
        "rss": common.rss_bytes(),
    }


def soak(workload: Workload, variant: str, kickoffs: int, every: int) -> dict[str, Any]:
    """Sequential kickoffs; RSS and live objects (after a full GC) every ``every``."""
    samples: list[dict[str, Any]] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def sample(done: int) -> None:
        workload.pipeline.flush()  # no spans waiting in the batch queue
        gc.collect()
        common.release_free_memory()
        entry: dict[str, Any] = {
            "kickoffs": done,
            "rss": common.rss_bytes(),
            "objects": len(gc.get_objects()),
            "wall": time.perf_counter() - wall0,
            "cpu": time.process_time() - cpu0,
        }
        tracked = _crew_otel_tracked_objects() if variant == common.CREW_OTEL else None
        if tracked is not None:
            entry["crew_otel_tracked_objects"] = tracked
        samples.append(entry)

    sample(0)
    types_at_start = _live_types()
    types_after_first = types_at_start
    for done in range(1, kickoffs + 1):
        workload.kickoff()
        if done % every == 0 or done == kickoffs:
            sample(done)
            if done == every:
                types_after_first = _live_types()
    types_at_end = _live_types()
    return {
        "samples": samples,
        "live_type_growth": dict((types_at_end - types_at_start).most_common(20)),
        "live_type_growth_after_first_interval": dict(
            (types_at_end - types_after_first).most_common(20)
        ),
        "errors": workload.errors,
        "first_error": workload.first_error,
    }


def _live_types() -> collections.Counter[str]:
    """Live GC-tracked objects by type (after the GC the caller ran)."""
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


def _crew_otel_tracked_objects() -> int | None:
    try:
        import crew_otel

        runtime = crew_otel.CrewAIInstrumentor().runtime
        return int(runtime.sharing.tracked_objects) if runtime is not None else None
    except Exception:
        return None


def profile(
    workload: Workload, kickoffs: int, out: str, top: int, dump: str | None = None
) -> dict[str, Any]:
    """Run ``kickoffs`` under cProfile in every thread and write the crew_otel hot spots."""
    import cProfile
    import pstats
    import threading

    from benchmarks import profiling

    profiles: list[cProfile.Profile] = []

    def start_thread_profiler(*_: Any) -> None:
        thread_profile = cProfile.Profile()
        profiles.append(thread_profile)
        thread_profile.enable()  # replaces this hook in the new thread

    main_profile = cProfile.Profile()
    profiles.append(main_profile)
    threading.setprofile(start_thread_profiler)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    main_profile.enable()
    try:
        workload.run("threads", 1, kickoffs)
        workload.pipeline.flush()
    finally:
        main_profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    stats = pstats.Stats(main_profile)
    for thread_profile in profiles[1:]:
        try:
            stats.add(thread_profile)
        except (TypeError, ValueError):  # a thread that never ran Python code
            continue
    if dump:
        stats.dump_stats(dump)
    text, summary = profiling.render(stats, kickoffs=kickoffs, top=top, wall=wall, cpu=cpu)
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(common.scrub(text))
    summary["threads_profiled"] = len(profiles)
    return summary


#: ``--quiet-timers``: a day, i.e. never during a run.
QUIET_TIMER_MILLIS = 86_400_000.0


#: The dump of a window's span flush is named after the window plus this.
EXPORT_SUFFIX = ".export"


def instructions(
    workload: Workload, kickoffs: int, label: str, what: str = "kickoffs", concurrency: int = 1
) -> dict[str, Any]:
    """Callgrind counts instructions (every thread) only around ``kickoffs`` kickoffs
    (``concurrency`` at a time) and the span flush after them (``what="kickoffs"``; dumps
    ``label`` and, for the flush, ``label + EXPORT_SUFFIX``), or around one collection and
    export of the metrics (``what="metrics"``), or around one full garbage collection
    (``what="gc"``; these two dump ``label``).

    The process runs under ``valgrind --tool=callgrind --instr-atstart=no`` (see
    :mod:`benchmarks.instructions`); outside Valgrind this only runs the work.
    """
    from benchmarks import callgrind

    exporter = workload.pipeline.span_exporter
    spans_before, errors_before = exporter.spans, workload.errors
    if what == "kickoffs":
        # A full collection walks the whole heap (about 250 M instructions, natively once per
        # 60 kickoffs or so, in every variant alike): collected here, outside the window, the
        # next one is tens of thousands of allocations away, so windows compare like for like.
        gc.collect()
    collections_before = [generation["collections"] for generation in gc.get_stats()]
    callgrind.start_instrumentation()
    callgrind.zero_stats()
    wall0 = time.perf_counter()
    if what == "metrics":
        workload.pipeline.meter_provider.force_flush()
    elif what == "gc":
        gc.collect()
    else:
        workload.run("threads", concurrency, kickoffs)
        callgrind.dump_stats_at(label)  # the kickoffs; the flush is a dump of its own
        workload.pipeline.flush()
    wall = time.perf_counter() - wall0
    callgrind.dump_stats_at(label + EXPORT_SUFFIX if what == "kickoffs" else label)
    callgrind.stop_instrumentation()
    collections = [generation["collections"] for generation in gc.get_stats()]
    return {
        "label": label,
        "what": what,
        "kickoffs": kickoffs,
        "wall": wall,
        "spans": exporter.spans - spans_before,
        "errors": workload.errors - errors_before,
        "first_error": workload.first_error,
        "threads": [thread.name for thread in threading.enumerate()],
        #: Garbage collections per generation during the window.
        "gc_collections": [b - a for a, b in zip(collections_before, collections, strict=True)],
        "gc_objects": len(gc.get_objects()),
        "on_valgrind": callgrind.running_on_valgrind(),
    }


#: Modules a run imports on first use at a moment the collector decides: an OpenAI async client
#: CrewAI built and dropped is closed (``AsyncClient.aclose``) from its finaliser when a
#: collection frees it while one of CrewAI's event loops runs, and the first close imports
#: anyio's asyncio backend (19 ms natively). In one variant's process that falls into the
#: warm-up, in another's into a measured window (an instruction window about 200 M above the
#: others): imported before the warm-up, it is in none.
LATE_IMPORTS = ("anyio._backends._asyncio",)


def _import_what_a_run_imports_late() -> None:
    for name in LATE_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True, choices=common.WORKER_VARIANTS)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--workload", default=common.STANDARD, choices=common.WORKER_WORKLOADS)
    parser.add_argument(
        "--quiet-timers",
        action="store_true",
        help="no timed span or metric export: spans at each flush, metrics when asked "
        "(the instructions section, where a kickoff lasts 50-100 times longer)",
    )
    args = parser.parse_args()

    # The protocol gets the real stdout; anything CrewAI prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    storage: str | None = None
    if args.workload == common.FLOW_MEMORY:
        # Memory (LanceDB) and knowledge (Chroma) of this process only: the variants' processes
        # must not share a store (each accumulates the same number of kickoffs' memories).
        storage = tempfile.mkdtemp(prefix="crew-otel-bench-storage-")
        os.environ["CREWAI_STORAGE_DIR"] = storage
    timings: dict[str, float] = {}
    start = time.perf_counter()
    import crewai  # noqa: F401  (after the parent prepared the offline environment)

    timings["import_crewai"] = time.perf_counter() - start
    _import_what_a_run_imports_late()
    # CrewAI warns on every call that it estimates tokens for a non-OpenAI base URL.
    logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)
    pipeline = (
        common.Pipeline(
            metric_interval_millis=QUIET_TIMER_MILLIS,
            schedule_delay_millis=QUIET_TIMER_MILLIS,
            max_queue_size=1_000_000,
        )
        if args.quiet_timers
        else common.Pipeline()
    )
    start = time.perf_counter()
    instrumentation_versions = setup_variant(args.variant, pipeline)
    timings["instrument"] = time.perf_counter() - start
    workload = Workload(args.base_url, pipeline, args.workload)
    if args.variant == common.SDK_FLOOR:
        from benchmarks import floor

        workload.after_kickoff = floor.load(
            os.environ[common.FLOOR_TEMPLATE_ENV],
            pipeline.tracer_provider,
            pipeline.meter_provider,
        )
    elif args.variant == common.SDK_FLOOR_IN_PLACE:
        from benchmarks import floor

        floor.install_in_place(
            os.environ[common.FLOOR_TEMPLATE_ENV],
            pipeline.tracer_provider,
            pipeline.meter_provider,
        )
    send(
        {
            "ready": True,
            "variant": args.variant,
            "pid": os.getpid(),
            "timings": timings,
            "versions": instrumentation_versions,
            "rss": common.rss_bytes(),
            "threads": [thread.name for thread in threading.enumerate()],
        }
    )

    for line in sys.stdin:
        command = json.loads(line)
        op = command.get("op")
        try:
            if op == "run":
                reply = measure(
                    workload,
                    command.get("mode", "threads"),
                    int(command.get("concurrency", 1)),
                    int(command["kickoffs"]),
                )
            elif op == "soak":
                reply = soak(workload, args.variant, int(command["kickoffs"]), command["every"])
            elif op == "profile":
                reply = profile(
                    workload,
                    int(command["kickoffs"]),
                    command["out"],
                    int(command.get("top", 40)),
                    command.get("dump"),
                )
            elif op == "instructions":
                reply = instructions(
                    workload,
                    int(command.get("kickoffs", 0)),
                    str(command["label"]),
                    str(command.get("what", "kickoffs")),
                    int(command.get("concurrency", 1)),
                )
            elif op == "spans":
                exporter = pipeline.span_exporter
                reply = {"spans": exporter.spans, "bytes": exporter.bytes, "names": exporter.names}
            elif op == "exit":
                send({"ok": True})
                break
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception:
            reply = {"error": traceback.format_exc()}
        send(reply)
    pipeline.tracer_provider.shutdown()
    for directory in (workload.directory, storage):
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
