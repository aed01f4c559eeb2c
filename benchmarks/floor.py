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


def capture(base_url: str, out: str) -> dict[str, Any]:
    """Run two kickoffs of the standard workload with crew_otel; write the second's spans and
    metric points to ``out``."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk import metrics as sdk_metrics
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        InMemoryMetricReader,
        Sum,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import crew_otel
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
    meter_provider = sdk_metrics.MeterProvider(metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    crew_otel.instrument()

    def kickoff() -> None:
        research_crew(lambda: make_llm(base_url)).kickoff(inputs=dict(common.INPUTS))

    kickoff()
    reader.get_metrics_data()
    spans.clear()
    kickoff()
    finished = sorted(spans.get_finished_spans(), key=lambda s: s.start_time or 0)
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
    data = reader.get_metrics_data()
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
        self._points: list[tuple[Any, dict[str, Any], int, float]] = []
        instruments: dict[tuple[str, str], Any] = {}
        for point in template["points"]:
            key = (point["scope"], point["name"])
            instrument = instruments.get(key)
            if instrument is None:
                meter = meter_provider.get_meter(point["scope"])
                make = (
                    meter.create_histogram if point["kind"] == _HISTOGRAM else meter.create_counter
                )
                instrument = instruments[key] = make(point["name"], unit=point["unit"])
            record = instrument.record if point["kind"] == _HISTOGRAM else instrument.add
            self._points.append((record, point["attributes"], point["times"], point["value"]))

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


def load(path: str, tracer_provider: Any, meter_provider: Any) -> Replay:
    with open(path, encoding="utf-8") as handle:
        return Replay(json.load(handle), tracer_provider, meter_provider)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capture", required=True, help="where to write the template (JSON)")
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)
    template = capture(args.base_url, args.capture)
    print(
        f"{len(template['spans'])} spans, "
        f"{sum(p['times'] for p in template['points'])} metric points per kickoff",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
