"""The request ID and the other run-scoped values crew_otel keeps in the OpenTelemetry Context.

Values live in the OTel Context (a contextvar), never in thread-locals: CrewAI copies the context
into its worker threads (``asyncio.to_thread``, ``copy_context().run``), so the request ID follows
the run wherever its work goes. Threads started without a copy are covered by the threading
hooks that :func:`crew_otel.instrument` installs.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import unicodedata
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from opentelemetry import context as otel_context

_logger = logging.getLogger("crew_otel")


def current_context_reader() -> Callable[[], otel_context.Context]:
    """How hot paths read the current OpenTelemetry context: straight from the ContextVar of
    the API's default runtime context when that is the one in use (one C call: every hooked call
    and every file open in a tool call reads it), else ``opentelemetry.context.get_current``.
    Ask again after ``opentelemetry.context``'s runtime context may have changed (at
    ``instrument()``)."""
    variable = _default_context_variable()
    return variable.get if variable is not None else otel_context.get_current


class ContextSwitch(NamedTuple):
    """Makes a context current and restores the one before: :func:`context_switch`."""

    #: Makes the context current; returns the token ``detach`` takes.
    attach: Callable[[otel_context.Context], Any]
    #: Restores the context current before the ``attach`` that returned the token.
    detach: Callable[[Any], Any]


#: ``opentelemetry.context.attach``/``detach``: whichever runtime context is in use.
API_CONTEXT_SWITCH = ContextSwitch(otel_context.attach, otel_context.detach)


def context_switch() -> ContextSwitch:
    """How hot paths attach and detach a context: the ContextVar's own ``set`` and ``reset``
    when the API's default runtime context is in use (C calls; its tokens are the API's
    tokens), else ``opentelemetry.context.attach``/``detach``. Where the API's ``detach`` logs
    a token it cannot reset (one from another context), this ``detach`` raises: callers then
    hand the token to ``opentelemetry.context.detach``, which logs it. Ask again at
    ``instrument()``, like :func:`current_context_reader`."""
    variable = _default_context_variable()
    if variable is not None:
        return ContextSwitch(variable.set, variable.reset)
    return API_CONTEXT_SWITCH


def _default_context_variable() -> contextvars.ContextVar[otel_context.Context] | None:
    """The ContextVar of the API's default runtime context, if that is the one in use."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ == "ContextVarsRuntimeContext" and isinstance(
        variable, contextvars.ContextVar
    ):
        return variable
    return None


REQUEST_ID_KEY = otel_context.create_key("crew_otel.request_id")
"""Context key of the current request ID (a ``str``)."""

KICKOFF_KEY = otel_context.create_key("crew_otel.kickoff")
"""Context key of the innermost active kickoff (``wrappers.kickoff.ActiveKickoff``; its
``run`` is the run's :class:`RunScope`)."""

ATTEMPT_KEY = otel_context.create_key("crew_otel.agent_attempt")
"""Context key of the innermost agent execution attempt (its step tracker)."""

LLM_CALL_KEY = otel_context.create_key("crew_otel.llm_call")
"""Context key of the model call in progress (its HTTP attempts are recorded there)."""

TOOL_CALL_KEY = otel_context.create_key("crew_otel.tool_call")
"""Context key of the tool call in progress (so the tool's own ``run`` adds no second span)."""

REQUEST_SCOPE_KEY = otel_context.create_key("crew_otel.request_scope")
"""Context key of the innermost ``with crew_otel.request(...)`` entry (:class:`RequestScope`)."""

MAX_REQUEST_ID_LENGTH = 256
"""Longer request IDs are cut to this many characters."""

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

#: The ``request`` scopes entered in this context (thread or task), innermost last: each entry
#: is the entering ``request`` object's id and the token that restores what was current before.
#: A contextvar, so one ``request`` object entered by several threads or tasks at once gives
#: each of them back its own previous context.
_ENTERED: contextvars.ContextVar[tuple[tuple[int, object, RequestScope], ...]] = (
    contextvars.ContextVar("crew_otel.request_scopes", default=())
)


