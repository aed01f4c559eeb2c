"""Start-up cost of an instrumentation, in a fresh process: ``python -m benchmarks.startup``.

Imports crewai, sets up the SDK (the export pipeline of the other benchmarks), then times
``import crew_otel`` and ``crew_otel.instrument()`` (or a competitor's instrument calls) and
prints one JSON line. ``--profile FILE`` also writes the cumulative-time profile of the
instrument call. ``--imports`` instead times ``import crew_otel`` alone (nothing imported
before it) and lists the heavy modules it brought in (the SDK, exporters, ``rich``, HTTP
clients: none is expected). The parent prepares the offline environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default=common.CREW_OTEL, choices=common.VARIANTS[1:])
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--imports", action="store_true", help="only `import crew_otel`")
    args = parser.parse_args()
    if args.imports:
        print(json.dumps(imports_of_crew_otel()))
        return

    timings: dict[str, float] = {}
    start = time.perf_counter()
    import crewai  # noqa: F401

    timings["import_crewai"] = time.perf_counter() - start
    pipeline = common.Pipeline()
    start = time.perf_counter()
    if args.variant == common.CREW_OTEL:
        import crew_otel  # noqa: F401
    timings["import_instrumentation"] = time.perf_counter() - start

    from benchmarks.worker import setup_variant

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    setup_variant(args.variant, pipeline)
    timings["instrument"] = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        _write_profile(profiler, args.profile)
    print(json.dumps({"variant": args.variant, **timings}))


#: What ``import crew_otel`` must not import: the instrumentation needs only the API.
HEAVY_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter", "rich", "httpx", "httpcore")


def imports_of_crew_otel() -> dict[str, object]:
    """Time ``import crew_otel`` in this (fresh) process; list the heavy modules it imported."""
    start = time.perf_counter()
    import crew_otel  # noqa: F401

    elapsed = time.perf_counter() - start
    heavy = sorted(
        name
        for name in sys.modules
        if any(name == root or name.startswith(root + ".") for root in HEAVY_MODULES)
    )
    return {"variant": "imports", "import_crew_otel": elapsed, "heavy_modules": heavy}


def _write_profile(profiler: object, path: str) -> None:
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)  # type: ignore[arg-type]
    buffer.write("crew_otel.instrument() after crewai is imported: cumulative time, top 40\n")
    stats.sort_stats("cumulative").print_stats(40)
    buffer.write("\nself time, top 25\n")
    stats.sort_stats("tottime").print_stats(25)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(common.scrub(buffer.getvalue()))


if __name__ == "__main__":
    main()
