"""The results table (Markdown) from the raw files of one run: ``python -m benchmarks.report``.

``python -m benchmarks.report [DIR]`` re-renders ``summary.md`` from ``DIR``
(default ``benchmarks/results``) without running anything.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common, detectors
from benchmarks.hooks import FLOORS, HOOKS

# The targets the benchmarks are compared with.
TARGET_E2E_RATIO = 1.03
TARGET_HOOK_RATIO = 1.5
TARGET_INSTRUMENT_S = 0.050
#: Shared-state detectors on vs off, end to end; and outside runs, per operation.
TARGET_DETECTORS_RATIO = 1.01

_FLOOR = "SDK span"
_BARE = "bare call"


# --- loading -------------------------------------------------------------------------------------
def load_hooks(path: Path) -> dict[str, Any]:
    """{name: {"median": s, "values": n, "spans_per_call": x}} from pyperf's or smoke output."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("mode") == "smoke":
        return {
            name: {
                "median": entry["value"],
                "values": 1,
                "spans_per_call": entry["spans_per_call"],
                "tool": "smoke (one timing, no pyperf)",
            }
            for name, entry in data["benchmarks"].items()
        }
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(path))
    result = {}
    for bench in suite.get_benchmarks():
        spans = bench.get_metadata().get("spans_per_call")
        if spans is None:  # per-run metadata
            runs = [run for run in bench.get_runs() if "spans_per_call" in run.get_metadata()]
            spans = runs[0].get_metadata()["spans_per_call"] if runs else None
        result[bench.get_name()] = {
            "median": bench.median(),
            "stdev": bench.stdev() if bench.get_nvalue() > 1 else 0.0,
            "values": bench.get_nvalue(),
            "processes": bench.get_nrun(),
            "spans_per_call": spans,
            "tool": "pyperf",
        }
    return result


