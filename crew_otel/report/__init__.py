"""The diagnosis report shared by ``crew-otel demo`` and ``crew-otel report FILE``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from crew_otel.otlp_json import OtlpJsonError, ReadLog, iter_file
from crew_otel.report.analysis import Analysis, ServiceReport, analyse, summary
from crew_otel.report.render import print_reports, save_timeline_svg

__all__ = ["EXIT_OK", "EXIT_UNUSABLE", "ServiceReport", "analyse", "run"]

#: The report was printed (lines that could not be read are named in a warning on stderr).
EXIT_OK = 0
#: Nothing to report: the file is missing, unreadable, empty, not OTLP/JSON or holds no
#: readable span; or an output file could not be written. One line on stderr says why.
EXIT_UNUSABLE = 2


def run(
    path: str | Path,
    console: Console,
    svg: str | Path | None = None,
    summary_json: str | Path | None = None,
) -> int:
    """``crew-otel report FILE``: :data:`EXIT_OK`, or :data:`EXIT_UNUSABLE` with a one-line
    error. The file is streamed: memory grows with the traces in flight, not with the file."""
    errors = Console(stderr=True, soft_wrap=True)
    log = ReadLog(str(path))
    analysis = Analysis()
    try:
        for span in iter_file(path, log):
            analysis.add(span)
        unusable = log.unusable()
        if unusable is not None:
            raise unusable
    except OtlpJsonError as exc:
        errors.print(f"crew-otel report: error: {exc}", highlight=False, markup=False)
        return EXIT_UNUSABLE
    warning = log.warning()
    if warning is not None:
        errors.print(f"crew-otel report: warning: {warning}", highlight=False, markup=False)
    reports = analysis.reports()
    print_reports(reports, console)
    try:
        if svg is not None:
            save_timeline_svg(reports, svg)
            console.print(f"timeline saved to {svg}", highlight=False)
        if summary_json is not None:
            Path(summary_json).write_text(json.dumps(summary(reports), indent=2))
    except OSError as exc:
        target = exc.filename if exc.filename is not None else summary_json or svg
        errors.print(
            f"crew-otel report: error: cannot write {target}: {exc.strerror or exc}",
            highlight=False,
            markup=False,
        )
        return EXIT_UNUSABLE
    return EXIT_OK
