"""Tool calls, on both of CrewAI's paths, plus tools called directly by user code.

No single CrewAI method sees every tool call, so spans are made at the *dispatchers* (they know
the tool name, the call ID and whether the cache answered):

* native function calling: ``AgentExecutor._execute_single_native_tool_call``,
* text/ReAct: ``ToolUsage.use`` / ``ause``,

and the tools' own entry points (``BaseTool.run``/``arun``, ``Tool.run``/``arun``,
``CrewStructuredTool.invoke``/``ainvoke``) are wrapped too. Inside a dispatcher they add no span:
they note the tool object (shared-instance detection) and see the tool's exception before
CrewAI turns it into text for the model, which makes the tool span the error's origin (marked
recovered, because CrewAI handed the error back to the model). Called directly, they make their
own ``execute_tool`` span.

MCP errors are origins on the MCP tool's span too, with the MCP client's view of them: a tool
result with ``isError`` (the server's tool raised; CrewAI hands the text to the model, and CrewAI
1.12 does not even tell it from a result) is ``error.type=tool_error``, as the MCP semantic
conventions say (:class:`McpToolResultObserver`); a server that exits or fails to start, or a
timeout, is the MCP client's exception, not the ``RuntimeError`` CrewAI wraps it in
(:class:`McpToolErrorObserver`). Neither records the server's error text beyond what the
privacy rules allow (an exception's message is cleaned; an ``isError`` text is not recorded).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes, internals
from crew_otel.attributes import Operation
from crew_otel.context import ATTEMPT_KEY, KICKOFF_KEY, REQUEST_ID_KEY, TOOL_CALL_KEY
from crew_otel.diagnosis.crosstalk import strings_in
from crew_otel.diagnosis.errors import is_cancellation
from crew_otel.diagnosis.retries import agent_will_retry
from crew_otel.diagnosis.shared_state import RunHoldings, is_locked_database_error
from crew_otel.diagnosis.sharing import Kind
from crew_otel.wrappers.base import (
    Call,
    DurationPoint,
    ErrorRecording,
    SpanWrapper,
    innermost_own_span_is,
)
from crew_otel.wrappers.observer import Observer

UNKNOWN_TOOL = "unknown"


class ToolCallRecord:
    """The tool call in progress (kept in the OTel Context)."""

    __slots__ = ("borrowed_by", "error_type", "mcp_error", "name", "span", "swallows_errors")

    def __init__(self, span: trace.Span, name: str, swallows_errors: bool) -> None:
        self.span = span
        self.name = name
        self.swallows_errors = swallows_errors
        #: id() of the tool whose own entry point runs inside this dispatcher span.
        self.borrowed_by: int | None = None
        #: error.type of the tool's exception when the dispatcher turned it into text.
        self.error_type: str | None = None
        #: The MCP client's exception, recorded here before CrewAI wrapped it.
        self.mcp_error: BaseException | None = None

    def is_mcp_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` is (CrewAI's wrapper of) the MCP error recorded on this span."""
        return self.mcp_error is not None and (
            exc is self.mcp_error or exc.__cause__ is self.mcp_error
        )


def _open_step(ctx: otel_context.Context) -> Call[Any] | None:
    """Tools run after their step's model call returned: the open step is their parent."""
    scope: Any = ctx.get(ATTEMPT_KEY)
    step = getattr(scope, "step", None)
    return step if isinstance(step, Call) else None


