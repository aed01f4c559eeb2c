"""Waiting for another process: a server that is starting, a file that is being written.

What happens in this process is waited on as a fact (a gate, a barrier, a condition);
:func:`wait_for` is for what only polling can see, with a bound that fails the test naming
what never happened (a bound against a broken test, never a measurement).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from crew_otel.testing.ports import free_port

__all__ = ["free_port", "wait_for"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` every ``interval`` s until it returns something truthy (returned);
    ``AssertionError`` "timed out waiting for WHAT" after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
