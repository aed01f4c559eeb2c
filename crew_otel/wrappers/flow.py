"""Flow steps: one ``crewai.flow.step {method}`` span per executed method of a user Flow.

CrewAI runs every ``@start``, ``@listen`` and ``@router`` method of a Flow through one coroutine,
``Flow._execute_method(method_name, method, *args)`` (defined on the runtime base class in newer
CrewAI), whatever triggered it: a start, a listener of one method, an ``or_``/``and_`` condition,
a router's label, a loop that re-triggers a method. Sync methods run in ``asyncio.to_thread``
with a copy of the context taken inside that coroutine, so the step span is current there and a
crew kicked off in a step nests under it. Listeners run after the method that triggered them
returned, so every step's parent is the flow's kickoff span.

The span carries the method's name, its kind (from the decorator: ``router`` wins over
``start``) and, for a router, the label it returned. CrewAI's internal flows (the agent
executor, the memory flows) get no step spans: their methods are the agent's steps, traced
elsewhere. A step that raises records the error like any other span; a step cancelled (the
loser of an ``or_`` race, a caller that stopped waiting) or paused for human feedback is not a
failure.
"""

from __future__ import annotations

import enum
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.diagnosis.errors import is_cancellation
from crew_otel.wrappers.base import RECORD, Call, ErrorRecording, SpanWrapper
from crew_otel.wrappers.kickoff import _is_internal_flow

#: The decorator wrapper classes of ``crewai.flow.flow_wrappers``, by class name.
_KIND_BY_WRAPPER_CLASS = {
    "RouterMethod": attributes.FLOW_KIND_ROUTER,
    "StartMethod": attributes.FLOW_KIND_START,
    "ListenMethod": attributes.FLOW_KIND_LISTEN,
}
#: Raised by a ``@human_feedback`` method to pause the flow: not a failure.
_PAUSE_EXCEPTIONS = frozenset({"HumanFeedbackPending"})


class FlowStepWrapper(SpanWrapper[str | None]):
    """``Flow._execute_method``: one step span per executed method (``Call.data``: its kind)."""

    operation = Operation.FLOW_STEP

    def passes_through(self, cls: type) -> bool:
        return _is_internal_flow(cls)  # CrewAI's own flows (the agent executor)

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[str | None] | None:
        method_name = args[0] if args else kwargs.get("method_name")
        name = attributes.bounded_name(
            str(method_name) if method_name is not None else None,
            attributes.DEFAULT_FLOW_METHOD_NAME,
        )
        kind = method_kind(type(instance), str(method_name))
        attrs: dict[str, AttributeValue] = {attributes.CREWAI_FLOW_METHOD_NAME: name}
        if kind is not None:
            attrs[attributes.CREWAI_FLOW_METHOD_KIND] = kind
        ctx = otel_context.get_current()
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_FLOW_STEP, name), context=ctx, attributes=attrs
        )
        return Call(span, trace.set_span_in_context(span, ctx), kind)

    def succeed(self, call: Call[str | None], result: Any) -> Any:
        if call.data == attributes.FLOW_KIND_ROUTER and call.span.is_recording():
            outcome = router_outcome(result)
            if outcome is not None:
                call.span.set_attribute(attributes.CREWAI_FLOW_ROUTER_OUTCOME, outcome)
        return result

    def error_recording(self, call: Call[str | None], exc: BaseException) -> ErrorRecording | None:
        if is_cancellation(exc) or _is_pause(exc):
            return None
        return RECORD


def method_kind(flow_class: type, method_name: str) -> str | None:
    """``start``, ``listen`` or ``router``: what the method's decorator declares, if known.

    The decorators wrap the method in ``StartMethod``/``ListenMethod``/``RouterMethod``
    (``crewai.flow.flow_wrappers``); older CrewAI also flags them ``__is_router__`` and
    ``__is_start_method__``. A router that is also a start is a ``router``.
    """
    declared = next(
        (k.__dict__[method_name] for k in flow_class.__mro__ if method_name in k.__dict__), None
    )
    if declared is None:
        return None
    if getattr(declared, "__is_router__", False):
        return attributes.FLOW_KIND_ROUTER
    for klass in type(declared).__mro__:
        kind = _KIND_BY_WRAPPER_CLASS.get(klass.__name__)
        if kind is not None:
            return kind
    if getattr(declared, "__is_start_method__", False):
        return attributes.FLOW_KIND_START
    return None


def router_outcome(result: object) -> str | None:
    """The label a router returned, from ``_execute_method``'s ``(result, event_id)``."""
    label = result[0] if isinstance(result, tuple) and result else result
    if isinstance(label, enum.Enum):
        label = label.value
    if label is None:
        return None
    text = attributes.bounded_name(str(label), "")
    return text or None


def _is_pause(exc: BaseException) -> bool:
    return any(klass.__name__ in _PAUSE_EXCEPTIONS for klass in type(exc).__mro__)
