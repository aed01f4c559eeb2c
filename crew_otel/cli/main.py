"""Entry point of the ``crew-otel`` command: ``demo``, ``report``, ``doctor`` and ``assets``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from crew_otel.version import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


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
    demo.add_argument(
        "--requests", type=_positive_int, default=20, help="requests per service (default 20)"
    )
    demo.add_argument(
        "--concurrency", type=_positive_int, default=8, help="requests per burst (default 8)"
    )
    demo.add_argument(
        "--error-rate",
        type=_rate,
        default=0.1,
        help="share of provider requests answered with HTTP 500 (default 0.1)",
    )
    demo.add_argument(
        "--rate-limit-rate", type=_rate, default=0.0, help="share answered with HTTP 429"
    )
    demo.add_argument(
        "--timeout-rate", type=_rate, default=0.0, help="share that hangs past the client timeout"
    )
    demo.add_argument(
        "--latency", type=float, default=0.05, help="provider latency in seconds (default 0.05)"
    )
    demo.add_argument("--seed", type=int, default=1, help="seed of the provider's faults")
    demo.add_argument(
        "--otlp-endpoint",
        help="also send traces and metrics to this OTLP/HTTP endpoint (http://127.0.0.1:4318)",
    )
    demo.add_argument("--out", type=Path, help="write the spans to FILE as OTLP/JSON lines")
    demo.add_argument("--svg", type=Path, help="save the overlap timeline as an SVG image")
    demo.add_argument("--summary-json", type=Path, help="write the report's figures as JSON")

    report = commands.add_parser(
        "report", help="analyse an OTLP/JSON trace file (Collector file exporter, demo --out)"
    )
    report.add_argument("file", type=Path)
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
        from crew_otel.demo.driver import DemoOptions
        from crew_otel.demo.driver import run as run_demo

        options = DemoOptions(
            requests=args.requests,
            concurrency=args.concurrency,
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            timeout_rate=args.timeout_rate,
            latency=args.latency,
            seed=args.seed,
            otlp_endpoint=args.otlp_endpoint,
            out=args.out,
            svg=args.svg,
            summary_json=args.summary_json,
        )
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
