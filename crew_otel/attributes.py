"""Every span/metric attribute key, span-name builder and attribute extractor.

Pure functions: no I/O, no global state. Keys follow the OpenTelemetry GenAI semantic
conventions where they exist (``gen_ai.*``, ``error.type``, ``thread.*``,
``http.request.resend_count``), ``crewai.*`` for CrewAI's own concepts and ``crew_otel.*`` for
crew_otel's diagnosis. The names are public: dashboards, alert rules and users' queries use them.

Span names are low-cardinality by construction: they only ever contain code-defined names
(crew name, task name, the agent's *original* role, tool name, model), cut to
:data:`MAX_NAME_LENGTH`; never task descriptions, inputs or IDs.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.util.types import AttributeValue

from crew_otel import internals

# --- GenAI semantic conventions --------------------------------------------------------------
GEN_AI_PREFIX = "gen_ai."
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
#: The finish reason of a generation that ended abnormally: the call failed or was cancelled
#: before the provider's answer (the conventions report it instead of leaving it out).
FINISH_REASON_ERROR = "error"
#: ``true`` on a model call whose conversation CrewAI summarised to fit the context window
#: (the conventions: set only when known, never ``false``).
GEN_AI_CONVERSATION_COMPACTED = "gen_ai.conversation.compacted"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
#: CrewAI's per-instance agent id. Not ``gen_ai.agent.id``: the GenAI conventions keep that for
#: the stable id of a hosted agent, and CrewAI makes a new id for every Agent object.
CREWAI_AGENT_ID = "crewai.agent.id"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
GEN_AI_WORKFLOW_NAME = "gen_ai.workflow.name"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
# Request parameters, set where the LLM object (or the SDK call) says them; never content.
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_REQUEST_ENCODING_FORMATS = "gen_ai.request.encoding_formats"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
#: ``json`` when the call asks for structured output (a ``response_model`` or
#: ``response_format``): the requested modality, not the answer's format.
GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"
OUTPUT_TYPE_JSON = "json"
GEN_AI_EMBEDDINGS_DIMENSION_COUNT = "gen_ai.embeddings.dimension.count"
GEN_AI_TOOL_DESCRIPTION = "gen_ai.tool.description"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
#: CrewAI runs every tool itself, in the agent's process: a function in the conventions' terms.
TOOL_TYPE_FUNCTION = "function"
GEN_AI_DATA_SOURCE_ID = "gen_ai.data_source.id"
GEN_AI_MEMORY_STORE_ID = "gen_ai.memory.store.id"
GEN_AI_MEMORY_RECORD_COUNT = "gen_ai.memory.record.count"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
#: The OpenAI refinement of the inference span: ``chat_completions`` or ``responses``.
OPENAI_API_TYPE = "openai.api.type"
OPENAI_API_CHAT_COMPLETIONS = "chat_completions"
OPENAI_API_RESPONSES = "responses"
#: Longest tool description recorded (the developer's text, sent to the model with the tool).
MAX_DESCRIPTION_LENGTH = 1024


class StrEnum(str, Enum):
    """:class:`enum.StrEnum` (Python 3.11+): members are their values, also in ``str()`` and
    f-strings; attributes and metric points get the plain ``.value``."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(str(self), format_spec)


class Operation(StrEnum):
    """Values of ``crew_otel.origin.operation`` (the operation of an error's origin span);
    ``invoke_workflow``, ``invoke_agent``, ``execute_tool``, ``chat``, ``embeddings``, ``plan``,
    ``search_memory``, ``upsert_memory`` and ``retrieval`` are also ``gen_ai.operation.name``
    values."""

    INVOKE_WORKFLOW = "invoke_workflow"
    INVOKE_AGENT = "invoke_agent"
    EXECUTE_TOOL = "execute_tool"
    CHAT = "chat"
    HTTP = "http"
    TASK = "task"
    STEP = "step"
    GUARDRAIL = "guardrail"
    FLOW_STEP = "flow_step"
    EMBEDDINGS = "embeddings"
    #: A memory recall (``Memory.recall``).
    SEARCH_MEMORY = "search_memory"
    #: A memory save (``Memory._encode_batch``): CrewAI may create, update or consolidate
    #: records without the caller choosing which, the conventions' ``upsert_memory``.
    UPSERT_MEMORY = "upsert_memory"
    #: A knowledge query (``Knowledge.query``).
    RETRIEVAL = "retrieval"
    #: The memory's own extraction model call (``crewai.memory.extract``).
    MEMORY = "memory"
    #: A knowledge ingestion (``crewai.knowledge.add``).
    KNOWLEDGE = "knowledge"
    PLAN = "plan"
    #: A wait for CrewAI's ``max_rpm`` limiter or for a human (``crewai.rpm.wait``,
    #: ``crewai.human_input``).
    WAIT = "wait"


