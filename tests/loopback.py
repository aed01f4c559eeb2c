"""Helpers for tests that start servers on 127.0.0.1 and wait for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from crew_otel.testing.ports import free_port

__all__ = ["free_port", "wait_for"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` every 0.5 s until it returns something truthy (returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
