"""Span-tree helpers for assertions by structure (names, parents, attributes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

REQUEST_ID = "crew_otel.request.id"


class Spans:
    """Finished spans with parent/child navigation."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.all = list(spans)
        self.by_id = {s.context.span_id: s for s in self.all}
        self.children: dict[int, list[ReadableSpan]] = defaultdict(list)
        for span in self.all:
            if span.parent is not None:
                self.children[span.parent.span_id].append(span)
        for kids in self.children.values():
            kids.sort(key=lambda s: s.start_time or 0)

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.all if s.name == prefix or s.name.startswith(prefix + " ")]

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent else None

    def ancestors(self, span: ReadableSpan) -> list[ReadableSpan]:
        chain = []
        current = self.parent(span)
        while current is not None:
            chain.append(current)
            current = self.parent(current)
        return chain

    def kids(self, span: ReadableSpan, prefix: str | None = None) -> list[ReadableSpan]:
        kids = self.children.get(span.context.span_id, [])
        if prefix is None:
            return kids
        return [k for k in kids if k.name == prefix or k.name.startswith(prefix + " ")]

    def descendants(self, span: ReadableSpan) -> list[ReadableSpan]:
        found = []
        stack = list(self.kids(span))
        while stack:
            current = stack.pop()
            found.append(current)
            stack.extend(self.kids(current))
        return found

    def roots(self) -> list[ReadableSpan]:
        return [s for s in self.all if s.parent is None or s.parent.span_id not in self.by_id]

    def traces(self) -> dict[int, list[ReadableSpan]]:
        grouped: dict[int, list[ReadableSpan]] = defaultdict(list)
        for span in self.all:
            grouped[span.context.trace_id].append(span)
        return dict(grouped)

    def orphans(self) -> list[ReadableSpan]:
        """Spans whose parent is not among the finished spans (lost or never ended)."""
        return [s for s in self.all if s.parent is not None and s.parent.span_id not in self.by_id]


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def names(spans: Iterable[ReadableSpan]) -> list[str]:
    return [s.name for s in spans]


def traces_by_marker(spans: Spans, provider: Any, markers: Iterable[str]) -> dict[str, Spans]:
    """Each marker's trace: the one whose provider requests carried the marker (exactly one)."""
    traces = spans.traces()
    by_marker = {}
    for marker in markers:
        trace_ids = {
            int(r.traceparent.split("-")[1], 16)
            for r in provider.requests
            if marker in r.markers and r.traceparent
        }
        assert len(trace_ids) == 1, (marker, trace_ids)
        by_marker[marker] = Spans(traces[trace_ids.pop()])
    return by_marker


def whole_run(run: Spans, root_name: str) -> ReadableSpan:
    """One root named ``root_name``, its request ID on every span, no orphans: the root."""
    (root,) = run.roots()
    assert root.name == root_name
    request_id = attr(root, REQUEST_ID)
    assert request_id
    assert {attr(s, REQUEST_ID) for s in run.all} == {request_id}
    assert run.orphans() == []
    return root
