"""Will a retry layer take over after this error? (for ``crew_otel.error.recovered``)

CrewAI stacks three retry layers: the provider SDK's HTTP retries (``max_retries``, default 2),
CrewAI's rate-limit retry wrapper (3 attempts, 429/throttling only, crewai >= 1.15.25) and the
agent re-running the whole ``execute_task`` (``max_retry_limit``, default 2, counted over the
Agent's lifetime). A span is ended before anyone knows whether a later attempt succeeds, so the
origin span records whether one of these layers *will retry* after its error: ``recovered=true``
means the error did not end the operation there. When every layer gives up, exactly one origin
of the failure is ``recovered=false``: the one whose error reached the caller.

CrewAI also handles a context-window overflow (a 400) of an agent's model call itself: it
summarises the conversation or raises ``SystemExit`` (a new error). The HTTP attempt cannot tell
an overflow from another 400 (the body is read after its span ended), so inside an agent's
execution a 400 counts on that handling; the model call, which sees the exception, becomes the
fatal origin when it was not an overflow (see ``ErrorRecorder.record``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from opentelemetry import context as otel_context

from crew_otel import internals
from crew_otel.context import ATTEMPT_KEY

#: CrewAI's rate-limit wrapper makes 3 attempts, i.e. 2 retries.
RATE_LIMIT_MAX_RETRIES = 2
#: The Stainless SDKs (OpenAI, Anthropic) do not retry when asked to wait longer than this.
MAX_RETRY_AFTER_SECONDS = 120.0
#: Exceptions ``Agent.execute_task`` passes through without re-running the agent.
_AGENT_PASSTHROUGH = frozenset({"ToolExecutionFailedError", "HookAborted"})
#: Set in the context of a call whose CrewAI caller logs every ``Exception`` it raises and goes
#: on (an agent's reasoning step: the agent then works without a plan).
SWALLOWED_BY_CALLER_KEY = otel_context.create_key("crew_otel.swallowed_by_caller")
#: Exceptions those callers raise again (a hook aborting the run).
_NOT_SWALLOWED = frozenset({"HookAborted"})
#: Set in the context while CrewAI handles a context-window overflow (``handle_context_length``):
#: an overflow of its summarising call is not handled again.
HANDLING_OVERFLOW_KEY = otel_context.create_key("crew_otel.handling_overflow")
#: The status providers reject an overflowing request with.
OVERFLOW_STATUS = 400
#: CrewAI's exception for an overflow (what its agent loop handles).
_OVERFLOW_ERRORS = frozenset({"LLMContextLengthExceededError"})
#: Causes looked at to find an overflow behind an exception.
_MAX_CAUSES = 8


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return float(raw) / scale
        except ValueError:
            return None  # an HTTP date: the SDK honours it like a normal retry
    return None


def sdk_will_retry_status(status: int, headers: Mapping[str, str]) -> bool:
    """Whether the provider SDK retries a response with this status (if retries are left)."""
    retry_after = _retry_after(headers)
    if (
        retry_after is not None
        and math.isfinite(retry_after)
        and retry_after > MAX_RETRY_AFTER_SECONDS
    ):
        return False
    should = headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    return status in (408, 409, 429) or status >= 500


class RetryBudget(Protocol):
    """What a model call knows of its retry layers (``wrappers.llm.LlmCallState``)."""

    @property
    def max_retries(self) -> int:
        """The SDK's HTTP retry budget for the call."""
        ...

    @property
    def rate_limit_layer(self) -> bool:
        """Whether CrewAI's rate-limit retry wrapper is present."""
        ...

    @property
    def rate_limit_retries(self) -> int:
        """Rate-limit retries made so far."""
        ...


def attempt_recovered(
    budget: RetryBudget, resend: int, status: int | None, headers: Mapping[str, str]
) -> bool:
    """Whether a retry layer retries this failed HTTP attempt of a model call.

    Args:
        resend: the attempt's retry number (the SDK's ``x-stainless-retry-count``).
        status: the response status; ``None`` for a transport error (timeouts and connection
            errors are retried by the SDKs while retries are left).
        headers: the response headers, lower-cased (``retry-after``, ``x-should-retry``).
    """
    retryable = status is None or sdk_will_retry_status(status, headers)
    if retryable and resend < budget.max_retries:
        return True  # the SDK retries
    if (
        budget.rate_limit_layer
        and status == 429
        and budget.rate_limit_retries < RATE_LIMIT_MAX_RETRIES
    ):
        return True  # CrewAI's rate-limit wrapper retries
    if status == OVERFLOW_STATUS and crewai_handles_overflow():
        return True  # an overflow is CrewAI's to handle; the model call tells if it was not
    return crewai_recovers()  # the SDK's error propagates; CrewAI may go on or re-run


def swallowed(exc: BaseException) -> bool:
    """Whether a caller that swallows errors (``SWALLOWED_BY_CALLER_KEY``) swallows ``exc``."""
    return isinstance(exc, Exception) and type(exc).__name__ not in _NOT_SWALLOWED


def crewai_recovers(exc: BaseException | None = None) -> bool:
    """Whether CrewAI goes on after an error in this context without it reaching the caller:
    the call's CrewAI caller swallows it (an agent's reasoning step), or the agent re-runs."""
    if otel_context.get_value(SWALLOWED_BY_CALLER_KEY) is True and (exc is None or swallowed(exc)):
        return True
    if exc is not None and is_overflow(exc) and crewai_handles_overflow():
        return True  # CrewAI summarises (or raises SystemExit, a new error)
    return agent_will_retry(exc)


def crewai_handles_overflow() -> bool:
    """Whether CrewAI handles a context-window overflow of a model call in this context: a
    call made in an agent's execution, other than the one summarising after an overflow."""
    return (
        otel_context.get_value(ATTEMPT_KEY) is not None
        and otel_context.get_value(HANDLING_OVERFLOW_KEY) is not True
    )


def is_overflow(exc: BaseException) -> bool:
    """Whether ``exc`` is (raised from) CrewAI's context-window overflow error."""
    current: BaseException | None = exc
    for _ in range(_MAX_CAUSES):
        if current is None:
            return False
        if type(current).__name__ in _OVERFLOW_ERRORS:
            return True
        current = current.__cause__
    return False


def agent_will_retry(exc: BaseException | None = None) -> bool:
    """Whether ``Agent.execute_task`` re-runs the agent after an error in this context."""
    scope: Any = otel_context.get_value(ATTEMPT_KEY)
    agent = getattr(scope, "agent", None)
    if agent is None or not getattr(scope, "task_key", 0):
        return False  # no agent attempt (a standalone Agent.kickoff does not retry)
    if exc is not None:
        if not isinstance(exc, Exception) or isinstance(exc, TimeoutError):
            return False
        cls = type(exc)
        if cls.__name__ in _AGENT_PASSTHROUGH or cls.__module__.startswith("litellm"):
            return False
    limit = getattr(agent, "max_retry_limit", None)
    used = internals.AGENT_TIMES_EXECUTED.read(agent)
    if not isinstance(limit, int) or not isinstance(used, int):
        return False
    return used < limit
