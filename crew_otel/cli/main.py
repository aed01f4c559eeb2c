"""Entry point of the ``crew-otel`` command: ``demo``, ``report``, ``doctor`` and ``assets``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from crew_otel.demo.options import DemoOptions, add_arguments, from_arguments
from crew_otel.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crew-otel",
        description="OpenTelemetry for CrewAI: see why a crew fails under concurrent load.",
    )
    parser.add_argument("--version", action="version", version=f"crew-otel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="reproduce intermittent 500s under concurrency offline and print the diagnosis",
        description="Serve the broken and the fixed example service against a local "
        "fault-injecting OpenAI-compatible provider, send them requests one at a time and then "
        "in parallel bursts, and print where each failure began.",
    )
    add_arguments(demo, DemoOptions)

    report = commands.add_parser(
        "report",
        help="analyse an OTLP/JSON trace file (Collector file exporter, demo --out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Analyse an OTLP/JSON trace file (one ExportTraceServiceRequest per line:\n"
        "the Collector's file exporter, OTEL_TRACES_EXPORTER=crew_otel_file, demo --out)\n"
        "and print the diagnosis. The file is streamed: memory grows with the requests\n"
        "in flight, not with the file. A line that cannot be read (cut off by a crash or\n"
        "a full disk, or corrupt) is skipped; a warning on stderr counts the skipped\n"
        "lines and names them by number, never by content.",
        epilog="exit status 0: the report was printed (possibly with lines skipped)\n"
        "exit status 2: nothing usable (the file is missing, unreadable, empty, not\n"
        "               OTLP/JSON, or no line holds a readable span), or an output\n"
        "               file could not be written; one line on stderr says why",
    )
    report.add_argument("file", type=Path, help="the trace file")
    report.add_argument("--svg", type=Path, help="save the overlap timeline as an SVG image")
    report.add_argument("--summary-json", type=Path, help="write the report's figures as JSON")

    commands.add_parser("doctor", help="show installed versions and which CrewAI hooks apply here")

    assets = commands.add_parser(
        "assets",
        help="write the Collector stack, alert rules and Grafana dashboards into DIR",
        description="Write DIR/collector (Collector configs, compose files, Prometheus alert "
        "rules, Alertmanager and Grafana provisioning) and DIR/dashboards; then run "
        "`docker compose up -d` in DIR/collector. Files you changed are not overwritten.",
    )
    assets.add_argument("dir", type=Path)
    assets.add_argument(
        "--force", action="store_true", help="overwrite files that differ from the bundled ones"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "demo":
        from crew_otel.demo.driver import run as run_demo

        options = from_arguments(DemoOptions, args)
        return run_demo(options, console)
    if args.command == "report":
        from crew_otel import report as report_command

        return report_command.run(args.file, console, svg=args.svg, summary_json=args.summary_json)
    if args.command == "doctor":
        from crew_otel.cli import doctor

        return doctor.run(console)
    if args.command == "assets":
        from crew_otel.cli import assets as assets_command

        return assets_command.run(args.dir, console, force=args.force)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
