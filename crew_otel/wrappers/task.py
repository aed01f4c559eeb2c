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

from crew_otel import attributes as a
from crew_otel import content
from crew_otel.context import REQUEST_ID_KEY
from crew_otel.diagnosis.sharing import KIND_TASK
from crew_otel.wrappers.base import Call, Observer, SpanWrapper


class TaskWrapper(SpanWrapper):
    """One ``crewai.task {name}`` span per task run."""

    operation = a.ORIGIN_TASK

    def begin(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        ctx = otel_context.get_current()
        name = a.task_name(instance)
        attrs = a.task_attributes(instance, name)
        if self.config.capture_content:
            description = getattr(instance, "description", None)
            if description is not None:
                attrs[a.CREWAI_TASK_DESCRIPTION] = content.render(
                    description, self.config.max_attribute_length, self.config.redact
                )
        span = self.tracer.start_span(a.span_name(a.SPAN_TASK, name), context=ctx, attributes=attrs)
        call = Call(span, trace.set_span_in_context(span, ctx))
        request_id: Any = ctx.get(REQUEST_ID_KEY)
        if self.config.detect_shared_instances and isinstance(request_id, str):
            sharing = self.runtime.sharing
            usage = sharing.enter(instance, KIND_TASK, request_id, span, name)
            call.add_cleanup(lambda: sharing.exit(usage))
            sharing.check_task_inputs(instance, request_id, span, name)
        return call

    def succeed(self, call: Call, result: Any) -> Any:
        if self.config.capture_content and call.span.is_recording():
            raw = getattr(result, "raw", result)
            call.span.set_attribute(
                a.CREWAI_TASK_OUTPUT,
                content.render(raw, self.config.max_attribute_length, self.config.redact),
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
