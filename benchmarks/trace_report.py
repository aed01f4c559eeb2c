"""``crew-otel report`` on a big trace file: peak memory against the file's size.

``python -m benchmarks.trace_report [--size-mb N ...] [--out DIR]`` (or ``python -m
benchmarks.run --only report``):

1. *record*: a real workload in this process (``crew_otel.instrument()``, the research crew of
   the other benchmarks against ``crew_otel.testing.FakeOpenAIProvider`` on 127.0.0.1, 4 threads
   of kickoffs, each in ``crew_otel.request(...)``, with scripted provider 500s the SDK retries)
   writes its spans with ``OTLPJsonFileExporter`` under a ``BatchSpanProcessor``, as a service
   with ``configure(trace_file=...)`` does;
2. *multiply*: that file is copied until it reaches each size, every copy with fresh trace and
   span IDs, its own request IDs and its times shifted by the recording's duration (the same
   load, continued), so the traces in flight at any time are those of the recording;
3. *measure*: ``crew-otel report FILE --summary-json`` in a fresh process per file, its peak
   RSS (``ru_maxrss`` from ``os.wait4``) and wall time; the same on the recording alone gives the
   fixed cost (interpreter, imports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

#: Sizes measured by default (MB of trace file): the issue's 57.6 MB and 1 GB.
DEFAULT_SIZES_MB = (60, 1000)
QUICK_SIZES_MB = (60,)
REQUEST_ID = "crew_otel.request.id"
OTHER_REQUEST_IDS = "crew_otel.shared_instance.other_request_ids"
KICKOFFS = 24


# --- multiply ------------------------------------------------------------------------------
def _span_time(value: Any, shift: int) -> str:
    return str(int(value) + shift) if value not in (None, "0", 0) else str(value or 0)


def _rename(attributes: Iterable[dict[str, Any]], suffix: str) -> None:
    for item in attributes:
        value = item.get("value") or {}
        if item.get("key") == REQUEST_ID and "stringValue" in value:
            value["stringValue"] += suffix
        elif item.get("key") == OTHER_REQUEST_IDS:
            for entry in (value.get("arrayValue") or {}).get("values", []):
                if "stringValue" in entry and entry["stringValue"] != "unknown":
                    entry["stringValue"] += suffix


def _copy_request(request: dict[str, Any], copy: int, shift: int, ids: _Ids) -> dict[str, Any]:
    suffix = f"~{copy}"
    for resource in request.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                span["traceId"] = ids.trace(span["traceId"])
                span["spanId"] = ids.span(span["spanId"])
                if span.get("parentSpanId"):
                    span["parentSpanId"] = ids.span(span["parentSpanId"])
                for key in ("startTimeUnixNano", "endTimeUnixNano"):
                    span[key] = _span_time(span.get(key), shift)
                _rename(span.get("attributes", []), suffix)
                for event in span.get("events", []):
                    event["timeUnixNano"] = _span_time(event.get("timeUnixNano"), shift)
                    _rename(event.get("attributes", []), suffix)
    return request


class _Ids:
    """Fresh IDs for one copy: the same old ID gets the same new one within the copy."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._map: dict[str, str] = {}

    def trace(self, old: str) -> str:
        return self._map.setdefault(old, f"{self._rng.getrandbits(128):032x}")

    def span(self, old: str) -> str:
        return self._map.setdefault(old, f"{self._rng.getrandbits(64):016x}")


def recording_duration_ns(lines: Sequence[str]) -> int:
    """From the first span start to the last span end of OTLP/JSON ``lines``."""
    starts, ends = [], []
    for line in lines:
        for resource in json.loads(line).get("resourceSpans", []):
            for scope in resource.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    starts.append(int(span["startTimeUnixNano"]))
                    ends.append(int(span["endTimeUnixNano"]))
    return max(ends) - min(starts) if starts else 0


def multiply(lines: Sequence[str], copies: range, shift_ns: int, seed: int = 1) -> Iterator[str]:
    """Copies ``copies`` of OTLP/JSON ``lines`` (one request per line, no newline): copy k is
    shifted by ``k * shift_ns``, with fresh trace and span IDs and request IDs ending ``~k``."""
    rng = random.Random(seed)
    for copy in copies:
        ids = _Ids(rng)
        for line in lines:
            request = _copy_request(json.loads(line), copy, copy * shift_ns, ids)
            yield json.dumps(request, separators=(",", ":"))


def write_multiplied(seed_file: Path, target: Path, size_bytes: int) -> dict[str, Any]:
    """Write copies of ``seed_file`` to ``target`` until it holds at least ``size_bytes``."""
    lines = [line for line in seed_file.read_text(encoding="utf-8").splitlines() if line]
    shift = recording_duration_ns(lines) + 1_000_000_000
    written = spans = copies = 0
    with target.open("w", encoding="utf-8") as handle:
        while written < size_bytes:
            for line in multiply(lines, range(copies, copies + 1), shift, seed=copies + 1):
                handle.write(line + "\n")
                written += len(line) + 1
                spans += line.count('"spanId"')
            copies += 1
    return {"bytes": written, "spans": spans, "copies": copies, "shift_s": shift / 1e9}


