"""Context growth: CrewAI's handling of a conversation that outgrew the model's window.

When the provider rejects a request as too long, CrewAI either summarises the conversation and
carries on (``respect_context_window=True``, the default; if the loop then ends without another
model call the agent silently returns "Agent completed execution but produced no final
output.") or raises ``SystemExit`` (``respect_context_window=False``), which ``except
Exception`` handlers in web frameworks do not catch. Each case is flagged on the agent's span.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes as a
from crew_otel import internals
from crew_otel.context import ATTEMPT_KEY
from crew_otel.runtime import Runtime
from crew_otel.safety import safe_call
from crew_otel.wrappers.base import Observer


def agent_span() -> trace.Span:
    """The span of the innermost agent execution (the current span outside one)."""
    scope: Any = otel_context.get_value(ATTEMPT_KEY)
    call = getattr(scope, "call", None)
    return call.span if call is not None else trace.get_current_span()


class ContextLengthObserver(Observer):
    """``handle_context_length`` as bound in CrewAI's executor modules (notes before the call,
    and the ``SystemExit`` it may raise)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        #: Its arguments by name, positions from the installed signature.
        self.arguments = internals.CONTEXT_LENGTH_ARGS.bind()

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.runtime.active:
            respect = self.arguments.get(args, kwargs, "respect_context_window", True)
            messages = self.arguments.get(args, kwargs, "messages", None)
            safe_call(self._note, bool(respect), messages, default=None)
        try:
            return wrapped(*args, **kwargs)
        except SystemExit as exc:
            # CrewAI's answer to an overflow it may not summarise: a new, fatal error that starts
            # here (whatever provider error is still in its implicit context).
            if self.runtime.active:
                safe_call(
                    self.runtime.errors.record,
                    agent_span(),
                    exc,
                    a.OP_INVOKE_AGENT,
                    origin=True,
                    recovered=False,
                    default=False,
                )
            raise

    @staticmethod
    def _note(respect: bool, messages: object) -> None:
        span = agent_span()
        count = len(messages) if isinstance(messages, list) else None
        attrs: dict[str, Any] = {"crew_otel.context.respect_context_window": respect}
        if count is not None:
            attrs[a.CREWAI_LLM_MESSAGES] = count
        if respect:
            span.set_attribute(a.CONTEXT_SUMMARIZED, True)
            span.add_event(a.EVENT_CONTEXT_SUMMARIZED, attrs)
        else:
            # CrewAI raises SystemExit next: a BaseException that most handlers miss.
            span.set_attribute(a.CONTEXT_OVERFLOW, True)
            span.add_event("crew_otel.context.overflow", attrs)


def is_no_final_output(result: object) -> bool:
    """Whether an agent result is CrewAI's silent fallback after a context overflow."""
    text = result if isinstance(result, str) else getattr(result, "raw", None)
    return internals.NO_FINAL_OUTPUT_MESSAGE.matches(text)
