"""The private parts of CrewAI, the OpenTelemetry SDK, wrapt and the standard library that
crew_otel reads.

Some diagnoses need what no public API says: how many retries an Agent has used
(``Agent._times_executed``), the tool behind a structured tool (``_original_tool``), the chunk
iterator inside a streaming output, an error's message text, the depth of the event loop's
executor queue. Each of those reads goes through one accessor here instead of a ``getattr`` at
the call site, so that

* a read never raises and returns ``None`` when the internal is missing (the diagnosis is then
  skipped, as before);
* :func:`crew_otel.internals_check.check` says whether the internal still resolves on the
  installed versions (the attribute is declared on the class, the parameter is in the
  signature, the message text is still in CrewAI's source), ``crew-otel doctor`` lists every
  accessor with its status and a test on the lowest and latest CrewAI fails when one stops
  resolving;
* positional arguments are read by parameter name, bound with :func:`inspect.signature` once
  when the hook is installed (:meth:`Parameters.bind`), not by a hand-copied order.

A *part* is one place an internal lives (a class, a module, a parameter). A part that exists
only in some versions declares the versions it was checked absent in (``missing_in``); the
test checks that declaration too.

Checking lives in :mod:`crew_otel.internals_check`: it imports the modules it inspects (CrewAI,
the SDK) and reads their source, for ``doctor`` and tests, never for the instrumentation's hot
path, which only calls the readers here.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from types import CodeType
from typing import Any

_logger = logging.getLogger(__name__)

CREWAI = "crewai"
OTEL_SDK = "opentelemetry-sdk"
HTTPX_INSTRUMENTATION = "opentelemetry-instrumentation-httpx"
WRAPT = "wrapt"
PYTHON = "python"

#: The versions every accessor below was checked on (lowest supported and latest).
CHECKED_ON: dict[str, tuple[str, ...]] = {
    CREWAI: ("1.12.2", "1.15.30"),
    OTEL_SDK: ("1.34.1", "1.45.1"),
    HTTPX_INSTRUMENTATION: ("0.55b1", "0.66b1"),
    WRAPT: ("1.17.3", "2.5.2"),
    PYTHON: ("3.11",),
}

_LOWEST_CREWAI = ("1.12.2",)
_LOWEST_OTEL_SDK = ("1.34.1",)


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (``python``: the interpreter's)."""
    if distribution == PYTHON:
        return ".".join(str(n) for n in sys.version_info[:3])
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


class Part:
    """One place an internal lives: ``module:Class``, a module, a parameter or a class name."""

    __slots__ = ("missing_in", "where")

    def __init__(self, where: str, missing_in: tuple[str, ...] = ()) -> None:
        self.where = where
        #: Versions (of the accessor's distribution) this part was checked to be absent in.
        self.missing_in = missing_in

    def __repr__(self) -> str:
        return f"Part({self.where!r}, missing_in={self.missing_in!r})"


class Internal:
    """One private thing crew_otel reads; subclasses say how to read it and where it lives."""

    def __init__(
        self, name: str, what: str, parts: tuple[Part, ...], distribution: str = CREWAI
    ) -> None:
        #: Short identifier (shown by ``crew-otel doctor``).
        self.name = name
        #: What the diagnosis uses it for.
        self.what = what
        self.parts = parts
        #: The distribution whose versions ``missing_in`` and ``checked_on`` refer to.
        self.distribution = distribution
        #: The versions this accessor was checked on.
        self.checked_on = CHECKED_ON[distribution]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def load(where: str) -> Any:
    """The object named by ``module:qualname``."""
    module, _, qualname = where.partition(":")
    obj: Any = importlib.import_module(module)
    for piece in qualname.split("."):
        obj = getattr(obj, piece)
    return obj


