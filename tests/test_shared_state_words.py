"""Shared state in words a person can act on, for every kind and shape: the right noun for the
thing (``global int 'app.COUNTER'`` for a rebound int, ``environment variable 'X'``), no
doubled word ("file file"), and advice that fits the shape, in the report and in the runtime
warning.

The report's input is written as ``tests/test_report_shared_state.py`` writes it (the public
event names, read back by ``crew-otel report``); the warnings come from real tool code of the
corpus (``tests/shared_state_corpus``) run as concurrent requests through CrewAI.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shared_state_corpus import shapes
from tests.shared_state_corpus.shapes import SHAPES
from tests.test_report_shared_state import Traces, event, one_line, run_report
from tests.test_shared_state_corpus import place, provider, run_threads, slug  # noqa: F401

_DOUBLED = re.compile(r"\b([A-Za-z]+)\s+\1\b", re.IGNORECASE)
#: Words that were wrong for a shape: the kind repeated as a noun, an int called a module.
_WRONG_EVERYWHERE = ("file file", "global module", "resource connection", "a environment")


def doubled_words(text: str) -> list[str]:
    return [match.group(0) for match in _DOUBLED.finditer(text)]


@dataclass(frozen=True)
class Words:
    """One shape as the event names it, and the words expected for it."""

    id: str
    kind: str
    class_name: str
    name: str
    #: The thing in words.
    noun: str
    #: A part of the advice that fits the shape.
    advice: str
    #: Words that were used for it and are wrong.
    wrong: tuple[str, ...] = ()


def report_shapes(tmp: Path) -> list[Words]:
    path, database = str(tmp / "report.json"), str(tmp / "tickets.sqlite")
    return [
        Words(
            "module dict",
            "global",
            "builtins.dict",
            "app.tools.CACHE",
            "module global 'app.tools.CACHE'",
            "keep tool state per request",
        ),
        Words(
            "rebound int",
            "global",
            "builtins.int",
            "app.counter",
            "global int 'app.counter'",
            "instead of rebinding the global",
            ("module global 'app.counter'",),
        ),
        Words(
            "rebound str",
            "global",
            "builtins.str",
            "app.LAST",
            "global str 'app.LAST'",
            "instead of rebinding the global",
            ("module global 'app.LAST'",),
        ),
        Words(
            "environment variable",
            "global",
            "os.environ",
            "os.environ['TICKET']",
            "environment variable 'TICKET'",
            "instead of setting it in os.environ",
            ("module global", "os.environ['TICKET']", "app.os.environ"),
        ),
        Words(
            "class attribute",
            "global",
            "builtins.list",
            "app.Registry.entries",
            "module global 'app.Registry.entries'",
            "keep tool state per request",
        ),
        Words(
            "module object",
            "global",
            "app.store.Store",
            "app.store.STORE",
            "module global 'app.store.STORE'",
            "keep tool state per request",
        ),
        Words(
            "fixed file",
            "file",
            "file",
            path,
            f"file '{path}'",
            "give each request its own path",
        ),
        Words(
            "database",
            "database",
            "sqlite3.Connection",
            database,
            f"SQLite database '{database}'",
            "busy timeout",
            ("give each request its own database or serialise the writes", "written by"),
        ),
        Words(
            "resource connection",
            "resource",
            "sqlite3.Connection",
            "sqlite3.Connection at app.db.CONNECTION",
            "sqlite3.Connection at app.db.CONNECTION",
            "open connections, sessions and files per request",
        ),
        Words(
            "resource file handle",
            "resource",
            "_io.TextIOWrapper",
            "_io.TextIOWrapper at app.LOG",
            "_io.TextIOWrapper at app.LOG",
            "open connections, sessions and files per request",
        ),
    ]


REPORT_IDS = [words.id for words in report_shapes(Path("/tmp"))]


@pytest.mark.parametrize("index", range(len(REPORT_IDS)), ids=REPORT_IDS)
@pytest.mark.parametrize("failed", [False, True], ids=["succeeded", "failed"])
def test_report_words_fit_each_shape(index: int, failed: bool, tmp_path: Path) -> None:
    words = report_shapes(tmp_path)[index]
    traces = Traces()
    try:
        traces.request("r-1", 0, 300)
        traces.request(
            "r-2",
            10,
            310,
            [event(words.kind, words.name, words.class_name, "r-1")],
            tool_error="OperationalError" if failed else None,
        )
        text, figures = run_report(traces.spans(), tmp_path)
    finally:
        traces.provider.shutdown()
    conclusion, flat = figures["conclusion"], one_line(text)
    said = [conclusion, flat, *figures["causes"]]
    assert words.noun in conclusion, conclusion
    assert words.noun in flat
    assert words.advice in conclusion, conclusion
    if failed:
        assert [cause for cause in figures["causes"] if words.noun in cause], figures["causes"]
    for sentence in said:
        assert not doubled_words(sentence), sentence
        for wrong in (*_WRONG_EVERYWHERE, *words.wrong):
            assert wrong.lower() not in sentence.lower(), (wrong, sentence)


# --- the runtime warnings, from real tool code ------------------------------------------------
M = shapes.__name__
_BY_ID = {shape.id: shape for shape in SHAPES}
#: Corpus shape -> (the thing in words, a part of the advice, wrong words for it).
WARNINGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "module dict by name": (
        f"module global '{M}.COUNTS'",
        "keep it per request",
        (),
    ),
    "global int": (
        f"global int '{M}.COUNTER'",
        "rebinds a module global",
        (f"module global '{M}.COUNTER'",),
    ),
    "global rebound": (
        f"global str '{M}.LAST'",
        "rebinds a module global",
        (f"module global '{M}.LAST'",),
    ),
    "os.environ write": (
        "environment variable 'CREW_OTEL_CORPUS_TICKET'",
        "the process has one environment",
        ("os.environ['CREW_OTEL_CORPUS_TICKET']", "module global"),
    ),
    "class attribute": (
        f"module global '{M}.Registry.entries'",
        "keep it per request",
        (),
    ),
    "fixed file": ("file '{dir}/report.json'", "give each request its own path", ()),
    "module sqlite connection": (
        f"sqlite3.Connection at {M}.CONNECTION",
        "open the connection, session or file per request",
        ("'sqlite3.Connection at",),
    ),
    "database is locked": (
        "SQLite database '{dir}/tickets.sqlite'",
        "busy timeout",
        (),
    ),
}


@pytest.mark.parametrize("shape_id", list(WARNINGS), ids=[slug(s) for s in WARNINGS])
def test_warning_words_fit_each_shape(
    otel,
    provider,  # noqa: F811
    place,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    shape_id: str,
) -> None:
    noun, advice, wrong = WARNINGS[shape_id]
    noun = noun.format(dir=place)
    with caplog.at_level(logging.WARNING, logger="crew_otel"):
        run_threads(_BY_ID[shape_id], provider, gate_name=f"words-{slug(shape_id)}")
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "crew_otel" and "is used by request" in record.getMessage()
    ]
    assert warnings, f"{shape_id}: no warning"
    assert len(warnings) == 1, warnings  # once per thing
    message = warnings[0]
    assert f"crew_otel: {noun} is used by request req-" in message, message
    assert advice in message, message
    assert not doubled_words(message), message
    for word in (*_WRONG_EVERYWHERE, *wrong):
        assert word.lower() not in message.lower(), (word, message)
