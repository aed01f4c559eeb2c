"""Memory, knowledge and embeddings: the spans of CrewAI's retrieval layer.

* ``embeddings {model}`` (CLIENT) per call of an embedder (chromadb's embedding functions,
  which CrewAI's embedder factory builds for memory and knowledge). The call keeps an
  :class:`EmbeddingsCallState` (an :class:`~crew_otel.wrappers.llm.LlmCallState`) in the
  context, so its HTTP attempts are nested under it and a failed attempt (a 429, a 500) is the
  error's origin, as for chat. The input tokens come from the SDK's response
  (:class:`EmbeddingsUsageObserver`).
* ``crewai.memory.search`` (``Memory.recall``; ``arecall`` delegates to it),
  ``crewai.memory.save`` (``Memory._encode_batch``: the encoding of one batch, for ``remember``
  and for the background saves of ``remember_many``) and ``crewai.memory.extract``
  (``Memory.extract_memories``, the memory's own model call on a task's result): their model
  calls, embeddings calls and storage errors nest under them.
* ``crewai.knowledge.query`` (``Knowledge.query``/``aquery``) and ``crewai.knowledge.add``
  (``Knowledge.add_sources``/``aadd_sources``: the sources embedded and stored).

The memory's storage and the knowledge's storage are watched by the shared-instance
detection (kinds ``memory`` and ``knowledge``): one store used by two requests at once is
flagged on the span that used it.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes as a
from crew_otel.attributes import Operation
from crew_otel.context import LLM_CALL_KEY
from crew_otel.diagnosis.sharing import Kind
from crew_otel.wrappers.base import Call, DurationPoint, ErrorRecording, SpanWrapper
from crew_otel.wrappers.llm import DEFAULT_SDK_MAX_RETRIES, LlmCallState
from crew_otel.wrappers.observer import Observer

AZURE_PROVIDER = "azure.ai.openai"


class EmbeddingsCallState(LlmCallState):
    """What one embeddings call learns while it runs (the HTTP attempts note their failures)."""

    __slots__ = ()


def embeddings_provider(embedder: Any) -> str:
    """``gen_ai.provider.name`` of a chromadb embedding function (its ``name()``)."""
    if getattr(embedder, "api_type", None) == "azure":
        return AZURE_PROVIDER
    name_fn = getattr(type(embedder), "name", None)
    name = name_fn() if callable(name_fn) else None
    if isinstance(name, str) and name:
        return name[: a.MAX_NAME_LENGTH]
    return a.DEFAULT_EMBEDDINGS_PROVIDER


def embeddings_model(embedder: Any) -> str:
    """The model an embedding function asks for."""
    for field in ("model_name", "model", "deployment_id"):
        value = getattr(embedder, field, None)
        if isinstance(value, str) and value:
            return value[: a.MAX_NAME_LENGTH]
    return a.DEFAULT_MODEL_NAME


def _client_max_retries(embedder: Any) -> int:
    max_retries = getattr(getattr(embedder, "client", None), "max_retries", None)
    if not isinstance(max_retries, int) or isinstance(max_retries, bool):
        return DEFAULT_SDK_MAX_RETRIES
    return max_retries


class EmbeddingsWrapper(SpanWrapper[EmbeddingsCallState]):
    """One ``embeddings {model}`` CLIENT span per call of an embedding function."""

    operation = Operation.EMBEDDINGS

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[EmbeddingsCallState] | None:
        ctx = otel_context.get_current()
        existing = ctx.get(LLM_CALL_KEY)
        if isinstance(existing, EmbeddingsCallState) and trace.get_current_span(ctx) is (
            existing.span
        ):
            return None  # a subclass's __call__ delegating to its base class's
        provider, model = embeddings_provider(instance), embeddings_model(instance)
        attrs: dict[str, AttributeValue] = {
            a.GEN_AI_OPERATION_NAME: a.OP_EMBEDDINGS,
            a.GEN_AI_PROVIDER_NAME: provider,
            a.GEN_AI_REQUEST_MODEL: model,
        }
        span = self.tracer.start_span(
            a.span_name(a.SPAN_EMBEDDINGS, model),
            context=ctx,
            kind=SpanKind.CLIENT,
            attributes=attrs,
        )
        state = EmbeddingsCallState(span, provider, model, _client_max_retries(instance), False)
        call = Call(
            span,
            otel_context.set_value(LLM_CALL_KEY, state, trace.set_span_in_context(span, ctx)),
            state,
        )
        return call

    def succeed(self, call: Call[EmbeddingsCallState], result: Any) -> Any:
        state = call.data
        if state.input_tokens is not None:
            self.runtime.metrics.token_usage.record(
                state.input_tokens, {**_metric_attributes(state), a.GEN_AI_TOKEN_TYPE: "input"}
            )
        return result

    def error_recording(
        self, call: Call[EmbeddingsCallState], exc: BaseException
    ) -> ErrorRecording:
        # A failed last HTTP attempt is the origin; otherwise decide by the exception chain.
        return ErrorRecording(origin=False if call.data.last_http_failed else None)

    def duration_point(self, call: Call[EmbeddingsCallState]) -> DurationPoint:
        return DurationPoint(self.runtime.metrics.operation_duration, _metric_attributes(call.data))


def _metric_attributes(state: LlmCallState) -> dict[str, AttributeValue]:
    return {
        a.GEN_AI_OPERATION_NAME: a.OP_EMBEDDINGS,
        a.GEN_AI_PROVIDER_NAME: state.provider,
        a.GEN_AI_REQUEST_MODEL: state.model,
    }


class EmbeddingsUsageObserver(Observer):
    """The OpenAI SDK's ``Embeddings.create``: its response's input tokens -> the embeddings
    span in progress (nothing outside one)."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = otel_context.get_value(LLM_CALL_KEY)
        return state if isinstance(state, EmbeddingsCallState) else None

    def after_result(self, observed: EmbeddingsCallState, result: Any) -> None:
        tokens = getattr(getattr(result, "usage", None), "prompt_tokens", None)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            observed.input_tokens = (observed.input_tokens or 0) + tokens
            observed.span.set_attribute(a.GEN_AI_USAGE_INPUT_TOKENS, observed.input_tokens)