def load_detectors(path: Path) -> dict[str, Any]:
    """{name: {"median": s, "stdev": s, "values": n}} from pyperf's or smoke output."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("mode") == "smoke":
        return {
            name: {"median": entry["value"], "stdev": 0.0, "values": 1, "tool": "smoke"}
            for name, entry in data["benchmarks"].items()
        }
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(path))
    return {
        bench.get_name(): {
            "median": bench.median(),
            "stdev": bench.stdev() if bench.get_nvalue() > 1 else 0.0,
            "values": bench.get_nvalue(),
            "processes": bench.get_nrun(),
            "tool": "pyperf",
        }
        for bench in suite.get_benchmarks()
    }


def _read(directory: Path, name: str) -> Any:
    path = directory / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _soak_file(directory: Path) -> Any:
    files = sorted(
        directory.glob("soak-*.json"), key=lambda p: int(p.stem.split("-")[1]), reverse=True
    )
    return json.loads(files[0].read_text(encoding="utf-8")) if files else None


# --- statistics ----------------------------------------------------------------------------------
def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def paired_ratios(rows: list[dict[str, Any]], variant: str, metric: str, key: tuple[str, ...]):
    """Ratio variant/baseline of ``metric`` for each group of ``key`` (same round)."""
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in key), {})[row["variant"]] = row[metric]
    return [
        g[variant] / g[common.BASELINE]
        for g in groups.values()
        if variant in g and common.BASELINE in g
    ]


def quiet_rows(
    rows: list[dict[str, Any]], key: tuple[str, ...]
) -> tuple[list[dict[str, Any]], int, int]:
    """Rows of the groups (rounds) in which other processes stayed under DISTURBED cores.

    Falls back to every row when fewer than half of the groups were quiet. Returns (rows,
    groups set aside, groups in all).
    """
    worst: dict[tuple[Any, ...], float] = {}
    for row in rows:
        group = tuple(row[k] for k in key)
        worst[group] = max(worst.get(group, 0.0), row.get("other_cores", 0.0))
    quiet = {group for group, cores in worst.items() if cores <= common.DISTURBED}
    if len(quiet) * 2 < len(worst):
        return rows, 0, len(worst)
    kept = [row for row in rows if tuple(row[k] for k in key) in quiet]
    return kept, len(worst) - len(quiet), len(worst)


def _set_aside(dropped: int, total: int) -> str:
    if not dropped:
        return ""
    return (
        f" {dropped} of {total} rounds, measured while other processes on the machine used "
        f"more than {common.DISTURBED} cores, are left out."
    )


def median_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """A distribution-free 95 % confidence interval of the median (order statistics at
    n/2 ± 0.98 √n), or None for fewer than 6 values."""
    n = len(values)
    if n < 6:
        return None
    ordered = sorted(values)
    half = 0.98 * n**0.5
    low = max(int(n / 2 - half), 0)
    high = min(int(n / 2 + half + 0.999999), n - 1)
    return ordered[low], ordered[high]


def _fmt_ratio(ratios: Sequence[float]) -> str:
    if not ratios:
        return "n/a"
    low, high = _quartiles(ratios)
    median = statistics.median(ratios)
    if len(ratios) < 2:
        return f"{median:.3f}"
    return f"{median:.3f} ({low:.3f}-{high:.3f})"


def _status(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "met" if ok else "**missed**"


# --- rendering -----------------------------------------------------------------------------------
def render(directory: Path, system: dict[str, Any] | None = None) -> str:
    system = system or _read(directory, "system.json") or {}
    hooks_path = directory / "hooks.json"
    if not hooks_path.is_file():
        hooks_path = directory / "hooks-smoke.json"
    hooks = load_hooks(hooks_path) if hooks_path.is_file() else None
    hooks_other = (_read(directory, "hooks-interference.json") or {}).get("other_cores", 0.0)
    e2e = _read(directory, "e2e-raw.json")
    flow = _read(directory, "flow-memory-raw.json")
    concurrency = _read(directory, "concurrency.json")
    soak = _soak_file(directory)
    startup = _read(directory, "startup.json")
    profile = _read(directory, "profile.json")
    shared = _read(directory, "shared-state-raw.json")
    detectors_path = directory / "detectors.json"
    if not detectors_path.is_file():
        detectors_path = directory / "detectors-smoke.json"
    outside = load_detectors(detectors_path) if detectors_path.is_file() else None
    outside_other = (_read(directory, "detectors-interference.json") or {}).get("other_cores", 0.0)
    counted = _read(directory, detectors.instructions_path(detectors_path).name)
    outside_counts = counted.get("per_operation") if counted else None

    targets: list[tuple[str, str, str]] = []
    sections: list[str] = []

    e2e_lines, e2e_targets = _render_e2e(e2e)
    targets += e2e_targets
    flow_lines, flow_targets = _render_flow_memory(flow)
    targets += flow_targets
    hook_lines, hook_targets = _render_hooks(
        hooks, hooks_other, _read(directory, "hooks-cold.json")
    )
    targets += hook_targets
    conc_lines, conc_targets = _render_concurrency(concurrency)
    targets += conc_targets
    soak_lines, soak_targets = _render_soak(soak)
    targets += soak_targets
    start_lines, start_targets = _render_startup(startup)
    targets += start_targets
    shared_lines, shared_targets = _render_shared_state(
        shared, outside, outside_other, outside_counts
    )
    targets += shared_targets
    instructions = _read(directory, "instructions.json")
    instruction_lines = _render_instructions(instructions)
    targets[len(e2e_targets) : len(e2e_targets)] = _instruction_targets(instructions)
    for block in (
        e2e_lines,
        flow_lines,
        hook_lines,
        conc_lines,
        soak_lines,
        start_lines,
        shared_lines,
        instruction_lines,
    ):
        if block:
            sections.append("\n".join(block))
    if profile:
        sections.append(
            f"cProfile of {profile['kickoffs']} instrumented kickoffs: crew_otel's own code "
            f"(self time) is {profile['crew_otel_self_us_per_kickoff']:.0f} µs per kickoff, "
            f"{100 * profile['crew_otel_share_of_cpu']:.2f} % of the process CPU under the "
            "profiler; the hot spots are in `profile.txt`."
        )

    versions = system.get("versions", {})
    competitor_versions = _competitor_versions(e2e)
    header = [
        "## Performance",
        "",
        f"Measured on {system.get('cpu_model', '?')} "
        f"({system.get('cpu_count', '?')} cores), Python {system.get('python', '?')}, "
        f"crewai {versions.get('crewai', '?')}, OpenTelemetry SDK "
        f"{versions.get('opentelemetry-sdk', '?')}, crew_otel {versions.get('crew-otel', '?')}"
        + (f"; {competitor_versions}" if competitor_versions else "")
        + ". Each section as its latest run measured it: "
        + "; ".join(
            f"{section} {run.get('date', '?')[:16].replace('T', ' ')} UTC "
            f"(`{run.get('command', 'python -m benchmarks.run')}`, "
            f"{run.get('runtime_s', 0) / 60:.0f} min)"
            for section, run in _latest_run_of_each_section(system)
        )
        + "; method and raw data in [`benchmarks/`](benchmarks/README.md).",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *[f"| {target} | {measured} | {status} |" for target, measured, status in targets],
    ]
    latest_run = (system, *system.get("additional_runs", []))[-1]
    load = latest_run.get("machine_load")
    if load:
        header += [
            "",
            f"During the latest run (`{latest_run.get('command', '?')}`), processes other than "
            "the benchmark's used "
            f"{100 * load['other_share_of_machine']:.1f} % of the machine's CPU "
            f"({load['other_cpu_s']:.0f} s); the hypervisor took {load['steal_s']:.0f} s.",
        ]
    if system.get("skipped"):
        header += [
            "",
            "Not measured: " + "; ".join(f"{k}: {v}" for k, v in system["skipped"].items()),
        ]
    return "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"


def _render_instructions(data: Any) -> list[str]:
    """Executed instructions per kickoff (callgrind), per variant and window length."""
    if not data or not data.get("variants"):
        return []
    variants = data["variants"]
    windows = [w["kickoffs"] for w in next(iter(variants.values()))["windows"]]
    base = variants.get("baseline")
    lines = [
        "Executed instructions per kickoff (callgrind, every thread, "
        f"{data['settings']['timers']} export timers; `instructions.json`; added: each "
        "variant's representative window (the longest without a full collection, the lowest "
        "of those; the median process's when several ran) against the uninstrumented one's, "
        "as in the targets above):",
        "",
        "| variant | spans | "
        + " | ".join(f"M instructions, {k} kickoffs" for k in windows)
        + " | added | of which span export |",
        "|---|---|" + "---|" * len(windows) + "---|---|",
    ]
    for variant in common.VARIANTS:
        entry = variants.get(variant)
        if entry is None:
            continue
        ours = _added(data, variant) if base and variant != common.BASELINE else None
        added = f"+{ours[0] / 1e6:.1f} M ({ours[1]:.3f} x)" if ours else ""
        export = entry["windows"][-1].get("span_export_per_kickoff", 0.0) / 1e6
        lines.append(
            f"| {common.LABELS[variant]} | {entry['windows'][-1]['spans_per_kickoff']:.0f} | "
            + " | ".join(
                f"{w['per_kickoff'] / 1e6:.1f}" + ("*" if common.full_collections(w) else "")
                for w in entry["windows"]
            )
            + f" | {added} | {export:.1f} M |"
        )
    spread = [
        f"{common.LABELS[v]} "
        + ", ".join(
            f"{common.representative_window(p['windows'])['per_kickoff'] / 1e6:.1f}"
            for p in e["processes"]
        )
        for v, e in variants.items()
        if e.get("processes") and v in common.LABELS
    ]
    if spread:
        lines += [
            "",
            f"Each variant ran in {data['settings'].get('processes_per_variant')} callgrind "
            "processes; the table shows the median one (by its representative window). Every "
            "process's, M instructions per kickoff: " + "; ".join(spread) + ".",
        ]
    lines += [
        "",
        "\\* the window contained a full (generation 2) garbage collection, which walks the "
        "whole heap: "
        + ", ".join(
            f"{common.LABELS[v]} {e['full_gc'] / 1e6:.0f} M"
            for v, e in variants.items()
            if "full_gc" in e and v in common.LABELS
        )
        + " instructions each when forced.",
    ]
    detectors = data.get("detectors")
    if detectors and detectors.get("per_kickoff", {}).get("all_on"):
        counts = detectors["per_kickoff"]
        on = counts["all_on"]
        lines += [
            "",
            f"Detectors, {detectors['kickoffs']} kickoffs {detectors['concurrency']} at a time "
            "(crew_otel, every detector on against one switched off): "
            + ", ".join(
                f"{name.removesuffix('_off').replace('_', ' ')} "
                f"{(on - counts[name]) / 1e6:+.2f} M per kickoff ({on / counts[name]:.4f} x)"
                for name in ("crosstalk_off", "shared_instances_off")
                if counts.get(name)
            )
            + ".",
        ]
    return lines + _render_hook_breakdown(data.get("hooks"))


def _added(data: Any, variant: str) -> tuple[float, float, float] | None:
    """(added instructions per kickoff, ratio, spans per kickoff) of ``variant`` against
    uninstrumented, span export included, over each one's representative window
    (:func:`benchmarks.common.representative_window`; the median process's when several
    processes ran per variant); None if not measured."""
    variants = (data or {}).get("variants", {})
    if variant not in variants or common.BASELINE not in variants:
        return None

    def total(entry: dict[str, Any]) -> tuple[float, float]:
        # With several processes per variant, ``windows`` are the median process's.
        window = common.representative_window(entry["windows"])
        return window["per_kickoff"], window.get("spans_per_kickoff", 0.0)

    base, _ = total(variants[common.BASELINE])
    mine, spans = total(variants[variant])
    return mine - base, mine / base, spans


#: The SDK floors in the instruction targets: (variant, what its row says it is).
_FLOOR_INSTRUCTION_ROWS = (
    (
        common.SDK_FLOOR,
        "the SDK floor in instructions (crew_otel's spans and points, bare SDK, in a burst)",
    ),
    (
        common.SDK_FLOOR_IN_PLACE,
        "the SDK floor in place in instructions (the same, made around the calls crew_otel wraps)",
    ),
)


def _instruction_targets(data: Any) -> list[tuple[str, str, str]]:
    """Executed instructions beside the CPU-time targets: they resolve what CPU time on a
    shared machine cannot."""
    ours = _added(data, common.CREW_OTEL)
    if ours is None:
        return [("end-to-end instructions per kickoff (callgrind)", "-", _status(None))]
    added, ratio, spans = ours
    targets = [
        (
            f"end-to-end instructions per kickoff ≤ {TARGET_E2E_RATIO} x uninstrumented "
            "(span export included)",
            f"{ratio:.3f} x (+{added / 1e6:.1f} M, {spans:.0f} spans)",
            _status(ratio <= TARGET_E2E_RATIO),
        )
    ]
    for variant, what in _FLOOR_INSTRUCTION_ROWS:
        floor = _added(data, variant)
        if floor is not None:
            targets.append(
                (
                    what,
                    f"+{floor[0] / 1e6:.1f} M ({floor[1]:.3f} x, {floor[2]:.0f} spans); "
                    f"crew_otel's own code on top: +{(added - floor[0]) / 1e6:.1f} M",
                    "information",
                )
            )
    theirs = _added(data, common.OPENLLMETRY)
    if theirs is not None:
        targets.append(
            (
                "added instructions per kickoff ≤ OpenLLMetry's",
                f"crew_otel +{added / 1e6:.1f} M ({spans:.0f} spans); OpenLLMetry "
                f"+{theirs[0] / 1e6:.1f} M ({theirs[2]:.0f} spans)",
                _status(added <= theirs[0]),
            )
        )
    return targets


def _render_hook_breakdown(hooks: Any) -> list[str]:
    """Instructions per hook call: wrapt, the SDK's own work for the same spans, crew_otel."""
    breakdown = (hooks or {}).get("breakdown")
    if not breakdown:
        return []
    lines = [
        "",
        f"Instructions per hook call ({hooks['calls']} calls per window, net of a plain "
        "method call, span export included): wrapt's pass-through wrapper; the SDK floor, the "
        "same spans (names, attributes, events, status) made by the bare SDK; crew_otel's own, "
        "the rest (its Python, context attach/detach, its metric points: one duration point "
        f"costs {hooks.get('histogram_point', 0.0) / 1e3:.0f} k in the SDK).",
        "",
        "| hook | k instructions | wrapt | SDK floor | crew_otel's own |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in breakdown.items():
        lines.append(
            f"| {name} | {entry['net_per_call'] / 1e3:.0f} | {entry['wrapt'] / 1e3:.0f} | "
            f"{entry['sdk_floor'] / 1e3:.0f} | {entry['crew_otel'] / 1e3:.0f} |"
        )
    return lines


def _latest_run_of_each_section(system: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(section, the run that last measured it), in the order the sections were first run:
    the full run's record and each ``--only`` run added to it (``additional_runs``)."""
    latest: dict[str, dict[str, Any]] = {}
    for run in (system, *system.get("additional_runs", [])):
        for section in run.get("sections", []):
            latest[section] = run
    return list(latest.items())


def _competitor_versions(e2e: Any) -> str:
    if not e2e:
        return ""
    parts = []
    for variant in (common.OPENINFERENCE, common.OPENLLMETRY):
        workers = e2e.get("workers", {}).get(variant)
        if workers:
            packages = workers[0].get("versions", {})
            parts.append(
                f"{common.LABELS[variant]}: "
                + ", ".join(f"{name} {version}" for name, version in packages.items())
            )
    return "; ".join(parts)


def _render_e2e(e2e: Any) -> tuple[list[str], list[tuple[str, str, str]]]:
    if not e2e:
        return [], [(f"end-to-end CPU ≤ {TARGET_E2E_RATIO} x uninstrumented", "-", _status(None))]
    rows, dropped, total = quiet_rows(e2e["rounds"], ("block", "round"))
    variants = [v for v in common.VARIANTS if any(r["variant"] == v for r in rows)]
    settings = e2e["settings"]
    n_rounds = settings["blocks"] * settings["rounds_per_block"]
    lines = [
        f"**End to end**: one kickoff of a new 2-agent, 2-task crew with a tool (3 model calls "
        f"to a loopback provider in another process), sequential; {n_rounds} interleaved rounds "
        f"of {settings['kickoffs_per_round']} kickoffs per variant, each variant in its own "
        "process; BatchSpanProcessor + OTLP protobuf encoding (discarded) inside the timing. "
        "Ratios: median of the per-round ratios to the uninstrumented run of the same round "
        "(interquartile range)." + _set_aside(dropped, total),
        "",
        "| | CPU ms / kickoff | Δ CPU ms | CPU vs none | wall ms / kickoff | wall vs none "
        "| spans / kickoff | OTLP kB / kickoff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, float] = {}
    cpu_ratios: dict[str, list[float]] = {}
    base_cpu = statistics.median(r["cpu"] for r in rows if r["variant"] == common.BASELINE)
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        cpu = statistics.median(r["cpu"] for r in mine)
        wall = statistics.median(r["wall"] for r in mine)
        medians[variant] = cpu
        cpu_ratios[variant] = paired_ratios(rows, variant, "cpu", ("block", "round"))
        wall_ratios = paired_ratios(rows, variant, "wall", ("block", "round"))
        spans = statistics.median(r["spans"] for r in mine)
        otlp = statistics.median(r["otlp_bytes"] for r in mine) / 1000
        base = variant == common.BASELINE
        delta = "" if base else f"{(cpu - base_cpu) * 1e3:+.1f}"
        lines.append(
            f"| {common.LABELS[variant]} | {cpu * 1e3:.1f} | {delta} | "
            f"{'1' if base else _fmt_ratio(cpu_ratios[variant])} | {wall * 1e3:.1f} | "
            f"{'1' if base else _fmt_ratio(wall_ratios)} | {spans:.0f} | {otlp:.1f} |"
        )
    lines += _render_threads(rows, variants)
    lines += _render_process(rows, variants)
    targets = []
    ours = cpu_ratios.get(common.CREW_OTEL)
    if ours:
        ratio = statistics.median(ours)
        delta = (medians[common.CREW_OTEL] - medians[common.BASELINE]) * 1e3
        ci = median_ci(ours)
        ci_text = f"; 95 % CI of the median {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
        targets.append(
            (
                f"end-to-end CPU per kickoff ≤ {TARGET_E2E_RATIO} x uninstrumented",
                f"{ratio:.3f} x ({delta:+.1f} ms per kickoff{ci_text}), {len(ours)} rounds",
                _ci_status(ratio, ci, TARGET_E2E_RATIO),
            )
        )
        for floor_variant, what in _FLOOR_ROWS:
            floor = cpu_ratios.get(floor_variant)
            if not floor:
                continue
            floor_ci = median_ci(floor)
            floor_delta = (medians[floor_variant] - medians[common.BASELINE]) * 1e3
            targets.append(
                (
                    what,
                    f"{statistics.median(floor):.3f} x ({floor_delta:+.1f} ms per kickoff"
                    + (f"; 95 % CI {floor_ci[0]:.3f}-{floor_ci[1]:.3f}" if floor_ci else "")
                    + f"); crew_otel's own code on top: {delta - floor_delta:+.1f} ms",
                    "information",
                )
            )
        competitors = [v for v in (common.OPENINFERENCE, common.OPENLLMETRY) if v in cpu_ratios]
        if competitors:
            theirs = ", ".join(
                f"{common.LABELS[v]} {statistics.median(cpu_ratios[v]):.3f} x" for v in competitors
            )
            below = all(ratio < statistics.median(cpu_ratios[v]) for v in competitors)
            low, high = _quartiles(ours)
            overlap = all(low <= statistics.median(cpu_ratios[v]) <= high for v in competitors)
            targets.append(
                (
                    "end-to-end CPU below both competitors",
                    f"crew_otel {ratio:.3f} x; {theirs}"
                    + ("" if len(competitors) == 2 else " (one competitor not measured)")
                    + (
                        " (their medians lie within crew_otel's interquartile range)"
                        if overlap
                        else ""
                    ),
                    _status(below if len(competitors) == 2 else None),
                )
            )
    return lines, targets


def _ci_status(median: float, ci: tuple[float, float] | None, target: float) -> str:
    """Met when the confidence interval of the median lies at or under the target, missed
    when it lies above, otherwise not resolved (by CPU time alone)."""
    if ci is None:
        return _status(median <= target)
    if ci[1] <= target:
        return "met"
    if ci[0] > target:
        return "**missed**"
    return "not resolved by CPU time (its CI spans the target; see instructions)"


def _render_threads(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    """CPU per kickoff by thread role (medians over the rounds), where rounds recorded it."""
    measured = [r for r in rows if r.get("cpu_by_thread")]
    if not measured or common.BASELINE not in {r["variant"] for r in measured}:
        return []
    roles: list[str] = []
    for row in measured:
        roles += [role for role in row["cpu_by_thread"] if role not in roles]
    shown = [v for v in variants if any(r["variant"] == v for r in measured)]

    def median_of(variant: str, role: str) -> float:
        values = [r["cpu_by_thread"].get(role, 0.0) for r in measured if r["variant"] == variant]
        return statistics.median(values) if values else 0.0

    lines = [
        "",
        "CPU per kickoff by thread (medians of the rounds; per-thread CPU clocks of the threads "
        "alive at the end of a round, the rest of the process's CPU is the threads that ended "
        "during it: CrewAI's agent-step workers):",
        "",
        "| thread | " + " | ".join(f"{common.LABELS[v]} ms" for v in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    base = {role: median_of(common.BASELINE, role) for role in roles}
    for role in roles:
        cells = []
        for variant in shown:
            value = median_of(variant, role)
            delta = "" if variant == common.BASELINE else f" ({(value - base[role]) * 1e3:+.1f})"
            cells.append(f"{value * 1e3:.1f}{delta}")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return lines


#: The process counters of the end-to-end rounds: (key, index or None, label, decimals, unit
#: scale). Means over the rounds: collections of the older generations are rare events.
_PROCESS_COUNTERS: tuple[tuple[str, int | None, str, int, float], ...] = (
    ("user", None, "CPU in user space (every thread), ms", 2, 1e3),
    ("sys", None, "CPU in the kernel (system calls, page faults), ms", 2, 1e3),
    ("gc_collections", 0, "collections of generation 0", 2, 1.0),
    ("gc_collections", 1, "collections of generation 1", 3, 1.0),
    ("gc_collections", 2, "full collections (generation 2)", 4, 1.0),
    ("gc_cpu", None, "CPU in the collector, ms", 2, 1e3),
    ("gc_collected", None, "objects the collector freed", 0, 1.0),
    ("minor_faults", None, "minor page faults", 0, 1.0),
    ("voluntary_switches", None, "voluntary context switches", 1, 1.0),
    ("involuntary_switches", None, "involuntary context switches", 1, 1.0),
)


def _render_process(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    """Per kickoff: the garbage collector's work and the kernel's page faults and context
    switches (means over the rounds), where rounds recorded them."""
    measured = [r for r in rows if r.get("process")]
    shown = [v for v in variants if any(r["variant"] == v for r in measured)]
    if common.BASELINE not in shown:
        return []

    def mean_of(variant: str, key: str, index: int | None) -> float | None:
        # user and kernel CPU are the round's own, the rest its counters.
        values = [r["process"].get(key, r.get(key)) for r in measured if r["variant"] == variant]
        if any(v is None for v in values):
            return None  # rounds from before the benchmark recorded it
        picked = [v[index] if index is not None else v for v in values]
        return statistics.fmean(picked)

    lines = [
        "",
        "Where the CPU went and what the garbage collector and the kernel did, per kickoff "
        "(means of the rounds; the collector's CPU is part of the CPU above, measured in the "
        "thread that collected; kernel CPU is time instruction counts do not show):",
        "",
        "| per kickoff | " + " | ".join(common.LABELS[v] for v in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for key, index, label, decimals, scale in _PROCESS_COUNTERS:
        means = {v: m for v in shown if (m := mean_of(v, key, index)) is not None}
        if len(means) < len(shown):
            continue
        base = means[common.BASELINE] * scale
        cells = []
        for variant in shown:
            value = means[variant] * scale
            delta = "" if variant == common.BASELINE else f" ({value - base:+.{decimals}f})"
            cells.append(f"{value:.{decimals}f}{delta}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _busy_rounds(rows: list[dict[str, Any]]) -> str:
    """Says how busy other processes kept the machine during the rounds kept, if they did."""
    cores = [r.get("other_cores", 0.0) for r in rows]
    if not cores or statistics.median(cores) <= common.DISTURBED:
        return ""
    busy = sum(c > common.DISTURBED for c in cores)
    return (
        f" Other processes on the machine used a median of {statistics.median(cores):.2f} cores "
        f"during these measurements ({busy} of {len(cores)} above {common.DISTURBED})."
    )


def _kickoffs(n: int) -> str:
    return f"{n} kickoff" + ("" if n == 1 else "s")


def _render_flow_memory(raw: Any) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The Flow + memory workload, uninstrumented vs crew_otel (nothing when not measured)."""
    if not raw:
        return [], []
    rows, dropped, total = quiet_rows(raw["rounds"], ("block", "round"))
    settings = raw["settings"]
    n_rounds = settings["blocks"] * settings["rounds_per_block"]
    lines = [
        "**Flow + memory, end to end**: one kickoff of a new Flow (`@start` -> `@router` -> "
        "`@listen`) whose listen step builds the end-to-end crew with `memory=True` (CrewAI's "
        "unified memory over LanceDB, its own model calls to the same provider), a string "
        "knowledge source (Chroma) and an OpenAI embedder, all served by the loopback provider "
        "in another process, and kicks it off; sequential; each process has its own storage "
        "directory, so memory accumulates equally in both. "
        f"{n_rounds} interleaved rounds of {_kickoffs(settings['kickoffs_per_round'])} per "
        f"variant after {_kickoffs(settings['warmup_kickoffs'])} of warm-up per process, each "
        "variant in its own process. Ratios: median of the per-round ratios to the "
        "uninstrumented run of the same round (interquartile range)."
        + _set_aside(dropped, total)
        + _busy_rounds(rows),
        "",
        "| | CPU ms / kickoff | Δ CPU ms | CPU vs none | wall ms / kickoff | wall vs none "
        "| spans / kickoff | OTLP kB / kickoff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pair = [v for v in (common.BASELINE, common.CREW_OTEL) if any(r["variant"] == v for r in rows)]
    if common.BASELINE not in pair:
        return [], []
    base_cpu = statistics.median(r["cpu"] for r in rows if r["variant"] == common.BASELINE)
    targets: list[tuple[str, str, str]] = []
    for variant in pair:
        mine = [r for r in rows if r["variant"] == variant]
        cpu = statistics.median(r["cpu"] for r in mine)
        wall = statistics.median(r["wall"] for r in mine)
        spans = statistics.median(r["spans"] for r in mine)
        otlp = statistics.median(r["otlp_bytes"] for r in mine) / 1000
        if variant == common.BASELINE:
            lines.append(
                f"| {common.LABELS[variant]} | {cpu * 1e3:.1f} | | 1 | {wall * 1e3:.1f} | 1 "
                f"| {spans:.0f} | {otlp:.1f} |"
            )
            continue
        cpu_ratios = paired_ratios(rows, variant, "cpu", ("block", "round"))
        wall_ratios = paired_ratios(rows, variant, "wall", ("block", "round"))
        delta = (cpu - base_cpu) * 1e3
        lines.append(
            f"| {common.LABELS[variant]} | {cpu * 1e3:.1f} | {delta:+.1f} | "
            f"{_fmt_ratio(cpu_ratios)} | {wall * 1e3:.1f} | {_fmt_ratio(wall_ratios)} | "
            f"{spans:.0f} | {otlp:.1f} |"
        )
        if cpu_ratios:
            ratio = statistics.median(cpu_ratios)
            ci = median_ci(cpu_ratios)
            ci_text = f"; 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
            targets.append(
                (
                    f"Flow + memory: end-to-end CPU per kickoff ≤ {TARGET_E2E_RATIO} x "
                    "uninstrumented",
                    f"{ratio:.3f} x ({delta:+.1f} ms per kickoff{ci_text})",
                    _status(ratio <= TARGET_E2E_RATIO),
                )
            )
    return lines, targets


def _busy_note(cores: float) -> str:
    if cores <= common.DISTURBED:
        return ""
    return f" Other processes on the machine used {cores:.2f} cores meanwhile."


def _render_hooks(
    hooks: Any, other: float = 0.0, cold: Any = None
) -> tuple[list[str], list[tuple[str, str, str]]]:
    if not hooks or _FLOOR not in hooks:
        return [], [(f"per-hook cost ≤ {TARGET_HOOK_RATIO} x a bare SDK span", "-", _status(None))]
    bare = hooks[_BARE]["median"] if _BARE in hooks else 0.0
    floor = hooks[_FLOOR]["median"] - bare
    tool = next(iter(hooks.values()))["tool"]
    cold_of = _cold_costs(cold)
    lines = [
        "**Per hook**: process CPU per call above the unwrapped call (a plain method call, "
        f"{bare * 1e9:.0f} ns), each wrapper around a target that returns at once, on real "
        "CrewAI objects in the context a run gives it; each call's span encoded to OTLP "
        f"protobuf in batches of 512 inside the timing ({tool})." + _busy_note(other),
        "",
        "| hook | µs / call | x bare SDK span |" + (_COLD_HEADER if cold_of else ""),
        "|---|---:|---:|" + ("---:|---:|---:|" if cold_of else ""),
    ]
    worst = 0.0
    for name in (*FLOORS, *HOOKS):
        if name not in hooks or name == _BARE:
            continue
        cost = hooks[name]["median"] - bare
        ratio = cost / floor
        label = name if name in HOOKS else f"*{name}*"
        if name in HOOKS:
            worst = max(worst, ratio)
        cells = f"| {label} | {cost * 1e6:.1f} | {ratio:.2f} |"
        if cold_of and name in cold_of:
            hot, cold_cost = cold_of[name]
            cells += (
                f" {hot * 1e6:.1f} | {cold_cost * 1e6:.1f} | {cold_cost / cold_of[_FLOOR][1]:.2f} |"
            )
        elif cold_of:
            cells += " | | |"
        lines.append(cells)
    if cold_of:
        lines += [
            "",
            f"One call at a time ({cold['calls']} each, `hooks-cold.json`): *hot* right after "
            f"another call, *cold* right after {cold['evict_bytes'] >> 20} MB were copied, so "
            "that none of the call's code or data is left in the CPU's caches, as between "
            "stretches of CrewAI's own work in a run; each net of the same timing around a "
            "plain method call, span export outside the timing.",
        ]
    present = [name for name in HOOKS if name in hooks]
    costs = sorted((hooks[name]["median"] - bare) / floor for name in present)
    targets = [
        (
            f"per-hook cost ≤ {TARGET_HOOK_RATIO} x a bare SDK span ({floor * 1e6:.0f} µs here)",
            f"{costs[0]:.1f}-{costs[-1]:.1f} x",
            _status(worst <= TARGET_HOOK_RATIO),
        )
    ]
    return lines, targets


_COLD_HEADER = " hot, one at a time, µs | cold, µs | cold x cold bare SDK span |"


def _cold_costs(cold: Any) -> dict[str, tuple[float, float]]:
    """``benchmarks.hooks --cold``: (hot, cold) CPU per call of each benchmark, net of the
    plain method call timed the same way; empty when not measured."""
    measured = (cold or {}).get("benchmarks") or {}
    if _BARE not in measured or _FLOOR not in measured:
        return {}
    bare = measured[_BARE]
    return {
        name: (value["hot"] - bare["hot"], value["cold"] - bare["cold"])
        for name, value in measured.items()
        if name != _BARE
    }


#: The end-to-end section's floors, each an information row beside the budget.
_FLOOR_ROWS = (
    (
        common.SDK_FLOOR,
        "the SDK floor: crew_otel's spans and metric points made by the bare SDK "
        "(what any instrumentation pays for them)",
    ),
    (
        common.SDK_FLOOR_IN_PLACE,
        "the SDK floor in place: the same spans and points made by the bare SDK where a run "
        "makes them, one wrapt wrapper per span (what a minimal instrumentation of the span "
        "model pays, cold caches included)",
    ),
)


def _render_concurrency(data: Any) -> tuple[list[str], list[tuple[str, str, str]]]:
    if not data or not data.get("runs"):
        return [], [("overhead ratio not growing with concurrency", "-", _status(None))]
    runs, dropped, total = quiet_rows(data["runs"], ("round", "level"))
    levels = [level[0] for level in data["levels"]]
    lines = [
        "**Concurrency**: the same kickoffs, N at a time in one process (threads, or "
        "`akickoff`s gathered on one event loop); crew_otel vs uninstrumented, interleaved "
        "rounds. CPU is per kickoff; wall is the batch's wall time per kickoff."
        + _set_aside(dropped, total),
        "",
        "| load | CPU ms / kickoff, none | crew_otel | CPU ratio | wall ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    ratios = {}
    spread: dict[str, list[float]] = {}
    for level in levels:
        rows = [r for r in runs if r["level"] == level]
        base = [r["cpu"] for r in rows if r["variant"] == common.BASELINE]
        ours = [r["cpu"] for r in rows if r["variant"] == common.CREW_OTEL]
        cpu_ratios = paired_ratios(rows, common.CREW_OTEL, "cpu", ("round",))
        wall_ratios = paired_ratios(rows, common.CREW_OTEL, "wall", ("round",))
        ratios[level] = statistics.median(cpu_ratios)
        spread[level] = cpu_ratios
        lines.append(
            f"| {level} | {statistics.median(base) * 1e3:.1f} | "
            f"{statistics.median(ours) * 1e3:.1f} | {_fmt_ratio(cpu_ratios)} | "
            f"{_fmt_ratio(wall_ratios)} |"
        )
    # Growing = a level whose ratios lie clearly above the one-thread ratios: its lower
    # quartile above their upper quartile (medians alone move by several % between runs).
    _, first_high = _quartiles(spread[levels[0]])
    grown = [level for level in levels[1:] if _quartiles(spread[level])[0] > first_high]
    measured = ", ".join(f"{level} {ratio:.3f}" for level, ratio in ratios.items())
    if grown:
        measured += f" ({', '.join(grown)} clearly above 1 thread)"
    else:
        measured += " (interquartile ranges overlap the 1-thread one)"
    return lines, [("overhead ratio not growing with concurrency", measured, _status(not grown))]


def _render_soak(soak: Any) -> tuple[list[str], list[tuple[str, str, str]]]:
    if not soak:
        return [], [("no RSS growth beyond uninstrumented", "-", _status(None))]
    kickoffs = soak["kickoffs"]
    every = soak["every"]
    lines = [
        f"**Memory**: {kickoffs} sequential kickoffs per variant after "
        f"{soak.get('warmup_kickoffs', 0)} warm-up kickoffs; RSS and live objects sampled "
        f"after a full GC and `malloc_trim` every {every} ({soak['elapsed_s'] / 60:.0f} min, "
        "the variants at once). Lazily created caches and classes still grow in the first "
        f"interval, so growth is shown in all and from kickoff {every} on (steady state); "
        "slope: Theil-Sen (median of pairwise slopes) over the steady-state samples."
        + _busy_note(soak.get("other_cores", 0.0)),
        "",
        f"| | RSS at 0, MB | at {kickoffs}, MB | growth, MB | from {every}, MB "
        "| slope, MB / 1000 kickoffs | live objects: growth | from "
        f"{every} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    steady: dict[str, float] = {}
    for variant in (common.BASELINE, common.CREW_OTEL, common.SDK_FLOOR):
        result = soak["variants"].get(variant)
        if not result:
            continue
        samples = result["samples"]
        first, second, last = samples[0], samples[min(1, len(samples) - 1)], samples[-1]
        later = samples[1:] if len(samples) > 2 else samples
        slope = _theil_sen([s["kickoffs"] for s in later], [s["rss"] for s in later])
        steady[variant] = last["rss"] - second["rss"]
        lines.append(
            f"| {common.LABELS[variant]} | {first['rss'] / 1e6:.1f} | {last['rss'] / 1e6:.1f} | "
            f"{(last['rss'] - first['rss']) / 1e6:+.1f} | {steady[variant] / 1e6:+.1f} | "
            f"{slope * 1000 / 1e6:+.2f} | {last['objects'] - first['objects']:+d} | "
            f"{last['objects'] - second['objects']:+d} |"
        )
    if common.CREW_OTEL not in steady or common.BASELINE not in steady:
        return lines, [("no RSS growth beyond uninstrumented", "-", _status(None))]
    ours, base = steady[common.CREW_OTEL], steady[common.BASELINE]
    # Pages and allocator arenas: within 1 MB of the uninstrumented growth counts as none.
    ok = ours <= base + 1_000_000
    scope = f"{kickoffs:,} kickoffs" + ("" if kickoffs >= 5000 else " (not 5,000: see README)")
    targets = [
        (
            f"no RSS growth beyond uninstrumented over {scope}",
            f"{ours / 1e6:+.1f} MB vs {base / 1e6:+.1f} MB from kickoff {every} on",
            _status(ok),
        )
    ]
    floor = steady.get(common.SDK_FLOOR)
    if floor is not None:
        targets.append(
            (
                "RSS growth of the SDK floor (crew_otel's spans and points, bare SDK) over the "
                "same kickoffs",
                f"{floor / 1e6:+.1f} MB from kickoff {every} on",
                "information",
            )
        )
    return lines, targets


def _theil_sen(xs: Sequence[float], ys: Sequence[float]) -> float:
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i])
        for i in range(len(xs))
        for j in range(i + 1, len(xs))
        if xs[j] != xs[i]
    ]
    return statistics.median(slopes) if slopes else 0.0


def _render_startup(startup: Any) -> tuple[list[str], list[tuple[str, str, str]]]:
    if not startup:
        return [], [(f"`instrument()` < {TARGET_INSTRUMENT_S * 1e3:.0f} ms", "-", _status(None))]
    probes = startup["probes"]
    lines = [
        "**Start-up**: fresh processes, after `import crewai` and the SDK set-up; median "
        "(90th percentile).",
        "",
        "| | import, ms | instrument, ms | processes |",
        "|---|---:|---:|---:|",
    ]
    targets = []
    for variant in (common.CREW_OTEL, common.OPENINFERENCE, common.OPENLLMETRY):
        runs = [p for p in probes.get(variant, []) if p.get("kind", "measured") == "measured"]
        calm = [p for p in runs if p.get("other_cores", 0.0) <= common.DISTURBED]
        if len(calm) * 2 >= len(runs):
            runs = calm
        if not runs:
            continue
        imported = statistics.median(p["import_instrumentation"] for p in runs)
        instrument = statistics.median(p["instrument"] for p in runs)
        label = common.LABELS[variant]
        if variant == common.CREW_OTEL:
            p90 = _percentile([p["instrument"] for p in runs], 0.9)
            lines.append(
                f"| {label}: `import crew_otel`, `crew_otel.instrument()` | {imported * 1e3:.0f} | "
                f"{instrument * 1e3:.0f} ({p90 * 1e3:.0f}) | {len(runs)} |"
            )
            targets.append(
                (
                    f"`instrument()` < {TARGET_INSTRUMENT_S * 1e3:.0f} ms",
                    f"{instrument * 1e3:.0f} ms (median of {len(runs)})",
                    _status(instrument < TARGET_INSTRUMENT_S),
                )
            )
        else:
            lines.append(
                f"| {label}: CrewAI + OpenAI instrumentors (import included) | - | "
                f"{instrument * 1e3:.0f} | {len(runs)} |"
            )
    imports = startup.get("imports") or []
    if imports:
        heavy = sorted({name for probe in imports for name in probe["heavy_modules"]})
        alone = statistics.median(p["import_crew_otel"] for p in imports)
        lines += [
            "",
            f"`import crew_otel` alone (nothing imported before it): {alone * 1e3:.0f} ms, median "
            f"of {len(imports)} fresh processes; heavy modules it imports: "
            + (", ".join(f"`{name}`" for name in heavy[:8]) if heavy else "none")
            + " (the SDK, exporters, `rich` and the HTTP clients are loaded when used).",
        ]
        sdk = [name for name in heavy if name.startswith("opentelemetry.sdk")]
        targets.append(
            (
                "`import crew_otel` does not import `opentelemetry.sdk`",
                ", ".join(sdk[:3]) if sdk else "not imported",
                _status(not sdk),
            )
        )
    return lines, targets


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def _render_shared_state(
    raw: Any, outside: Any, outside_other: float = 0.0, counts: dict[str, float] | None = None
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Detectors on vs off end to end, and their cost outside runs (None: not measured)."""
    if not raw and not outside:
        return [], []
    lines: list[str] = []
    targets: list[tuple[str, str, str]] = []
    if raw:
        e2e_lines, e2e_target = _render_shared_e2e(raw)
        lines += e2e_lines
        targets.append(e2e_target)
    if outside:
        if lines:
            lines.append("")
        outside_lines, outside_target = _render_outside(outside, outside_other, counts)
        lines += outside_lines
        targets.append(outside_target)
    return lines, targets


_WORKLOAD_LABELS = {
    common.STANDARD: "standard (tool returns a string)",
    common.IO: "file + SQLite I/O in the tool",
}


def _render_shared_e2e(raw: Any) -> tuple[list[str], tuple[str, str, str]]:
    on, off = common.CREW_OTEL, common.CREW_OTEL_NO_DETECT
    rows, dropped, total = quiet_rows(raw["rounds"], ("block", "round"))
    settings = raw["settings"]
    n_rounds = settings["blocks"] * settings["rounds_per_block"]
    lines = [
        "**Shared-state detectors, end to end**: crew_otel with `detect_shared_instances=True` "
        "(the default: CrewAI objects, plus module globals, files, SQLite databases and "
        "resources of tool code) vs `False`, same build, each in its own process; "
        f"{n_rounds} interleaved rounds of {settings['kickoffs_per_round']} sequential kickoffs, "
        "the two variants of a workload back to back. The I/O workload's tool writes a file and "
        "a SQLite database file of its own per request (connect, create, insert, commit, close). "
        "Ratio: median of the per-round on / off ratios (interquartile range; 95 % confidence "
        "interval of the median)." + _set_aside(dropped, total),
        "",
        "| workload | CPU ms / kickoff, off | on | Δ CPU ms | CPU on / off | 95 % CI "
        "| wall on / off |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    measured: list[str] = []
    intervals: list[tuple[float, float, float]] = []  # (lower, median, upper) per workload
    for workload in common.WORKLOADS:
        mine = [r for r in rows if r.get("workload") == workload]
        cpu_on = [r["cpu"] for r in mine if r["variant"] == on]
        cpu_off = [r["cpu"] for r in mine if r["variant"] == off]
        if not cpu_on or not cpu_off:
            continue
        cpu_ratios = _pair_ratios(mine, on, off, "cpu")
        wall_ratios = _pair_ratios(mine, on, off, "wall")
        median_on, median_off = statistics.median(cpu_on), statistics.median(cpu_off)
        ratio = statistics.median(cpu_ratios)
        ci = median_ci(cpu_ratios)
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"
        lines.append(
            f"| {_WORKLOAD_LABELS[workload]} | {median_off * 1e3:.1f} | {median_on * 1e3:.1f} | "
            f"{(median_on - median_off) * 1e3:+.1f} | {_fmt_ratio(cpu_ratios)} | {ci_text} | "
            f"{_fmt_ratio(wall_ratios)} |"
        )
        measured.append(
            f"{workload} workload {ratio:.3f} x (95 % CI {ci_text}; "
            f"{(median_on - median_off) * 1e3:+.1f} ms per kickoff)"
        )
        intervals.append((ci[0], ratio, ci[1]) if ci else (ratio, ratio, ratio))
    target = f"shared-state detectors on: end-to-end CPU ≤ {TARGET_DETECTORS_RATIO} x off"
    if not intervals:
        return lines, (target, "-", _status(None))
    # Met when every confidence interval lies under the target, missed when one lies above
    # it; otherwise this run cannot tell (its median is then said).
    if all(upper <= TARGET_DETECTORS_RATIO for _, _, upper in intervals):
        status = _status(True)
    elif any(lower > TARGET_DETECTORS_RATIO for lower, _, _ in intervals):
        status = _status(False)
    elif any(median > TARGET_DETECTORS_RATIO for _, median, _ in intervals):
        status = "not resolved (a median above, its confidence interval across the target)"
    else:
        status = "not resolved (medians below, a confidence interval across the target)"
    return lines, (target, "; ".join(measured), status)


def _pair_ratios(rows: list[dict[str, Any]], on: str, off: str, metric: str = "cpu"):
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    for row in rows:
        groups.setdefault((row["block"], row["round"]), {})[row["variant"]] = row[metric]
    return [g[on] / g[off] for g in groups.values() if on in g and off in g]


def _render_outside(
    outside: Any, other: float, counts: dict[str, float] | None = None
) -> tuple[list[str], tuple[str, str, str]]:
    """The operations outside runs: CPU time per state, and executed instructions when counted
    (then the target is decided by them: they do not move with the load)."""
    tool = next(iter(outside.values()))["tool"]
    lines = [
        "**Shared-state detectors, outside runs**: process CPU per operation in code that "
        "runs outside any crew. While instrumented with the detectors on, `open`, `io.open`, "
        "`os.open` and `sqlite3.connect` are wrapped (one wrapper call and one context "
        "look-up per call outside tool calls); nothing is set on SQLite connections; "
        "`uninstrument()` restores the functions. `copy.deepcopy` is a control nothing wrapped "
        f"touches. crewai and crew_otel imported in every state ({tool})." + _busy_note(other),
        "",
        "| operation | none, µs | detectors off, µs | vs none | detectors on, µs | vs none "
        "| after `uninstrument()`, µs | vs none |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    affected: list[str] = []
    measured: list[str] = []
    for op, (description, _estimate) in detectors.OPERATIONS.items():
        base = outside.get(f"{op}: {detectors.NONE}")
        if base is None:
            continue
        cells = [f"| {op}: {description} | {base['median'] * 1e6:.2f}"]
        parts = []
        for state in (detectors.OFF, detectors.ON, detectors.AFTER):
            entry = outside.get(f"{op}: {state}")
            if entry is None:
                cells.append("- | -")
                continue
            delta = entry["median"] - base["median"]
            ratio = entry["median"] / base["median"]
            cells.append(f"{entry['median'] * 1e6:.2f} | {ratio:.3f} ({delta * 1e9:+.0f} ns)")
            if state == detectors.OFF:
                continue  # not the detectors: what instrumenting at all does
            parts.append(f"{ratio:.3f} x")
            noise = base["stdev"] + entry["stdev"]
            if counts is None and ratio > TARGET_DETECTORS_RATIO and delta > noise:
                affected.append(f"{op} ({state})")
        lines.append(" | ".join(cells) + " |")
        measured.append(f"{op} {' / '.join(parts)}")
    if counts is not None:
        counted_lines, measured, affected = _outside_instructions(counts)
        lines += ["", *counted_lines]
        text = "instructions, on / after `uninstrument()`: " + "; ".join(measured)
    else:
        text = "CPU, on / after `uninstrument()`: " + "; ".join(measured)
    if affected:
        text += f" (above {TARGET_DETECTORS_RATIO} x: {', '.join(affected)})"
    return lines, (
        f"code outside tool calls unaffected by the detectors (≤ {TARGET_DETECTORS_RATIO} x)",
        text,
        _status(not affected),
    )


def _outside_instructions(
    counts: dict[str, float],
) -> tuple[list[str], list[str], list[str]]:
    """The outside operations' executed instructions per call by state: table lines, the
    target's figures, the operations above the target."""
    lines = [
        "Executed instructions per call, the same operations (callgrind, "
        f"{detectors.OUTSIDE_CALLS} calls per state after as many to warm up; user space only: "
        "the kernel's part of opening a file is not counted, so a ratio overstates the share "
        "of a wrapper in an operation that is mostly system calls):",
        "",
        "| operation | none | detectors off | detectors on | after `uninstrument()` |",
        "|---|---:|---:|---:|---:|",
    ]
    measured: list[str] = []
    affected: list[str] = []
    for op in detectors.OPERATIONS:
        base = counts.get(f"{op}: {detectors.NONE}")
        if not base:
            continue
        cells = [f"| {op} | {base:,.0f}"]
        parts = []
        for state in (detectors.OFF, detectors.ON, detectors.AFTER):
            value = counts.get(f"{op}: {state}")
            if value is None:
                cells.append("-")
                continue
            ratio = value / base
            cells.append(f"{value:,.0f} ({value - base:+,.0f}; {ratio:.3f} x)")
            if state == detectors.OFF:
                continue
            parts.append(f"{ratio:.3f} x ({value - base:+,.0f})")
            if ratio > TARGET_DETECTORS_RATIO:
                affected.append(f"{op} ({state})")
        lines.append(" | ".join(cells) + " |")
        measured.append(f"{op} {' / '.join(parts)}")
    return lines, measured, affected


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else common.BENCH_DIR / "results"
    from benchmarks import deps

    deps.ensure_tools()  # pyperf reads hooks.json
    text = render(directory)
    (directory / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
