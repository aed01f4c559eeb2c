"""Turn merged cProfile stats of the end-to-end workload into crew_otel's hot-spot list."""

from __future__ import annotations

import os
import pstats
from typing import Any

# Wrapper entry points: their cumulative time includes the instrumented CrewAI call itself.
_PASS_THROUGH = {"__call__", "_call_async", "_run_awaitable", "_defer_to_await"}


def _package_root() -> str:
    import crew_otel

    return os.path.dirname(os.path.abspath(crew_otel.__file__))


def _group(filename: str, crew_otel_root: str) -> str:
    if filename.startswith(os.path.join(crew_otel_root, "testing")):
        return "workload (crew_otel.testing)"
    if filename.startswith(crew_otel_root):
        return "crew_otel"
    if filename.startswith("~") or filename.startswith("<"):
        return "built-ins"
    marker = "site-packages" + os.sep
    if marker in filename:
        top = filename.split(marker, 1)[1].split(os.sep, 1)[0]
        top = top.removesuffix(".py")
        if top == "opentelemetry":
            return "opentelemetry"
        return top
    return "stdlib"


def _label(key: tuple[str, int, str], crew_otel_root: str) -> str:
    filename, line, name = key
    if filename.startswith(crew_otel_root):
        relative = os.path.relpath(filename, os.path.dirname(crew_otel_root))
        return f"{relative}:{line}({name})"
    marker = "site-packages" + os.sep
    if marker in filename:
        filename = filename.split(marker, 1)[1]
    return f"{filename}:{line}({name})"


def render(
    stats: pstats.Stats, *, kickoffs: int, top: int, wall: float, cpu: float
) -> tuple[str, dict[str, Any]]:
    """The report text and a summary (crew_otel's share of the profiled time)."""
    root = _package_root()
    entries = stats.stats  # type: ignore[attr-defined]
    total_self = sum(value[2] for value in entries.values())
    groups: dict[str, float] = {}
    ours = []
    for key, (_cc, calls, self_time, cum_time, _callers) in entries.items():
        group = _group(key[0], root)
        groups[group] = groups.get(group, 0.0) + self_time
        if group == "crew_otel":
            ours.append((key, calls, self_time, cum_time))
    crew_otel_self = groups.get("crew_otel", 0.0)
    per_kickoff = 1e6 / kickoffs

    lines = [
        "crew_otel hot paths: cProfile of the end-to-end workload (every thread)",
        "",
        f"workload: {kickoffs} sequential kickoffs of research_crew (2 agents, 2 tasks, a tool,",
        "3 model calls), a new crew per kickoff, crew_otel.instrument() with its defaults,",
        "BatchSpanProcessor + OTLP protobuf encoding (discarded).",
        f"under the profiler: wall {wall:.2f} s, process CPU {cpu:.2f} s "
        f"({cpu * per_kickoff / 1e3:.1f} ms per kickoff); self time recorded in all threads "
        f"{total_self:.2f} s (includes threads blocked in C calls: queue waits, epoll, recv)",
        f"crew_otel self time: {crew_otel_self * 1e3:.1f} ms = "
        f"{crew_otel_self * per_kickoff:.0f} us per kickoff = "
        f"{100 * crew_otel_self / cpu:.2f} % of the process CPU under the profiler",
        "(cProfile adds a fixed cost to every Python call, so small functions look dearer than",
        "they are; use the ranking, and the benchmarks for absolute numbers)",
        "",
        "Self time by package (share of all recorded self time, blocking C calls included):",
    ]
    for group, seconds in sorted(groups.items(), key=lambda item: -item[1])[:14]:
        lines.append(f"  {group:<28} {100 * seconds / total_self:6.2f} %")

    lines += [
        "",
        f"Top {top} crew_otel functions by self time",
        f"{'rank':>4} {'self us/kickoff':>15} {'calls/kickoff':>13} {'self us/call':>12} "
        f"{'cum us/kickoff':>14}  function",
    ]
    ranked = sorted(ours, key=lambda item: -item[2])
    for rank, (key, calls, self_time, cum_time) in enumerate(ranked[:top], start=1):
        cum = "(wraps)" if key[2] in _PASS_THROUGH else f"{cum_time * per_kickoff:.1f}"
        lines.append(
            f"{rank:>4} {self_time * per_kickoff:>15.1f} {calls / kickoffs:>13.1f} "
            f"{1e6 * self_time / max(calls, 1):>12.2f} {cum:>14}  {_label(key, root)}"
        )

    lines += [
        "",
        "Top crew_otel functions by cumulative time (what they call included; wrapper entry",
        "points, whose cumulative time includes the instrumented CrewAI call, left out)",
        f"{'rank':>4} {'cum us/kickoff':>14} {'calls/kickoff':>13}  function",
    ]
    by_cum = sorted(
        (item for item in ours if item[0][2] not in _PASS_THROUGH), key=lambda item: -item[3]
    )
    for rank, (key, calls, _self_time, cum_time) in enumerate(by_cum[:top], start=1):
        lines.append(
            f"{rank:>4} {cum_time * per_kickoff:>14.1f} {calls / kickoffs:>13.1f}  "
            f"{_label(key, root)}"
        )

    others = sorted(
        ((key, value) for key, value in entries.items() if _group(key[0], root) != "crew_otel"),
        key=lambda item: -item[1][2],
    )
    lines += [
        "",
        "For context: top 15 functions of other packages by self time (blocking calls such as",
        "queue waits, epoll and recv are time threads spent waiting, not CPU)",
    ]
    for key, (_cc, calls, self_time, _cum, _callers) in others[:15]:
        lines.append(
            f"  {self_time * per_kickoff:>9.1f} us/kickoff {calls / kickoffs:>9.1f} calls/kickoff"
            f"  {_label(key, root)}"
        )
    summary = {
        "kickoffs": kickoffs,
        "wall": wall,
        "cpu": cpu,
        "profiled_self_time": total_self,
        "crew_otel_self_time": crew_otel_self,
        "crew_otel_self_us_per_kickoff": crew_otel_self * per_kickoff,
        "crew_otel_share_of_cpu": crew_otel_self / cpu if cpu else None,
        "top": [
            {
                "function": _label(key, root),
                "self_us_per_kickoff": self_time * per_kickoff,
                "calls_per_kickoff": calls / kickoffs,
                "self_us_per_call": 1e6 * self_time / max(calls, 1),
            }
            for key, calls, self_time, _cum in ranked[:top]
        ],
        "groups": {group: seconds / total_self for group, seconds in groups.items()},
    }
    return "\n".join(lines) + "\n", summary
