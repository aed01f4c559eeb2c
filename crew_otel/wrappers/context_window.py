"""The context-window hook: ``handle_context_length`` as bound in CrewAI's executor modules.

When the provider rejects a request as too long, CrewAI calls ``handle_context_length``, which
either summarises the conversation (``respect_context_window=True``) or raises ``SystemExit``
(see :mod:`crew_otel.diagnosis.context_window`). The hook flags which one on the span of the
agent execution, before the call, and records the ``SystemExit`` as a fatal error that starts
there. Once the summary replaced the conversation, the agent execution is marked compacted: its
later model calls carry ``gen_ai.conversation.compacted`` (set by the ``chat`` span's wrapper).
"""

from __future__ import annotations

from contextvars import Token
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes as a
from crew_otel import internals
from crew_otel.context import ATTEMPT_KEY
from crew_otel.diagnosis.retries import HANDLING_OVERFLOW_KEY
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.observer import Observer


def agent_span(scope: Any) -> trace.Span:
    """The span of the agent execution ``scope`` (the ``ATTEMPT_KEY`` value of a context; the
    current span outside one)."""
    span: trace.Span | None = getattr(scope, "span", None)
    return span if span is not None else trace.get_current_span()


class _Handling(NamedTuple):
    """One overflow handling: the agent execution's span and scope, and what CrewAI does."""

    span: trace.Span
    scope: Any
    respect: bool
    #: Detaches the context marking the call as CrewAI's overflow handling.
    token: Token[otel_context.Context]


class ContextLengthObserver(Observer):
    """Notes the overflow handling before the call, and the ``SystemExit`` it may raise."""

    def __init__(self, runtime: Runtime, *, is_async: bool = False) -> None:
        super().__init__(runtime, is_async=is_async)
        #: Its arguments by name, positions from the installed signature.
        self.arguments = internals.CONTEXT_LENGTH_ARGS.bind()

    def before(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        span = agent_span(otel_context.get_value(ATTEMPT_KEY))
        respect = bool(self.arguments.get(args, kwargs, "respect_context_window", True))
        messages = self.arguments.get(args, kwargs, "messages", None)
        safe_call(_note, span, respect, messages, default=None)
        scope = otel_context.get_value(ATTEMPT_KEY)
        # The summarising model calls run in it: their own overflow is not handled again.
        token = otel_context.attach(otel_context.set_value(HANDLING_OVERFLOW_KEY, True))
        return _Handling(span, scope, respect, token)

    def after_result(self, observed: _Handling, result: Any) -> None:
        """Summarised (noted before the call): the conversation is now the summary."""
        otel_context.detach(observed.token)
        if not observed.respect:
            return
        observed.span.set_attribute(a.GEN_AI_CONVERSATION_COMPACTED, True)
        if hasattr(observed.scope, "compacted"):
            observed.scope.compacted = True

    def after_error(self, observed: _Handling, exc: BaseException) -> None:
        otel_context.detach(observed.token)
        if isinstance(exc, SystemExit):
            # CrewAI's answer to an overflow it may not summarise: a new, fatal error that
            # starts here (whatever provider error is still in its implicit context).
            self.runtime.errors.record(
                observed.span, exc, a.OP_INVOKE_AGENT, origin=True, recovered=False
            )


def _note(span: trace.Span, respect: bool, messages: object) -> None:
    attrs: dict[str, Any] = {a.CONTEXT_RESPECT_WINDOW: respect}
    if isinstance(messages, list):
        attrs[a.CREWAI_LLM_MESSAGES] = len(messages)
    if respect:
        span.set_attribute(a.CONTEXT_SUMMARIZED, True)
        span.add_event(a.EVENT_CONTEXT_SUMMARIZED, attrs)
    else:
        # CrewAI raises SystemExit next: a BaseException that most handlers miss.
        span.set_attribute(a.CONTEXT_OVERFLOW, True)
        span.add_event(a.EVENT_CONTEXT_OVERFLOW, attrs)
