"""Span export that survives a collector outage: bounded queue, counted drops, bounded shutdown.

:class:`CountingBatchSpanProcessor` is the SDK's ``BatchSpanProcessor`` (the batching, the
worker thread and the exporter are the SDK's) with two changes for services under load: a span
that arrives while the queue is full is dropped *counted* (``crew_otel.spans.dropped``) and
logged once, naming where the spans go (a collector that may be unreachable, a trace file that
cannot keep up), instead of once per span, and ``shutdown`` takes a time limit, so a
black-holed endpoint cannot hold the process at exit. ``crew-otel doctor`` run in the process
lists every live processor with its drop count (:func:`live_processors`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.metrics import Counter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from crew_otel import internals

_logger = logging.getLogger("crew_otel")

DROPPED_SPANS = "crew_otel.spans.dropped"


def redacted_url(url: str) -> str:
    """``url`` without credentials: no user or password, query or fragment."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(an endpoint that is not a valid URL)"
    if not parts.netloc:  # "host:4317" or "user:secret@host:4317" without a scheme
        return url.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclasses.dataclass(frozen=True)
class ExportDestination:
    """Where an exporter sends telemetry, as log lines and ``doctor`` say it (no credentials)."""

    #: "the trace file PATH", "the collector at URL", "the exporter CLASS".
    description: str
    #: What a full span queue most likely means for this destination.
    overflow_cause: str

    def __str__(self) -> str:
        return self.description

    @classmethod
    def trace_file(cls, path: object) -> ExportDestination:
        return cls(
            f"the trace file {path}",
            f"writing to the trace file {path} cannot keep up (a slow disk, or a burst of "
            "spans bigger than the queue, whose size OTEL_BSP_MAX_QUEUE_SIZE sets)",
        )

    @classmethod
    def collector(cls, endpoint: str) -> ExportDestination:
        url = redacted_url(endpoint)
        return cls(f"the collector at {url}", f"is the collector at {url} reachable?")

    @classmethod
    def of(cls, exporter: object, endpoint: str | None = None) -> ExportDestination:
        """The destination of ``exporter``; ``endpoint`` is where it sends over OTLP, if known."""
        from crew_otel.otlp_json import OTLPJsonFileExporter

        if isinstance(exporter, OTLPJsonFileExporter):
            return cls.trace_file(exporter.path)
        if endpoint:
            return cls.collector(endpoint)
        name = type(exporter).__name__
        return cls(f"the exporter {name}", f"the exporter {name} cannot keep up")


#: Every CountingBatchSpanProcessor not shut down yet, for ``crew-otel doctor``.
_live: weakref.WeakSet[CountingBatchSpanProcessor] = weakref.WeakSet()


def live_processors() -> list[CountingBatchSpanProcessor]:
    """The span processors ``configure()`` set up in this process and not shut down yet."""
    return list(_live)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """``BatchSpanProcessor`` that counts queue-full drops and logs the first one."""

    def __init__(
        self,
        exporter: SpanExporter,
        dropped_counter: Counter | None = None,
        destination: ExportDestination | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(exporter, **kwargs)
        self.dropped = 0
        #: Where the spans go (named in the queue-full warning and by ``crew-otel doctor``).
        self.destination = destination or ExportDestination.of(exporter)
        self._dropped_counter = dropped_counter
        self._lock = threading.Lock()
        self._queue = internals.SDK_BATCH_QUEUE.read(self)
        self._max_queue_size: int | None = internals.SDK_BATCH_QUEUE_LIMIT.read(self)
        _live.add(self)

    @property
    def max_queue_size(self) -> int | None:
        """How many finished spans wait for export before new ones are dropped."""
        return self._max_queue_size

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
                    "crew_otel: the span export queue is full (%d spans) and spans are dropped "
                    "until it drains (counted in the %s metric): %s",
                    limit,
                    DROPPED_SPANS,
                    self.destination.overflow_cause,
                )
            return
        super().on_end(span)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush what can be flushed within ``timeout_millis`` and stop the worker."""
        _live.discard(self)
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