class _ToolSpanWrapper(SpanWrapper[ToolCallRecord]):
    operation = Operation.EXECUTE_TOOL

    #: Whether the wrapped dispatcher turns tool exceptions into text for the model.
    swallows_errors = True

    def start_tool_span(
        self,
        ctx: otel_context.Context,
        name: str,
        call_id: object,
        arguments: object,
        extra: dict[str, str] | None = None,
        tool: object = None,
    ) -> Call[ToolCallRecord]:
        attrs = attributes.tool_attributes(name, call_id)
        if extra:
            attrs.update(extra)
        scope: Any = ctx.get(ATTEMPT_KEY)
        role = getattr(scope, "role", None)
        if isinstance(role, str):
            attrs[attributes.GEN_AI_AGENT_NAME] = role  # the agent running the tool
        self.capture(attrs, attributes.GEN_AI_TOOL_CALL_ARGUMENTS, arguments)
        step = _open_step(ctx)
        parent_ctx = trace.set_span_in_context(step.span, ctx) if step is not None else ctx
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_TOOL, name), context=parent_ctx, attributes=attrs
        )
        if tool is not None and span.is_recording():
            span.set_attributes(attributes.tool_description_attributes(tool))
        record = ToolCallRecord(span, name, self.swallows_errors)
        call_ctx = otel_context.set_value(
            TOOL_CALL_KEY, record, trace.set_span_in_context(span, ctx)
        )
        call = Call(span, call_ctx, record)
        call.parent = step  # the step's span waits for the tool's
        return call

    def succeed(self, call: Call[ToolCallRecord], result: Any) -> Any:
        self.capture_on_span(call.span, attributes.GEN_AI_TOOL_CALL_RESULT, result)
        crosstalk = self.runtime.crosstalk
        if crosstalk is not None and result is not None:
            crosstalk.check(
                call.ctx.get(REQUEST_ID_KEY),  # type: ignore[arg-type]
                strings_in(result),
                attributes.CROSSTALK_TOOL_RESULT,
                call.span,
            )
        return result

    def error_recording(
        self, call: Call[ToolCallRecord], exc: BaseException
    ) -> ErrorRecording | None:
        if call.data.is_mcp_error(exc):
            return None  # recorded on this span as the MCP client raised it
        # An error escaping the tool span goes to the agent attempt, which may re-run the agent;
        # escaping a dispatcher that turns tool errors into text means it did not. CrewAI runs
        # parallel tool calls in a pool and re-raises one error of theirs: whether this one
        # reaches the caller is known only above (unsettled).
        return ErrorRecording(
            recovered=agent_will_retry(exc),
            expected_retry=self.swallows_errors,
            unsettled=self.swallows_errors,
        )

    def duration_point(self, call: Call[ToolCallRecord]) -> DurationPoint:
        """The tool's duration; ``error.type`` also when the dispatcher turned the tool's
        exception into text for the model."""
        record = call.data
        attrs: dict[str, AttributeValue] = {attributes.GEN_AI_TOOL_NAME: record.name}
        if record.error_type is not None:
            attrs[attributes.ERROR_TYPE] = record.error_type
        return (self.runtime.metrics.tool_duration, attrs)


class NativeToolCallWrapper(_ToolSpanWrapper):
    """``_execute_single_native_tool_call`` of the agent executor (function calling).

    Two signatures exist: ``(tool_call)`` (``AgentExecutor``) and keyword-only
    ``(call_id=, func_name=, func_args=, available_functions=, ...)`` (``CrewAgentExecutor``).
    """

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[ToolCallRecord] | None:
        if "func_name" in kwargs:
            call_id, raw_name = kwargs.get("call_id"), kwargs.get("func_name")
            arguments = kwargs.get("func_args")
            known = kwargs.get("available_functions") or {}
        else:
            tool_call = kwargs.get("tool_call", args[0] if args else None)
            call_id, raw_name, arguments = _native_call_info(tool_call)
            known = internals.EXECUTOR_AVAILABLE_FUNCTIONS.read(instance) or {}
        tool = getattr(known.get(raw_name), "__self__", None) if raw_name in known else None
        name, extra = _tool_name(tool, raw_name if raw_name in known else None)
        return self.start_tool_span(
            otel_context.get_current(), name, call_id, arguments, extra, tool
        )

    def succeed(self, call: Call[ToolCallRecord], result: Any) -> Any:
        if not isinstance(result, dict):
            return super().succeed(call, result)
        if call.span.is_recording():
            call.span.set_attribute(
                attributes.CREWAI_TOOL_CACHE_HIT, bool(result.get("from_cache"))
            )
        super().succeed(call, result.get("result"))
        return result


