"""``crew-otel doctor``: versions, and what each hook of the targets table would do here."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from crew_otel import targets
from crew_otel.http import HTTP_CLIENTS, HTTP_INSTRUMENTATION
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


@dataclass(frozen=True)
class HookStatus:
    key: str
    layer: str
    installed: bool
    detail: str


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


def hook_statuses() -> list[HookStatus]:
    """Resolve every row of the targets table without installing anything."""
    statuses = []
    for target in targets.TARGETS:
        try:
            targets.resolve(target)
        except targets.Unresolved as reason:
            statuses.append(HookStatus(target.key, target.layer, False, str(reason)))
        else:
            statuses.append(HookStatus(target.key, target.layer, True, target.note))
    statuses.extend(http_statuses())
    return statuses


def http_statuses() -> list[HookStatus]:
    """The HTTP rows: each client's layer installs when the client and its pool are imported."""
    statuses = []
    for client in HTTP_CLIENTS:
        missing = next(
            (name for name in (client.module, client.pool_module) if not _findable(name)), None
        )
        if missing is not None:
            statuses.append(HookStatus(client.key, "http", False, f"{missing} not installed"))
            continue
        try:
            module = importlib.import_module(HTTP_INSTRUMENTATION)
        except ImportError as exc:
            statuses.append(HookStatus(client.key, "http", False, str(exc)))
            continue
        if not hasattr(module, client.instrumentor):
            detail = f"no {client.instrumentor} in this opentelemetry-instrumentation-httpx"
            statuses.append(HookStatus(client.key, "http", False, detail))
            continue
        statuses.append(
            HookStatus(
                client.key,
                "http",
                True,
                f"{client.instrumentor}; installs when {client.module} and "
                f"{client.pool_module} are imported (its first client)",
            )
        )
    return statuses


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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
    hooks = Table(title="Hooks", show_header=True)
    hooks.add_column("layer")
    hooks.add_column("target", overflow="fold")
    hooks.add_column("status")
    hooks.add_column("detail", overflow="fold")
    statuses = hook_statuses()
    for status in statuses:
        label = "[green]installed[/green]" if status.installed else "[yellow]skipped[/yellow]"
        hooks.add_row(status.layer, status.key, label, status.detail)
    console.print(hooks)
    installed = sum(1 for s in statuses if s.installed)
    console.print(f"{installed} of {len(statuses)} hooks available in this environment.")
    return 0 if supported else 1
