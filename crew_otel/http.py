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
  error's origin (``crew_otel.error.recovered=true`` when a retry layer will retry it, as
  :func:`crew_otel.diagnosis.retries.attempt_recovered` decides).

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
from crew_otel.diagnosis.retries import attempt_recovered
from crew_otel.safety import safe_call
from crew_otel.wrappers.llm import LlmCallState
from crew_otel.wrappers.observer import Observer

_logger = logging.getLogger("crew_otel")

RETRY_COUNT_HEADER = "x-stainless-retry-count"
CREWAI_BAGGAGE_KEYS = frozenset({"crew_context", "flow_inputs", "flow_input_files"})
#: The module of ``opentelemetry-instrumentation-httpx`` (importing it imports httpx and httpx2).
HTTP_INSTRUMENTATION = "opentelemetry.instrumentation.httpx"


#: The hook's key in ``crew-otel doctor`` and the hook set.
HEADER_NORMALIZATION_KEY = "httpx header normalization (skipped: no header captured)"
#: Where its header capture is configured (read when an instrumentor or client is instrumented).
HEADER_CAPTURE_VARIABLES = (
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE",
)


def skip_header_normalization(headers: object, module: object) -> dict[str, list[str]]:
    """``opentelemetry.instrumentation.httpx._normalize_headers`` while no header capture is
    configured (:func:`header_normalization_skippable`).

    The instrumentation turns every request and response header into a dict (each found by a
    scan of them all: about 70 Python calls per request or response) and hands it only to
    ``get_custom_header_attributes``, which returns ``{}`` without reading it when no header is
    to be captured. Same spans, same attributes; the dict is not built.
    """
    return {}


def header_normalization_skippable(http_instrumentation: Any) -> bool:
    """Whether ``_normalize_headers`` of ``http_instrumentation`` may be replaced by
    :func:`skip_header_normalization`: it exists, the installed instrumentation is one of the
    versions its use was checked on (:data:`crew_otel.internals.HEADER_NORMALIZATION`), and no
    request or response header capture is configured (the instrumentation reads the same
    variables, with the same parser, when it is instrumented)."""
    if not internals.HEADER_NORMALIZATION.replaceable_in(http_instrumentation):
        return False
    from opentelemetry.util.http import get_custom_headers

    return not any(get_custom_headers(name) for name in HEADER_CAPTURE_VARIABLES)


#: The hook's key in ``crew-otel doctor`` and the hook set.
REQUEST_PARAMETERS_KEY = "httpx request parameters (the request's URL not parsed again)"


