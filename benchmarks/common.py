"""What every benchmark process shares: the export pipeline, RSS, versions and path scrubbing.

Nothing here imports crewai: the offline environment must be in place before that happens.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEPS_DIR = BENCH_DIR / ".deps"

#: The variants of the end-to-end comparison, in the order they are reported.
BASELINE = "baseline"
CREW_OTEL = "crew_otel"
OPENINFERENCE = "openinference"
OPENLLMETRY = "openllmetry"
#: The uninstrumented kickoff, then crew_otel's spans and metric points of one kickoff made
#: again with the bare SDK (see :mod:`benchmarks.floor`).
SDK_FLOOR = "sdk_floor"
#: The same spans and points made by the bare SDK where a run makes them, one at a time (the
#: end-to-end and instructions sections; :class:`benchmarks.floor.InPlace`).
SDK_FLOOR_IN_PLACE = "sdk_floor_in_place"
VARIANTS = (BASELINE, CREW_OTEL, SDK_FLOOR, SDK_FLOOR_IN_PLACE, OPENINFERENCE, OPENLLMETRY)
LABELS = {
    BASELINE: "no instrumentation",
    CREW_OTEL: "crew_otel",
    SDK_FLOOR: "SDK floor (crew_otel's spans and points, bare SDK)",
    SDK_FLOOR_IN_PLACE: "SDK floor in place (the same, made where the run makes them)",
    OPENINFERENCE: "OpenInference",
    OPENLLMETRY: "OpenLLMetry",
}
#: crew_otel with ``detect_shared_instances=False`` (the shared-state detectors' benchmark).
CREW_OTEL_NO_DETECT = "crew_otel_detect_off"
WORKER_VARIANTS = (*VARIANTS, CREW_OTEL_NO_DETECT)
#: The environment variable naming the span model's template (:func:`benchmarks.floor.capture`).
FLOOR_TEMPLATE_ENV = "CREW_OTEL_BENCH_FLOOR_TEMPLATE"

#: The workloads a worker can run: ``research_crew`` as is, or with a tool doing file and
#: SQLite I/O (a per-request file and a per-request database file).
STANDARD = "standard"
IO = "io"
WORKLOADS = (STANDARD, IO)
#: A Flow (start -> router -> listen) whose listen step kicks off ``research_crew`` with
#: ``memory=True`` and a knowledge source, embeddings served by the loopback provider
#: (the ``flow-memory`` section; not part of the shared-state section's workloads).
FLOW_MEMORY = "flow-memory"
WORKER_WORKLOADS = (*WORKLOADS, FLOW_MEMORY)

#: Other processes using more cores than QUIET make the machine "busy": a round waits until
#: they use less (within the run's budget); rounds measured while they used more than
#: DISTURBED are left out of the statistics when enough quiet rounds remain.
QUIET = 0.15
DISTURBED = 0.25

#: The inputs of every benchmark kickoff.
INPUTS = {"topic": "observability"}


# --- the export pipeline: BatchSpanProcessor + OTLP protobuf serialisation, then discard ------
def _sdk_export_types() -> tuple[Any, Any, Any, Any]:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    return SpanExporter, SpanExportResult, MetricExporter, MetricExportResult


def make_span_exporter() -> Any:
    """A span exporter that encodes each batch to OTLP protobuf bytes and drops them.

    It does everything an OTLP exporter does except the network write, so serialisation cost
    is part of what is measured. It counts spans and bytes.
    """
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    span_exporter_base, result, _, _ = _sdk_export_types()

    class DiscardingOtlpSpanExporter(span_exporter_base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            self.spans = 0
            self.bytes = 0
            self.names: dict[str, int] = {}
            self._lock = threading.Lock()

        def export(self, spans: Sequence[Any]) -> Any:
            data = encode_spans(spans).SerializeToString()
            with self._lock:
                self.spans += len(spans)
                self.bytes += len(data)
                for span in spans:
                    self.names[span.name] = self.names.get(span.name, 0) + 1
            return result.SUCCESS

        def shutdown(self) -> None:
            return None

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return DiscardingOtlpSpanExporter()


def make_metric_exporter() -> Any:
    """A metric exporter that encodes to OTLP protobuf bytes and drops them."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    _, _, metric_exporter_base, result = _sdk_export_types()

    class DiscardingOtlpMetricExporter(metric_exporter_base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            self.bytes += len(encode_metrics(metrics_data).SerializeToString())
            return result.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            return None

    return DiscardingOtlpMetricExporter()


class Pipeline:
    """An SDK TracerProvider (BatchSpanProcessor -> OTLP encode -> discard) and MeterProvider."""

    def __init__(
        self,
        set_global: bool = True,
        metric_interval_millis: float | None = None,
        **batch_options: Any,
    ) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": "crew-otel-benchmark"})
        self.span_exporter = make_span_exporter()
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(self.span_exporter, **batch_options)
        )
        self.metric_exporter = make_metric_exporter()
        # The SDK's default export interval (60 s): metrics cost what they cost in production.
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=[
                PeriodicExportingMetricReader(
                    self.metric_exporter, export_interval_millis=metric_interval_millis
                )
            ],
        )
        if set_global:
            trace.set_tracer_provider(self.tracer_provider)
            metrics.set_meter_provider(self.meter_provider)

    def flush(self) -> None:
        """Export every finished span now (the caller decides whether that is timed)."""
        self.tracer_provider.force_flush()


