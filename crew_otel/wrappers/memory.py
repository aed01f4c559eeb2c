"""Memory, knowledge and embeddings: the spans of CrewAI's retrieval layer.

* ``embeddings {model}`` (CLIENT) per call of an embedder (chromadb's embedding functions,
  which CrewAI's embedder factory builds for memory and knowledge). The call keeps an
  :class:`EmbeddingsCallState` (an :class:`~crew_otel.wrappers.llm.LlmCallState`) in the
  context, so its HTTP attempts are nested under it and a failed attempt (a 429, a 500) is the
  error's origin, as for chat. The input tokens come from the SDK's response
  (:class:`EmbeddingsUsageObserver`). When a provider SDK instrumentation hooks the openai
  SDK's embeddings call the embedder makes (see :mod:`crew_otel.coexistence`), its span is
  the embeddings span: crew_otel's is then ``crewai.embeddings {model}`` (INTERNAL, no
  ``gen_ai.*``), still the parent of the SDK call and its HTTP attempts, and the
  ``gen_ai.client.*`` points are left to the provider instrumentation when it records them.
* the GenAI conventions' memory operations (span name = ``gen_ai.operation.name``):
  ``search_memory`` (``Memory.recall``; ``arecall`` delegates to it) and ``upsert_memory``
  (``Memory._encode_batch``: the encoding of one batch, for ``remember`` and for the background
  saves of ``remember_many``; CrewAI may create, update or consolidate records without the
  caller choosing which), with ``gen_ai.memory.store.id`` (the storage path, else its class)
  and ``gen_ai.memory.record.count``; INTERNAL, as the conventions allow for a memory store in
  the process (LanceDB). ``crewai.memory.extract`` (``Memory.extract_memories``, the memory's
  own model call on a task's result) is CrewAI's. Their model calls, embeddings calls and
  storage errors nest under them; crew_otel's details stay as ``crewai.memory.*``.
* ``retrieval {gen_ai.data_source.id}`` (CLIENT, ``Knowledge.query``/``aquery``: the data
  source is CrewAI's knowledge collection, the result limit ``gen_ai.request.top_k``, or
  ``gen_ai.retrieval.top_k`` under :mod:`crew_otel.semconv`'s opt-in) and
  ``crewai.knowledge.add`` (``Knowledge.add_sources``/``aadd_sources``: the sources embedded
  and stored).

The memory's storage and the knowledge's storage are watched by the shared-instance
detection (kinds ``memory`` and ``knowledge``): one store used by two requests at once is
flagged on the span that used it.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes, internals, semconv
from crew_otel.attributes import Operation
from crew_otel.coexistence import ProviderInstrumentations, deferred_attributes
from crew_otel.context import ATTEMPT_KEY, LLM_CALL_KEY
from crew_otel.diagnosis.sharing import Kind
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
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
        return name[: attributes.MAX_NAME_LENGTH]
    return attributes.DEFAULT_EMBEDDINGS_PROVIDER


def embeddings_model(embedder: Any) -> str:
    """The model an embedding function asks for."""
    for field in ("model_name", "model", "deployment_id"):
        value = getattr(embedder, field, None)
        if isinstance(value, str) and value:
            return value[: attributes.MAX_NAME_LENGTH]
    return attributes.DEFAULT_MODEL_NAME


def _client_max_retries(client: Any) -> int:
    """The SDK's HTTP retry budget of an embedding function's client."""
    max_retries = getattr(client, "max_retries", None)
    if not isinstance(max_retries, int) or isinstance(max_retries, bool):
        return DEFAULT_SDK_MAX_RETRIES
    return max_retries


class EmbeddingsWrapper(SpanWrapper[EmbeddingsCallState]):
    """One ``embeddings {model}`` CLIENT span per call of an embedding function (or
    ``crewai.embeddings {model}`` beside a provider SDK instrumentation)."""

    operation = Operation.EMBEDDINGS

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        self._provider_instrumentations = ProviderInstrumentations()

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
            attributes.GEN_AI_OPERATION_NAME: attributes.OP_EMBEDDINGS,
            attributes.GEN_AI_PROVIDER_NAME: provider,
            attributes.GEN_AI_REQUEST_MODEL: model,
        }
        client = getattr(instance, "client", None)
        deferral = (
            self._provider_instrumentations.embeddings_deferral_for(client)
            if self.config.defer_to_provider_instrumentation
            else None
        )
        name, kind = attributes.SPAN_EMBEDDINGS, SpanKind.CLIENT
        if deferral is not None:
            # The provider instrumentation's span under this one is the embeddings span.
            attrs = deferred_attributes(attrs, deferral)
            name, kind = attributes.SPAN_EMBEDDINGS_CALL, SpanKind.INTERNAL
        span = self.tracer.start_span(
            attributes.span_name(name, model), context=ctx, kind=kind, attributes=attrs
        )
        state = EmbeddingsCallState(span, provider, model, _client_max_retries(client), False)
        if deferral is not None:
            state.deferred = True
            state.record_metrics = not deferral.records_metrics
        call = Call(
            span,
            otel_context.set_value(LLM_CALL_KEY, state, trace.set_span_in_context(span, ctx)),
            state,
        )
        return call

    def succeed(self, call: Call[EmbeddingsCallState], result: Any) -> Any:
        state = call.data
        if state.input_tokens is None or not state.record_metrics:
            return result
        metrics = self.runtime.metrics
        if metrics.inference_tokens is not None:
            # semconv opt-in: main replaced gen_ai.client.token.usage and names no embeddings
            # token metric; the input histogram, told apart by gen_ai.operation.name
            metrics.inference_tokens["input"].record(state.input_tokens, _metric_attributes(state))
        else:
            metrics.token_usage.record(
                state.input_tokens,
                {**_metric_attributes(state), attributes.GEN_AI_TOKEN_TYPE: "input"},
            )
        return result

    def error_recording(
        self, call: Call[EmbeddingsCallState], exc: BaseException
    ) -> ErrorRecording:
        # A failed last HTTP attempt is the origin; otherwise decide by the exception chain.
        return ErrorRecording(origin=False if call.data.last_http_failed else None)

    def duration_point(self, call: Call[EmbeddingsCallState]) -> DurationPoint | None:
        if not call.data.record_metrics:
            return None  # the provider instrumentation records gen_ai.client.* points
        return (self.runtime.metrics.operation_duration, _metric_attributes(call.data))


def _metric_attributes(state: LlmCallState) -> dict[str, AttributeValue]:
    return {
        attributes.GEN_AI_OPERATION_NAME: attributes.OP_EMBEDDINGS,
        attributes.GEN_AI_PROVIDER_NAME: state.provider,
        attributes.GEN_AI_REQUEST_MODEL: state.model,
    }


class EmbeddingsUsageObserver(Observer):
    """The OpenAI SDK's ``Embeddings.create`` -> the embeddings span in progress (nothing
    outside one): where it sends (``server.*``), the encoding and dimensions asked, and from
    the response the model, the embeddings' dimensions and the input tokens. Beside a provider
    instrumentation (a deferred call) only the input tokens are kept, for the points crew_otel
    records when the provider instrumentation records none: its span has the rest."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = otel_context.get_value(LLM_CALL_KEY)
        if not isinstance(state, EmbeddingsCallState):
            return None
        if not state.deferred and state.span.is_recording():
            attrs = attributes.server_attributes(
                getattr(getattr(instance, "_client", None), "base_url", None)
            )
            # The SDK asks for base64 (and decodes it) unless told otherwise.
            encoding = kwargs.get("encoding_format")
            attrs[attributes.GEN_AI_REQUEST_ENCODING_FORMATS] = (
                encoding if isinstance(encoding, str) else _SDK_ENCODING_FORMAT,
            )
            dimensions = kwargs.get("dimensions")
            if isinstance(dimensions, int) and not isinstance(dimensions, bool):
                attrs[attributes.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = dimensions
            state.span.set_attributes(attrs)
        return state

    def after_result(self, observed: EmbeddingsCallState, result: Any) -> None:
        tokens = getattr(getattr(result, "usage", None), "prompt_tokens", None)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            observed.input_tokens = (observed.input_tokens or 0) + tokens
        if observed.deferred or not observed.span.is_recording():
            return
        if observed.input_tokens is not None:
            observed.span.set_attribute(attributes.GEN_AI_USAGE_INPUT_TOKENS, observed.input_tokens)
        model = getattr(result, "model", None)
        if isinstance(model, str) and model:
            observed.span.set_attribute(
                attributes.GEN_AI_RESPONSE_MODEL, model[: attributes.MAX_NAME_LENGTH]
            )
        data = getattr(result, "data", None)
        vector = getattr(data[0], "embedding", None) if isinstance(data, list) and data else None
        if isinstance(vector, list) and vector:
            observed.span.set_attribute(attributes.GEN_AI_EMBEDDINGS_DIMENSION_COUNT, len(vector))


#: The encoding the OpenAI SDK requests when its caller names none.
_SDK_ENCODING_FORMAT = "base64"


class StoreCallState:
    """What one memory or knowledge operation learns while it runs."""

    __slots__ = ("lock_wait", "operation")

    def __init__(self, operation: str) -> None:
        #: Seconds spent waiting for the storage lock so far.
        self.lock_wait = 0.0
        #: ``crew_otel.origin.operation`` of an error recorded on the span by a hook below it.
        self.operation = operation


class _StoreSpanWrapper(SpanWrapper[StoreCallState]):
    """An INTERNAL span around one memory or knowledge operation, with the result count.

    The call is kept in the context under ``context_key`` so the hooks below it (the storage
    lock, the knowledge search) can note on its span what happened inside the storage.
    """

    span_name: str
    count_key: str
    #: ``gen_ai.memory.record.count`` too (memory operations).
    record_count = False
    kind: Kind
    span_kind = SpanKind.INTERNAL
    #: Where the call is kept in the context for the hooks below it (``None``: not kept).
    context_key: str | None = None

    def describe(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        """The span's attributes and the store object watched for sharing (``None``: none)."""
        raise NotImplementedError

    def name(self, attrs: dict[str, AttributeValue]) -> str:
        """The span's name (from its attributes)."""
        return self.span_name

    def arguments(
        self, attrs: dict[str, AttributeValue], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Add what the call's arguments say (a limit) to ``attrs``."""

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[StoreCallState] | None:
        ctx = otel_context.get_current()
        attrs, store = self.describe(instance)
        self.arguments(attrs, args, kwargs)
        span = self.tracer.start_span(
            self.name(attrs), context=ctx, kind=self.span_kind, attributes=attrs
        )
        call = Call(
            span, trace.set_span_in_context(span, ctx), StoreCallState(self.operation.value)
        )
        if self.context_key is not None:
            call.ctx = otel_context.set_value(self.context_key, call, call.ctx)
        if store is not None:
            self.track_instance(call, self.kind, store, type(store).__name__)
        self.started(call, attrs)
        return call

    def started(self, call: Call[StoreCallState], attrs: dict[str, AttributeValue]) -> None:
        """The span started with ``attrs``."""

    def succeed(self, call: Call[StoreCallState], result: Any) -> Any:
        if isinstance(result, (list, tuple)) and call.span.is_recording():
            call.span.set_attribute(self.count_key, len(result))
            if self.record_count:
                call.span.set_attribute(attributes.GEN_AI_MEMORY_RECORD_COUNT, len(result))
        return result


#: The memory call (``crewai.memory.*``) in progress in a context.
MEMORY_CALL_KEY = otel_context.create_key("crew_otel.memory_call")
#: The knowledge query in progress in a context.
KNOWLEDGE_CALL_KEY = otel_context.create_key("crew_otel.knowledge_call")
#: When a save was handed to the memory's save queue (a :class:`SaveSubmitted`).
SAVE_SUBMITTED_KEY = otel_context.create_key("crew_otel.memory_save_submitted")


def _current_call(key: str) -> Call[StoreCallState] | None:
    call = otel_context.get_value(key)
    return call if isinstance(call, Call) and isinstance(call.data, StoreCallState) else None


class _MemoryWrapper(_StoreSpanWrapper):
    operation = Operation.MEMORY
    count_key = attributes.CREWAI_MEMORY_RESULT_COUNT
    kind = Kind.MEMORY
    context_key: str | None = MEMORY_CALL_KEY

    def describe(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        attrs: dict[str, AttributeValue] = {
            attributes.CREWAI_MEMORY_TYPE: attributes.MEMORY_TYPE_UNIFIED
        }
        if self.operation is not Operation.MEMORY:
            attrs[attributes.GEN_AI_OPERATION_NAME] = self.operation.value
        storage = internals.MEMORY_STORAGE.read(instance)
        if storage is not None:
            store_class = type(storage).__name__[: attributes.MAX_NAME_LENGTH]
            attrs[attributes.CREWAI_MEMORY_STORAGE] = store_class
            path = internals.LANCEDB_STORAGE_PATH.read(storage)
            if path is not None:
                attrs[attributes.CREWAI_MEMORY_STORAGE_PATH] = str(path)
            # The store's identity: where it lives (two memories on one path share it).
            attrs[attributes.GEN_AI_MEMORY_STORE_ID] = (
                str(path) if path is not None else store_class
            )
        return attrs, storage


class MemorySearchWrapper(_MemoryWrapper):
    """``Memory.recall``: ``search_memory``, with the recall's ``limit``."""

    operation = Operation.SEARCH_MEMORY
    span_name = attributes.SPAN_MEMORY_SEARCH
    record_count = True

    def arguments(
        self, attrs: dict[str, AttributeValue], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        limit = kwargs.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool):
            attrs[attributes.CREWAI_MEMORY_LIMIT] = limit


class MemorySaveWrapper(_MemoryWrapper):
    """``Memory._encode_batch``: ``upsert_memory`` (one batch encoded and stored), with the
    time the save waited in the memory's save queue when it was queued."""

    operation = Operation.UPSERT_MEMORY
    span_name = attributes.SPAN_MEMORY_SAVE
    record_count = True

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[StoreCallState] | None:
        call = super().begin(instance, args, kwargs)
        submitted = otel_context.get_value(SAVE_SUBMITTED_KEY)
        if call is not None and isinstance(submitted, SaveSubmitted) and submitted.take():
            call.span.set_attribute(
                attributes.CREWAI_MEMORY_QUEUE_WAIT, max(0.0, call.start - submitted.at)
            )
        return call


class MemoryExtractWrapper(_MemoryWrapper):
    """``Memory.extract_memories``: ``crewai.memory.extract`` (the memory's model call)."""

    span_name = attributes.SPAN_MEMORY_EXTRACT


class SaveSubmitted:
    """A save handed to the memory's save queue at ``at`` (``perf_counter``); the first
    ``upsert_memory`` span that starts in its context takes it."""

    __slots__ = ("_taken", "at")

    def __init__(self) -> None:
        self.at = time.perf_counter()
        self._taken = False

    def take(self) -> bool:
        """Whether this is the first look (a later save in the same context is no queued one)."""
        taken, self._taken = self._taken, True
        return not taken


class SaveQueueObserver(Observer):
    """``Memory._submit_save``: the context CrewAI copies for its save thread carries the
    time the save was queued (one writer thread per Memory: a shared memory's saves queue)."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return SaveSubmitted()

    def context(self, observed: SaveSubmitted) -> otel_context.Context:
        return otel_context.set_value(SAVE_SUBMITTED_KEY, observed)

    def after_result(self, observed: SaveSubmitted, result: Any) -> None:
        """Nothing to note: the save's span takes the queued time."""


class StorageLockObserver(Observer):
    """The storage lock CrewAI takes around every memory write (``store_lock``: a file lock
    per storage path, shared by threads and processes): the time spent waiting for it goes on
    the memory span in progress (``crewai.memory.lock_wait``, summed), and a failure to get it
    (the lock's timeout) is recorded there, where it happened."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _current_call(MEMORY_CALL_KEY)

    def after_result(self, observed: Call[StoreCallState], result: Any) -> None:
        """Nothing to note yet: the lock is timed when it is entered (:meth:`wrap_result`)."""

    def wrap_result(self, observed: Call[StoreCallState], result: Any) -> Any:
        if not hasattr(result, "__enter__") or not hasattr(result, "__exit__"):
            return result
        return _TimedLock(result, observed, self.runtime)


class _TimedLock:
    """A lock's context manager that times its acquisition; everything else is the lock's."""

    __slots__ = ("_call", "_lock", "_runtime")

    def __init__(self, lock: Any, call: Call[StoreCallState], runtime: Runtime) -> None:
        self._lock, self._call, self._runtime = lock, call, runtime

    def __enter__(self) -> Any:
        start = time.perf_counter()
        try:
            acquired = self._lock.__enter__()
        except BaseException as exc:
            safe_call(self._waited, start, exc, default=None)
            raise
        safe_call(self._waited, start, None, default=None)
        return acquired

    def __exit__(self, *exc_info: Any) -> Any:
        return self._lock.__exit__(*exc_info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lock, name)

    def _waited(self, start: float, exc: BaseException | None) -> None:
        state = self._call.data
        state.lock_wait += time.perf_counter() - start
        span = self._call.span
        if not span.is_recording():
            return
        span.set_attribute(attributes.CREWAI_MEMORY_LOCK_WAIT, state.lock_wait)
        if exc is not None:
            self._runtime.errors.record(span, exc, state.operation, since=self._call.start)


class KnowledgeSearchErrorObserver(Observer):
    """The vector store's search under ``retrieval`` (``ChromaDBClient.search`` /
    ``asearch``): CrewAI's ``KnowledgeStorage.search`` turns every error into an empty result,
    so the error is recorded here, on the knowledge span, as an origin CrewAI handled
    (``crew_otel.error.recovered=true``): the app still gets ``[]``."""

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _current_call(KNOWLEDGE_CALL_KEY)

    def after_result(self, observed: Any, result: Any) -> None:
        """Nothing to note: the search succeeded (the wrapper counts the results)."""

    def after_error(self, observed: Call[StoreCallState], exc: BaseException) -> None:
        self.runtime.errors.record(
            observed.span,
            exc,
            observed.data.operation,
            recovered=True,
            since=observed.start,
        )


class _KnowledgeWrapper(_StoreSpanWrapper):
    count_key = attributes.CREWAI_KNOWLEDGE_RESULT_COUNT
    kind = Kind.KNOWLEDGE

    def describe(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        attrs: dict[str, AttributeValue] = {}
        storage = getattr(instance, "storage", None)
        if storage is not None:
            attrs[attributes.CREWAI_KNOWLEDGE_STORAGE] = type(storage).__name__[
                : attributes.MAX_NAME_LENGTH
            ]
        collection = getattr(storage, "collection_name", None) or getattr(
            instance, "collection_name", None
        )
        if isinstance(collection, str) and collection:
            attrs[attributes.CREWAI_KNOWLEDGE_COLLECTION] = collection[: attributes.MAX_NAME_LENGTH]
        return attrs, storage


def knowledge_data_source(collection: object) -> str:
    """The collection CrewAI's knowledge storage searches: ``knowledge_{name}``, or
    ``knowledge`` for a Knowledge without a name."""
    if isinstance(collection, str) and collection:
        return f"{attributes.DEFAULT_KNOWLEDGE_COLLECTION}_{collection}"[
            : attributes.MAX_NAME_LENGTH
        ]
    return attributes.DEFAULT_KNOWLEDGE_COLLECTION


class KnowledgeQueryWrapper(_KnowledgeWrapper):
    """``Knowledge.query``/``aquery``: ``retrieval {gen_ai.data_source.id}`` (CLIENT)."""

    operation = Operation.RETRIEVAL
    span_name = attributes.SPAN_KNOWLEDGE_QUERY
    span_kind = SpanKind.CLIENT
    context_key: str | None = KNOWLEDGE_CALL_KEY

    def describe(self, instance: Any) -> tuple[dict[str, AttributeValue], object]:
        attrs, storage = super().describe(instance)
        attrs[attributes.GEN_AI_OPERATION_NAME] = attributes.SPAN_KNOWLEDGE_QUERY
        attrs[attributes.GEN_AI_DATA_SOURCE_ID] = knowledge_data_source(
            attrs.get(attributes.CREWAI_KNOWLEDGE_COLLECTION)
        )
        return attrs, storage

    def name(self, attrs: dict[str, AttributeValue]) -> str:
        return attributes.span_name(self.span_name, str(attrs[attributes.GEN_AI_DATA_SOURCE_ID]))

    def arguments(
        self, attrs: dict[str, AttributeValue], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        limit = kwargs.get("results_limit", args[1] if len(args) > 1 else _DEFAULT_RESULTS_LIMIT)
        if isinstance(limit, int) and not isinstance(limit, bool):
            attrs[semconv.retrieval_top_k()] = limit

    def started(self, call: Call[StoreCallState], attrs: dict[str, AttributeValue]) -> None:
        """The agent attempt this query runs in uses the data source: ``gen_ai.data_source.id``
        on its span too."""
        scope: Any = call.ctx.get(ATTEMPT_KEY)
        span = getattr(scope, "span", None)
        if span is not None and span.is_recording():
            span.set_attribute(
                attributes.GEN_AI_DATA_SOURCE_ID, attrs[attributes.GEN_AI_DATA_SOURCE_ID]
            )


#: ``Knowledge.query``'s default ``results_limit`` (crewai 1.12 and 1.15).
_DEFAULT_RESULTS_LIMIT = 5


class KnowledgeAddWrapper(_KnowledgeWrapper):
    """``Knowledge.add_sources``/``aadd_sources``: ``crewai.knowledge.add``."""

    operation = Operation.KNOWLEDGE
    span_name = attributes.SPAN_KNOWLEDGE_ADD

    def error_recording(self, call: Call[StoreCallState], exc: BaseException) -> ErrorRecording:
        """An ingestion error reaches the caller (an Agent's knowledge: CrewAI re-raises it),
        except a crew's: ``Crew.create_crew_knowledge`` logs it and goes on (at construction,
        and on CrewAI versions that re-validate the crew during a kickoff), so there it is an
        origin CrewAI handled."""
        return ErrorRecording(recovered=internals.CREW_KNOWLEDGE_INIT.on_stack())
