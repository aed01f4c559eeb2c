"""Streaming kickoffs: iterate CrewAI's chunk iterators inside the kickoff's context.

``Crew(stream=True).kickoff*()`` (and a streaming ``Flow.kickoff*``) returns an output object at
once; CrewAI starts the run's thread (sync) or task (async) at the *first* ``next()`` /
``__anext__()``, with a copy of the context current then. Running every step of the iterator
under the kickoff's context puts the run in the kickoff's trace, with its request ID.

The iterators here replace the output's ``_sync_iterator`` / ``_async_iterator`` (the classes
and the versions they were checked on are in :mod:`crew_otel.internals`). They are classes, not
generators, so that ``close()`` / ``aclose()`` of a stream that was never iterated still tells
the owner the stream is over. They never swallow or replace what the inner iterator raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from opentelemetry import context as otel_context

from crew_otel import internals
from crew_otel.safety import safe_call

_attach = otel_context.attach
_detach = otel_context.detach


class StreamOwner(Protocol):
    """What a traced stream reports to the kickoff that returned it."""

    def stream_failed(self, exc: BaseException) -> None:
        """Iterating raised ``exc`` (the run's error, or the consumer's cancellation)."""

    def stream_done(self) -> None:
        """The stream is over: exhausted, failed, closed or collected (called at least once)."""


def is_streaming_output(result: Any) -> bool:
    """Whether ``result`` is one of CrewAI's streaming outputs."""
    return internals.STREAMING_OUTPUTS.matches(result)


class _Step:
    """One step of a traced stream: runs in the kickoff's context; tells the owner when the
    stream is over (exhausted or failed) and never swallows what the step raised."""

    __slots__ = ("_owner", "_token")

    def __init__(self, ctx: otel_context.Context, owner: StreamOwner) -> None:
        self._owner = owner
        self._token = _attach(ctx)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is not None:
                if not isinstance(exc, (StopIteration, StopAsyncIteration)):
                    safe_call(self._owner.stream_failed, exc, default=None)
                safe_call(self._owner.stream_done, default=None)
        finally:
            _detach(self._token)


class TracedStream:
    """A sync chunk iterator whose every step runs in the kickoff's context."""

    __slots__ = ("_ctx", "_inner", "_owner")

    def __init__(self, inner: Iterator[Any], ctx: otel_context.Context, owner: StreamOwner) -> None:
        self._inner = inner
        self._ctx = ctx
        self._owner = owner

    def __iter__(self) -> TracedStream:
        return self

    def __next__(self) -> Any:
        with _Step(self._ctx, self._owner):
            return next(self._inner)

    def close(self) -> None:
        """Close the inner iterator (CrewAI waits for the run there), then end the stream."""
        try:
            close = getattr(self._inner, "close", None)
            if callable(close):
                close()
        finally:
            safe_call(self._owner.stream_done, default=None)


class TracedAsyncStream:
    """An async chunk iterator whose every step runs in the kickoff's context."""

    __slots__ = ("_ctx", "_inner", "_owner")

    def __init__(
        self, inner: AsyncIterator[Any], ctx: otel_context.Context, owner: StreamOwner
    ) -> None:
        self._inner = inner
        self._ctx = ctx
        self._owner = owner

    def __aiter__(self) -> TracedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        # The context is attached and detached in the same task (the consumer's): CrewAI's
        # ``asyncio.create_task`` at the first step copies it into the run's task. A
        # cancellation of the consumer also ends the stream: CrewAI's generator is finished.
        with _Step(self._ctx, self._owner):
            return await self._inner.__anext__()

    async def aclose(self) -> None:
        """Close the inner iterator (CrewAI cancels or awaits the run), then end the stream."""
        try:
            aclose = getattr(self._inner, "aclose", None)
            if callable(aclose):
                await aclose()
        finally:
            safe_call(self._owner.stream_done, default=None)


def trace_stream(result: Any, ctx: otel_context.Context, owner: StreamOwner) -> bool:
    """Swap ``result``'s chunk iterator for a traced one; False if it has none to swap."""
    sync_iterator = internals.STREAM_SYNC_ITERATOR.read(result)
    if sync_iterator is not None:
        traced = TracedStream(sync_iterator, ctx, owner)
        return internals.STREAM_SYNC_ITERATOR.write(result, traced)
    async_iterator = internals.STREAM_ASYNC_ITERATOR.read(result)
    if async_iterator is not None:
        traced_async = TracedAsyncStream(async_iterator, ctx, owner)
        return internals.STREAM_ASYNC_ITERATOR.write(result, traced_async)
    return False
