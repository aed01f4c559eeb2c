"""Entry point of the ``crew-otel`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from crew_otel.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crew-otel",
        description="OpenTelemetry for CrewAI: see why a crew fails under concurrent load.",
    )
    parser.add_argument("--version", action="version", version=f"crew-otel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("doctor", help="show installed versions and which CrewAI hooks apply here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "doctor":
        from crew_otel.cli import doctor

        return doctor.run(console)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
