"""The table of the CrewAI functions crew_otel hooks (the static rows of the plan).

Each row names a module (looked up in ``sys.modules`` first: ``crewai/__init__.py`` rewrites some
modules' ``__name__``), a ``Class.method`` or module-level function, and the wrapper that hooks
it. :func:`crew_otel.plan.build_plan` adds the hooks found at run time (provider LLM classes,
HTTP pools, threads, baggage) and decides for each row: installed, pending until its module is
imported, or skipped with the reason; the instrumentor applies that plan and ``crew-otel doctor``
prints it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from crew_otel import internals
from crew_otel.diagnosis.sharing import Kind
from crew_otel.hook_kinds import Layer
from crew_otel.runtime import Runtime
from crew_otel.wrappers.agent import AgentAttemptWrapper, AgentStepWrapper
from crew_otel.wrappers.context_window import ContextLengthObserver
from crew_otel.wrappers.flow import FlowStepWrapper
from crew_otel.wrappers.guardrail import GuardrailRunWrapper, GuardrailWrapper
from crew_otel.wrappers.kickoff import KickoffWrapper
from crew_otel.wrappers.llm import (
    ChatWrapper,
    LlmResponseObjectObserver,
    LlmResponseObserver,
    RateLimitRetryObserver,
    StreamChunkObserver,
)
from crew_otel.wrappers.memory import (
    EmbeddingsUsageObserver,
    EmbeddingsWrapper,
    KnowledgeAddWrapper,
    KnowledgeQueryWrapper,
    KnowledgeSearchErrorObserver,
    MemoryExtractWrapper,
    MemorySaveWrapper,
    MemorySearchWrapper,
    SaveQueueObserver,
    StorageLockObserver,
)
from crew_otel.wrappers.planning import AgentReasoningWrapper, CrewPlanningWrapper
from crew_otel.wrappers.task import InterpolationObserver, TaskWrapper
from crew_otel.wrappers.tool import (
    McpToolErrorObserver,
    McpToolResultObserver,
    NativeToolCallWrapper,
    ToolRunWrapper,
    ToolUsageWrapper,
)
from crew_otel.wrappers.waits import HumanInputWrapper, RpmLimiterObserver, RpmSleepObserver


class WrapperFactory(Protocol):
    """What builds a row's wrapper: a :class:`SpanWrapper` or :class:`Observer` class, or a
    partial of one, called with the runtime and whether the target is a coroutine function."""

    def __call__(self, runtime: Runtime, *, is_async: bool) -> Callable[..., Any]: ...


@dataclasses.dataclass(frozen=True)
class Target:
    """One hook: where it is and what wraps it."""

    module: str
    path: str
    factory: WrapperFactory
    layer: Layer
    #: Wrap on the class of the MRO that defines the method (e.g. ``Flow.kickoff``, defined
    #: on a base class in some versions) instead of requiring it in the class's own dict.
    inherited: bool = False
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.module}:{self.path}"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a target lives in the installed CrewAI: ``owner.__dict__[name]`` is ``original``."""

    owner: Any
    name: str
    original: Any
    function: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)


class Unresolved(Exception):
    """A target that does not exist in the installed CrewAI version (the reason is the text)."""


def build_wrapper(
    factory: WrapperFactory, runtime: Runtime, resolved: Resolved
) -> Callable[..., Any]:
    """The wrapper ``factory`` builds for the ``resolved`` target."""
    return factory(runtime, is_async=resolved.is_async)


def _kickoff(entrypoint: str, kind: Kind) -> WrapperFactory:
    return functools.partial(KickoffWrapper, entrypoint=entrypoint, kind=kind)


def _kickoffs(
    module: str, cls: str, entrypoint: str, kind: Kind, note: str, inherited: bool = False
) -> tuple[Target, ...]:
    """The rows of ``cls.kickoff``, ``cls.kickoff_async`` and ``cls.akickoff``."""
    return tuple(
        Target(
            module,
            f"{cls}.{method}",
            _kickoff(f"{entrypoint}.{method}", kind),
            Layer.KICKOFF,
            inherited=inherited,
            note=note,
        )
        for method in ("kickoff", "kickoff_async", "akickoff")
    )


RATE_LIMIT_MODULE = "crewai.llms.retry"