# The operations as plain strings (attribute values, metric attributes).
OP_INVOKE_WORKFLOW = Operation.INVOKE_WORKFLOW.value
OP_INVOKE_AGENT = Operation.INVOKE_AGENT.value
OP_EXECUTE_TOOL = Operation.EXECUTE_TOOL.value
OP_CHAT = Operation.CHAT.value

ERROR_TYPE = "error.type"
THREAD_ID = "thread.id"
THREAD_NAME = "thread.name"
HTTP_RESEND_COUNT = "http.request.resend_count"
HTTP_STATUS_CODE = "http.response.status_code"
HTTP_STATUS_CODE_OLD = "http.status_code"

# --- CrewAI's own concepts --------------------------------------------------------------------
CREWAI_CREW_ID = "crewai.crew.id"
CREWAI_KICKOFF_ENTRYPOINT = "crewai.kickoff.entrypoint"
CREWAI_KICKOFF_INPUTS = "crewai.kickoff.inputs"
CREWAI_TASK_ID = "crewai.task.id"
CREWAI_TASK_NAME = "crewai.task.name"
CREWAI_TASK_ASYNC_EXECUTION = "crewai.task.async_execution"
CREWAI_TASK_DESCRIPTION = "crewai.task.description"
CREWAI_TASK_OUTPUT = "crewai.task.output"
CREWAI_AGENT_ITERATION = "crewai.agent.iteration"
CREWAI_TOOL_CACHE_HIT = "crewai.tool.cache_hit"
#: Where a tool comes from: ``mcp`` for tools of an MCP server (CrewAI's ``mcps=``).
CREWAI_TOOL_SOURCE = "crewai.tool.source"
#: The MCP server's label: the leading words of CrewAI's server name (never an argument).
CREWAI_MCP_SERVER_NAME = "crewai.mcp.server.name"
TOOL_SOURCE_MCP = "mcp"
#: error.type of an MCP tool result with ``isError`` (the MCP semantic conventions' value).
ERROR_TYPE_MCP_TOOL_ERROR = "tool_error"
CREWAI_LLM_MESSAGES = "crewai.llm.messages"
#: The model and provider of a model call whose inference span a provider SDK instrumentation
#: makes (crew_otel's span then carries no gen_ai.* attributes; see crew_otel.coexistence).
CREWAI_LLM_MODEL = "crewai.llm.model"
CREWAI_LLM_PROVIDER = "crewai.llm.provider"

# --- crew_otel's diagnosis --------------------------------------------------------------------
REQUEST_ID = "crew_otel.request.id"
#: Which provider SDK instrumentation(s) made the inference (or embeddings) span under this
#: model (or embeddings) call.
LLM_INFERENCE_BY = "crew_otel.llm.inference_by"
KICKOFFS_IN_FLIGHT = "crew_otel.kickoffs.in_flight"
ATTEMPT = "crew_otel.attempt"
RETRY_BUDGET_REMAINING = "crew_otel.retry.budget_remaining"
RETRY_BUDGET_EXHAUSTED = "crew_otel.retry.budget_exhausted"
RETRY_LAYER = "crew_otel.retry.layer"
ERROR_ORIGIN = "crew_otel.error.origin"
ERROR_RECOVERED = "crew_otel.error.recovered"
ORIGIN_OPERATION = "crew_otel.origin.operation"
SHARED_INSTANCE = "crew_otel.shared_instance"
SHARED_INSTANCE_KIND = "crew_otel.shared_instance.kind"
SHARED_INSTANCE_CLASS = "crew_otel.shared_instance.class"
SHARED_INSTANCE_NAME = "crew_otel.shared_instance.name"
SHARED_INSTANCE_OTHER_REQUEST_IDS = "crew_otel.shared_instance.other_request_ids"
#: Why a run failed (:mod:`crew_otel.diagnosis.failure_cause`), on its kickoff span.
FAILURE_CAUSE = "crew_otel.failure.cause"
FAILURE_ORIGIN = "crew_otel.failure.origin"
FAILURE_SHARED_KIND = "crew_otel.failure.shared_instance.kind"
FAILURE_SHARED_NAME = "crew_otel.failure.shared_instance.name"
#: Cross-talk (:mod:`crew_otel.diagnosis.crosstalk`): on the kickoff span of a run that
#: received another in-flight run's data, and on the event where the data entered.
CROSSTALK = "crew_otel.crosstalk"
CROSSTALK_SOURCE = "crew_otel.crosstalk.source"
CROSSTALK_OTHER_REQUEST_IDS = "crew_otel.crosstalk.other_request_ids"
CROSSTALK_MARKS = "crew_otel.crosstalk.marks"
#: Values of ``crew_otel.crosstalk.source``: where the foreign data entered the run.
CROSSTALK_TOOL_RESULT = "tool_result"
CROSSTALK_MODEL_INPUT = "model_input"
CROSSTALK_OUTPUT = "output"
#: The SQLite database (path) a tool call failed on with "database is locked".
DATABASE_LOCKED = "crew_otel.database.locked"
SYNC_IN_EVENT_LOOP = "crew_otel.sync_in_event_loop"
QUEUE_WAIT = "crew_otel.kickoff.queue_wait"
EXECUTOR_QUEUE_DEPTH = "crew_otel.executor.queue_depth"
CONTEXT_SUMMARIZED = "crew_otel.context.summarized"
CONTEXT_NO_FINAL_OUTPUT = "crew_otel.context.no_final_output"
CONTEXT_OVERFLOW = "crew_otel.context.overflow"
#: On the context-window events: the agent's ``respect_context_window``.
CONTEXT_RESPECT_WINDOW = "crew_otel.context.respect_context_window"

