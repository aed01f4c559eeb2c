"""One helper through which every piece of instrumentation code runs.

The rule: only the wrapped CrewAI call, and the re-raise of its own exception, may raise into
user code. Everything else (attribute extraction, bookkeeping, metrics) goes through
:func:`safe_call`, which logs an internal error once per place and returns a default.

Tests turn on *strict* mode (``CREW_OTEL_STRICT=1`` or :func:`set_strict`) so that a bug in the
instrumentation fails the test suite instead of hiding behind a log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

_logger = logging.getLogger("crew_otel")

_T = TypeVar("_T")

_TRUE = frozenset({"1", "true", "yes", "on"})

_strict: bool = os.environ.get("CREW_OTEL_STRICT", "").strip().lower() in _TRUE
_reported: set[str] = set()


def set_strict(strict: bool) -> None:
    """Make internal errors raise (``True``, for tests) or be logged and swallowed (default)."""
    global _strict  # noqa: PLW0603 - one process-wide switch, read on the error path only
    _strict = strict


def report_internal_error(where: str, exc: BaseException) -> None:
    """Log an error that happened inside crew_otel: a warning the first time per place.

    Later errors from the same place are logged at debug level, so a broken extractor on a hot
    path cannot flood the application's logs.
    """
    if where in _reported:
        _logger.debug("crew_otel internal error in %s: %r", where, exc)
        return
    _reported.add(where)
    _logger.warning(
        "crew_otel internal error in %s (the application is not affected; further errors "
        "from this place are logged at debug level)",
        where,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def safe_call(fn: Callable[..., _T], *args: Any, default: _T, **kwargs: Any) -> _T:
    """Call ``fn(*args, **kwargs)``; on any ``Exception`` log it once and return ``default``.

    ``BaseException``s that are not ``Exception`` (``KeyboardInterrupt``, ``SystemExit``,
    ``GeneratorExit``) are not caught: they belong to the application.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return internal_error(fn, exc, default)


def internal_error(fn: Callable[..., Any], exc: Exception, default: _T) -> _T:
    """The ``except Exception`` branch of :func:`safe_call`, for the hot paths that run a step
    inline (``try: x = step() / except Exception as exc: x = internal_error(step, exc, d)``):
    one Python call fewer per step than going through :func:`safe_call`.

    Raises ``exc`` again in strict mode; else logs it once per place and returns ``default``.
    """
    if _strict:
        raise exc
    report_internal_error(_name_of(fn), exc)
    return default


def reset_reported_errors() -> None:
    """Forget which places already logged an error (tests use this between cases)."""
    _reported.clear()