def rate_limit_layer_present() -> bool:
    """Whether this CrewAI retries rate-limited model calls itself (crewai >= 1.15.25).

    ``crewai.llms.base_llm`` imports the module, so it is in ``sys.modules`` whenever there is an
    LLM to wrap. Never imported here: this runs under the instrumentor's lock from post-import
    hooks, where an import could deadlock with another thread's import.
    """
    return RATE_LIMIT_MODULE in sys.modules


def _chat(runtime: Runtime, *, is_async: bool) -> ChatWrapper:
    return ChatWrapper(runtime, rate_limit_layer_present(), is_async=is_async)


#: The per-response hooks' parameters (positions bound from the installed signatures).
_USAGE_FIELDS = internals.LLM_USAGE_ARGS
_COMPLETED_FIELDS = internals.LLM_COMPLETED_ARGS

_EXECUTOR_MODULES = (
    ("crewai.agents.agent_executor", "AgentExecutor"),
    ("crewai.experimental.agent_executor", "AgentExecutor"),
    ("crewai.agents.crew_agent_executor", "CrewAgentExecutor"),
)
_STEP_MODULES = (
    "crewai.agents.agent_executor",
    "crewai.experimental.agent_executor",
    "crewai.agents.crew_agent_executor",
    "crewai.lite_agent",
)