# Span event names.
EVENT_SHARED_INSTANCE = "crew_otel.shared_instance"
EVENT_CROSSTALK = "crew_otel.crosstalk"
EVENT_RETRY = "crew_otel.retry"
EVENT_CONTEXT_SUMMARIZED = "crew_otel.context.summarized"
EVENT_CONTEXT_OVERFLOW = "crew_otel.context.overflow"
#: The caller stopped waiting for a kickoff (cancelled, timed out) while its work went on.
EVENT_CALLER_CANCELLED = "crew_otel.kickoff.caller_cancelled"

# Values of crew_otel.retry.layer.
RETRY_LAYER_HTTP = "http"
RETRY_LAYER_RATE_LIMIT = "rate_limit"
RETRY_LAYER_AGENT = "agent"

# --- task guardrails (one span per evaluation; a rejection re-runs the agent) -----------------
RETRY_LAYER_GUARDRAIL = "guardrail"
SPAN_GUARDRAIL = "crewai.guardrail"
CREWAI_GUARDRAIL_PASSED = "crewai.guardrail.passed"
#: crew_otel.origin.operation of a guardrail span (a guardrail that raised, or ran out of retries).
ORIGIN_GUARDRAIL = Operation.GUARDRAIL.value
#: error.type of a guardrail retry in crew_otel.retries (a rejection is no exception).
ERROR_TYPE_GUARDRAIL_REJECTED = "guardrail_rejected"

# Values of crew_otel.origin.operation that are no gen_ai.operation.name (see Operation).
ORIGIN_HTTP = Operation.HTTP.value

MAX_NAME_LENGTH = 64

DEFAULT_WORKFLOW_NAME = "crew"
DEFAULT_TASK_NAME = "task"

# --- Flow steps (one span per executed method of a user Flow) ---------------------------------
SPAN_FLOW_STEP = "crewai.flow.step"
CREWAI_FLOW_METHOD_NAME = "crewai.flow.method.name"
#: ``start``, ``listen`` or ``router`` (a method that is both a start and a router: ``router``).
CREWAI_FLOW_METHOD_KIND = "crewai.flow.method.kind"
#: The label a router returned (the trigger of the listeners it chose).
CREWAI_FLOW_ROUTER_OUTCOME = "crewai.flow.router.outcome"
FLOW_KIND_START = "start"
FLOW_KIND_LISTEN = "listen"
FLOW_KIND_ROUTER = "router"
DEFAULT_FLOW_METHOD_NAME = "method"

DEFAULT_AGENT_NAME = "agent"
DEFAULT_TOOL_NAME = "tool"
DEFAULT_MODEL_NAME = "model"