class _StoreSpanWrapper(SpanWrapper[None]):
    """An INTERNAL span around one memory or knowledge operation, with the result count."""

    span_name: str
    count_key: str
    kind: Kind

    def attributes(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        """The span's attributes and the store object watched for sharing (``None``: none)."""
        raise NotImplementedError

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[None] | None:
        ctx = otel_context.get_current()
        attrs, store = self.attributes(instance)
        span = self.tracer.start_span(self.span_name, context=ctx, attributes=attrs)
        call: Call[None] = Call(span, trace.set_span_in_context(span, ctx), None)
        if store is not None:
            self.track_instance(call, self.kind, store, type(store).__name__)
        return call

    def succeed(self, call: Call[None], result: Any) -> Any:
        if isinstance(result, (list, tuple)):
            call.span.set_attribute(self.count_key, len(result))
        return result


def _private(instance: Any, name: str) -> object:
    try:
        return getattr(instance, name, None)
    except Exception:  # pydantic private attributes not set yet
        return None


class _MemoryWrapper(_StoreSpanWrapper):
    operation = Operation.MEMORY
    count_key = a.CREWAI_MEMORY_RESULT_COUNT
    kind = Kind.MEMORY

    def attributes(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        attrs: dict[str, AttributeValue] = {a.CREWAI_MEMORY_TYPE: a.MEMORY_TYPE_UNIFIED}
        storage = _private(instance, "_storage")
        if storage is not None:
            attrs[a.CREWAI_MEMORY_STORAGE] = type(storage).__name__[: a.MAX_NAME_LENGTH]
        return attrs, storage


class MemorySearchWrapper(_MemoryWrapper):
    """``Memory.recall``: ``crewai.memory.search``."""

    span_name = a.SPAN_MEMORY_SEARCH


class MemorySaveWrapper(_MemoryWrapper):
    """``Memory._encode_batch``: ``crewai.memory.save`` (one batch encoded and stored)."""

    span_name = a.SPAN_MEMORY_SAVE


class MemoryExtractWrapper(_MemoryWrapper):
    """``Memory.extract_memories``: ``crewai.memory.extract`` (the memory's model call)."""

    span_name = a.SPAN_MEMORY_EXTRACT


class KnowledgeQueryWrapper(_StoreSpanWrapper):
    """``Knowledge.query``/``aquery``: ``crewai.knowledge.query``."""

    operation = Operation.KNOWLEDGE
    span_name = a.SPAN_KNOWLEDGE_QUERY
    count_key = a.CREWAI_KNOWLEDGE_RESULT_COUNT
    kind = Kind.KNOWLEDGE

    def attributes(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        attrs: dict[str, AttributeValue] = {}
        storage = getattr(instance, "storage", None)
        if storage is not None:
            attrs[a.CREWAI_KNOWLEDGE_STORAGE] = type(storage).__name__[: a.MAX_NAME_LENGTH]
        collection = getattr(storage, "collection_name", None) or getattr(
            instance, "collection_name", None
        )
        if isinstance(collection, str) and collection:
            attrs[a.CREWAI_KNOWLEDGE_COLLECTION] = collection[: a.MAX_NAME_LENGTH]
        return attrs, storage


class KnowledgeAddWrapper(KnowledgeQueryWrapper):
    """``Knowledge.add_sources``/``aadd_sources``: ``crewai.knowledge.add``."""

    span_name = a.SPAN_KNOWLEDGE_ADD
