"""``crew-otel doctor``: versions, the plan (what ``instrument()`` does with each hook here), and,
when run inside the application, where its spans go and how many were dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from crew_otel import export, internals, internals_check
from crew_otel.hook_kinds import Source, Status
from crew_otel.instrumentor import CrewAIInstrumentor, HookReport
from crew_otel.plan import (
    PlanRow,
    build_plan,
)
from crew_otel.version import __version__

DISTRIBUTIONS = (
    "crewai",
    "openai",
    "httpx",
    "httpx2",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-httpx",
    "opentelemetry-instrumentation-threading",
    "wrapt",
)
MINIMUM_CREWAI = (1, 12)
_COLOURS = {
    Status.INSTALLED: "green",
    Status.PENDING: "cyan",
    Status.SKIPPED: "yellow",
    Status.FAILED: "red",
}


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def hook_statuses() -> list[PlanRow]:
    """What ``instrument()`` would do with each hook here: the plan, a dry run (imports nothing).

    The plan sees an HTTP client that is instrumented already, not by whom: when this process's
    ``instrument()`` did it, the row says so (with the same status).
    """
    reports = {report.key: report for report in installed_hooks() or ()}
    return [_by_crew_otel(row, reports.get(row.key)) for row in build_plan().rows]


def _by_crew_otel(row: PlanRow, report: HookReport | None) -> PlanRow:
    """``row``, saying crew_otel instrumented its HTTP client when ``report`` shows it did."""
    client = row.client
    if row.source != Source.HTTP_CLIENT or client is None or report is None:
        return row
    if report.status != Status.INSTALLED or report.detail != client.instrumentor:
        return row  # instrumented by the application, by opentelemetry-instrument, or not at all
    return dataclasses.replace(row, detail=f"{client.instrumentor}, installed by crew_otel")


def installed_hooks() -> list[HookReport] | None:
    """What ``instrument()`` installed in this process (``None`` when not instrumented)."""
    instrumentor = CrewAIInstrumentor()
    return instrumentor.reports if instrumentor.is_instrumented_by_opentelemetry else None


def _hook_table(title: str, rows: list[PlanRow] | list[HookReport]) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("layer")
    table.add_column("target", overflow="fold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for row in rows:
        colour = _COLOURS.get(row.status, "red")
        table.add_row(row.layer, row.key, f"[{colour}]{row.status}[/{colour}]", row.detail)
    return table


def replaced_functions_table() -> Table:
    """Every function crew_otel replaced in this process, whether its wrapper is still the one
    in place (another library may have wrapped it since)."""
    table = Table(title="Functions crew_otel replaced in this process", show_header=True)
    table.add_column("by")
    table.add_column("function", overflow="fold")
    table.add_column("state")
    for component, hook in CrewAIInstrumentor().replaced_functions():
        state = "in place" if hook.in_place else "wrapped again by another library"
        table.add_row(component, hook.where, state)
    return table


def _import_crewai() -> None:
    """Import crewai as the application does before ``instrument()`` (the plan imports nothing)."""
    with contextlib.suppress(Exception):
        importlib.import_module("crewai")


def run(console: Console) -> int:
    """Print the report; exit status 1 when CrewAI is missing or too old."""
    for key, value in (
        ("CREWAI_DISABLE_TELEMETRY", "true"),
        ("CREWAI_TRACING_ENABLED", "false"),
        ("CREWAI_TESTING", "true"),
    ):
        os.environ.setdefault(key, value)  # doctor imports crewai but runs nothing
    console.print(f"[bold]crew-otel {__version__}[/bold]")
    versions = Table(title="Installed", show_header=True)
    versions.add_column("package")
    versions.add_column("version")
    for distribution in DISTRIBUTIONS:
        versions.add_row(
            distribution, installed_version(distribution) or "[dim]not installed[/dim]"
        )
    console.print(versions)
    crewai_version = installed_version("crewai")
    if crewai_version is None:
        console.print("[red]crewai is not installed: nothing to instrument.[/red]")
        return 1
    supported = _release(crewai_version) >= MINIMUM_CREWAI
    if not supported:
        console.print(
            f"[red]crewai {crewai_version} is older than the supported 1.12; "
            "instrument() will not install any hook.[/red]"
        )
    _import_crewai()
    statuses = hook_statuses()
    console.print(_hook_table("Hooks (what instrument() does here)", statuses))
    installed = sum(1 for s in statuses if s.status == Status.INSTALLED)
    pending = sum(1 for s in statuses if s.status == Status.PENDING)
    console.print(
        f"{installed} of {len(statuses)} hooks install at instrument(), "
        f"{pending} when their module is first imported."
    )
    reports = installed_hooks()
    if reports is not None:
        console.print(_hook_table("Hooks installed by instrument() in this process", reports))
        console.print(replaced_functions_table())
    console.print(span_export_report(export.live_processors()))
    console.print(internals_table(internal_statuses()))
    return 0 if supported else 1


def span_export_report(processors: Sequence[export.CountingBatchSpanProcessor]) -> Table | str:
    """The span processors ``crew_otel.configure()`` set up in this process, with their drops.

    ``crew-otel doctor`` on the command line is a process of its own: it names where the
    count of a running service is instead (``doctor.run()`` called in the application, the
    ``crew_otel.spans.dropped`` metric, ``Setup.dropped_spans``).
    """
    if not processors:
        return (
            "Span export: none set up by crew_otel.configure() in this process. A running "
            f"service's dropped spans are its {export.DROPPED_SPANS} metric and "
            "Setup.dropped_spans (or call crew_otel.cli.doctor.run() inside it)."
        )
    table = Table(title="Span export in this process (crew_otel.configure())", show_header=True)
    table.add_column("destination", overflow="fold")
    table.add_column("queue")
    table.add_column("dropped (queue full)")
    for processor in processors:
        size = processor.max_queue_size
        dropped = f"{processor.dropped} dropped"
        colour = "red" if processor.dropped else "green"
        table.add_row(
            processor.destination.description,
            f"{size} spans" if size is not None else "unknown",
            f"[{colour}]{dropped}[/{colour}]",
        )
    return table


def internal_statuses(
    registry: tuple[internals.Internal, ...] = internals.REGISTRY,
) -> list[internals_check.InternalStatus]:
    """Whether each CrewAI/SDK internal the diagnoses read resolves on the installed versions."""
    return internals_check.statuses(registry)


def internals_table(statuses: list[internals_check.InternalStatus]) -> Table:
    """The internals table: name, status, installed version, versions checked on, detail."""
    table = Table(title="Internals read by the diagnoses", show_header=True)
    table.add_column("internal")
    table.add_column("status")
    table.add_column("installed")
    table.add_column("checked on")
    table.add_column("detail", overflow="fold")
    for status in statuses:
        label = "[green]resolves[/green]" if status.ok else "[red]missing[/red]"
        installed = f"{status.distribution} {status.version or 'not installed'}"
        table.add_row(status.name, label, installed, ", ".join(status.checked_on), status.detail)
    return table
