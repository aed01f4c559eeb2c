"""The request ID and the other run-scoped values crew_otel keeps in the OpenTelemetry Context.

Values live in the OTel Context (a contextvar), never in thread-locals: CrewAI copies the context
into its worker threads (``asyncio.to_thread``, ``copy_context().run``), so the request ID follows
the run wherever its work goes. Threads started without a copy are covered by the threading
instrumentation that :func:`crew_otel.instrument` installs.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, cast

from opentelemetry import context as otel_context

REQUEST_ID_KEY = otel_context.create_key("crew_otel.request_id")
"""Context key of the current request ID (a ``str``)."""

KICKOFF_KEY = otel_context.create_key("crew_otel.kickoff")
"""Context key of the innermost active kickoff (:class:`crew_otel.wrappers.base.ActiveKickoff`)."""

ATTEMPT_KEY = otel_context.create_key("crew_otel.agent_attempt")
"""Context key of the innermost agent execution attempt (its step tracker)."""

LLM_CALL_KEY = otel_context.create_key("crew_otel.llm_call")
"""Context key of the model call in progress (its HTTP attempts are recorded there)."""

TOOL_CALL_KEY = otel_context.create_key("crew_otel.tool_call")
"""Context key of the tool call in progress (so the tool's own ``run`` adds no second span)."""

MAX_REQUEST_ID_LENGTH = 256

_F = TypeVar("_F", bound=Callable[..., Any])


def new_request_id() -> str:
    """A new random request ID (16 hex characters)."""
    return uuid.uuid4().hex[:16]


def current_request_id() -> str | None:
    """The request ID of the run the caller is in, or ``None`` outside any run."""
    value = otel_context.get_value(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


def _validated(request_id: object) -> str:
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if not request_id:
        raise ValueError("request_id must not be empty")
    return request_id[:MAX_REQUEST_ID_LENGTH]


class request:
    """Run the enclosed code as one request: every kickoff inside uses ``request_id``.

    Use it as a context manager (``with crew_otel.request(request.headers["X-Request-ID"]):``)
    or as a decorator on a sync or ``async`` function. Without an argument a new ID is
    generated on every entry. The ID is used verbatim (cut to 256 characters).

    The ``with`` statement returns the request ID::

        with crew_otel.request() as request_id:
            crew.kickoff(inputs)
    """

    def __init__(self, request_id: str | None = None) -> None:
        self._request_id = None if request_id is None else _validated(request_id)
        self._tokens: list[object] = []

    def __enter__(self) -> str:
        request_id = self._request_id or new_request_id()
        ctx = otel_context.set_value(REQUEST_ID_KEY, request_id)
        self._tokens.append(otel_context.attach(ctx))
        return request_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel_context.detach(cast(Any, self._tokens.pop()))

    def __call__(self, func: _F) -> _F:
        request_id = self._request_id
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with request(request_id):
                    return await func(*args, **kwargs)

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with request(request_id):
                return func(*args, **kwargs)

        return cast(_F, wrapper)
