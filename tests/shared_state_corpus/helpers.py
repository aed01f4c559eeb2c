"""The application's helper module, called as ``helpers.save(x)`` by a corpus shape."""

from __future__ import annotations

SAVED: list[str] = []


def save(value: str) -> None:
    """Keep ``value`` (in module state: shared by every request)."""
    SAVED.append(value)
