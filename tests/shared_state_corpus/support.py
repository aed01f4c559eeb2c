"""What every corpus shape's tool code calls: a meeting point for the requests of a test."""

from __future__ import annotations

import threading

#: Set by the CrewAI test while a shape runs; the tool calls of its requests meet here.
GATE: dict[str, threading.Barrier] = {}
#: Per test: a directory for files and databases (set by the tests).
PLACE: dict[str, str] = {}


def meet() -> None:
    """Wait until every request of the test is inside its tool call (bounded; not on an event
    loop's thread, where CrewAI 1.12 runs ``akickoff`` tools)."""
    from tests.workloads import meet_in_tool

    meet_in_tool(GATE.get("barrier"), timeout=20)


def request_index(query: str) -> int:
    """The request's index, from the marker ``[[tN]]`` the provider puts in the tool input."""
    digits = "".join(c for c in query.rsplit("[[t", 1)[-1] if c.isdigit())
    return int(digits) if digits else -1
