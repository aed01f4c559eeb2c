"""Span export that survives a collector outage: bounded queue, counted drops, bounded shutdown.

:class:`CountingBatchSpanProcessor` is the SDK's ``BatchSpanProcessor`` (the batching, the
worker thread and the exporter are the SDK's) with two changes for services under load: a span
that arrives while the queue is full is dropped *counted* (``crew_otel.spans.dropped``) and
logged once instead of once per span, and ``shutdown`` takes a time limit, so a black-holed
endpoint cannot hold the process at exit.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.metrics import Counter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from crew_otel import internals

_logger = logging.getLogger("crew_otel")

DROPPED_SPANS = "crew_otel.spans.dropped"


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """``BatchSpanProcessor`` that counts queue-full drops and logs the first one."""

    def __init__(
        self, exporter: SpanExporter, dropped_counter: Counter | None = None, **kwargs: Any
    ) -> None:
        super().__init__(exporter, **kwargs)
        self.dropped = 0
        self._dropped_counter = dropped_counter
        self._lock = threading.Lock()
        self._queue = internals.SDK_BATCH_QUEUE.read(self)
        self._max_queue_size: int | None = internals.SDK_BATCH_QUEUE_LIMIT.read(self)

    def on_end(self, span: ReadableSpan) -> None:
        queue, limit = self._queue, self._max_queue_size
        if (
            queue is not None
            and limit is not None
            and len(queue) >= limit
            and span.context is not None
            and span.context.trace_flags.sampled
        ):
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if self._dropped_counter is not None:
                self._dropped_counter.add(1)
            if first:
                _logger.warning(
                    "crew_otel: the span export queue is full (%d spans; is the collector "
                    "reachable?): dropping spans until it drains; the count is in the %s metric",
                    limit,
                    DROPPED_SPANS,
                )
            return
        super().on_end(span)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush what can be flushed within ``timeout_millis`` and stop the worker."""
        batch = internals.SDK_BATCH_PROCESSOR.read(self)
        if timeout_millis is None or batch is None:
            super().shutdown()  # type: ignore[no-untyped-call]
        elif internals.SDK_BATCH_SHUTDOWN_ARGS.accepts("timeout_millis"):
            batch.shutdown(timeout_millis=timeout_millis)
        else:
            # Older SDKs wait for the worker without a limit: wait for it in a daemon thread.
            waiter = threading.Thread(
                target=super().shutdown, name="crew-otel-span-shutdown", daemon=True
            )
            waiter.start()
            waiter.join(timeout_millis / 1000)
