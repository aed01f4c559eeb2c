"""Why a run failed: one cause per failed run, from a small vocabulary (a metric label).

Classified once, when the run's exception reaches the caller, from what the error recording
already knows: the exception chain (``__cause__``/``__context__``), the operation of the
failure's fatal origin, and whether a span the failure went through was flagged as shared.
Precedence, first match wins:

1. ``cancelled``: the caller got a cancellation (``asyncio.CancelledError``: ``wait_for``
   timed out, the task was cancelled).
2. ``shared_instance``: a span on the failure's way from its origin to the kickoff (the
   kickoff included) was in use by another request at the same time: a Crew, Agent, Task,
   tool or LLM object, or a Task run with another request's inputs. Sharing beats the error
   type: "Executor is already running" is a ``RuntimeError``, the cause is the shared Agent.
3. ``shared_state``: the same for a module global, file, SQLite database or resource the
   tool code of two requests touched, or a tool call that found a SQLite database locked.
4. ``context_window``: the provider rejected the conversation as too long
   (``context_length_exceeded``), and CrewAI could not (or was told not to) summarise.
5. ``rate_limit``: a 429 left after every retry layer.
6. ``provider_error``: a 5xx from the provider left after every retry layer (even where
   CrewAI raised something else from it).
7. ``provider_timeout``: a timeout or a connection error talking to the provider.
8. ``guardrail``: a task guardrail that never passed (its retries ran out).
9. ``tool_error``: a tool raised and nothing took over (no retries left).
10. ``application_error``: anything else (a callback, the application's own code).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from enum import Enum

from crew_otel import attributes as a
from crew_otel.diagnosis import error_text
from crew_otel.diagnosis.retries import is_overflow


class FailureCause(str, Enum):
    """Values of ``crew_otel.failure.cause`` (public: dashboards and alerts use them)."""

    CANCELLED = "cancelled"
    SHARED_INSTANCE = "shared_instance"
    SHARED_STATE = "shared_state"
    CONTEXT_WINDOW = "context_window"
    RATE_LIMIT = "rate_limit"
    PROVIDER_ERROR = "provider_error"
    PROVIDER_TIMEOUT = "provider_timeout"
    GUARDRAIL = "guardrail"
    TOOL_ERROR = "tool_error"
    APPLICATION_ERROR = "application_error"

    def __str__(self) -> str:
        return self.value


#: Shared-instance kinds that are CrewAI objects (the rest are shared state).
_INSTANCE_KINDS = frozenset({"crew", "agent", "task", "tool", "llm", "task_inputs", "flow"})
#: Exception class names of a provider that did not answer in time or could not be reached
#: (the OpenAI SDK's, httpx's and the standard library's).
_TIMEOUT_NAMES = frozenset(
    {
        "APITimeoutError",
        "APIConnectionError",
        "TimeoutException",
        "ReadTimeout",
        "ConnectTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "ConnectError",
        "ReadError",
        "RemoteProtocolError",
        "Timeout",
        "TimeoutError",
    }
)


@dataclasses.dataclass(frozen=True)
class SharedThing:
    """What a span on the failure's way was shared as (``crew_otel.shared_instance.*``)."""

    kind: str
    name: str


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failed run's diagnosis, as written on its kickoff span."""

    cause: FailureCause
    #: The fatal origin's span name (low cardinality), when known.
    origin: str | None = None
    shared: SharedThing | None = None


def classify(
    exc: BaseException,
    origin_operation: str | None,
    shared: SharedThing | None,
    database_locked: bool = False,
) -> FailureCause:
    """The cause of a run failed by ``exc`` (see the module docstring for the precedence)."""
    if isinstance(exc, asyncio.CancelledError):
        return FailureCause.CANCELLED
    if shared is not None:
        if shared.kind in _INSTANCE_KINDS:
            return FailureCause.SHARED_INSTANCE
        return FailureCause.SHARED_STATE
    if database_locked:
        return FailureCause.SHARED_STATE
    chain = list(_chain(exc))
    if any(is_overflow(e) for e in chain):
        return FailureCause.CONTEXT_WINDOW
    for error in chain:
        status = a.error_type(error)
        if status == "429":
            return FailureCause.RATE_LIMIT
        if status.isdigit() and status.startswith("5"):
            return FailureCause.PROVIDER_ERROR
        if status == "408" or type(error).__name__ in _TIMEOUT_NAMES:
            return FailureCause.PROVIDER_TIMEOUT
    if origin_operation == a.Operation.GUARDRAIL.value:
        return FailureCause.GUARDRAIL
    if origin_operation == a.Operation.EXECUTE_TOOL.value:
        return FailureCause.TOOL_ERROR
    return FailureCause.APPLICATION_ERROR


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling (bounded, no cycles)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < error_text.MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
