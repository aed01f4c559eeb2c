"""Model calls: ``call``/``acall`` of every CrewAI LLM class, sync and async.

``BaseLLM.call`` is abstract, so each class that defines ``call``/``acall`` itself is wrapped
(every native provider and the litellm ``LLM``; classes defined later, such as provider modules
imported on first use or custom LLMs, are wrapped when they are defined). The wrapper sits
outside CrewAI's rate-limit retry wrapper, so one ``chat {model}`` span covers all its attempts;
each HTTP attempt is a child span (``crew_otel.http``), and each rate-limit retry an event.

When a provider SDK instrumentation hooks the SDK the call goes through (see
:mod:`crew_otel.coexistence`), it makes the inference span: crew_otel's span is then
``crewai.llm.call {model}`` (INTERNAL, no ``gen_ai.*`` attributes), still the parent of the SDK
calls and HTTP attempts and the holder of the retries and error origins, and the
``gen_ai.client.*`` points are left to the provider instrumentation when it records them.

A model call keeps an :class:`LlmCallState` in the context: the HTTP attempts record their
failures there, so the model-call span knows whether a failed HTTP attempt is the error's origin.

What the provider answered comes from the SDK's response objects CrewAI already holds, never
from re-reading the body: :class:`LlmResponseObjectObserver` sees each complete response (and a
stream's usage chunk), :class:`StreamChunkObserver` the chunks of a streamed answer, on every
supported CrewAI version (1.12 hands no finish reason to any hook). A call that ends without an
answer (failed, cancelled, a stream cut short) reports the finish reason ``error``, as the GenAI
conventions ask, and a call made after CrewAI summarised the agent's conversation to fit the
context window carries ``gen_ai.conversation.compacted``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes, internals
from crew_otel.attributes import Operation
from crew_otel.coexistence import ProviderInstrumentations, deferred_attributes
from crew_otel.context import ATTEMPT_KEY, LLM_CALL_KEY, REQUEST_ID_KEY
from crew_otel.diagnosis.crosstalk import strings_in
from crew_otel.diagnosis.retries import crewai_recovers
from crew_otel.diagnosis.sharing import Kind
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.base import Call, DurationPoint, ErrorRecording, SpanWrapper
from crew_otel.wrappers.observer import Observer

DEFAULT_SDK_MAX_RETRIES = 2


class LlmCallState:
    """What one model call learns while it runs (kept in the OTel Context)."""

    __slots__ = (
        "agent",
        "deferred",
        "finish_reason_known",
        "finish_reasons",
        "first_chunk_seen",
        "input_tokens",
        "last_error_type",
        "last_http_failed",
        "max_retries",
        "model",
        "output_tokens",
        "pending_attributes",
        "provider",
        "rate_limit_layer",
        "rate_limit_retries",
        "record_metrics",
        "span",
        "started",
    )

    def __init__(
        self, span: trace.Span, provider: str, model: str, max_retries: int, rate_limit_layer: bool
    ) -> None:
        self.span = span
        self.provider = provider
        self.model = model
        #: The SDK's HTTP retry budget for this call.
        self.max_retries = max_retries
        #: Whether CrewAI's rate-limit retry wrapper is present (crewai >= 1.15.25).
        self.rate_limit_layer = rate_limit_layer
        self.rate_limit_retries = 0
        #: error.type of the latest failed attempt (what the next retry is retrying).
        self.last_error_type: str | None = None
        #: Whether the latest HTTP attempt failed (its span is then the error's origin).
        self.last_http_failed = False
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.finish_reason_known = False
        #: The finish reasons of the latest response (the agent attempt reports its last).
        self.finish_reasons: tuple[str, ...] = ()
        #: When the call started (``perf_counter``): a stream's first chunk is timed from it.
        self.started = time.perf_counter()
        self.first_chunk_seen = False
        #: The agent attempt whose LLM this call is (it sums the usage of its calls).
        self.agent: Any = None
        #: A provider SDK instrumentation makes the inference span: no gen_ai.* on ours.
        self.deferred = False
        #: Whether crew_otel records this call's gen_ai.client.* points (else the provider
        #: instrumentation does).
        self.record_metrics = True
        #: What the response said (model, ID, finish reasons, usage), set on the span in one
        #: go when the call finishes (:meth:`set_pending_attributes`), not at each hook that
        #: saw a part of it.
        self.pending_attributes: dict[str, AttributeValue] | None = None

    def note_attributes(self, attrs: dict[str, AttributeValue]) -> None:
        """Keep ``attrs`` (the state owns the dict) for the span, set when the call finishes;
        a later value of a key replaces an earlier one."""
        pending = self.pending_attributes
        if pending is None:
            self.pending_attributes = attrs
        else:
            pending.update(attrs)

    def set_pending_attributes(self) -> None:
        """Set what :meth:`note_attributes` kept on the span (a cleanup of the call)."""
        pending, self.pending_attributes = self.pending_attributes, None
        if pending:
            self.span.set_attributes(pending)

    def note_http_failure(self, error_type: str) -> None:
        self.last_error_type = error_type
        self.last_http_failed = True

    def note_http_success(self) -> None:
        self.last_http_failed = False


class ChatWrapper(SpanWrapper[LlmCallState]):
    """One ``chat {model}`` CLIENT span per model call."""

    operation = Operation.CHAT

    def __init__(self, runtime: Runtime, rate_limit_layer: bool, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        self.rate_limit_layer = rate_limit_layer
        self._provider_instrumentations = ProviderInstrumentations()

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[LlmCallState] | None:
        ctx = otel_context.get_current()
        existing: LlmCallState | None = ctx.get(LLM_CALL_KEY)  # type: ignore[assignment]
        if existing is not None and trace.get_current_span(ctx) is existing.span:
            return None  # a provider delegating to another call of its own
        self.runtime.before_model_call()
        model = attributes.model_name(instance)
        cls = type(instance)
        provider = attributes.provider_name(instance)
        messages = kwargs.get("messages", args[0] if args else None)
        attrs = attributes.llm_attributes(instance, model, provider, messages)
        deferral = (
            self._provider_instrumentations.deferral_for(cls)
            if self.config.defer_to_provider_instrumentation
            else None
        )
        if deferral is not None:
            # The provider instrumentation's span under this one is the inference span.
            attrs = deferred_attributes(attrs, deferral)
            name, kind = attributes.span_name(attributes.SPAN_LLM_CALL, model), SpanKind.INTERNAL
        else:
            self.capture(attrs, attributes.GEN_AI_INPUT_MESSAGES, messages)
            if _conversation_compacted(ctx):
                attrs[attributes.GEN_AI_CONVERSATION_COMPACTED] = True
            # where the call goes decides sampling too: at the span's start
            attrs.update(attributes.server_attributes(attributes.llm_base_url(instance)))
            # and what it asks: set with the rest (one set of attributes, not two)
            attrs.update(_request_attributes(instance, provider, kwargs))
            name, kind = attributes.span_name(attributes.SPAN_CHAT, model), SpanKind.CLIENT
        span = self.tracer.start_span(name, context=ctx, kind=kind, attributes=attrs)
        state = LlmCallState(span, provider, model, _max_retries(instance), self.rate_limit_layer)
        if deferral is not None:
            state.deferred = True
            state.record_metrics = not deferral.records_metrics
        elif span.is_recording():
            state.agent = _agent_scope_of(ctx, instance)
        call = Call(
            span,
            otel_context.set_value(LLM_CALL_KEY, state, trace.set_span_in_context(span, ctx)),
            state,
        )
        if not state.deferred:
            call.add_cleanup(state.set_pending_attributes)
        self.track_instance(call, Kind.LLM, instance, model)
        crosstalk = self.runtime.crosstalk
        if crosstalk is not None and messages is not None:
            crosstalk.check(
                ctx.get(REQUEST_ID_KEY),  # type: ignore[arg-type]
                strings_in(messages),
                attributes.CROSSTALK_MODEL_INPUT,
                span,
            )
        return call

    def succeed(self, call: Call[LlmCallState], result: Any) -> Any:
        state = call.data
        if state.record_metrics:
            self._record_tokens(state)
        if state.agent is not None:
            state.agent.note_model_call(
                state.input_tokens, state.output_tokens, state.finish_reasons
            )
        if state.deferred:
            return result  # the provider instrumentation's span has the response
        if not state.finish_reason_known and isinstance(result, list) and result:
            # Older CrewAI does not report the finish reason; a list of tool calls is certain.
            call.span.set_attribute(attributes.GEN_AI_RESPONSE_FINISH_REASONS, ("tool_calls",))
        self.capture_on_span(call.span, attributes.GEN_AI_OUTPUT_MESSAGES, result)
        return result

    def _record_tokens(self, state: LlmCallState) -> None:
        metrics = self.runtime.metrics
        by_type = metrics.inference_tokens  # main's per-type histograms (semconv opt-in)
        for token_type, tokens in (("input", state.input_tokens), ("output", state.output_tokens)):
            if tokens is None:
                continue
            if by_type is not None:
                by_type[token_type].record(tokens, _metric_attributes(state))
            else:
                metrics.token_usage.record(
                    tokens, {**_metric_attributes(state), attributes.GEN_AI_TOKEN_TYPE: token_type}
                )

    def on_fail(self, call: Call[LlmCallState], exc: BaseException) -> None:
        state = call.data
        if state.agent is not None:
            state.agent.note_model_call(
                state.input_tokens, state.output_tokens, (attributes.FINISH_REASON_ERROR,)
            )
        if not state.deferred and not state.finish_reason_known:
            # No answer: the conventions report the generation's end as "error", not nothing.
            call.span.set_attribute(
                attributes.GEN_AI_RESPONSE_FINISH_REASONS, (attributes.FINISH_REASON_ERROR,)
            )

    def error_recording(self, call: Call[LlmCallState], exc: BaseException) -> ErrorRecording:
        # A failed last HTTP attempt is the origin; otherwise decide by the exception chain
        # (e.g. CrewAI rejecting an empty response makes the model call itself the origin).
        return ErrorRecording(
            origin=False if call.data.last_http_failed else None,
            recovered=crewai_recovers(exc),
        )

    def duration_point(self, call: Call[LlmCallState]) -> DurationPoint | None:
        state = call.data
        if not state.record_metrics:
            return None  # the provider instrumentation records gen_ai.client.* points
        return (self.runtime.metrics.inference_duration, _metric_attributes(state))


#: ``Operation.CHAT.value``, read once (an enum member's ``value`` is a Python property).
_CHAT = Operation.CHAT.value


def _metric_attributes(state: LlmCallState) -> dict[str, AttributeValue]:
    return {
        attributes.GEN_AI_OPERATION_NAME: _CHAT,
        attributes.GEN_AI_PROVIDER_NAME: state.provider,
        attributes.GEN_AI_REQUEST_MODEL: state.model,
    }


def _request_attributes(
    llm: Any, provider: str, kwargs: dict[str, Any]
) -> dict[str, AttributeValue]:
    """What the call asks beyond its messages: the LLM's parameters, an output format (a
    ``response_model`` for this call or the LLM's ``response_format``), the OpenAI API used."""
    attrs = attributes.request_parameters(llm)
    if kwargs.get("response_model") is not None or getattr(llm, "response_format", None):
        attrs[attributes.GEN_AI_OUTPUT_TYPE] = attributes.OUTPUT_TYPE_JSON
    if provider == "openai":
        attrs[attributes.OPENAI_API_TYPE] = attributes.openai_api_type(llm)
    return attrs