class ToolUsageWrapper(_ToolSpanWrapper):
    """``ToolUsage.use(calling, tool_string)`` / ``ause`` (the text/ReAct path)."""

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[ToolCallRecord] | None:
        calling = kwargs.get("calling", args[0] if args else None)
        raw_name = getattr(calling, "tool_name", None)
        tools = [
            t for t in getattr(instance, "tools", None) or () if getattr(t, "name", 0) == raw_name
        ]
        tool = tools[0] if tools else None
        name, extra = _tool_name(tool, raw_name if tools else None)
        arguments = getattr(calling, "arguments", None)
        return self.start_tool_span(otel_context.get_current(), name, None, arguments, extra, tool)


class ToolRunWrapper(_ToolSpanWrapper):
    """A tool's own entry point: ``BaseTool.run``/``arun``, ``Tool.run``/``arun``,
    ``CrewStructuredTool.invoke``/``ainvoke``.
    """

    swallows_errors = False

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[ToolCallRecord] | None:
        ctx = otel_context.get_current()
        tool = internals.TOOL_ORIGINAL_TOOL.read(instance) or instance
        name, extra = _tool_name(tool, getattr(tool, "name", None), attributes.DEFAULT_TOOL_NAME)
        record: ToolCallRecord | None = ctx.get(TOOL_CALL_KEY)  # type: ignore[assignment]
        if (
            record is not None
            and innermost_own_span_is(record.span, ctx)
            and record.borrowed_by in (None, id(tool))
        ):
            call = _borrow(record, ctx, tool, name, extra)
        else:
            arguments = kwargs if kwargs else (args or None)
            call = self.start_tool_span(ctx, name, None, arguments, extra, tool)
        usage = self.track_instance(call, Kind.TOOL, tool, name)
        if usage is not None:
            self._watch_shared_state(call, tool, usage.request_id)
        return call

    def _watch_shared_state(
        self, call: Call[ToolCallRecord], tool: object, request_id: str
    ) -> None:
        """Note the globals, files, databases and resources this tool call touches; they stay
        the run's until it ends (or until the call ends, for a tool called outside a run)."""
        kickoff = call.ctx.get(KICKOFF_KEY)
        holdings = getattr(kickoff, "holdings", None)
        if not isinstance(holdings, RunHoldings):
            holdings = self.runtime.shared_state.new_holdings()
            call.add_cleanup(holdings.release)
        call.ctx = self.runtime.shared_state.enter_tool(
            tool, request_id, call.span, holdings, call.ctx, call.add_closer
        )

    def succeed(self, call: Call[ToolCallRecord], result: Any) -> Any:
        if not call.borrowed:
            super().succeed(call, result)
        return result

    def error_recording(
        self, call: Call[ToolCallRecord], exc: BaseException
    ) -> ErrorRecording | None:
        if not call.borrowed or call.data.is_mcp_error(exc):
            return super().error_recording(call, exc)
        swallowed = call.data.swallows_errors and isinstance(exc, Exception)
        if not swallowed and not is_cancellation(exc):
            return None  # goes past the dispatcher (KeyboardInterrupt, SystemExit): it records it
        # The dispatcher turns an Exception into text for the model: the error starts here and
        # is recovered from the run's point of view.
        return ErrorRecording(recovered=swallowed)

    def on_fail(self, call: Call[ToolCallRecord], exc: BaseException) -> None:
        if is_locked_database_error(exc):
            self.runtime.shared_state.database_locked(call.ctx, call.span)
        if call.borrowed and call.error_type is not None:
            call.data.error_type = call.error_type  # for the dispatcher's duration point


def _mcp_tool_call() -> ToolCallRecord | None:
    """The tool call an MCP client call is made for (``None`` outside a tool call)."""
    record = otel_context.get_value(TOOL_CALL_KEY)
    return record if isinstance(record, ToolCallRecord) else None