def parameters_without_reparse(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement of ``opentelemetry.instrumentation.httpx._extract_parameters``
    (``original``) on the versions where it is checked to return the same
    (:func:`request_parameters_replaceable`).

    For each request the instrumentation parses the request's URL again from its text
    (``URL(str(request.url))``: a scan of every character and the host's address, about 65
    Python calls) into a URL equal to the request's own, which it only reads; httpx URLs are
    immutable. The replacement returns the request's own URL; anything but a request (the
    transport API of httpx before 0.20) goes to ``original``.
    """

    def extract_parameters(
        args: tuple[Any, ...], kwargs: dict[str, Any], module: Any
    ) -> tuple[Any, Any, Any, Any, Any]:
        if args and isinstance(args[0], module.Request):
            request = args[0]
            return (
                request.method.encode(),
                request.url,
                request.headers,
                request.stream,
                request.extensions,
            )
        return original(args, kwargs, module)  # type: ignore[no-any-return]

    return extract_parameters


def request_parameters_replaceable(http_instrumentation: Any) -> bool:
    """Whether ``_extract_parameters`` of ``http_instrumentation`` may be replaced
    (:func:`parameters_without_reparse`): the installed instrumentation is not newer than the
    versions it was checked on and, called on a sample request, returns the request's own
    method, headers, stream and extensions and a URL equal to its own
    (:data:`crew_otel.internals.REQUEST_PARAMETERS`)."""
    if not internals.REQUEST_PARAMETERS.replaceable_in(http_instrumentation):
        return False
    from crew_otel import internals_check

    return internals_check.check(internals.REQUEST_PARAMETERS).parts[0].resolved


class HelperReplacement(NamedTuple):
    """A helper of the httpx instrumentation that crew_otel replaces where ``applies``
    (given the instrumentation module) says so, by ``build(original)``."""

    internal: internals.ReplacedFunction
    #: The hook's key in ``crew-otel doctor`` and the hook set.
    key: str
    applies: Callable[[Any], bool]
    build: Callable[[Any], Callable[..., Any]]


#: What crew_otel spares the httpx instrumentation: work whose result nothing reads.
HTTP_HELPER_REPLACEMENTS = (
    HelperReplacement(
        internals.HEADER_NORMALIZATION,
        HEADER_NORMALIZATION_KEY,
        header_normalization_skippable,
        lambda _original: skip_header_normalization,
    ),
    HelperReplacement(
        internals.REQUEST_PARAMETERS,
        REQUEST_PARAMETERS_KEY,
        request_parameters_replaceable,
        parameters_without_reparse,
    ),
)


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
#: Reads the instrumentation scope of a span: which spans are HTTP attempts.
_read_http_scope = internals.HTTPX_TRACER.read


def _header(headers: Any, name: bytes) -> str | None:
    """One header of httpcore's ``[(b"Name", b"value"), ...]`` list, without building a dict.

    Read from the end: the SDK adds its retry header after its defaults, httpx only a few
    after it (a header the SDK sets appears once).
    """
    length = len(name)
    for key, value in reversed(headers) if isinstance(headers, list) else headers or ():
        if len(key) == length and key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def _resend_count(request: Any) -> int:
    headers: Any = getattr(request, "headers", None)
    if isinstance(headers, list):  # httpcore's list of (name, value) pairs: the usual case
        raw = _header(headers, _RETRY_COUNT_HEADER_BYTES)
    elif hasattr(headers, "get"):  # a mapping (httpx-style)
        raw = headers.get(RETRY_COUNT_HEADER)
    else:
        raw = _header(headers, _RETRY_COUNT_HEADER_BYTES)
    if raw is None or raw == "0":
        return 0
    try:
        return max(int(raw), 0)
    except (TypeError, ValueError):
        return 0


#: An HTTP attempt inside a model call: its span, the call's state, its retry number (a plain
#: tuple: one is made per request).
_Attempt = tuple[trace.Span, LlmCallState, int]


class HttpAttemptObserver(Observer):
    """Runs inside each HTTP attempt span (``handle_request`` of the sync connection pools,
    ``handle_async_request`` of the async ones, with ``is_async=True``)."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ctx = otel_context.get_current()
        span = trace.get_current_span(ctx)
        if _read_http_scope(span) is None:  # not an HTTP attempt span (or not recording)
            return None
        resend = _resend_count(
            kwargs["request"] if "request" in kwargs else args[0] if args else None
        )
        if resend:
            span.set_attribute(a.HTTP_RESEND_COUNT, resend)
        state = ctx.get(LLM_CALL_KEY)
        if not isinstance(state, LlmCallState):
            return None
        if resend:
            self.runtime.metrics.retry(
                a.RETRY_LAYER_HTTP, state.last_error_type or "unknown", state.provider
            )
        attempt: _Attempt = (span, state, resend)
        return attempt

    def after_result(self, observed: _Attempt, response: Any) -> None:
        status = getattr(response, "status", None)
        if status is None:
            status = getattr(response, "status_code", None)
        if not isinstance(status, int) or status < 400:
            observed[1].note_http_success()
            return
        headers = header_map(getattr(response, "headers", None))
        self._failed(observed, str(status), status, headers, f"HTTP {status}")

    def after_error(self, observed: _Attempt, exc: BaseException) -> None:
        if isinstance(exc, Exception):  # not a cancellation: the attempt failed
            error_type = a.error_type(exc)
            self._failed(observed, error_type, None, {}, error_type)

    def _failed(
        self,
        observed: _Attempt,
        error_type: str,
        status: int | None,
        headers: dict[str, str],
        description: str,
    ) -> None:
        span, state, resend = observed
        recovered = attempt_recovered(state, resend, status, headers)
        state.note_http_failure(error_type)
        self.runtime.errors.record_status(
            span, error_type, a.ORIGIN_HTTP, recovered=recovered, description=description
        )


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
        entries = baggage.get_all(ctx)
        # propagation.outgoing changes nothing without either (most requests: skipped).
        if self.propagate_request_id or propagation.REQUEST_ID_BAGGAGE_KEY in entries:
            ctx = safe_call(propagation.outgoing, ctx, self.propagate_request_id, default=ctx)
            entries = baggage.get_all(ctx)
        if self.strip_crewai and entries and not CREWAI_BAGGAGE_KEYS.isdisjoint(entries):
            if CREWAI_BAGGAGE_KEYS.issuperset(entries):
                ctx = baggage.clear(ctx)  # only CrewAI's (inside a run, usually): one context
            else:
                for key in CREWAI_BAGGAGE_KEYS.intersection(entries):
                    ctx = baggage.remove_baggage(key, ctx)
        self.inner.inject(carrier, ctx, setter)

    @property
    def fields(self) -> set[str]:
        return self.inner.fields
