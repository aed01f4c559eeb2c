"""The SDK floor of the span model: what recording crew_otel's spans and metric points costs
with the bare OpenTelemetry SDK and no instrumentation code at all.

crew_otel records 15 spans per kickoff of the standard workload, the HTTP instrumentation 3
more, and 13 histogram points. Part of what that costs is the SDK's own work for each span
(creating it, its attributes and events, the span processors, ending it, encoding it at export)
and each point (aggregation, exemplar), which no instrumentation can avoid while it records
them. This module measures that part end to end:

* :func:`capture` (``python -m benchmarks.floor --capture FILE --base-url URL``, run once by
  :mod:`benchmarks.run` before the workers start) runs the standard workload with crew_otel in
  a process of its own and writes one kickoff's spans (name, kind, parent, attributes, events,
  status) and metric points (instrument, attributes, how many) to ``FILE``, as JSON;
* the worker of the ``sdk_floor`` variant (:func:`Replay`) runs the *uninstrumented* kickoff,
  then makes the same spans (nested and made current as in the run) and records the same
  points with the bare SDK, through the same export pipeline as every variant.

So ``sdk_floor`` minus the uninstrumented kickoff is the least any instrumentation pays for
crew_otel's span model on this SDK, and crew_otel minus ``sdk_floor`` is what crew_otel's own
code (hooks, context propagation into threads, detectors, the HTTP instrumentation's extraction
and propagation) adds on top. Nothing of crew_otel is imported by a replaying process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

#: Metric points recorded per kickoff that the replay records again (observable instruments
#: are collected, not recorded by a kickoff).
_HISTOGRAM = "histogram"
_COUNTER = "counter"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _attrs(attributes: Any) -> dict[str, Any]:
    return {key: _plain(value) for key, value in dict(attributes or {}).items()}


def _second_kickoff(base_url: str, set_up: Any) -> tuple[list[Any], Any]:
    """Two kickoffs of the standard workload after ``set_up(tracer_provider, meter_provider)``
    (in-memory export, delta temporality): the second one's finished spans, by start time, and
    its metrics."""
    from opentelemetry.sdk import metrics as sdk_metrics
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from benchmarks import common
    from crew_otel.testing.crews import make_llm, research_crew

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    delta: dict[type, AggregationTemporality] = dict.fromkeys(
        (sdk_metrics.Counter, sdk_metrics.Histogram, sdk_metrics.UpDownCounter),
        AggregationTemporality.DELTA,
    )
    reader = InMemoryMetricReader(preferred_temporality=delta)
    set_up(tracer_provider, sdk_metrics.MeterProvider(metric_readers=[reader]))

    def kickoff() -> None:
        research_crew(lambda: make_llm(base_url)).kickoff(inputs=dict(common.INPUTS))

    kickoff()
    reader.get_metrics_data()
    spans.clear()
    kickoff()
    finished = sorted(spans.get_finished_spans(), key=lambda s: s.start_time or 0)
    return finished, reader.get_metrics_data()


def capture(base_url: str, out: str) -> dict[str, Any]:
    """Run two kickoffs of the standard workload with crew_otel; write the second's spans and
    metric points to ``out``."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics.export import Histogram, Sum

    def instrument(tracer_provider: Any, meter_provider: Any) -> None:
        import crew_otel

        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        crew_otel.instrument()

    finished, data = _second_kickoff(base_url, instrument)
    index = {span.context.span_id: i for i, span in enumerate(finished)}
    template_spans = [
        {
            "name": span.name,
            "kind": span.kind.name,
            "parent": index.get(span.parent.span_id) if span.parent is not None else None,
            "attributes": _attrs(span.attributes),
            "events": [
                {"name": event.name, "attributes": _attrs(event.attributes)}
                for event in span.events
            ],
            "status": [span.status.status_code.name, span.status.description],
        }
        for span in finished
    ]
    points: list[dict[str, Any]] = []
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = (
                    _HISTOGRAM
                    if isinstance(metric.data, Histogram)
                    else _COUNTER
                    if isinstance(metric.data, Sum) and metric.data.is_monotonic
                    else None
                )
                if kind is None:
                    continue
                for point in metric.data.data_points:
                    times = point.count if kind == _HISTOGRAM else 1
                    value = (point.sum / point.count) if kind == _HISTOGRAM else point.value
                    if not times:
                        continue
                    points.append(
                        {
                            "scope": scope_metrics.scope.name,
                            "name": metric.name,
                            "unit": metric.unit,
                            "kind": kind,
                            "attributes": _attrs(point.attributes),
                            "times": times,
                            "value": value,
                        }
                    )
    template = {"spans": template_spans, "points": points}
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(template, handle)
    return template