# --- attributes ---------------------------------------------------------------------------------
class PrivateAttribute(Internal):
    """A private attribute of CrewAI objects, declared on each of ``parts`` (``module:Class``)."""

    def __init__(
        self,
        name: str,
        what: str,
        attribute: str,
        parts: tuple[Part, ...],
        distribution: str = CREWAI,
    ) -> None:
        super().__init__(name, what, parts, distribution)
        self.attribute = attribute

    def read(self, obj: object) -> Any:
        """``obj.<attribute>``, or None when it is missing (never raises)."""
        try:
            return getattr(obj, self.attribute, None)
        except Exception:
            return None

    def write(self, obj: object, value: object) -> bool:
        """Set ``obj.<attribute>``; False when that fails (never raises)."""
        try:
            setattr(obj, self.attribute, value)
        except Exception:
            _logger.debug("internal %s: cannot set it", self.name, exc_info=True)
            return False
        return True


class AttributePath(Internal):
    """A chain of private attributes (``a._b._c``) of a stdlib or SDK object.

    ``check()`` builds a real sample object (``sample``: the name of a sample builder in
    :mod:`crew_otel.internals_check`) and reads the chain from it.
    """

    def __init__(
        self,
        name: str,
        what: str,
        path: tuple[str, ...],
        owner: str,
        sample: str,
        distribution: str,
    ) -> None:
        super().__init__(name, what, (Part(f"{owner}.{'.'.join(path)}"),), distribution)
        self.path = path
        #: The sample ``check()`` reads the chain from (:data:`crew_otel.internals_check.SAMPLES`).
        self.sample = sample

    def read(self, obj: object) -> Any:
        """The end of the chain from ``obj``, or None when a link is missing (never raises)."""
        try:
            for attribute in self.path:
                if obj is None:
                    return None
                obj = getattr(obj, attribute, None)
        except Exception:
            return None
        return obj


class MessageText(Internal):
    """A message text CrewAI produces, found in the source of each of ``parts`` (modules)."""

    def __init__(
        self, name: str, what: str, text: str, parts: tuple[Part, ...], whole: bool
    ) -> None:
        super().__init__(name, what, parts)
        self.text = text
        #: The text is the whole message (stripped), not a part of it.
        self.whole = whole

    def matches(self, message: object) -> bool:
        """Whether ``message`` (a string) is, or contains, the text."""
        if not isinstance(message, str):
            return False
        return message.strip() == self.text if self.whole else self.text in message

    def read(self, obj: object) -> str | None:
        """``str(obj)`` when it matches the text, else None (never raises)."""
        try:
            message = obj if isinstance(obj, str) else str(obj)
        except Exception:
            return None
        return message if self.matches(message) else None


class ClassNames(Internal):
    """CrewAI classes recognised by name (``parts``: ``module:Class``)."""

    def __init__(self, name: str, what: str, parts: tuple[Part, ...]) -> None:
        super().__init__(name, what, parts)
        self.names = frozenset(part.where.rpartition(":")[2] for part in parts)

    def matches(self, obj: object) -> bool:
        """Whether ``obj`` is an instance of one of the classes (by class name)."""
        return type(obj).__name__ in self.names

    def read(self, obj: object) -> str | None:
        """The class name of ``obj`` when it is one of the classes, else None."""
        return type(obj).__name__ if self.matches(obj) else None


class TracerScope(Internal):
    """Spans made by an instrumentation, recognised by its tracer (instrumentation scope) name.

    ``check()`` finds ``get_tracer(__name__`` in the instrumentation module's source: its tracer
    is named after the module.
    """

    def __init__(self, name: str, what: str, module: str, distribution: str) -> None:
        super().__init__(name, what, (Part(module),), distribution)
        self.prefix = module

    def read(self, span: object) -> str | None:
        """The span's instrumentation scope name when it is this instrumentation's, else None."""
        try:
            scope = getattr(span, "instrumentation_scope", None)
            name = getattr(scope, "name", None)
        except Exception:
            return None
        return name if isinstance(name, str) and name.startswith(self.prefix) else None

    def matches(self, span: object) -> bool:
        """Whether ``span`` was made by this instrumentation."""
        return self.read(span) is not None