# Span-name prefixes (the part before the code-defined name).
SPAN_WORKFLOW = OP_INVOKE_WORKFLOW
SPAN_TASK = "crewai.task"
SPAN_AGENT = OP_INVOKE_AGENT
SPAN_STEP = "crewai.agent.step"
SPAN_TOOL = OP_EXECUTE_TOOL
SPAN_CHAT = OP_CHAT
#: A model call whose inference span (``chat``) a provider SDK instrumentation makes.
SPAN_LLM_CALL = "crewai.llm.call"
#: An embeddings call whose ``embeddings`` span a provider SDK instrumentation makes.
SPAN_EMBEDDINGS_CALL = "crewai.embeddings"

# Provider class name -> gen_ai.provider.name (semantic-convention values where defined).
_PROVIDER_BY_CLASS = {
    "OpenAICompletion": "openai",
    "AnthropicCompletion": "anthropic",
    "AzureCompletion": "azure.ai.inference",
    "GeminiCompletion": "gcp.gemini",
    "BedrockCompletion": "aws.bedrock",
}
_PROVIDER_BY_PREFIX = {
    "openai": "openai",
    "anthropic": "anthropic",
    "claude": "anthropic",
    "azure": "azure.ai.inference",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "groq": "groq",
    "mistral": "mistral_ai",
    "deepseek": "deepseek",
    "cohere": "cohere",
    "ollama": "ollama",
    "openrouter": "openrouter",
    "xai": "x_ai",
}


def bounded_name(value: object, default: str) -> str:
    """A code-defined name for a span name or metric attribute: a short single-line string."""
    if not isinstance(value, str) or not value.strip():
        return default
    text = " ".join(value.split())
    return text[:MAX_NAME_LENGTH]


# A word of an MCP server name that can be shown: letters (a command, a host, a package name),
# no digits, no "=" and not a flag; tokens, keys and credentials fail it.
_SAFE_SERVER_WORD = re.compile(r"[A-Za-z][A-Za-z.\-/@]*")
_MAX_SERVER_WORDS = 3


def mcp_tool_identity(tool: object) -> tuple[str, str] | None:
    """``(tool name on its server, server label)`` of a CrewAI MCP tool, else ``None``.

    CrewAI names an MCP tool ``{server}_{tool}`` where the server part is built from the
    stdio command line (``command_arg1_arg2...``: tokens and keys included) or the URL. The
    span uses the tool's own name on its server; the server label keeps only the leading
    words that cannot be secrets (see ``_SAFE_SERVER_WORD``) and the command's base name.
    """
    if not isinstance(getattr(type(tool), "original_tool_name", None), property):
        return None
    name = bounded_name(getattr(tool, "original_tool_name", None), DEFAULT_TOOL_NAME)
    server = getattr(tool, "server_name", None)
    return name, mcp_server_label(server if isinstance(server, str) else "")


def mcp_server_label(server_name: str) -> str:
    """The safe leading words of CrewAI's MCP server name (``"mcp"`` when none is safe)."""
    words: list[str] = []
    command, *arguments = server_name.split("_")
    # the command's base name without a version: /usr/bin/python3 -> python
    for word in (command.rsplit("/", 1)[-1].rstrip("0123456789."), *arguments):
        if len(words) == _MAX_SERVER_WORDS or not _SAFE_SERVER_WORD.fullmatch(word):
            break
        words.append(word)
    return bounded_name("_".join(words), TOOL_SOURCE_MCP)


def span_name(prefix: str, name: str) -> str:
    """``"{operation} {name}"``, the shape of every crew_otel span name."""
    return f"{prefix} {name}"


# --- extractors (object -> attributes); each is called through safety.safe_call ---------------


def workflow_name(instance: Any) -> str:
    """Name of a Crew (its ``name``), a Flow (its ``name`` or class) or an Agent (its role)."""
    name = getattr(instance, "name", None)
    if isinstance(name, str) and name.strip():
        return bounded_name(name, DEFAULT_WORKFLOW_NAME)
    role = agent_role(instance)
    if role != DEFAULT_AGENT_NAME:
        return role
    return bounded_name(type(instance).__name__, DEFAULT_WORKFLOW_NAME)


def kickoff_attributes(instance: Any, entrypoint: str, name: str) -> dict[str, AttributeValue]:
    """Attributes of a kickoff span."""
    attrs = _operation_attributes(
        OP_INVOKE_WORKFLOW, GEN_AI_WORKFLOW_NAME, name, CREWAI_CREW_ID, instance
    )
    attrs[CREWAI_KICKOFF_ENTRYPOINT] = entrypoint
    return attrs


