"""The HTTP layer: httpx and httpx2 instrumentation, retry attempts, error origins, baggage.

Each HTTP attempt to the model provider is a CLIENT span made by
``opentelemetry-instrumentation-httpx`` (``HTTPXClientInstrumentor`` for httpx, used by
openai 2.x; ``HTTPX2ClientInstrumentor`` for httpx2, used by openai 3.x). crew_otel adds an
*attempt observer* inside each of those spans - on the connection pool the transport calls
(``httpcore``/``httpcore2`` ``ConnectionPool.handle_request``), so it runs inside the HTTP span
whichever instrumentation was installed first - that:

* sets ``http.request.resend_count`` from the SDK's ``x-stainless-retry-count`` header and
  counts the HTTP retry,
* on a 4xx/5xx response or a transport error inside a model call, marks the attempt as the
  error's origin (``crew_otel.error.recovered=true`` when a retry layer will retry it: the SDK
  has retries left for a retryable status, or CrewAI's rate-limit wrapper will retry a 429).

:class:`CrewAIBaggageFilter` keeps CrewAI's baggage entries (``crew_context``, ``flow_inputs``,
``flow_input_files`` - flow inputs may hold secrets) out of every outgoing ``baggage`` header.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)

from crew_otel import attributes as a
from crew_otel import internals, propagation
from crew_otel.context import LLM_CALL_KEY
from crew_otel.diagnosis.retries import (
    RATE_LIMIT_MAX_RETRIES,
    agent_will_retry,
    sdk_will_retry_status,
)
from crew_otel.safety import safe_call
from crew_otel.wrappers.base import Observer
from crew_otel.wrappers.llm import LlmCallState

_logger = logging.getLogger("crew_otel")

RETRY_COUNT_HEADER = "x-stainless-retry-count"
CREWAI_BAGGAGE_KEYS = frozenset({"crew_context", "flow_inputs", "flow_input_files"})
#: The module of ``opentelemetry-instrumentation-httpx`` (importing it imports httpx and httpx2).
HTTP_INSTRUMENTATION = "opentelemetry.instrumentation.httpx"


class HttpClient(NamedTuple):
    """An HTTP client library, its instrumentor class and the connection pools it sends with."""

    module: str
    instrumentor: str
    pool_module: str
    sync_pool: str
    async_pool: str

    @property
    def key(self) -> str:
        """The row name in ``instrument()``'s reports and ``crew-otel doctor``."""
        return f"{self.module} (HTTP attempts)"


HTTP_CLIENTS = (
    HttpClient(
        "httpx", "HTTPXClientInstrumentor", "httpcore", "ConnectionPool", "AsyncConnectionPool"
    ),
    HttpClient(
        "httpx2", "HTTPX2ClientInstrumentor", "httpcore2", "ConnectionPool", "AsyncConnectionPool"
    ),
)


def _is_http_attempt_span(span: trace.Span) -> bool:
    return internals.HTTPX_TRACER.matches(span)


def header_map(headers: Any) -> dict[str, str]:
    """Lower-cased header dict from httpcore's ``[(b"name", b"value"), ...]`` or a mapping."""
    if headers is None:
        return {}
    items = headers.items() if hasattr(headers, "items") else headers
    result: dict[str, str] = {}
    for name, value in items:
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        result[key.lower()] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return result


_RETRY_COUNT_HEADER_BYTES = RETRY_COUNT_HEADER.encode()


def _header(headers: Any, name: bytes) -> str | None:
    """One header of httpcore's ``[(b"Name", b"value"), ...]`` list, without building a dict."""
    for key, value in headers or ():
        if len(key) == len(name) and key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def _resend_count(request: Any) -> int:
    headers: Any = getattr(request, "headers", None)
    if hasattr(headers, "get"):  # a mapping (httpx-style), not httpcore's list
        raw = headers.get(RETRY_COUNT_HEADER)
    else:
        raw = _header(headers, _RETRY_COUNT_HEADER_BYTES)
    if raw is None:
        return 0
    try:
        return max(int(raw), 0)
    except (TypeError, ValueError):
        return 0


def attempt_recovered(
    state: LlmCallState, resend: int, status: int | None, retryable: bool
) -> bool:
    """Whether a retry layer will retry this failed HTTP attempt (see diagnosis.retries)."""
    if retryable and resend < state.max_retries:
        return True  # the SDK retries
    if (
        state.rate_limit_layer
        and status == 429
        and state.rate_limit_retries < RATE_LIMIT_MAX_RETRIES
    ):
        return True  # CrewAI's rate-limit wrapper retries
    return agent_will_retry()  # the SDK's error propagates; the agent may re-run