# --- functions --------------------------------------------------------------------------------
class PrivateFunction(Internal):
    """A private module-level function (``module:name``), with a public ``fallback`` that does
    the same (more slowly) when the installed version lacks it.

    :attr:`function` is looked up once, when the accessor is made (the module must be one that
    is imported anyway: the standard library's).
    """

    def __init__(
        self,
        name: str,
        what: str,
        where: str,
        fallback: Callable[[], Any],
        distribution: str,
    ) -> None:
        super().__init__(name, what, (Part(where),), distribution)
        try:
            found = load(where)
        except Exception:
            found = None
        #: The private function, or ``fallback`` when it is missing.
        self.function: Callable[[], Any] = found if callable(found) else fallback

    def read(self) -> Any:
        """``function()``, or None when it raises (never raises)."""
        try:
            return self.function()
        except Exception:
            return None


class ReplacedFunction(Internal):
    """A private module-level function (``module:name``) that crew_otel replaces by one of its
    own (:mod:`crew_otel.hookset`) on the versions its use was checked on.

    ``check()`` verifies on the installed version what makes the replacement safe: with
    ``consumer``, every call of the function hands its result straight to ``consumer`` (in the
    module's source); with ``same_result``, the function returns on a sample input what the
    replacement returns (the checker of that name in
    :data:`crew_otel.internals_check.SAME_RESULT`).
    """

    def __init__(
        self,
        name: str,
        what: str,
        where: str,
        distribution: str,
        *,
        consumer: str | None = None,
        same_result: str | None = None,
        missing_in: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, what, (Part(where, missing_in),), distribution)
        self.module, _, self.function = where.partition(":")
        #: The function every result of :attr:`function` is passed to.
        self.consumer = consumer
        #: The checker that compares the function's result with the replacement's.
        self.same_result = same_result

    def installed_version_checked(self) -> bool:
        """Whether the installed version is not newer than the latest it was checked on (a
        newer one may use the function otherwise: it is then left alone)."""
        from packaging.version import InvalidVersion, Version

        installed = installed_version(self.distribution)
        try:
            return installed is not None and Version(installed) <= Version(self.checked_on[-1])
        except InvalidVersion:
            return False

    def replaceable_in(self, module: object) -> bool:
        """Whether ``module`` (the installed one) has the function and is not newer than the
        latest version checked: what every replacement needs before its own conditions."""
        return callable(getattr(module, self.function, None)) and self.installed_version_checked()


def _running_loop_fallback() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class CallerFunction(Internal):
    """A CrewAI function recognised on the call stack (``module:Class.function``, compared by
    its code object): a hook asks whether this function is among its callers, e.g. a caller
    that logs the hooked call's error and goes on.

    The function is looked up when asked (in ``sys.modules``: its module is imported by then);
    the stack is walked only that far up (``depth`` frames), and only when asked: on an error.
    """

    def __init__(self, name: str, what: str, where: str, depth: int) -> None:
        super().__init__(name, what, (Part(where),))
        self.where = where
        #: How many frames above the asking one are looked at.
        self.depth = depth

    def code(self) -> CodeType | None:
        module, _, qualname = self.where.partition(":")
        obj: Any = sys.modules.get(module)
        for piece in qualname.split("."):
            obj = getattr(obj, piece, None)
        code = getattr(obj, "__code__", None)
        return code if isinstance(code, CodeType) else None

    def on_stack(self) -> bool:
        """Whether the function is among the callers of the caller (never raises)."""
        try:
            code = self.code()
            if code is None:
                return False
            frame = inspect.currentframe()
            for _ in range(self.depth + 1):
                if frame is None:
                    return False
                if frame.f_code is code:
                    return True
                frame = frame.f_back
        except Exception:
            return False
        return False