def _operation_attributes(
    operation: str, name_key: str, name: str, id_key: str, obj: Any
) -> dict[str, AttributeValue]:
    """The operation, its name under ``name_key`` and ``obj.id`` (as text, when it has one)
    under ``id_key``."""
    attrs: dict[str, AttributeValue] = {GEN_AI_OPERATION_NAME: operation, name_key: name}
    obj_id = getattr(obj, "id", None)
    if obj_id is not None:
        attrs[id_key] = str(obj_id)
    return attrs


def agent_role(agent: Any) -> str:
    """The agent's role as written in code (CrewAI interpolates inputs into ``role``)."""
    original = internals.AGENT_ORIGINAL_ROLE.read(agent)
    role = original if isinstance(original, str) and original else getattr(agent, "role", None)
    return bounded_name(role, DEFAULT_AGENT_NAME)


def agent_attributes(agent: Any, role: str) -> dict[str, AttributeValue]:
    """Attributes of an agent attempt span: with the provider and model of the agent's LLM (the
    conventions want them at the start of ``invoke_agent``)."""
    attrs = _operation_attributes(OP_INVOKE_AGENT, GEN_AI_AGENT_NAME, role, CREWAI_AGENT_ID, agent)
    llm = getattr(agent, "llm", None)
    if llm is not None and not isinstance(llm, str):
        attrs[GEN_AI_PROVIDER_NAME] = provider_name(llm)
        attrs[GEN_AI_REQUEST_MODEL] = model_name(llm)
    elif isinstance(llm, str) and llm:
        attrs[GEN_AI_REQUEST_MODEL] = bounded_name(llm, DEFAULT_MODEL_NAME)
    return attrs


def agent_request_attributes(agent: Any, task: Any) -> dict[str, AttributeValue]:
    """What an agent attempt asks of its model: its LLM's request parameters, and
    ``gen_ai.output.type`` when its task wants structured output (``output_pydantic`` /
    ``output_json``, the LLM's ``response_format``)."""
    llm = getattr(agent, "llm", None)
    attrs = request_parameters(llm) if llm is not None and not isinstance(llm, str) else {}
    if (
        getattr(task, "output_pydantic", None) is not None
        or getattr(task, "output_json", None) is not None
        or getattr(llm, "response_format", None)
    ):
        attrs[GEN_AI_OUTPUT_TYPE] = OUTPUT_TYPE_JSON
    return attrs


def task_name(task: Any) -> str:
    """The task's code-defined name, or ``"task"`` (never its description)."""
    return bounded_name(getattr(task, "name", None), DEFAULT_TASK_NAME)


def task_attributes(task: Any, name: str) -> dict[str, AttributeValue]:
    """Attributes of a task span."""
    attrs: dict[str, AttributeValue] = {
        CREWAI_TASK_NAME: name,
        CREWAI_TASK_ASYNC_EXECUTION: bool(getattr(task, "async_execution", False)),
    }
    task_id = getattr(task, "id", None)
    if task_id is not None:
        attrs[CREWAI_TASK_ID] = str(task_id)
    return attrs


def tool_attributes(name: str, call_id: object = None) -> dict[str, AttributeValue]:
    """Attributes of a tool span."""
    attrs: dict[str, AttributeValue] = {
        GEN_AI_OPERATION_NAME: OP_EXECUTE_TOOL,
        GEN_AI_TOOL_NAME: name,
    }
    if isinstance(call_id, str) and call_id:
        attrs[GEN_AI_TOOL_CALL_ID] = call_id[:MAX_NAME_LENGTH]
    return attrs


def provider_name(llm: Any) -> str:
    """``gen_ai.provider.name`` of an LLM object: its class decides for native providers, else
    its configuration (``provider``, or ``provider/model`` for litellm)."""
    return class_provider_name(type(llm)) or configured_provider_name(llm)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def class_provider_name(llm_class: type) -> str | None:
    """``gen_ai.provider.name`` implied by a native provider class (or one it derives from);
    looked up once per class."""
    for cls in llm_class.__mro__:
        known = _PROVIDER_BY_CLASS.get(cls.__name__)
        if known:
            return known
    return None


def configured_provider_name(llm: Any) -> str:
    """``gen_ai.provider.name`` from the object's ``provider`` or ``provider/model`` (litellm)."""
    provider = getattr(llm, "provider", None)
    if not isinstance(provider, str) or not provider:
        model = getattr(llm, "model", None)
        provider = model.split("/", 1)[0] if isinstance(model, str) and "/" in model else ""
    provider = provider.lower()
    return _PROVIDER_BY_PREFIX.get(provider, bounded_name(provider, "unknown"))


