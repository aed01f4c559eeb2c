"""Tasks: ``Task._execute_core`` / ``_aexecute_core``, the one place every task run passes.

That covers ``execute_sync``, ``async_execution`` tasks (run in their own thread), native async
``aexecute_sync`` and direct calls. The span is ``crewai.task {task name}``; the description is
content and only recorded when content capture is on. Also: ``Crew._interpolate_inputs`` is
observed so a Task run with inputs that *another* request interpolated into it is flagged.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from crew_otel import attributes
from crew_otel.attributes import Operation
from crew_otel.context import REQUEST_ID_KEY
from crew_otel.diagnosis.sharing import Kind
from crew_otel.wrappers.base import Call, SpanWrapper
from crew_otel.wrappers.observer import Observer


class TaskWrapper(SpanWrapper[None]):
    """One ``crewai.task {name}`` span per task run."""

    operation = Operation.TASK

    def begin(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call[None] | None:
        ctx = otel_context.get_current()
        name = attributes.task_name(instance)
        attrs = attributes.task_attributes(instance, name)
        self.capture(
            attrs, attributes.CREWAI_TASK_DESCRIPTION, getattr(instance, "description", None)
        )
        span = self.tracer.start_span(
            attributes.span_name(attributes.SPAN_TASK, name), context=ctx, attributes=attrs
        )
        call = Call(span, trace.set_span_in_context(span, ctx), None)
        usage = self.track_instance(call, Kind.TASK, instance, name)
        if usage is not None:
            self.runtime.sharing.check_task_inputs(instance, usage.request_id, span, name)
        return call

    def succeed(self, call: Call[None], result: Any) -> Any:
        self.capture_on_span(
            call.span, attributes.CREWAI_TASK_OUTPUT, getattr(result, "raw", result)
        )
        return result


class InterpolationObserver(Observer):
    """``Crew._interpolate_inputs``: remember which request put its inputs into which Tasks."""

    def observe(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        request_id = otel_context.get_value(REQUEST_ID_KEY)
        if self.runtime.config.detect_shared_instances and isinstance(request_id, str):
            self.runtime.sharing.note_interpolation(getattr(instance, "tasks", None), request_id)