class RunScope:
    """The extent of one run: the one definition of "the run has ended".

    A run is a kickoff (it ends when the kickoff's call, ``wrappers.kickoff``, finishes: when the
    kickoff's last work is over, whatever its span: a sampled-out or non-SDK span ends nothing)
    or one entry of :class:`request` outside any kickoff (it ends when the ``with`` exits).
    ``ended`` turns true once, from the run itself. What a thread carries for the run
    (``threads.RunBoundContext``) is bound to it with :meth:`release_on_end` and lets go of the
    run's values at that moment, even if the thread never looks at its context again.
    """

    __slots__ = ("_bound", "ended")

    def __init__(self) -> None:
        self.ended = False
        self._bound: list[weakref.ref[Releasable]] = []

    def release_on_end(self, held: Releasable) -> None:
        """Call ``held.release()`` when the run ends (now, if it has); ``held`` is held weakly."""
        bound = self._bound
        bound.append(weakref.ref(held))
        if len(bound) >= _PRUNE_AT and len(bound) & (len(bound) - 1) == 0:
            bound[:] = [ref for ref in bound if ref() is not None]  # threads that are gone
        if self.ended:
            held.release()

    def end(self) -> None:
        """The run is over: ``ended`` turns true and what was bound to it lets go."""
        self.ended = True
        bound, self._bound = self._bound, []
        for ref in bound:
            held = ref()
            if held is not None:
                held.release()


class Releasable(Protocol):
    """Something that holds a run's values until the run ends (see :class:`RunScope`)."""

    def release(self) -> None: ...


#: :meth:`RunScope.release_on_end` drops dead references when its list reaches a power of two
#: from this size on (a run that hands many items to long-lived threads).
_PRUNE_AT = 64


class RequestScope(RunScope):
    """One entry of :class:`request`; ``ended`` once it exited. A thread started inside the
    scope (outside any kickoff) carries the request only until then."""

    __slots__ = ()


def innermost_run(ctx: Mapping[str, object]) -> RunScope | None:
    """The run ``ctx`` belongs to: the innermost kickoff's, else the innermost request scope's."""
    run = getattr(ctx.get(KICKOFF_KEY), "run", None)
    if isinstance(run, RunScope):
        return run
    scope = ctx.get(REQUEST_SCOPE_KEY)
    return scope if isinstance(scope, RunScope) else None


def new_request_id() -> str:
    """A new random request ID (16 hex characters)."""
    return uuid.uuid4().hex[:16]


def current_request_id() -> str | None:
    """The request ID of the run the caller is in, or ``None`` outside any run."""
    value = otel_context.get_value(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


def normalize_request_id(value: object) -> str | None:
    """A usable request ID made from ``value`` (a client's header, say), or ``None``.

    Never raises, whatever ``value`` is. ``str`` values are stripped of surrounding whitespace
    and of control characters and cut to :data:`MAX_REQUEST_ID_LENGTH`; ``bytes`` are decoded
    as UTF-8; other values (an ``int``, a ``UUID``) are converted with ``str()``. ``None``, an
    empty or whitespace-only value, undecodable bytes and objects whose ``str()`` fails give
    ``None`` (the caller then generates an ID). One debug line says what was done to a value
    that was not used as given.
    """
    if value is None:
        return None
    try:
        text = _as_text(value)
    except Exception as exc:  # a hostile __str__, undecodable bytes: never the app's problem
        _logger.debug(
            "crew_otel: request ID of type %s unusable (%s); a new one is generated",
            type(value).__name__,
            type(exc).__name__,
        )
        return None
    cleaned = _clean(text)
    if cleaned != text or not isinstance(value, str):
        _logger.debug(
            "crew_otel: request ID of type %s and %d characters %s",
            type(value).__name__,
            len(text),
            "normalised" if cleaned else "empty after normalising; a new one is generated",
        )
    return cleaned or None


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return str.__str__(value)  # a str subclass's own __str__ is not trusted
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[: MAX_REQUEST_ID_LENGTH * 4]).decode("utf-8")
    text = str(value)
    if not isinstance(text, str):
        raise TypeError("__str__ returned a non-str")
    return text


def _clean(text: str) -> str:
    text = text[: MAX_REQUEST_ID_LENGTH * 4].strip()
    if not text.isprintable():
        text = "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()
    return text[:MAX_REQUEST_ID_LENGTH]