def _recorders(template: dict[str, Any], meter_provider: Any) -> list[tuple[dict[str, Any], Any]]:
    """Each of the template's points with the bare SDK's ``record`` (histograms) or ``add``
    (counters) of its instrument, one instrument per scope and name."""
    instruments: dict[tuple[str, str], Any] = {}
    recorders = []
    for point in template["points"]:
        key = (point["scope"], point["name"])
        instrument = instruments.get(key)
        if instrument is None:
            meter = meter_provider.get_meter(point["scope"])
            make = meter.create_histogram if point["kind"] == _HISTOGRAM else meter.create_counter
            instrument = instruments[key] = make(point["name"], unit=point["unit"])
        recorders.append(
            (point, instrument.record if point["kind"] == _HISTOGRAM else instrument.add)
        )
    return recorders


class Replay:
    """Records one kickoff's spans and points, as :func:`capture` wrote them, with the bare
    SDK (call the instance after each uninstrumented kickoff)."""

    def __init__(self, template: dict[str, Any], tracer_provider: Any, meter_provider: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        # Looked up once: the replay is what is measured.
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._status, self._unset = Status, StatusCode.UNSET
        self._tracer = tracer_provider.get_tracer("benchmarks.floor")
        self._spans = template["spans"]
        self._children: dict[int | None, list[int]] = {}
        for i, span in enumerate(self._spans):
            self._children.setdefault(span["parent"], []).append(i)
        self._kinds = [SpanKind[span["kind"]] for span in self._spans]
        self._statuses = [StatusCode[span["status"][0]] for span in self._spans]
        self._points = [
            (record, point["attributes"], point["times"], point["value"])
            for point, record in _recorders(template, meter_provider)
        ]

    def __call__(self) -> None:
        for root in self._children.get(None, ()):
            self._span(root, None)

    def _span(self, i: int, parent: Any) -> None:
        template = self._spans[i]
        span = self._tracer.start_span(
            template["name"], context=parent, kind=self._kinds[i], attributes=template["attributes"]
        )
        ctx = self._in_context(span, parent)
        token = self._attach(ctx)
        try:
            for child in self._children.get(i, ()):
                self._span(child, ctx)
            if parent is None:  # the kickoff: its run's points, recorded inside it
                for record, attributes, times, value in self._points:
                    for _ in range(times):
                        record(value, attributes)
            for event in template["events"]:
                span.add_event(event["name"], event["attributes"])
            code = self._statuses[i]
            if code is not self._unset:
                span.set_status(self._status(code, template["status"][1]))
        finally:
            self._detach(token)
        span.end()


#: Where a run makes each of the template's spans (by the start of its name): the targets the
#: in-place floor wraps, as ``(name prefix, module, attribute path)``.
IN_PLACE_TARGETS = (
    ("invoke_workflow", "crewai.crew", "Crew.kickoff"),
    ("crewai.task", "crewai.task", "Task._execute_core"),
    ("invoke_agent", "crewai.agent.core", "Agent.execute_task"),
    ("crewai.agent.step", "crewai.agents.agent_executor", "get_llm_response"),
    ("chat", "crewai.llms.providers.openai.completion", "OpenAICompletion.call"),
    (
        "execute_tool",
        "crewai.agents.agent_executor",
        "AgentExecutor._execute_single_native_tool_call",
    ),
    ("POST", "httpx", "HTTPTransport.handle_request"),
)
#: Which span's call records each metric (by name); any other metric is recorded by the kickoff.
IN_PLACE_POINTS = {
    "http.client.duration": "POST",
    "http.client.request.duration": "POST",
    "gen_ai.client.token.usage": "chat",
    "gen_ai.client.operation.duration": "chat",
    "gen_ai.execute_tool.duration": "execute_tool",
    "gen_ai.invoke_agent.duration": "invoke_agent",
    "gen_ai.invoke_workflow.duration": "invoke_workflow",
}


class _PointShare:
    """One of the template's points, recorded by the calls of one kind of span: a point made
    3 times per kickoff by 3 calls is recorded at every call, one made once by 2 calls at every
    other call (``per_call`` accumulates into ``credit``)."""

    __slots__ = ("attributes", "credit", "per_call", "record", "value")

    def __init__(self, record: Any, attributes: dict[str, Any], value: float, per_call: float):
        self.record, self.attributes, self.value = record, attributes, value
        self.per_call = per_call
        self.credit = 0.0

    def at_call(self) -> None:
        """Record this call's share."""
        self.credit += self.per_call
        while self.credit >= 1.0 - 1e-9:
            self.record(self.value, self.attributes)
            self.credit -= 1.0


class InPlaceSpan:
    """A wrapt wrapper that makes one kind of the template's spans, with the bare SDK, around
    the call a run makes it for: started as a child of the current span, made current for the
    call, ended after it, its points recorded as it ends. Calls take the kind's template spans
    in turn (a run's two tasks: the first's, then the second's)."""

    def __init__(
        self, owner: InPlace, spans: list[dict[str, Any]], points: list[_PointShare]
    ) -> None:
        from opentelemetry.trace import SpanKind, StatusCode

        self._owner = owner
        self._spans = [
            (
                span["name"],
                SpanKind[span["kind"]],
                span["attributes"],
                span["events"],
                StatusCode[span["status"][0]],
                span["status"][1],
            )
            for span in spans
        ]
        self._points = points
        self._turn = 0

    def __call__(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        owner = self._owner
        name, kind, attributes, events, code, description = self._spans[
            self._turn % len(self._spans)
        ]
        self._turn += 1
        span = owner.tracer.start_span(name, kind=kind, attributes=attributes)
        token = owner.attach(owner.in_context(span))
        try:
            return wrapped(*args, **kwargs)
        finally:
            for point in self._points:
                point.at_call()
            for event in events:
                span.add_event(event["name"], event["attributes"])
            if code is not owner.unset:
                span.set_status(owner.status(code, description))
            owner.detach(token)
            span.end()


class InPlace:
    """The SDK floor made where a run makes it: the template's spans and points recorded by
    wrapt wrappers around the calls crew_otel's hooks wrap (:data:`IN_PLACE_TARGETS`), each at
    the moment of its call, with the bare SDK and no crew_otel code.

    :class:`Replay` makes the same spans in one burst after the kickoff, with the SDK's code
    hot in the CPU's caches; a hook makes its span between stretches of CrewAI's work, where a
    bare span costs several times as much. This floor pays what a minimal instrumentation of
    the same span model pays in a run: the cold SDK, plus one wrapt wrapper per span.
    """

    def __init__(self, template: dict[str, Any], tracer_provider: Any, meter_provider: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        self.attach, self.detach = context.attach, context.detach
        self.in_context = trace.set_span_in_context
        self.status, self.unset = Status, StatusCode.UNSET
        self.tracer = tracer_provider.get_tracer("benchmarks.floor")
        by_prefix: dict[str, list[dict[str, Any]]] = {}
        for span in template["spans"]:
            prefix = next((p for p, _, _ in IN_PLACE_TARGETS if span["name"].startswith(p)), None)
            if prefix is None:
                raise ValueError(f"no in-place target for the span {span['name']!r}")
            by_prefix.setdefault(prefix, []).append(span)
        points: dict[str, list[_PointShare]] = {}
        for point, record in _recorders(template, meter_provider):
            prefix = IN_PLACE_POINTS.get(point["name"], "invoke_workflow")
            if prefix not in by_prefix:
                prefix = "invoke_workflow"
            per_call = point["times"] / len(by_prefix[prefix])
            points.setdefault(prefix, []).append(
                _PointShare(record, point["attributes"], point["value"], per_call)
            )
        self.wrappers = {
            prefix: InPlaceSpan(self, spans, points.get(prefix, []))
            for prefix, spans in by_prefix.items()
        }

    def install(self) -> None:
        """Wrap the targets (once per process)."""
        import wrapt

        for prefix, module, path in IN_PLACE_TARGETS:
            wrapper = self.wrappers.get(prefix)
            if wrapper is not None:
                wrapt.wrap_function_wrapper(module, path, wrapper)


def install_in_place(path: str, tracer_provider: Any, meter_provider: Any) -> InPlace:
    """:class:`InPlace` from the template at ``path``, installed."""
    with open(path, encoding="utf-8") as handle:
        floor = InPlace(json.load(handle), tracer_provider, meter_provider)
    floor.install()
    return floor


def load(path: str, tracer_provider: Any, meter_provider: Any) -> Replay:
    with open(path, encoding="utf-8") as handle:
        return Replay(json.load(handle), tracer_provider, meter_provider)


def made_in_place(base_url: str, template_path: str) -> dict[str, Any]:
    """What :class:`InPlace` makes in one uninstrumented kickoff (after one to warm up): each
    span's name and its parent's, and each histogram's points (a check of the floor)."""
    finished, data = _second_kickoff(
        base_url, lambda tracer, meter: install_in_place(template_path, tracer, meter)
    )
    names = {span.context.span_id: span.name for span in finished}
    return {
        "spans": [
            [span.name, names.get(span.parent.span_id) if span.parent is not None else None]
            for span in finished
        ],
        "points": [
            [metric.name, _attrs(point.attributes), point.count]
            for resource in (data.resource_metrics if data is not None else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
            if getattr(point, "count", 0)
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capture", help="where to write the template (JSON)")
    parser.add_argument(
        "--made-in-place", help="a template: print what the in-place floor makes of it (JSON)"
    )
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)
    if args.made_in_place:
        print(json.dumps(made_in_place(args.base_url, args.made_in_place)))
        return
    if not args.capture:
        parser.error("--capture or --made-in-place")
    template = capture(args.base_url, args.capture)
    print(
        f"{len(template['spans'])} spans, "
        f"{sum(p['times'] for p in template['points'])} metric points per kickoff",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
