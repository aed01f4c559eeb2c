"""The demo's options, declared once.

:class:`DemoOptions` is ``crew-otel demo``'s command line, :class:`ServeOptions` the command
line of each service process (``python -m crew_otel.demo.serve``): both parsers, and the
arguments the driver passes to a service, are made from the dataclass fields (a field
``rate_limit_rate`` is the option ``--rate-limit-rate``; a field without a default is
required). This module imports no more than the standard library: the CLI builds its parser
from it at every start.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from crew_otel.demo.services import SERVICES


def positive_int(text: str) -> int:
    """An argument that is a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def rate(text: str) -> float:
    """An argument that is a share between 0 and 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def option(
    parse: Callable[[str], Any] = str,
    description: str | None = None,
    choices: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metadata that makes a dataclass field a command-line option: how to parse it and its
    help text (``%(default)s`` in it shows the default)."""
    return {"parse": parse, "help": description, "choices": choices}


def _flag(spec: dataclasses.Field[Any]) -> str:
    return "--" + spec.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, options: type[Any]) -> None:
    """Add an option to ``parser`` for each field of the dataclass ``options``."""
    for spec in dataclasses.fields(options):
        required = spec.default is dataclasses.MISSING
        parser.add_argument(
            _flag(spec),
            dest=spec.name,
            type=spec.metadata["parse"],
            choices=spec.metadata["choices"],
            required=required,
            default=None if required else spec.default,
            help=spec.metadata["help"],
        )


_O = TypeVar("_O")


def from_arguments(options: type[_O], arguments: argparse.Namespace) -> _O:
    """The dataclass ``options`` made from what :func:`add_arguments` parsed."""
    names = [f.name for f in dataclasses.fields(cast(Any, options))]
    return options(**{name: getattr(arguments, name) for name in names})


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """``crew-otel demo``'s options."""

    requests: int = dataclasses.field(
        default=20,
        metadata=option(positive_int, "requests per service (default %(default)s)"),
    )
    concurrency: int = dataclasses.field(
        default=8, metadata=option(positive_int, "requests per burst (default %(default)s)")
    )
    error_rate: float = dataclasses.field(
        default=0.1,
        metadata=option(
            rate, "share of provider requests answered with HTTP 500 (default %(default)s)"
        ),
    )
    rate_limit_rate: float = dataclasses.field(
        default=0.0, metadata=option(rate, "share answered with HTTP 429")
    )
    timeout_rate: float = dataclasses.field(
        default=0.0, metadata=option(rate, "share that hangs past the client timeout")
    )
    latency: float = dataclasses.field(
        default=0.05,
        metadata=option(float, "provider latency in seconds (default %(default)s)"),
    )
    seed: int | None = dataclasses.field(
        default=1, metadata=option(int, "seed of the provider's faults")
    )
    otlp_endpoint: str | None = dataclasses.field(
        default=None,
        metadata=option(
            str,
            "also send traces and metrics to this OTLP/HTTP endpoint (http://127.0.0.1:4318)",
        ),
    )
    out: Path | None = dataclasses.field(
        default=None, metadata=option(Path, "write the spans to FILE as OTLP/JSON lines")
    )
    svg: Path | None = dataclasses.field(
        default=None, metadata=option(Path, "save the overlap timeline as an SVG image")
    )
    summary_json: Path | None = dataclasses.field(
        default=None, metadata=option(Path, "write the report's figures as JSON")
    )


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The options of one service process (``python -m crew_otel.demo.serve``)."""

    service: str = dataclasses.field(metadata=option(choices=tuple(SERVICES)))
    port: int = dataclasses.field(metadata=option(int))
    provider_url: str = dataclasses.field(metadata=option())
    trace_file: Path = dataclasses.field(metadata=option(Path))
    otlp_endpoint: str | None = dataclasses.field(default=None, metadata=option())
    llm_timeout: float = dataclasses.field(default=2.0, metadata=option(float))
    workdir: Path | None = dataclasses.field(
        default=None, metadata=option(Path, "default: the trace file's directory")
    )

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None) -> ServeOptions:
        """The options on a service process's command line."""
        parser = argparse.ArgumentParser(prog="python -m crew_otel.demo.serve")
        add_arguments(parser, cls)
        return from_arguments(cls, parser.parse_args(argv))

    def argv(self) -> list[str]:
        """The command-line arguments that :meth:`parse` reads back as these options."""
        arguments: list[str] = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is not None:
                arguments += [_flag(spec), str(value)]
        return arguments