def model_name(llm: Any) -> str:
    """The requested model, as configured in code."""
    return bounded_name(getattr(llm, "model", None), DEFAULT_MODEL_NAME)


def llm_attributes(
    llm: Any, model: str, provider: str, messages: object
) -> dict[str, AttributeValue]:
    """Attributes of a model-call span at its start."""
    attrs: dict[str, AttributeValue] = {
        GEN_AI_OPERATION_NAME: OP_CHAT,
        GEN_AI_PROVIDER_NAME: provider,
        GEN_AI_REQUEST_MODEL: model,
    }
    if isinstance(messages, list):
        attrs[CREWAI_LLM_MESSAGES] = len(messages)
    elif isinstance(messages, str):
        attrs[CREWAI_LLM_MESSAGES] = 1
    return attrs


#: LLM field -> attribute, for the float request parameters.
_FLOAT_PARAMETERS = (
    ("temperature", GEN_AI_REQUEST_TEMPERATURE),
    ("top_p", GEN_AI_REQUEST_TOP_P),
    ("frequency_penalty", GEN_AI_REQUEST_FREQUENCY_PENALTY),
    ("presence_penalty", GEN_AI_REQUEST_PRESENCE_PENALTY),
)
_MAX_STOP_SEQUENCES = 8


def request_parameters(llm: Any) -> dict[str, AttributeValue]:
    """The request parameters an LLM object sets (CrewAI sends only those that are set):
    temperature, top_p, top_k, penalties, max tokens, seed, stop sequences, choice count."""
    attrs: dict[str, AttributeValue] = {}
    for field, key in _FLOAT_PARAMETERS:
        value = getattr(llm, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attrs[key] = float(value)
    # Integers, not booleans (a bool is an int), tested inline: this runs at every model call.
    max_tokens = getattr(llm, "max_tokens", None)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = getattr(llm, "max_completion_tokens", None)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        attrs[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    for field, key in (("seed", GEN_AI_REQUEST_SEED), ("top_k", GEN_AI_REQUEST_TOP_K)):
        value = getattr(llm, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[key] = value
    choices = getattr(llm, "n", None)
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        attrs[GEN_AI_REQUEST_CHOICE_COUNT] = choices
    stop = getattr(llm, "stop", None)
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        attrs[GEN_AI_REQUEST_STOP_SEQUENCES] = tuple(
            s[:MAX_NAME_LENGTH] for s in stop[:_MAX_STOP_SEQUENCES] if isinstance(s, str)
        )
    return attrs


def server_attributes(url: object) -> dict[str, AttributeValue]:
    """``server.address`` and ``server.port`` of a provider's base URL (none for no URL)."""
    text = str(url) if url is not None else ""
    return dict(_server_attributes(text)) if text else {}


@functools.lru_cache(maxsize=64)
def _server_attributes(url: str) -> tuple[tuple[str, AttributeValue], ...]:
    """Parsed once per base URL (a handful per process); no credentials, path or query."""
    try:
        parts = urlsplit(url if "//" in url else f"//{url}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a malformed port
        return ()
    if not host:
        return ()
    if port is None:
        port = 80 if parts.scheme == "http" else 443
    return ((SERVER_ADDRESS, host[:MAX_NAME_LENGTH]), (SERVER_PORT, port))


def llm_base_url(llm: Any) -> object:
    """The base URL an LLM object sends to (``base_url``, ``api_base``), else its SDK
    client's (which knows the provider's default)."""
    for field in ("base_url", "api_base"):
        value = getattr(llm, field, None)
        if isinstance(value, str) and value:
            return value
    client = getattr(llm, "_client", None)
    return getattr(client, "base_url", None) if client is not None else None


def openai_api_type(llm: Any) -> str:
    """``openai.api.type`` of an OpenAI model call: CrewAI's ``api`` (``responses``) or chat."""
    if getattr(llm, "api", None) == "responses":
        return OPENAI_API_RESPONSES
    return OPENAI_API_CHAT_COMPLETIONS


def tool_description_attributes(tool: object) -> dict[str, AttributeValue]:
    """``gen_ai.tool.type`` and ``gen_ai.tool.description`` (the developer's description, as
    CrewAI sends it to the model) of a CrewAI tool object."""
    attrs: dict[str, AttributeValue] = {GEN_AI_TOOL_TYPE: TOOL_TYPE_FUNCTION}
    description = getattr(tool, "description", None)
    if isinstance(description, str) and description.strip():
        attrs[GEN_AI_TOOL_DESCRIPTION] = description.strip()[:MAX_DESCRIPTION_LENGTH]
    return attrs


def usage_attributes(
    usage: object, finish_reason: object, response_id: object
) -> dict[str, AttributeValue]:
    """Attributes from one model response (CrewAI's completed-call hook)."""
    attrs: dict[str, AttributeValue] = {}
    if isinstance(usage, dict):
        prompt = _first_int(usage, ("prompt_tokens", "input_tokens", "prompt_token_count"))
        completion = _first_int(
            usage, ("completion_tokens", "output_tokens", "candidates_token_count")
        )
        if prompt is not None:
            attrs[GEN_AI_USAGE_INPUT_TOKENS] = prompt
        if completion is not None:
            attrs[GEN_AI_USAGE_OUTPUT_TOKENS] = completion
    if isinstance(finish_reason, str) and finish_reason:
        attrs[GEN_AI_RESPONSE_FINISH_REASONS] = (finish_reason[:MAX_NAME_LENGTH],)
    if isinstance(response_id, str) and response_id:
        attrs[GEN_AI_RESPONSE_ID] = response_id[:MAX_NAME_LENGTH]
    return attrs


def _first_int(mapping: dict[Any, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: the HTTP status code where one is known, else the class.

    Follows explicit causes (``raise ... from``), because CrewAI re-raises SDK errors as
    builtins; implicit ``__context__`` is not followed (an unrelated earlier error would
    otherwise lend its status code to a new one).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = _http_status(current)
        if status is not None:
            return status
        current = current.__cause__
    return type(exc).__qualname__


def _http_status(exc: BaseException) -> str | None:
    """The HTTP status an SDK error carries (``status_code`` or ``response.status_code``)."""
    try:
        for holder in (exc, getattr(exc, "response", None)):
            status = getattr(holder, "status_code", None)
            if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
                return str(status)
    except Exception:  # a hostile property on the exception
        return None
    return None


# --- Memory, knowledge and embeddings -------------------------------------------------------
#: ``embeddings {model}`` (CLIENT): one embeddings call to the provider.
SPAN_EMBEDDINGS = Operation.EMBEDDINGS.value
OP_EMBEDDINGS = Operation.EMBEDDINGS.value
#: Unified memory: a save (the encoding of one batch of items) and a search (``recall``) are the
#: conventions' memory operations (span name = the operation); the extraction of memories from
#: a task's result (a model call of the memory's own) is CrewAI's.
SPAN_MEMORY_SAVE = Operation.UPSERT_MEMORY.value
SPAN_MEMORY_SEARCH = Operation.SEARCH_MEMORY.value
SPAN_MEMORY_EXTRACT = "crewai.memory.extract"
#: ``retrieval {gen_ai.data_source.id}``: a knowledge query.
SPAN_KNOWLEDGE_QUERY = Operation.RETRIEVAL.value
#: CrewAI's knowledge collection when a Knowledge has no name of its own.
DEFAULT_KNOWLEDGE_COLLECTION = "knowledge"
#: The knowledge sources embedded and stored (at crew construction and, in CrewAI 1.15, again
#: when an agent's executor is built during a kickoff).
SPAN_KNOWLEDGE_ADD = "crewai.knowledge.add"
CREWAI_MEMORY_TYPE = "crewai.memory.type"
#: The storage class behind a memory (``LanceDBStorage``, ``QdrantEdgeStorage``, a custom one).
CREWAI_MEMORY_STORAGE = "crewai.memory.storage"
#: Records saved, matches found, memories extracted (on memory operations also as
#: ``gen_ai.memory.record.count``).
CREWAI_MEMORY_RESULT_COUNT = "crewai.memory.result_count"
#: A memory recall's ``limit``.
CREWAI_MEMORY_LIMIT = "crewai.memory.limit"
CREWAI_KNOWLEDGE_STORAGE = "crewai.knowledge.storage"
CREWAI_KNOWLEDGE_COLLECTION = "crewai.knowledge.collection"
CREWAI_KNOWLEDGE_RESULT_COUNT = "crewai.knowledge.result_count"
MEMORY_TYPE_UNIFIED = "unified"
DEFAULT_EMBEDDINGS_PROVIDER = "openai"
#: Where the memory's storage lives (LanceDB's directory): two memories on one path share it.
CREWAI_MEMORY_STORAGE_PATH = "crewai.memory.storage.path"
#: Seconds the memory operation waited for CrewAI's storage lock (summed over its writes).
CREWAI_MEMORY_LOCK_WAIT = "crewai.memory.lock_wait"
#: Seconds a save waited in the memory's save queue (one writer thread per Memory) to start.
CREWAI_MEMORY_QUEUE_WAIT = "crewai.memory.queue_wait"


# --- Planning (a crew's planning, an agent's reasoning step) ---------------------------------
#: ``plan {gen_ai.agent.name}``: the GenAI conventions' plan span (``gen_ai.operation.name``
#: ``plan``, INTERNAL); its model calls nest under it.
SPAN_PLAN = Operation.PLAN.value
OP_PLAN = Operation.PLAN.value
#: The role of the agent CrewAI's ``CrewPlanner`` builds for ``Crew(planning=True)`` (the same
#: in crewai 1.12 and 1.15; built inside the planning hook, so named here).
CREW_PLANNER_ROLE = "Task Execution Planner"
#: The crew whose planning a ``plan`` span is (its ``gen_ai.agent.name`` is the planner's).
CREWAI_CREW_NAME = "crewai.crew.name"
#: Whose plan it is: ``crew`` (``Crew(planning=True)``) or ``agent`` (an agent's reasoning).
CREWAI_PLAN_SCOPE = "crewai.plan.scope"
PLAN_SCOPE_CREW = "crew"
PLAN_SCOPE_AGENT = "agent"
#: Whether the agent declared itself ready to execute after its reasoning.
CREWAI_PLAN_READY = "crewai.plan.ready"


def crew_plan_attributes(crew: Any, name: str) -> dict[str, AttributeValue]:
    """Attributes of a crew's ``plan`` span: the planner agent's, with the crew's name."""
    attrs = _operation_attributes(
        OP_PLAN, GEN_AI_AGENT_NAME, CREW_PLANNER_ROLE, CREWAI_CREW_ID, crew
    )
    attrs[CREWAI_CREW_NAME] = name
    attrs[CREWAI_PLAN_SCOPE] = PLAN_SCOPE_CREW
    return attrs


def agent_plan_attributes(agent: Any, role: str) -> dict[str, AttributeValue]:
    """Attributes of an agent's reasoning (``plan``) span."""
    attrs = _operation_attributes(OP_PLAN, GEN_AI_AGENT_NAME, role, CREWAI_AGENT_ID, agent)
    attrs[CREWAI_PLAN_SCOPE] = PLAN_SCOPE_AGENT
    return attrs


# --- Waits (CrewAI's max_rpm limiter, human_input) --------------------------------------------
#: A call of the ``max_rpm`` limiter that waited (calls that did not wait leave no span).
SPAN_RPM_WAIT = "crewai.rpm.wait"
#: One prompt of ``human_input``: from the question to the human's answer.
SPAN_HUMAN_INPUT = "crewai.human_input"
ORIGIN_WAIT = Operation.WAIT.value
#: The limiter's requests per minute (``max_rpm`` of the agent or its crew).
CREWAI_RPM_LIMIT = "crewai.rpm.limit"
#: Why the call waited: ``limit`` (the minute's budget was spent: it slept until the next
#: minute, holding the limiter's lock) or ``lock`` (it waited for that lock while another
#: caller of the same limiter slept).
CREWAI_RPM_WAIT_REASON = "crewai.rpm.wait.reason"
RPM_WAIT_REASON_LIMIT = "limit"
RPM_WAIT_REASON_LOCK = "lock"
#: Seconds the call waited for the limiter's lock held by another caller's sleep.
CREWAI_RPM_LOCK_WAIT = "crewai.rpm.lock_wait"
#: The request whose call held the limiter's lock (sleeping) while this call waited for it.
RPM_LOCK_HOLDER_REQUEST_ID = "crew_otel.rpm.lock_holder.request_id"
#: On the agent's span: seconds its model calls waited for the limiter (summed).
CREWAI_RPM_WAITED = "crewai.rpm.waited"
#: The prompt's number in the agent execution (1-based; each feedback round asks again).
CREWAI_HUMAN_INPUT_ROUND = "crewai.human_input.round"
#: The human gave feedback (the agent runs again) rather than accepting the answer.
CREWAI_HUMAN_INPUT_FEEDBACK = "crewai.human_input.feedback"
#: On the agent's span: seconds it waited for the human (summed over the prompts).
CREWAI_HUMAN_INPUT_WAITED = "crewai.human_input.waited"