# --- positional arguments -------------------------------------------------------------------
class BoundArguments:
    """Reads a call's arguments by parameter name (positions from the installed signature)."""

    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...]) -> None:
        #: The positional parameter names, in order (``self`` excluded for methods).
        self.names = names

    def values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of the call by parameter name (unknown positions are left out)."""
        values = dict(zip(self.names, args, strict=False))
        values.update(kwargs)
        return values

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str, default: Any) -> Any:
        """One argument by parameter name, ``default`` when the call did not pass it."""
        if name in kwargs:
            return kwargs[name]
        try:
            index = self.names.index(name)
        except ValueError:
            return default
        return args[index] if index < len(args) else default


class Parameters(Internal):
    """The parameters of a private CrewAI function whose arguments a hook reads.

    ``parts`` are the parameter names the hook reads. :meth:`bind` looks the function up and
    takes its positional parameter order from :func:`inspect.signature`, once, when the hook is
    installed.
    """

    def __init__(
        self,
        name: str,
        what: str,
        function: str,
        parts: tuple[Part, ...],
        method: bool,
        distribution: str = CREWAI,
    ) -> None:
        super().__init__(name, what, parts, distribution)
        #: ``module:qualname`` of the function.
        self.function = function
        #: A method: the wrapper's ``args`` do not include ``self``.
        self.method = method

    def signature(self) -> inspect.Signature:
        module = self.function.partition(":")[0]
        if module not in sys.modules:
            importlib.import_module(module)
        return inspect.signature(load(self.function))

    def bind(self) -> BoundArguments:
        """The argument reader for the installed function (keywords only if it is missing)."""
        try:
            parameters = list(self.signature().parameters.values())
        except Exception:
            _logger.debug("internal %s: no signature", self.name, exc_info=True)
            return BoundArguments(())
        if self.method and parameters:
            parameters = parameters[1:]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return BoundArguments(tuple(p.name for p in parameters if p.kind in positional))

    def accepts(self, parameter: str) -> bool:
        """Whether the installed function takes ``parameter`` (False when it is missing)."""
        try:
            return parameter in self.signature().parameters
        except Exception:
            _logger.debug("internal %s: no signature", self.name, exc_info=True)
            return False


# --- the registry ---------------------------------------------------------------------------
_AGENT = Part("crewai.agent.core:Agent")
_STREAM_OWNERS = (
    Part("crewai.types.streaming:CrewStreamingOutput"),
    Part("crewai.types.streaming:FlowStreamingOutput"),
    Part("crewai.types.streaming:StreamSession", missing_in=_LOWEST_CREWAI),
    Part("crewai.types.streaming:AsyncStreamSession", missing_in=_LOWEST_CREWAI),
)
_AGENT_EXECUTOR_MODULES = (
    Part("crewai.agents.agent_executor", missing_in=_LOWEST_CREWAI),
    Part("crewai.experimental.agent_executor", missing_in=("1.15.30",)),
)

AGENT_TIMES_EXECUTED = PrivateAttribute(
    "agent_times_executed",
    "retries an Agent has used (never reset): retry budget, will-retry",
    "_times_executed",
    (_AGENT,),
)
AGENT_ORIGINAL_ROLE = PrivateAttribute(
    "agent_original_role",
    "the Agent's role before input interpolation: span names",
    "_original_role",
    (_AGENT,),
)
TOOL_ORIGINAL_TOOL = PrivateAttribute(
    "tool_original_tool",
    "the BaseTool behind a CrewStructuredTool: tool identity, shared state",
    "_original_tool",
    (Part("crewai.tools.structured_tool:CrewStructuredTool"),),
)
EXECUTOR_AVAILABLE_FUNCTIONS = PrivateAttribute(
    "executor_available_functions",
    "the AgentExecutor's tool functions by name: native tool-call names",
    "_available_functions",
    tuple(Part(p.where + ":AgentExecutor", p.missing_in) for p in _AGENT_EXECUTOR_MODULES),
)
STREAM_SYNC_ITERATOR = PrivateAttribute(
    "stream_sync_iterator",
    "a streaming output's chunk iterator (sync): run it in the kickoff's context",
    "_sync_iterator",
    _STREAM_OWNERS,
)
STREAM_ASYNC_ITERATOR = PrivateAttribute(
    "stream_async_iterator",
    "a streaming output's chunk iterator (async): run it in the kickoff's context",
    "_async_iterator",
    _STREAM_OWNERS,
)
STREAMING_OUTPUTS = ClassNames(
    "streaming_outputs", "the outputs of a streaming kickoff, by class name", _STREAM_OWNERS
)
EXECUTOR_BUSY_MESSAGE = MessageText(
    "executor_busy_message",
    'RuntimeError "Executor is already running": an Agent shared between runs',
    "already running",
    _AGENT_EXECUTOR_MODULES,
    whole=False,
)
NO_FINAL_OUTPUT_MESSAGE = MessageText(
    "no_final_output_message",
    "the placeholder output after a context overflow: no final answer",
    "Agent completed execution but produced no final output.",
    _AGENT_EXECUTOR_MODULES,
    whole=True,
)
CONTEXT_LENGTH_ARGS = Parameters(
    "context_length_args",
    "handle_context_length(respect_context_window, ..., messages): overflow handling",
    "crewai.utilities.agent_utils:handle_context_length",
    (Part("respect_context_window"), Part("messages")),
    method=False,
)
LLM_USAGE_ARGS = Parameters(
    "llm_usage_args",
    "BaseLLM._track_token_usage_internal(usage_data): token usage",
    "crewai.llms.base_llm:BaseLLM._track_token_usage_internal",
    (Part("usage_data"),),
    method=True,
)
LLM_COMPLETED_ARGS = Parameters(
    "llm_completed_args",
    "BaseLLM._emit_call_completed_event(..., finish_reason, response_id): response metadata",
    "crewai.llms.base_llm:BaseLLM._emit_call_completed_event",
    (
        Part("finish_reason", missing_in=_LOWEST_CREWAI),
        Part("response_id", missing_in=_LOWEST_CREWAI),
    ),
    method=True,
)
LLM_RESPONSE_ARGS = Parameters(
    "llm_response_args",
    "OpenAICompletion._extract_openai_token_usage(response): the SDK's response object "
    "(response model, finish reasons, response ID)",
    "crewai.llms.providers.openai.completion:OpenAICompletion._extract_openai_token_usage",
    (Part("response"),),
    method=True,
)
MEMORY_STORAGE = PrivateAttribute(
    "memory_storage",
    "the storage backend of a unified Memory: memory spans name it, sharing watches it",
    "_storage",
    (Part("crewai.memory.unified_memory:Memory"),),
)
LANCEDB_STORAGE_PATH = PrivateAttribute(
    "lancedb_storage_path",
    "the directory of a LanceDB memory storage: crewai.memory.storage.path",
    "_path",
    (Part("crewai.memory.storage.lancedb_storage:LanceDBStorage"),),
)
CREW_KNOWLEDGE_INIT = CallerFunction(
    "crew_knowledge_init",
    "Crew.create_crew_knowledge (a validator: at construction and when a kickoff re-validates "
    "the crew) logs a knowledge ingestion error and goes on: that origin is recovered",
    "crewai.crew:Crew.create_crew_knowledge",
    depth=10,
)
LOOP_EXECUTOR_QUEUE = AttributePath(
    "loop_executor_queue",
    "the work queue of the event loop's default executor: async kickoff queueing",
    ("_default_executor", "_work_queue"),
    "asyncio event loop",
    "loop_with_default_executor",
    PYTHON,
)
SDK_BATCH_PROCESSOR = AttributePath(
    "sdk_batch_processor",
    "the BatchSpanProcessor's worker: bounded shutdown",
    ("_batch_processor",),
    "BatchSpanProcessor",
    "batch_span_processor",
    OTEL_SDK,
)
SDK_BATCH_QUEUE = AttributePath(
    "sdk_batch_queue",
    "the BatchSpanProcessor's span queue: counted drops when full",
    ("_batch_processor", "_queue"),
    "BatchSpanProcessor",
    "batch_span_processor",
    OTEL_SDK,
)
SDK_BATCH_QUEUE_LIMIT = AttributePath(
    "sdk_batch_queue_limit",
    "the BatchSpanProcessor's queue size limit: counted drops when full",
    ("_batch_processor", "_max_queue_size"),
    "BatchSpanProcessor",
    "batch_span_processor",
    OTEL_SDK,
)
SDK_BATCH_SHUTDOWN_ARGS = Parameters(
    "sdk_batch_shutdown_args",
    "BatchProcessor.shutdown(timeout_millis): bounded shutdown without a helper thread",
    "opentelemetry.sdk._shared_internal:BatchProcessor.shutdown",
    (Part("timeout_millis", missing_in=_LOWEST_OTEL_SDK),),
    method=True,
    distribution=OTEL_SDK,
)
THREAD_TARGET = PrivateAttribute(
    "thread_target",
    "the function a Thread was created to run: a pool's own threads start with no run",
    "_target",
    (Part("threading:Thread"),),
    distribution=PYTHON,
)
RUNNING_LOOP = PrivateFunction(
    "running_loop",
    "asyncio._get_running_loop(): the event loop of this thread, cheaply, on every call",
    "asyncio:_get_running_loop",
    _running_loop_fallback,
    PYTHON,
)
WRAPT_WRAPPER = AttributePath(
    "wrapt_wrapper",
    "the wrapper function of a wrapt FunctionWrapper: whose hook it is",
    ("_self_wrapper",),
    "wrapt.FunctionWrapper",
    "function_wrapper",
    WRAPT,
)
HTTPX_TRACER = TracerScope(
    "httpx_tracer",
    "the httpx instrumentation's tracer name: which spans are HTTP attempts",
    "opentelemetry.instrumentation.httpx",
    HTTPX_INSTRUMENTATION,
)

HEADER_NORMALIZATION = ReplacedFunction(
    "httpx_header_normalization",
    "the httpx instrumentation's header-to-dict helper, not run while no header is captured",
    "opentelemetry.instrumentation.httpx:_normalize_headers",
    HTTPX_INSTRUMENTATION,
    consumer="get_custom_header_attributes",
    missing_in=("0.55b1",),
)
REQUEST_PARAMETERS = ReplacedFunction(
    "httpx_request_parameters",
    "the httpx instrumentation's request-parameter helper, without parsing the URL again",
    "opentelemetry.instrumentation.httpx:_extract_parameters",
    HTTPX_INSTRUMENTATION,
    same_result="request_parameters",
    # present in 0.55b1, but there it drops the URL's credentials while parsing it again
    # (later versions redact them when they set the attribute): not replaced there
    missing_in=("0.55b1",),
)

#: Every internal crew_otel reads.
REGISTRY: tuple[Internal, ...] = (
    AGENT_TIMES_EXECUTED,
    AGENT_ORIGINAL_ROLE,
    TOOL_ORIGINAL_TOOL,
    EXECUTOR_AVAILABLE_FUNCTIONS,
    STREAM_SYNC_ITERATOR,
    STREAM_ASYNC_ITERATOR,
    STREAMING_OUTPUTS,
    EXECUTOR_BUSY_MESSAGE,
    NO_FINAL_OUTPUT_MESSAGE,
    CONTEXT_LENGTH_ARGS,
    LLM_USAGE_ARGS,
    LLM_COMPLETED_ARGS,
    LLM_RESPONSE_ARGS,
    MEMORY_STORAGE,
    LANCEDB_STORAGE_PATH,
    CREW_KNOWLEDGE_INIT,
    LOOP_EXECUTOR_QUEUE,
    SDK_BATCH_PROCESSOR,
    SDK_BATCH_QUEUE,
    SDK_BATCH_QUEUE_LIMIT,
    SDK_BATCH_SHUTDOWN_ARGS,
    THREAD_TARGET,
    RUNNING_LOOP,
    WRAPT_WRAPPER,
    HTTPX_TRACER,
    HEADER_NORMALIZATION,
    REQUEST_PARAMETERS,
)