# --- record --------------------------------------------------------------------------------
def record(path: Path, kickoffs: int = KICKOFFS) -> dict[str, Any]:
    """Run the workload instrumented, its spans written to ``path`` (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="crew-otel-bench-report-home-") as home:
        return _record(path, kickoffs, home)


def _record(path: Path, kickoffs: int, home: str) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from crew_otel.testing.crews import prepare_offline_environment

    prepare_offline_environment(home)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    import crew_otel
    from crew_otel.otlp_json import OTLPJsonFileExporter
    from crew_otel.testing import FakeOpenAIProvider, Fault
    from crew_otel.testing.crews import make_llm, research_crew

    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench-report", "service.instance.id": "w1"})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPJsonFileExporter(path)))
    crew_otel.instrument(tracer_provider=provider)
    started = time.perf_counter()
    with FakeOpenAIProvider() as fake:

        def run(i: int) -> None:
            if i % 6 == 0:  # a provider 500 the SDK retries: an error origin, recovered
                fake.script(Fault.error(500), key=f"r{i}")
            with crew_otel.request(f"bench-{i:03d}"):
                research_crew(lambda: make_llm(fake.base_url)).kickoff(
                    inputs={"topic": f"[[r{i}]] topic {i}"}
                )

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(run, range(kickoffs)))
    crew_otel.uninstrument()
    provider.shutdown()
    return {"kickoffs": kickoffs, "seconds": time.perf_counter() - started}


# --- measure -------------------------------------------------------------------------------
def measure(trace_file: Path, summary: Path) -> dict[str, Any]:
    """``crew-otel report`` on ``trace_file`` in a fresh process: exit status, peak RSS, time."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "crew_otel.cli.main", "report", str(trace_file)]
    process = subprocess.Popen(
        [*command, "--summary-json", str(summary)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = process.stderr.read().decode("utf-8", "replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    figures = json.loads(summary.read_text())["services"] if summary.exists() else {}
    return {
        "exit_status": process.returncode,
        "stderr": stderr.strip(),
        "file_bytes": trace_file.stat().st_size,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: kilobytes
        "wall_s": elapsed,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "requests": sum(s["requests"] for s in figures.values()),
    }


def run(sizes_mb: Sequence[int], out: Path, keep: bool = False) -> dict[str, Any]:
    """Record, multiply to each size, measure: the results (also ``out/trace-report.json``)."""
    work = Path(tempfile.mkdtemp(prefix="crew-otel-bench-report-"))
    try:
        seed = work / "recorded.jsonl"
        recorded = subprocess.run(
            [sys.executable, "-m", "benchmarks.trace_report", "--record", str(seed)],
            capture_output=True,
            text=True,
            check=True,
        )
        recording = json.loads(recorded.stdout)
        fixed = measure(seed, work / "seed-summary.json")
        results = []
        for size in sizes_mb:
            target = work / f"traces-{size}mb.jsonl"
            generated = write_multiplied(seed, target, size * 1_000_000)
            measured = measure(target, work / f"summary-{size}.json")
            measured.update(
                spans=generated["spans"],
                copies=generated["copies"],
                rss_per_file_byte=measured["peak_rss_bytes"] / measured["file_bytes"],
                above_fixed_per_file_byte=(measured["peak_rss_bytes"] - fixed["peak_rss_bytes"])
                / measured["file_bytes"],
            )
            results.append(measured)
            if not keep:
                target.unlink()
        data = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {common.cpu_model()}",
            "python": platform.python_version(),
            "recording": {**recording, "bytes": seed.stat().st_size},
            "fixed_cost": fixed,
            "files": results,
        }
    finally:
        if not keep:
            for path in work.iterdir():
                path.unlink()
            work.rmdir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace-report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def describe(data: dict[str, Any]) -> str:
    """One line per file: size, spans, peak RSS and its ratio to the file."""
    fixed = data["fixed_cost"]["peak_rss_bytes"] / 1e6
    lines = [
        f"fixed cost (report on the {data['recording']['bytes'] / 1e6:.1f} MB recording): "
        f"{fixed:.0f} MB peak RSS"
    ]
    for item in data["files"]:
        lines.append(
            f"{item['file_bytes'] / 1e6:7.1f} MB, {item['spans']:,} spans, "
            f"{item['requests']:,} requests: peak RSS {item['peak_rss_bytes'] / 1e6:.0f} MB "
            f"({item['rss_per_file_byte']:.2f}x the file), {item['wall_s']:.0f} s, "
            f"exit {item['exit_status']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_report", description=__doc__)
    parser.add_argument("--size-mb", type=int, nargs="+", default=list(DEFAULT_SIZES_MB))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record is not None:
        print(json.dumps(record(args.record)))
        return 0
    print(describe(run(args.size_mb, args.out, keep=args.keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