class HttpAttemptObserver(Observer):
    """Runs inside each HTTP attempt span (sync connection pools)."""

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        span = trace.get_current_span()
        if not self.runtime.active or not _is_http_attempt_span(span):
            return wrapped(*args, **kwargs)
        request = kwargs.get("request", args[0] if args else None)
        state = safe_call(self.before, span, request, default=None)
        try:
            response = wrapped(*args, **kwargs)
        except Exception as exc:
            if state is not None:
                safe_call(self.after_error, span, state, exc, default=None)
            raise
        if state is not None:
            safe_call(self.after_response, span, state, response, default=None)
        return response

    def before(self, span: trace.Span, request: Any) -> tuple[LlmCallState, int] | None:
        resend = _resend_count(request)
        if resend:
            span.set_attribute(a.HTTP_RESEND_COUNT, resend)
        state = otel_context.get_value(LLM_CALL_KEY)
        if not isinstance(state, LlmCallState):
            return None
        if resend:
            self.runtime.metrics.retry(
                a.RETRY_LAYER_HTTP, state.last_error_type or "unknown", state.provider
            )
        return state, resend

    def after_response(
        self, span: trace.Span, observed: tuple[LlmCallState, int], response: Any
    ) -> None:
        state, resend = observed
        status = getattr(response, "status", getattr(response, "status_code", None))
        if not isinstance(status, int) or status < 400:
            state.note_http_success()
            return
        headers = header_map(getattr(response, "headers", None))
        recovered = attempt_recovered(state, resend, status, sdk_will_retry_status(status, headers))
        error_type = str(status)
        state.note_http_failure(error_type)
        self.runtime.errors.record_status(
            span, error_type, a.ORIGIN_HTTP, recovered=recovered, description=f"HTTP {status}"
        )

    def after_error(
        self, span: trace.Span, observed: tuple[LlmCallState, int], exc: BaseException
    ) -> None:
        state, resend = observed
        # Timeouts and connection errors are retried by the SDKs while retries are left.
        recovered = attempt_recovered(state, resend, None, retryable=True)
        error_type = a.error_type(exc)
        state.note_http_failure(error_type)
        self.runtime.errors.record_status(
            span, error_type, a.ORIGIN_HTTP, recovered=recovered, description=error_type
        )


class AsyncHttpAttemptObserver(HttpAttemptObserver):
    """Runs inside each HTTP attempt span (async connection pools)."""

    async def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        span = trace.get_current_span()
        if not self.runtime.active or not _is_http_attempt_span(span):
            return await wrapped(*args, **kwargs)
        request = kwargs.get("request", args[0] if args else None)
        state = safe_call(self.before, span, request, default=None)
        try:
            response = await wrapped(*args, **kwargs)
        except Exception as exc:
            if state is not None:
                safe_call(self.after_error, span, state, exc, default=None)
            raise
        if state is not None:
            safe_call(self.after_response, span, state, response, default=None)
        return response


class CrewAIBaggageFilter(TextMapPropagator):
    """A propagator that drops CrewAI's baggage entries before the wrapped one injects.

    It also carries the request ID across processes (see :mod:`crew_otel.propagation`): the
    ``crew_otel.request.id`` entry is never injected inside a CrewAI run, added outside one
    when ``propagate_request_id`` is on, and adopted as the request ID on extract.
    """

    def __init__(
        self,
        inner: TextMapPropagator,
        *,
        strip_crewai: bool = True,
        propagate_request_id: bool = False,
    ) -> None:
        self.inner = inner
        self.strip_crewai = strip_crewai
        self.propagate_request_id = propagate_request_id

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        ctx = self.inner.extract(carrier, context, getter)
        if self.propagate_request_id:
            ctx = safe_call(propagation.incoming, ctx, default=ctx)
        return ctx

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        ctx = context if context is not None else otel_context.get_current()
        ctx = safe_call(propagation.outgoing, ctx, self.propagate_request_id, default=ctx)
        entries = baggage.get_all(ctx)
        if self.strip_crewai and entries and not CREWAI_BAGGAGE_KEYS.isdisjoint(entries):
            for key in CREWAI_BAGGAGE_KEYS.intersection(entries):
                ctx = baggage.remove_baggage(key, ctx)
        self.inner.inject(carrier, ctx, setter)

    @property
    def fields(self) -> set[str]:
        return self.inner.fields
