"""An OTLP/HTTP receiver on 127.0.0.1, the way a collector receives telemetry.

It decodes every export with opentelemetry-proto and keeps it; a test waits on what arrived
(:meth:`OtlpReceiver.wait_until`) instead of polling. A holding receiver keeps every export it
gets unanswered until :meth:`OtlpReceiver.release`: a collector too slow to answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

#: A bound against a broken test (an export that never arrives), not a measurement.
WAIT_S = 60.0
T = TypeVar("T")


class OtlpReceiver:
    """Keeps every decoded trace and metric export; counts the exports and spans."""

    def __init__(self, port: int = 0, hold: bool = False) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        #: exports that arrived (held ones included), exports answered, spans received
        self.arrived = 0
        self.requests = 0
        self.span_count = 0
        self._changed = threading.Condition()
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _receive(self, path: str, body: bytes) -> None:
        with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        self._released.wait(WAIT_S)
        message: Any
        if path.endswith("/v1/traces"):
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            spans = sum(len(s.spans) for rs in message.resource_spans for s in rs.scope_spans)
        else:
            message = ExportMetricsServiceRequest()
            message.ParseFromString(body)
            spans = 0
        with self._changed:
            if isinstance(message, ExportTraceServiceRequest):
                self.traces.append(message)
            else:
                self.metrics.append(message)
            self.requests += 1
            self.span_count += spans
            self._changed.notify_all()

    # --- what arrived ------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[ExportTraceServiceRequest], list[ExportMetricsServiceRequest]]:
        """The trace and metric exports received so far (copies)."""
        with self._changed:
            return list(self.traces), list(self.metrics)

    def spans(self) -> list[Any]:
        traces, _ = self.snapshot()
        return [
            span
            for request in traces
            for resource_spans in request.resource_spans
            for scope in resource_spans.scope_spans
            for span in scope.spans
        ]

    def last_metrics(self) -> dict[str, list[Any]]:
        """Data points by metric name, from the last metric export."""
        _, metrics = self.snapshot()
        assert metrics, "no metric export arrived"
        points: dict[str, list[Any]] = {}
        for resource_metrics in metrics[-1].resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    points.setdefault(metric.name, []).extend(data.data_points)
        return points

    # --- waiting on it -----------------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], T], what: str, timeout: float = WAIT_S) -> T:
        """Wait until ``predicate()`` (evaluated after each export) is truthy; returns it.
        ``AssertionError`` naming ``what`` after ``timeout`` s (a bound, not a measurement)."""
        result: list[T] = []

        def holds() -> bool:
            value = predicate()
            if value:
                result.append(value)
            return bool(value)

        with self._changed:
            assert self._changed.wait_for(holds, timeout), f"timed out waiting for {what}"
        return result[0]

    def wait_arrived(self) -> None:
        """Until an export arrived (a holding receiver is holding it now)."""
        self.wait_until(lambda: self.arrived > 0, "an export to arrive")

    def wait_spans(self) -> None:
        """Until an export's spans were received."""
        self.wait_until(lambda: self.span_count > 0, "an export's spans")

    @property
    def holding(self) -> bool:
        """Whether exports that arrived are still held unanswered."""
        return not self._released.is_set()

    def release(self) -> None:
        """Answer the held exports, and the later ones at once."""
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _handler_for(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            receiver._receive(self.path, body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

    return Handler


def string_attribute(item: Any, key: str) -> str | None:
    """The string value of attribute ``key`` of a decoded span or resource (None if absent)."""
    for attribute in item.attributes:
        if attribute.key == key:
            return str(attribute.value.string_value)
    return None