# --- instruction windows (callgrind) --------------------------------------------------------
def full_collections(window: dict[str, Any]) -> int:
    """Full (generation 2) garbage collections during one measured window."""
    collections = window.get("gc_collections") or []
    return int(collections[2]) if len(collections) > 2 else 0


def representative_window(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The window that stands for a process: the longest without a full garbage collection
    (which walks the whole heap), the lowest of those; every window if each had one."""
    clean = [w for w in windows if not full_collections(w)] or list(windows)
    return max(clean, key=lambda w: (w["kickoffs"], -w["per_kickoff"]))


# --- process facts ---------------------------------------------------------------------------
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS tracks live memory, not caches."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU the whole machine was busy (and stolen by the hypervisor) since boot,
    and what this process and its waited-for children used."""
    import resource

    busy = steal = 0.0
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        busy = (user + nice + system + irq + softirq) / tick
        steal = (fields[7] if len(fields) > 7 else 0) / tick
    except (OSError, ValueError, IndexError):
        pass
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return {"busy": busy, "steal": steal, "own": own, "wall": time.monotonic()}


def machine_load(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """CPU used by processes other than the benchmark's, between two :func:`machine_cpu`."""
    wall = end["wall"] - start["wall"]
    other = max(end["busy"] - start["busy"] - (end["own"] - start["own"]), 0.0)
    cores = os.cpu_count() or 1
    return {
        "wall_s": round(wall, 1),
        "benchmark_cpu_s": round(end["own"] - start["own"], 1),
        "other_cpu_s": round(other, 1),
        "other_share_of_machine": round(other / (wall * cores), 4) if wall else 0.0,
        "steal_s": round(end["steal"] - start["steal"], 1),
    }


# --- other processes on the machine ---------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float:
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / _TICK


def _tree_seconds(root: int) -> float:
    """CPU seconds used so far by ``root``, its live descendants and every process they
    have waited for (``cutime``/``cstime``: a pyperf worker or a probe that has exited)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        used[pid] = sum(int(x) for x in fields[11:15]) / _TICK
    total = 0.0
    for pid, seconds in used.items():
        ancestor, hops = pid, 0
        while ancestor not in (0, 1, root) and hops < 64:
            ancestor, hops = parents.get(ancestor, 0), hops + 1
        if ancestor == root:
            total += seconds
    return total


class Interference:
    """How busy the machine is with processes that are not this benchmark's.

    ``sample()`` returns a token; ``other_cores(a, b)`` is the average number of cores other
    processes used between two tokens (machine busy time minus this process tree's). Works
    where /proc exists; elsewhere it reports 0.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root if root is not None else os.getpid()
        self.available = os.path.exists("/proc/stat")

    def sample(self) -> tuple[float, float, float]:
        if not self.available:
            return (0.0, 0.0, time.monotonic())
        return (_busy_seconds(), _tree_seconds(self.root), time.monotonic())

    @staticmethod
    def other_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
        elapsed = end[2] - start[2]
        if elapsed <= 0:
            return 0.0
        other = (end[0] - start[0]) - (end[1] - start[1])
        return max(other, 0.0) / elapsed

    def wait_until_quiet(self, threshold: float, max_wait: float) -> tuple[float, float]:
        """Wait (1 s windows) until other processes use under ``threshold`` cores, at most
        ``max_wait`` seconds; returns (seconds waited, last measured other cores)."""
        started = time.monotonic()
        while True:
            before = self.sample()
            time.sleep(1.0)
            cores = self.other_cores(before, self.sample())
            waited = time.monotonic() - started
            if cores < threshold or waited >= max_wait:
                return waited, cores


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


CORE_DISTRIBUTIONS = (
    "crew-otel",
    "crewai",
    "openai",
    "httpx",
    "wrapt",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-httpx",
    "opentelemetry-instrumentation-threading",
    "opentelemetry-exporter-otlp-proto-common",
    "pyperf",
)


def versions(names: Iterable[str] = CORE_DISTRIBUTIONS) -> dict[str, str | None]:
    return {name: version_of(name) for name in names}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def system_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


# --- keeping this machine's paths out of the results ----------------------------------------
def _login_home() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return os.path.expanduser("~")


def _path_replacements() -> list[tuple[str, str]]:
    pairs = [
        (str(REPO_ROOT), "<repo>"),
        (os.path.realpath(REPO_ROOT), "<repo>"),
        (sys.prefix, "<venv>"),
        (os.path.realpath(sys.prefix), "<venv>"),
        (sys.base_prefix, "<python>"),
        (os.path.realpath(sys.base_prefix), "<python>"),
        (tempfile.gettempdir(), "<tmp>"),
        (_login_home(), "<home>"),
    ]
    for key in ("HOME", "XDG_DATA_HOME", "PYTHONPYCACHEPREFIX"):
        value = os.environ.get(key)
        if value:
            pairs.append((value, f"<{key.lower()}>"))
    for entry in sys.path:
        if entry and os.path.isabs(entry) and "site-packages" in entry:
            pairs.append((entry, "<site-packages>"))
    # longest first, so that a prefix never hides a longer match
    return sorted({p for p in pairs if len(p[0]) > 1}, key=lambda p: -len(p[0]))


def scrub(text: str) -> str:
    """Replace this machine's paths (repo, interpreter, temp dirs, home) with placeholders.

    A path is replaced only where it is a whole path or a directory prefix, never inside a
    longer name.
    """
    for path, placeholder in _path_replacements():
        pattern = re.escape(path) + r"(?=[/\\\s\"'`:;,)\]}>]|$)"
        text = re.sub(pattern, lambda _match, p=placeholder: p, text, flags=re.MULTILINE)
    return text


def scrub_tree(directory: Path) -> None:
    """Scrub every text file under ``directory`` in place."""
    for path in directory.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".txt", ".md", ".log", ".csv"}:
            text = path.read_text(encoding="utf-8", errors="replace")
            cleaned = scrub(text)
            if cleaned != text:
                path.write_text(cleaned, encoding="utf-8")


def overlay_env(env: dict[str, str], *directories: Path) -> dict[str, str]:
    """``env`` with ``directories`` prepended to PYTHONPATH (and the repo root, for -m)."""
    parts = [str(d) for d in directories] + [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}
