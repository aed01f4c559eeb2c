"""Shared state outside CrewAI objects in words a person can act on: what the thing is (the
right noun for its shape) and what to change.

One source for the runtime warning (:mod:`crew_otel.diagnosis.sharing`) and the report
(:mod:`crew_otel.report.analysis`), which both see only what a ``crew_otel.shared_instance``
event carries: the kind (``global``, ``file``, ``database``, ``resource``), the class of the
object and the name. Names come from spans, hostile input: they are only quoted, never
evaluated.
"""

from __future__ import annotations

import re

GLOBAL = "global"
FILE = "file"
DATABASE = "database"
RESOURCE = "resource"

#: The class recorded for an ``os.environ`` write, and the name it carries: ``os.environ['X']``.
ENVIRON_CLASS = "os.environ"
_ENVIRON_NAME = re.compile(
    r"""\Aos\.environ\[(?P<quote>['"])(?P<variable>.*)(?P=quote)\]\Z""", re.S
)
#: Classes whose objects cannot change: a global of one of them was rebound, not mutated.
_VALUE_CLASSES = frozenset(
    {"int", "float", "complex", "str", "bytes", "bool", "NoneType", "tuple", "frozenset", "range"}
)

#: Shapes of shared state, each with its own words (see :func:`shape`).
MUTATED = "mutated"
REBOUND = "rebound"
ENVIRONMENT = "environment"

#: What to change, in the runtime warning, by shape.
ADVICE_MUTATED = (
    "tool code keeps state in a module or class: keep it per request (pass it in, or build "
    "the tool in a function that creates its state)"
)
ADVICE_REBOUND = (
    "tool code rebinds a module global: keep the value per request (pass it in, or return it)"
)
ADVICE_ENVIRONMENT = (
    "the process has one environment: pass the value to the code that needs it instead of "
    "setting os.environ from a request"
)
ADVICE_FILE = "give each request its own path (tempfile.mkstemp, or the request ID in the name)"
ADVICE_DATABASE = (
    "SQLite lets one writer in at a time: open connections with a busy timeout "
    "(sqlite3.connect(path, timeout=30)), keep write transactions short, or give each request "
    "its own database"
)
ADVICE_RESOURCE = (
    "open the connection, session or file per request (or per call), not once for every tool"
)
_WARNING_ADVICE = {
    MUTATED: ADVICE_MUTATED,
    REBOUND: ADVICE_REBOUND,
    ENVIRONMENT: ADVICE_ENVIRONMENT,
    FILE: ADVICE_FILE,
    DATABASE: ADVICE_DATABASE,
    RESOURCE: ADVICE_RESOURCE,
}
#: The report's shorter words, by shape: how the requests shared it, and what to change.
_REPORT_VERB = {
    MUTATED: "written by the tool code of",
    REBOUND: "rebound by the tool code of",
    ENVIRONMENT: "set by the tool code of",
    FILE: "written by the tool code of",
    DATABASE: "contended for by the tool code of",
    RESOURCE: "held by the tools of",
}
_REPORT_ADVICE = {
    MUTATED: "keep tool state per request",
    REBOUND: "pass the value in or return it instead of rebinding the global",
    ENVIRONMENT: "pass the value to the code that needs it instead of setting it in os.environ",
    FILE: "give each request its own path",
    DATABASE: "open connections with a busy timeout and keep write transactions short, or give "
    "each request its own database",
    RESOURCE: "open connections, sessions and files per request",
}


def environment_variable(class_name: str, name: str) -> str | None:
    """``X`` when the thing is the environment variable ``os.environ['X']``, else ``None``."""
    match = _ENVIRON_NAME.match(name)
    if match is not None:
        return match.group("variable")
    return name if class_name == ENVIRON_CLASS and name else None


def is_rebound_value(class_name: str) -> bool:
    """Whether a ``global`` of this class was rebound (``COUNTER += 1``): its value cannot
    change in place."""
    return short_class(class_name) in _VALUE_CLASSES


def short_class(class_name: str) -> str:
    """``dict`` for ``builtins.dict``."""
    return class_name.rsplit(".", 1)[-1]


def describe_state(kind: str, class_name: str, name: str) -> str:
    """The thing in words: ``module global 'app.CACHE'`` (an object the tool code changes),
    ``global int 'app.COUNTER'`` (a global rebound to a new value), ``environment variable
    'X'``, ``file '/srv/report.json'``, ``SQLite database '/srv/app.db'``,
    ``sqlite3.Connection at app.db.CONNECTION`` (a resource, named by where it is held)."""
    if kind == GLOBAL:
        variable = environment_variable(class_name, name)
        if variable is not None:
            return f"environment variable {variable!r}"
        noun = _MODULE
        if is_rebound_value(class_name):
            short = short_class(class_name)
            noun = "global" if short == "NoneType" else f"global {short}"
        return f"{noun} {name!r}" if name else noun
    named = _NOUNS.get(kind)
    if named is not None:
        return f"{named} {name!r}" if name else named
    if kind == RESOURCE:
        return name or short_class(class_name) or RESOURCE
    return f"{kind} {name!r}" if name else kind


_MODULE = "module global"
_NOUNS = {FILE: "file", DATABASE: "SQLite database"}


def shape(kind: str, class_name: str, name: str) -> str:
    """The shape of a shared thing, for its words: :data:`ENVIRONMENT` (``os.environ['X']``),
    :data:`REBOUND` (a global rebound to a new value), :data:`MUTATED` (an object the tool code
    changes), else the kind itself (``file``, ``database``, ``resource``)."""
    if kind != GLOBAL:
        return kind
    if environment_variable(class_name, name) is not None:
        return ENVIRONMENT
    return REBOUND if is_rebound_value(class_name) else MUTATED


def warning_advice(kind: str, class_name: str, name: str) -> str:
    """What to change, in the runtime warning (``''`` for a kind that is not shared state)."""
    return _WARNING_ADVICE.get(shape(kind, class_name, name), "")


def report_verb(kind: str, class_name: str, name: str) -> str:
    """How the requests shared the thing, in the report: ``written by the tool code of``."""
    return _REPORT_VERB.get(shape(kind, class_name, name), "used by")


def report_advice(kind: str, class_name: str, name: str) -> str:
    """What to change, in the report's one-sentence conclusion (``''`` if not shared state)."""
    return _REPORT_ADVICE.get(shape(kind, class_name, name), "")


def article(phrase: str) -> str:
    """``a`` or ``an`` before ``phrase`` (``an environment variable``, ``a SQLite database``)."""
    return "an" if phrase[:1].lower() in "aeio" and phrase[:1] else "a"