def _agent_scope_of(ctx: otel_context.Context, llm: Any) -> Any:
    """The agent attempt running in ``ctx`` when ``llm`` is its agent's LLM (the memory's
    or a planner's own LLM is not the agent's), else ``None``."""
    scope: Any = ctx.get(ATTEMPT_KEY)
    agent = getattr(scope, "agent", None)
    return scope if agent is not None and getattr(agent, "llm", None) is llm else None


def _conversation_compacted(ctx: otel_context.Context) -> bool:
    """Whether the agent execution this call runs in has had its conversation summarised."""
    scope = ctx.get(ATTEMPT_KEY)
    return getattr(scope, "compacted", False) is True


def _max_retries(llm: Any) -> int:
    """The SDK's HTTP retry budget of ``llm`` (the SDK default when it does not say)."""
    max_retries = getattr(llm, "max_retries", None)
    if not isinstance(max_retries, int) or isinstance(max_retries, bool):
        return DEFAULT_SDK_MAX_RETRIES
    return max_retries


class LlmResponseObserver(Observer):
    """CrewAI's per-response hooks (token usage, finish reason, response ID) -> the chat span.

    Wraps ``BaseLLM._track_token_usage_internal(usage)`` and
    ``BaseLLM._emit_call_completed_event(..., finish_reason=, response_id=)``; both run in the
    calling thread inside the model call, so the call's state is in the context.
    """

    def __init__(
        self,
        runtime: Runtime,
        parameters: internals.Parameters,
        take_usage: bool,
        *,
        is_async: bool = False,
    ) -> None:
        super().__init__(runtime, is_async=is_async)
        #: The wrapped method's arguments by name, positions from the installed signature.
        self.arguments = parameters.bind()
        #: Only one of the two hooks counts tokens (CrewAI calls both for one response).
        self.take_usage = take_usage

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        state = otel_context.get_value(LLM_CALL_KEY)
        if isinstance(state, LlmCallState):
            self._note(state, args, kwargs)

    def _note(self, state: LlmCallState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        values = self.arguments.values(args, kwargs)
        attrs = attributes.usage_attributes(
            values.get("usage_data", values.get("usage")) if self.take_usage else None,
            values.get("finish_reason"),
            values.get("response_id"),
        )
        if not attrs:
            return
        reasons = attrs.get(attributes.GEN_AI_RESPONSE_FINISH_REASONS)
        if isinstance(reasons, tuple):
            state.finish_reason_known = True
            state.finish_reasons = reasons
        input_tokens = attrs.get(attributes.GEN_AI_USAGE_INPUT_TOKENS)
        output_tokens = attrs.get(attributes.GEN_AI_USAGE_OUTPUT_TOKENS)
        if isinstance(input_tokens, int):
            state.input_tokens = (state.input_tokens or 0) + input_tokens
            attrs[attributes.GEN_AI_USAGE_INPUT_TOKENS] = state.input_tokens
        if isinstance(output_tokens, int):
            state.output_tokens = (state.output_tokens or 0) + output_tokens
            attrs[attributes.GEN_AI_USAGE_OUTPUT_TOKENS] = state.output_tokens
        if not state.deferred:  # else the provider instrumentation's span has them
            state.note_attributes(attrs)


def _current_call() -> LlmCallState | None:
    """The model call this code runs in, unless a provider instrumentation has its response."""
    state = otel_context.get_value(LLM_CALL_KEY)
    if isinstance(state, LlmCallState) and not state.deferred:
        return state
    return None


def _record_response(
    state: LlmCallState, model: object, response_id: object, reasons: tuple[str, ...]
) -> None:
    """The response model, ID and finish reasons (each already cut to the name length) the
    provider answered, on the call's span."""
    attrs: dict[str, AttributeValue] = {}
    if isinstance(model, str) and model:
        attrs[attributes.GEN_AI_RESPONSE_MODEL] = model[: attributes.MAX_NAME_LENGTH]
    if isinstance(response_id, str) and response_id:
        attrs[attributes.GEN_AI_RESPONSE_ID] = response_id[: attributes.MAX_NAME_LENGTH]
    if reasons:
        state.finish_reasons = reasons
        attrs[attributes.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
        state.finish_reason_known = True
    if attrs:
        state.note_attributes(attrs)


def _note_response(state: LlmCallState, response: object) -> None:
    """What one SDK response object (or a stream's usage chunk) says."""
    # Loops, not generators (a frame per item): this runs at every model call.
    reasons: list[str] = []
    for choice in getattr(response, "choices", None) or ():
        reason = getattr(choice, "finish_reason", None)
        if isinstance(reason, str) and reason:
            reasons.append(reason[: attributes.MAX_NAME_LENGTH])
    _record_response(
        state, getattr(response, "model", None), getattr(response, "id", None), tuple(reasons)
    )


class LlmResponseObjectObserver(Observer):
    """``OpenAICompletion._extract_openai_token_usage(response)``: the SDK's response object.

    CrewAI calls it with every complete chat completion (plain and structured, sync and async)
    and with a stream's usage chunk, on every supported version, inside the model call: the
    response model, ID and finish reasons are read from the object, the body is not parsed again.
    """

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        #: Its arguments by name, positions from the installed signature.
        self.arguments = internals.LLM_RESPONSE_ARGS.bind()

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        state = _current_call()
        if state is not None:
            _note_response(state, self.arguments.get(args, kwargs, "response", None))


class _StreamNotes:
    """What the chunks of one streamed answer say: the model, the ID, each choice's end."""

    __slots__ = ("finish_reasons", "model", "response_id", "state")

    def __init__(self, state: LlmCallState) -> None:
        self.state = state
        self.model: object = None
        self.response_id: object = None
        #: Finish reason by choice index (``None`` until the choice's last chunk).
        self.finish_reasons: dict[int, str | None] = {}

    def note(self, chunk: Any) -> None:
        if not self.state.first_chunk_seen:
            self.state.first_chunk_seen = True
            self.state.span.set_attribute(
                attributes.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
                time.perf_counter() - self.state.started,
            )
        choices = getattr(chunk, "choices", None)
        if self.model is None:
            self.model = getattr(chunk, "model", None)
            self.response_id = getattr(chunk, "id", None)
        for choice in choices or ():
            index = getattr(choice, "index", 0)
            index = index if isinstance(index, int) else 0
            reason = getattr(choice, "finish_reason", None)
            if reason or index not in self.finish_reasons:
                self.finish_reasons[index] = reason if isinstance(reason, str) else None

    def finish(self) -> None:
        """The stream ended (or was abandoned): a choice that never finished ended in error."""
        reasons = tuple(
            (self.finish_reasons[i] or attributes.FINISH_REASON_ERROR)[: attributes.MAX_NAME_LENGTH]
            for i in sorted(self.finish_reasons)
        )
        _record_response(self.state, self.model, self.response_id, reasons)


class StreamChunkObserver(Observer):
    """The OpenAI SDK's ``Stream.__iter__`` / ``AsyncStream.__aiter__`` inside a model call.

    Hands CrewAI the same chunks, noting each (model, ID, finish reason per choice) on the way:
    no extra parsing, one generator step per chunk, and nothing at all for streams iterated
    outside a model call. (``AsyncStream.__aiter__`` is an async generator function: calling it
    returns the iterator at once, so both are observed as plain calls.)
    """

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _current_call()

    def after_result(self, observed: LlmCallState, result: Any) -> None:
        observed.span.set_attribute(attributes.GEN_AI_REQUEST_STREAM, True)

    def wrap_result(self, observed: LlmCallState, result: Any) -> Any:
        notes = _StreamNotes(observed)
        return _anoted(result, notes) if hasattr(result, "__anext__") else _noted(result, notes)


def _noted(chunks: Iterator[Any], notes: _StreamNotes) -> Iterator[Any]:
    try:
        for chunk in chunks:
            safe_call(notes.note, chunk, default=None)
            yield chunk
    finally:
        safe_call(notes.finish, default=None)


async def _anoted(chunks: AsyncIterator[Any], notes: _StreamNotes) -> AsyncIterator[Any]:
    try:
        async for chunk in chunks:
            safe_call(notes.note, chunk, default=None)
            yield chunk
    finally:
        safe_call(notes.finish, default=None)


class RateLimitRetryObserver(Observer):
    """``crewai.llms.retry.get_retry_delay_seconds``: called once per rate-limit retry.

    Adds a ``crew_otel.retry`` event (layer ``rate_limit``, retry number, delay) to the model
    call's span and counts the retry.
    """

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        state = otel_context.get_value(LLM_CALL_KEY)
        if isinstance(state, LlmCallState):
            retry_number = kwargs.get("retry_number", args[0] if args else None)
            self._note(state, retry_number, result)

    def _note(self, state: LlmCallState, retry_number: object, delay: object) -> None:
        state.rate_limit_retries += 1
        error_type = state.last_error_type or "unknown"
        event: dict[str, Any] = {
            attributes.RETRY_LAYER: attributes.RETRY_LAYER_RATE_LIMIT,
            attributes.ERROR_TYPE: error_type,
        }
        if isinstance(retry_number, int):
            event["crew_otel.retry.number"] = retry_number
        if isinstance(delay, (int, float)):
            event["crew_otel.retry.delay_s"] = float(delay)
        state.span.add_event(attributes.EVENT_RETRY, event)
        self.runtime.metrics.retry(attributes.RETRY_LAYER_RATE_LIMIT, error_type, state.provider)
