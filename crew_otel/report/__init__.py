"""The diagnosis report shared by ``crew-otel demo`` and ``crew-otel report FILE``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from crew_otel.otlp_json import OtlpJsonError, read_file
from crew_otel.report.analysis import ServiceReport, analyse, summary
from crew_otel.report.render import print_reports, save_timeline_svg

__all__ = ["ServiceReport", "analyse", "run"]


def run(
    path: str | Path,
    console: Console,
    svg: str | Path | None = None,
    summary_json: str | Path | None = None,
) -> int:
    """``crew-otel report FILE``: 0 on success, 2 with a one-line error on unreadable input."""
    try:
        spans = read_file(path)
    except OtlpJsonError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"crew-otel report: error: {exc}", highlight=False, markup=False
        )
        return 2
    reports = analyse(spans)
    print_reports(reports, console)
    if svg is not None:
        save_timeline_svg(reports, svg)
        console.print(f"timeline saved to {svg}", highlight=False)
    if summary_json is not None:
        Path(summary_json).write_text(json.dumps(summary(reports), indent=2))
    return 0