TARGETS: tuple[Target, ...] = (
    # --- kickoffs -------------------------------------------------------------------------
    *(
        Target("crewai.crew", f"Crew.{method}", _kickoff(method, Kind.CREW), Layer.KICKOFF)
        for method in (
            "kickoff",
            "kickoff_async",
            "akickoff",
            "kickoff_for_each",
            "kickoff_for_each_async",
            "akickoff_for_each",
        )
    ),
    *_kickoffs(
        "crewai.flow.flow",
        "Flow",
        "flow",
        Kind.FLOW,
        "user flows only: CrewAI's internal flows (the agent executor) are skipped",
        inherited=True,
    ),
    *_kickoffs("crewai.agent.core", "Agent", "agent", Kind.AGENT, "standalone Agent.kickoff"),
    *_kickoffs("crewai.lite_agent", "LiteAgent", "lite_agent", Kind.AGENT, "deprecated LiteAgent"),
    # --- flow steps -----------------------------------------------------------------------
    Target(
        "crewai.flow.flow",
        "Flow._execute_method",
        FlowStepWrapper,
        Layer.FLOW,
        inherited=True,
        note="@start/@listen/@router methods of user flows (internal flows are skipped)",
    ),
    # --- tasks ----------------------------------------------------------------------------
    Target(
        "crewai.task",
        "Task._execute_core",
        TaskWrapper,
        Layer.TASK,
        note="sync tasks and async_execution tasks (their thread)",
    ),
    Target(
        "crewai.task", "Task._aexecute_core", TaskWrapper, Layer.TASK, note="native async tasks"
    ),
    *(
        Target(
            "crewai.task",
            f"Task.{method}",
            GuardrailRunWrapper,
            Layer.TASK,
            note="one guardrail checked; the agent re-run after a rejection",
        )
        for method in ("_invoke_guardrail_function", "_ainvoke_guardrail_function")
    ),
    Target(
        "crewai.task",
        "process_guardrail",
        GuardrailWrapper,
        Layer.TASK,
        note="module binding of crewai.utilities.guardrail.process_guardrail: one evaluation",
    ),
    *(
        Target(
            module,
            "process_guardrail",
            GuardrailWrapper,
            Layer.AGENT,
            note="module binding: one evaluation of a standalone agent's guardrail",
        )
        for module in ("crewai.agent.core", "crewai.lite_agent")
    ),
    Target(
        "crewai.crew",
        "Crew._interpolate_inputs",
        InterpolationObserver,
        Layer.TASK,
        note="which request interpolated inputs into which Task",
    ),
    # --- planning -------------------------------------------------------------------------
    Target(
        "crewai.crew",
        "Crew._handle_crew_planning",
        CrewPlanningWrapper,
        Layer.PLAN,
        note="Crew(planning=True): the planner's task and model calls",
    ),
    Target(
        "crewai.utilities.reasoning_handler",
        "AgentReasoning.handle_agent_reasoning",
        AgentReasoningWrapper,
        Layer.PLAN,
        note="an agent's reasoning (planning) step before its task",
    ),
    # --- agent attempts and steps ---------------------------------------------------------
    Target("crewai.agent.core", "Agent.execute_task", AgentAttemptWrapper, Layer.AGENT),
    Target("crewai.agent.core", "Agent.aexecute_task", AgentAttemptWrapper, Layer.AGENT),
    *(
        Target(
            module,
            function,
            AgentStepWrapper,
            Layer.STEP,
            note="module binding of crewai.utilities.agent_utils." + function,
        )
        for module in _STEP_MODULES
        for function in ("get_llm_response", "aget_llm_response")
    ),
    *(
        Target(
            module,
            "handle_context_length",
            ContextLengthObserver,
            Layer.AGENT,
            note="context window exceeded: summarise or SystemExit",
        )
        for module in _STEP_MODULES
    ),
    # --- tools ----------------------------------------------------------------------------
    *(
        Target(
            module,
            f"{cls}._execute_single_native_tool_call",
            NativeToolCallWrapper,
            Layer.TOOL,
            note="native function-calling dispatcher",
        )
        for module, cls in _EXECUTOR_MODULES
    ),
    Target(
        "crewai.tools.tool_usage",
        "ToolUsage.use",
        ToolUsageWrapper,
        Layer.TOOL,
        note="text/ReAct dispatcher",
    ),
    Target(
        "crewai.tools.tool_usage",
        "ToolUsage.ause",
        ToolUsageWrapper,
        Layer.TOOL,
        note="text/ReAct dispatcher",
    ),
    *(
        Target("crewai.tools.base_tool", f"{cls}.{method}", ToolRunWrapper, Layer.TOOL)
        for cls in ("BaseTool", "Tool")
        for method in ("run", "arun")
    ),
    Target("crewai.tools.structured_tool", "CrewStructuredTool.invoke", ToolRunWrapper, Layer.TOOL),
    Target(
        "crewai.tools.structured_tool", "CrewStructuredTool.ainvoke", ToolRunWrapper, Layer.TOOL
    ),
    Target(
        "mcp.client.session",
        "ClientSession.call_tool",
        McpToolResultObserver,
        Layer.TOOL,
        note="an MCP tool result with isError: the origin on the tool span (error.type tool_error)",
    ),
    Target(
        "crewai.tools.mcp_native_tool",
        "MCPNativeTool._run_async",
        McpToolErrorObserver,
        Layer.TOOL,
        note="an MCP tool's client error, before CrewAI wraps it in a RuntimeError",
    ),
    # --- model calls ----------------------------------------------------------------------
    Target("crewai.llm", "LLM.call", _chat, Layer.LLM, note="litellm fallback"),
    Target("crewai.llm", "LLM.acall", _chat, Layer.LLM, note="litellm fallback"),
    Target("crewai.llms.providers.openai.completion", "OpenAICompletion.call", _chat, Layer.LLM),
    Target("crewai.llms.providers.openai.completion", "OpenAICompletion.acall", _chat, Layer.LLM),
    Target(
        "crewai.llms.base_llm",
        "BaseLLM._track_token_usage_internal",
        functools.partial(LlmResponseObserver, parameters=_USAGE_FIELDS, take_usage=True),
        Layer.LLM,
        note="token usage per response",
    ),
    Target(
        "crewai.llms.base_llm",
        "BaseLLM._emit_call_completed_event",
        functools.partial(LlmResponseObserver, parameters=_COMPLETED_FIELDS, take_usage=False),
        Layer.LLM,
        note="finish reason and response ID",
    ),
    Target(
        "crewai.llms.providers.openai.completion",
        "OpenAICompletion._extract_openai_token_usage",
        LlmResponseObjectObserver,
        Layer.LLM,
        note="the SDK's response object: response model, finish reasons, response ID",
    ),
    Target(
        "openai._streaming",
        "Stream.__iter__",
        StreamChunkObserver,
        Layer.LLM,
        note="a streamed answer's chunks inside a model call: model and finish reasons",
    ),
    Target(
        "openai._streaming",
        "AsyncStream.__aiter__",
        StreamChunkObserver,
        Layer.LLM,
        note="a streamed answer's chunks inside a model call: model and finish reasons",
    ),
    Target(
        RATE_LIMIT_MODULE,
        "get_retry_delay_seconds",
        RateLimitRetryObserver,
        Layer.LLM,
        note="CrewAI's rate-limit retry layer (crewai >= 1.15.25)",
    ),
    # --- waits ----------------------------------------------------------------------------
    Target(
        "crewai.utilities.rpm_controller",
        "RPMController.check_or_wait",
        RpmLimiterObserver,
        Layer.WAIT,
        note="max_rpm: a call that waited for the limiter (slept, or waited for its lock)",
    ),
    Target(
        "crewai.utilities.rpm_controller",
        "RPMController._wait_for_next_minute",
        RpmSleepObserver,
        Layer.WAIT,
        note="max_rpm: the limiter's 60 s sleep (holding the lock every caller needs)",
    ),
    *(
        Target(
            "crewai.core.providers.human_input",
            f"SyncHumanInputProvider.{method}",
            HumanInputWrapper,
            Layer.WAIT,
            note="human_input: one prompt of the default provider, until the human answers",
        )
        for method in ("_prompt_input", "_prompt_input_async")
    ),
    # --- memory, knowledge and embeddings -------------------------------------------------
    Target(
        "chromadb.utils.embedding_functions.openai_embedding_function",
        "OpenAIEmbeddingFunction.__call__",
        EmbeddingsWrapper,
        Layer.MEMORY,
        note="the OpenAI embedder CrewAI builds for memory and knowledge",
    ),
    Target(
        "openai.resources.embeddings",
        "Embeddings.create",
        EmbeddingsUsageObserver,
        Layer.MEMORY,
        note="input tokens of an embeddings call",
    ),
    Target(
        "crewai.memory.unified_memory",
        "Memory.recall",
        MemorySearchWrapper,
        Layer.MEMORY,
        note="unified memory search (arecall delegates to it)",
    ),
    Target(
        "crewai.memory.unified_memory",
        "Memory._encode_batch",
        MemorySaveWrapper,
        Layer.MEMORY,
        note="unified memory save (remember and remember_many's background saves)",
    ),
    Target(
        "crewai.memory.unified_memory",
        "Memory.extract_memories",
        MemoryExtractWrapper,
        Layer.MEMORY,
        note="the memory's model call on a task's result",
    ),
    Target(
        "crewai.memory.unified_memory",
        "Memory._submit_save",
        SaveQueueObserver,
        Layer.MEMORY,
        note="when a save was queued (one save thread per Memory)",
    ),
    Target(
        "crewai.memory.storage.lancedb_storage",
        "store_lock",
        StorageLockObserver,
        Layer.MEMORY,
        note="module binding of CrewAI's storage lock: the memory's wait for it",
    ),
    *(
        Target(
            "crewai.rag.chromadb.client",
            f"ChromaDBClient.{method}",
            KnowledgeSearchErrorObserver,
            Layer.MEMORY,
            note="knowledge search errors (KnowledgeStorage returns [] for them)",
        )
        for method in ("search", "asearch")
    ),
    *(
        Target(
            "crewai.knowledge.knowledge", f"Knowledge.{method}", KnowledgeQueryWrapper, Layer.MEMORY
        )
        for method in ("query", "aquery")
    ),
    *(
        Target(
            "crewai.knowledge.knowledge", f"Knowledge.{method}", KnowledgeAddWrapper, Layer.MEMORY
        )
        for method in ("add_sources", "aadd_sources")
    ),
)


