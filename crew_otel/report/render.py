"""The report in the terminal (``rich``), and the overlap timeline as an SVG image."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from crew_otel.report.analysis import ServiceReport, causes_clause, process_tags

TIMELINE_WIDTH = 60
MAX_TIMELINE_ROWS = 60
#: Width of a request's label on the timeline (what distinguishes it from the others).
LABEL_WIDTH = 14
_SEPARATORS = "-_.:/ "
_ELLIPSIS = "…"


def request_labels(names: Sequence[str], width: int = LABEL_WIDTH) -> list[str]:
    """Short labels that keep what distinguishes requests: the prefix all ``names`` share is
    elided (``C-halffixed-1w-07`` -> ``…-07``), cut back to a separator so the rest reads."""
    prefix = _common_prefix(names) if len(set(names)) > 1 else ""
    cut = max((prefix.rfind(c) for c in _SEPARATORS), default=-1)
    cut = cut if cut > 0 else len(prefix)
    if names:  # every label keeps at least one character of its own
        cut = max(0, min(cut, min(len(name) for name in names) - 1))
    labels = [_ELLIPSIS + name[cut:] if cut else name for name in names]
    if all(len(label) <= width for label in labels):
        return labels
    heads = [label if len(label) <= width else label[: width - 1] + _ELLIPSIS for label in labels]
    if len(set(heads)) == len(set(labels)):
        return heads
    # the distinguishing part is at the end: keep the tail
    return [label if len(label) <= width else _ELLIPSIS + label[1 - width :] for label in labels]


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)  # the prefix they share is shared by all between
    size = next((i for i, (x, y) in enumerate(zip(first, last, strict=False)) if x != y), None)
    size = len(first) if size is None else size
    return first[:size]


def _process_tags(report: ServiceReport) -> dict[str, str]:
    """``p1``, ``p2``... per process, when the service ran in more than one."""
    return process_tags(report.processes)


def concurrency_label(report: ServiceReport) -> str:
    """What a request's concurrency figure counts, in words."""
    return f"peak requests in flight (in its {report.concurrency_scope})"


def timeline(report: ServiceReport, width: int = TIMELINE_WIDTH) -> Text:
    """One row per request: a bar over the service's time range, failures in red."""
    text = Text()
    requests = report.requests[:MAX_TIMELINE_ROWS]
    if not requests:
        return text
    t0 = min(r.start for r in requests)
    span = max(max(r.end for r in requests) - t0, 1)
    labels = request_labels([r.request_id or r.trace_id for r in requests])
    tags = _process_tags(report)
    label_width = max(len(label) for label in labels)
    pad = label_width + (4 if tags else 0)
    text.append(f"{'':>{pad}}  0s{' ' * (width - 8)}{span / 1e9:5.1f}s\n", style="dim")
    for index, request in enumerate(requests, 1):
        begin = int((request.start - t0) / span * width)
        end = max(int((request.end - t0) / span * width), begin + 1)
        text.append(f"{labels[index - 1]:>{label_width}} ", style="dim")
        if tags:
            text.append(f"{tags.get(request.process, '?'):>3} ", style="dim")
        text.append("|" + " " * begin)
        style = "bold red" if request.failed else "green"
        text.append("█" * (end - begin), style=style)
        text.append(" " * (width - end) + "| ")
        outcome = str(request.status_code or ("error" if request.failed else "ok"))
        text.append(outcome + (" ✗" if request.failed else ""), style=style)
        text.append(f"  x{request.concurrency}\n", style="dim")
        if index == MAX_TIMELINE_ROWS and len(report.requests) > MAX_TIMELINE_ROWS:
            text.append(f"... {len(report.requests) - MAX_TIMELINE_ROWS} more\n", style="dim")
    legend = f"xN: {concurrency_label(report)}"
    if tags:
        legend += "; " + ", ".join(f"{tag} = process {p}" for p, tag in tags.items())
    text.append(legend + "\n", style="dim")
    return text