class request:
    """Run the enclosed code as one request: every kickoff inside uses ``request_id``.

    Use it as a context manager (``with crew_otel.request(request.headers.get("X-Request-ID")):``)
    or as a decorator on a sync or ``async`` function, a generator or an async generator (the
    request then holds for the whole iteration). Without a usable ID (``None``, empty, blank,
    undecodable) a new one is generated on every entry; the ID is never a reason to fail, so a
    client's header can be passed as it came. IDs are stripped of surrounding whitespace and
    control characters and cut to 256 characters; ``bytes`` are decoded as UTF-8 and other
    values converted with ``str()``.

    The ``with`` statement returns the request ID::

        with crew_otel.request() as request_id:
            crew.kickoff(inputs)

    One ``request`` object may be entered by several threads or tasks at once (a module-level
    ``JOB = crew_otel.request("batch-7")`` used as ``with JOB:`` in workers): each restores its
    own previous context on exit.
    """

    def __init__(self, request_id: object = None) -> None:
        self._request_id = normalize_request_id(request_id)

    @property
    def request_id(self) -> str | None:
        """The normalised ID given, or ``None`` when each entry generates a new one."""
        return self._request_id

    def __enter__(self) -> str:
        request_id = self._request_id or new_request_id()
        scope = RequestScope()
        ctx = otel_context.set_value(REQUEST_ID_KEY, request_id)
        token = otel_context.attach(otel_context.set_value(REQUEST_SCOPE_KEY, scope, ctx))
        _ENTERED.set((*_ENTERED.get(), (id(self), token, scope)))
        return request_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entered = _ENTERED.get()
        for index in range(len(entered) - 1, -1, -1):
            owner, token, scope = entered[index]
            if owner == id(self):
                _ENTERED.set(entered[:index] + entered[index + 1 :])
                scope.end()
                otel_context.detach(cast(Any, token))
                return
        _logger.debug("crew_otel: request scope exited in a context that did not enter it")

    def __call__(self, func: _F) -> _F:
        request_id = self._request_id
        if inspect.isasyncgenfunction(func):

            @functools.wraps(func)
            def async_gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                return _iterate_async_in_request(func(*args, **kwargs), request_id)

            return cast(_F, async_gen_wrapper)
        if inspect.isgeneratorfunction(func):

            @functools.wraps(func)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                return _iterate_in_request(func(*args, **kwargs), request_id)

            return cast(_F, gen_wrapper)
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


class _Steps:
    """The state of iterating a (sync or async) generator inside one request, step by step.

    ``with steps:`` attaches the request ID onto whatever context is current for one step of
    the body (never across a ``yield``, so the consumer's own context is untouched between
    steps); :meth:`resume` sends the consumer's value into the body, or throws its exception in.
    """

    __slots__ = ("_token", "request_id", "sent", "thrown")

    def __init__(self, request_id: str | None) -> None:
        #: Fixed at the first step.
        self.request_id = request_id or new_request_id()
        #: What the consumer sent, or threw in, at the last ``yield`` (for the body's next step).
        self.sent: Any = None
        self.thrown: BaseException | None = None
        self._token: object = None

    def __enter__(self) -> None:
        ctx = otel_context.set_value(REQUEST_ID_KEY, self.request_id)
        self._token = otel_context.attach(ctx)

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(cast(Any, self._token))

    def resume(self, send: Callable[[Any], _T], throw: Callable[[BaseException], _T]) -> _T:
        """``send(sent)``, or ``throw(thrown)`` when the consumer threw an exception in."""
        sent, thrown = self.sent, self.thrown
        self.sent = self.thrown = None
        return send(sent) if thrown is None else throw(thrown)


def _iterate_in_request(
    gen: Generator[Any, Any, Any], request_id: str | None
) -> Generator[Any, Any, Any]:
    """Run every step of ``gen`` (``send``, ``throw``, ``close``) inside one request."""
    steps = _Steps(request_id)
    while True:
        try:
            with steps:
                item = steps.resume(gen.send, gen.throw)
        except StopIteration as stop:
            return stop.value
        try:
            steps.sent = yield item
        except GeneratorExit:
            with steps:
                gen.close()
            raise
        except BaseException as exc:  # thrown in by the consumer: hand it to the body
            steps.thrown = exc


async def _iterate_async_in_request(
    agen: AsyncGenerator[Any, Any], request_id: str | None
) -> AsyncGenerator[Any, Any]:
    """The async-generator counterpart of :func:`_iterate_in_request`."""
    steps = _Steps(request_id)
    while True:
        try:
            with steps:
                item = await steps.resume(agen.asend, agen.athrow)
        except StopAsyncIteration:
            return
        try:
            steps.sent = yield item
        except GeneratorExit:
            with steps:
                await agen.aclose()
            raise
        except BaseException as exc:
            steps.thrown = exc