class McpToolResultObserver(Observer):
    """``ClientSession.call_tool`` of the ``mcp`` package: a result with ``isError`` (the
    server's tool failed) is the error's origin on the tool span, ``error.type=tool_error``.

    It is recovered: the result goes back to the model as text (CrewAI >= 1.15.30 also notes
    it as a ``ToolFailure``; earlier versions keep only the text). The text is not recorded.
    """

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        if getattr(result, "isError", None) is not True:
            return
        record = _mcp_tool_call()
        if record is None or record.error_type is not None:
            return
        record.error_type = attributes.ERROR_TYPE_MCP_TOOL_ERROR
        self.runtime.errors.record_status(
            record.span,
            attributes.ERROR_TYPE_MCP_TOOL_ERROR,
            Operation.EXECUTE_TOOL.value,
            recovered=True,
            description="the MCP server's tool returned an error result (isError)",
        )


class McpToolErrorObserver(Observer):
    """An MCP tool's client call (``MCPNativeTool._run_async``: connect, call, disconnect):
    its exception (the server exited or failed to start, a timeout) is recorded on the tool
    span as the MCP client raised it, before CrewAI wraps it in a ``RuntimeError``."""

    def after_error(self, observed: Any, exc: BaseException) -> None:
        record = _mcp_tool_call()
        if record is None or is_cancellation(exc):
            return
        record.mcp_error = exc
        record.error_type = attributes.error_type(exc)
        self.runtime.errors.record(
            record.span,
            exc,
            Operation.EXECUTE_TOOL.value,
            recovered=record.swallows_errors and isinstance(exc, Exception),
        )


def _borrow(
    record: ToolCallRecord,
    ctx: otel_context.Context,
    tool: object,
    name: str,
    extra: dict[str, str],
) -> Call[ToolCallRecord]:
    """A tool's entry point called by the dispatcher that already made the span: borrow it,
    also through another instrumentation's span in between (OpenInference wraps Tool.run
    too). (A tool that calls another tool from its body gets a span of its own.)"""
    record.borrowed_by = id(tool)
    if record.name == UNKNOWN_TOOL or (extra and record.name != name):
        # The model's spelling did not match (or the dispatcher could not tell an MCP tool by
        # its name); the tool CrewAI picked is known now.
        record.name = name
        record.span.update_name(attributes.span_name(attributes.SPAN_TOOL, name))
        record.span.set_attributes({attributes.GEN_AI_TOOL_NAME: name, **extra})
        if record.span.is_recording():
            record.span.set_attributes(attributes.tool_description_attributes(tool))
    call = Call(record.span, ctx, record)
    call.borrowed = True
    return call


def _tool_name(
    tool: object, raw_name: object, default: str = UNKNOWN_TOOL
) -> tuple[str, dict[str, str]]:
    """The span's tool name and, for an MCP tool, its source and server label.

    An MCP tool's CrewAI name embeds its server's command line or URL (tokens included): the
    span is named after the tool's own name on its server instead.
    """
    mcp = attributes.mcp_tool_identity(tool) if tool is not None else None
    if mcp is not None:
        name, server = mcp
        return name, {
            attributes.CREWAI_TOOL_SOURCE: attributes.TOOL_SOURCE_MCP,
            attributes.CREWAI_MCP_SERVER_NAME: server,
        }
    return attributes.bounded_name(raw_name, default), {}


def _native_call_info(tool_call: Any) -> tuple[object, object, object]:
    """(call ID, function name, arguments) of an OpenAI/Anthropic/Gemini/dict tool call."""
    function = getattr(tool_call, "function", None)
    if function is not None:
        return (
            getattr(tool_call, "id", None),
            getattr(function, "name", None),
            getattr(function, "arguments", None),
        )
    if isinstance(tool_call, dict):
        function = tool_call.get("function") or {}
        return (
            tool_call.get("call_id") or tool_call.get("id") or tool_call.get("toolUseId"),
            function.get("name") or tool_call.get("name"),
            function.get("arguments") or tool_call.get("arguments") or tool_call.get("input"),
        )
    return getattr(tool_call, "id", None), getattr(tool_call, "name", None), None