def module_of(name: str) -> ModuleType:
    """The module object for ``name`` (``sys.modules`` first, then an import)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a provider module missing its SDK
        raise Unresolved(f"module {name} not importable ({type(exc).__name__})") from None


def resolve(target: Target) -> Resolved:
    """Find the target in the installed CrewAI, or raise :class:`Unresolved` with the reason."""
    module = module_of(target.module)
    if "." not in target.path:
        return resolve_attribute(module, target.path)
    class_name, method = target.path.split(".", 1)
    cls = module.__dict__.get(class_name)
    if not isinstance(cls, type):
        raise Unresolved(f"{class_name} not in {target.module}")
    owner: type | None = cls
    if target.inherited:
        owner = next((klass for klass in cls.__mro__ if method in klass.__dict__), None)
    elif method not in cls.__dict__:
        owner = None
    if owner is None:
        raise Unresolved(f"{target.path} not defined in this CrewAI version")
    return resolve_attribute(owner, method)


def resolve_attribute(owner: Any, name: str) -> Resolved:
    """``owner.__dict__[name]`` as a :class:`Resolved` (functions, static/class methods)."""
    original = owner.__dict__.get(name) if hasattr(owner, "__dict__") else None
    if original is None:
        raise Unresolved(f"{name} not found")
    function = getattr(original, "__func__", original)
    if not callable(function):
        raise Unresolved(f"{name} is not callable")
    return Resolved(owner, name, original, function)