def crosstalk_lines(report: ServiceReport) -> list[Text]:
    """``Answers carrying another request's data: N of M``, where it entered, and the shared
    things both requests of each pair touched (nothing when the service made no answer)."""
    crosstalk = report.crosstalk
    if not crosstalk.answers and not crosstalk.failed_runs:
        return []
    style = "red" if crosstalk.carrying else "green"
    line = Text.assemble(
        ("Answers carrying another request's data: ", "bold"),
        (f"{crosstalk.carrying} of {crosstalk.answers}", style),
    )
    if crosstalk.by_source:
        where = ", ".join(f"{source} {n}" for source, n in crosstalk.by_source.items())
        line.append(f"   entered at {where}")
    lines = [line]
    why = []
    if crosstalk.causes:
        things = ", ".join(f"{c.what} in {c.answers}" for c in crosstalk.causes)
        why.append(f"cause: both requests touched {things}")
    if crosstalk.no_cause:
        why.append(f"no shared thing named in {crosstalk.no_cause}")
    if why:
        lines.append(Text("  " + "; ".join(why)))
    if crosstalk.failed_runs:
        runs = "run also" if crosstalk.failed_runs == 1 else "runs also"
        lines.append(
            Text(f"  {crosstalk.failed_runs} failed {runs} carried another request's data")
        )
    return lines


def failure_cause_lines(report: ServiceReport) -> list[Text]:
    """``Failed runs by cause: shared_instance 7 (Agent 'Support Analyst'), provider_error 2``
    (``crew_otel.failure.cause`` on the failed runs' kickoff spans); nothing when no run
    carries it (no failure, or a file from before the attribute)."""
    if not report.failure_causes:
        return []
    return [
        Text.assemble(
            ("Failed runs by cause: ", "bold"), (causes_clause(report.failure_causes), "red")
        )
    ]


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column)
    return table


def service_panel(report: ServiceReport, width: int = TIMELINE_WIDTH) -> Panel:
    """Everything about one service, as one panel (timeline ``width`` columns wide)."""
    parts: list[object] = []
    failures = ", ".join(
        f"{status}: {count}" for status, count in report.failures_by_status.items()
    )
    parts.append(
        Text.assemble(
            ("Requests ", "bold"),
            f"{len(report.requests)}   ",
            ("failed ", "bold"),
            (f"{report.failed}", "red" if report.failed else "green"),
            f"  ({failures})" if failures else "",
        )
    )

    parts.extend(failure_cause_lines(report))
    parts.extend(crosstalk_lines(report))

    if report.origins:
        origins = _table(
            "Error origins (where each error began)",
            "origin span",
            "error.type",
            "recovered",
            "count",
        )
        for origin in report.origins:
            origins.add_row(
                origin.span,
                origin.error_type,
                "recovered" if origin.recovered else "[red]fatal[/red]",
                str(origin.count),
            )
        parts.append(origins)

    retries = _table("Retries", "layer", "retries")
    for layer, count in report.retries.items():
        retries.add_row(layer, str(count))
    retries.add_row(
        "amplification",
        f"{report.http_attempts} HTTP attempts / "
        f"{report.model_calls} model calls = {report.amplification:.2f}",
    )
    parts.append(retries)

    if report.conflicts:
        conflicts = _table(
            "Shared instances and state (one thing, several requests at once)",
            "what",  # its noun says the kind: no "file file '/path'"
            "requests involved",
        )
        tags = _process_tags(report)
        for conflict in report.conflicts:
            where = f" in {tags[conflict.process]}" if conflict.process in tags else ""
            conflicts.add_row(
                conflict.label + where,
                ", ".join(sorted(conflict.request_ids)[:6])
                + (" ..." if len(conflict.request_ids) > 6 else ""),
            )
        parts.append(conflicts)
    else:
        parts.append(Text("Shared instances and state: none", style="green"))

    ratio = _table(
        "Error ratio by concurrency", concurrency_label(report), "requests", "failed", "ratio"
    )
    for level, (total, failed) in report.by_concurrency.items():
        ratio.add_row(str(level), str(total), str(failed), f"{failed / total:.0%}")
    parts.append(ratio)
    parts.append(Text("Overlap timeline", style="bold"))
    parts.append(timeline(report, width))
    parts.append(Text(report.conclusion, style="bold red" if report.failed else "bold green"))
    return Panel(Group(*parts), title=f"[bold]{report.service}[/bold]", expand=False)  # type: ignore[arg-type]


def print_reports(reports: list[ServiceReport], console: Console) -> None:
    # label, process tag, bars, outcome and "xN" must fit on one line inside the panel
    width = max(20, min(TIMELINE_WIDTH, console.width - LABEL_WIDTH - 28))
    for report in reports:
        console.print(service_panel(report, width))


def save_timeline_svg(reports: list[ServiceReport], path: str | Path) -> None:
    """Save the overlap timelines of all services as one SVG image."""
    console = Console(record=True, width=TIMELINE_WIDTH + 40, file=io.StringIO())
    for report in reports:
        console.print(Text(report.service, style="bold"))
        console.print(timeline(report))
        console.print(Text(report.conclusion))
    console.save_svg(str(path), title="crew-otel: overlap of requests")
