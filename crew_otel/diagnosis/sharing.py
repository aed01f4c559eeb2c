"""Shared-instance detection: one Crew/Agent/Task/tool/LLM object used by two requests at once.

This is the most common cause of intermittent 500s when a CrewAI service scales: CrewAI keeps
per-run state on these objects (the agent's executor, interpolated task text, usage counters),
so two requests running through the same object corrupt each other.

Bookkeeping holds no strong references: objects in use are keyed by ``id()`` only while a call
on them is running (the caller keeps the object alive meanwhile) and the entry is removed when
the last call ends; the warn-once set is a ``WeakSet``. Memory does not grow with the number of
runs.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from opentelemetry.trace import Span

from crew_otel import attributes as a
from crew_otel.metrics import CrewOtelMetrics

_logger = logging.getLogger("crew_otel")

KIND_CREW = "crew"
KIND_AGENT = "agent"
KIND_TASK = "task"
KIND_TOOL = "tool"
KIND_LLM = "llm"
KIND_TASK_INPUTS = "task_inputs"

_ADVICE = {
    KIND_CREW: "build the Crew per request (or use kickoff_for_each, which copies it)",
    KIND_AGENT: "build Agents per request; one Agent runs one task at a time",
    KIND_TASK: "build Tasks per request; CrewAI writes run state onto the Task",
    KIND_TOOL: "build tools per request, or make the tool thread-safe and stateless",
    KIND_LLM: "build the LLM per request (its usage counters are shared otherwise)",
    KIND_TASK_INPUTS: "another request interpolated its inputs into this Task: build Tasks per "
    "request",
}

MAX_OTHER_IDS = 8


class Usage:
    """A release token: the object and request that entered, and whether it conflicted."""

    __slots__ = ("conflicted", "key", "request_id")

    def __init__(self, key: int, request_id: str, conflicted: bool) -> None:
        self.key = key
        self.request_id = request_id
        self.conflicted = conflicted


class SharedInstanceDetector:
    """Tracks which requests are using which objects right now."""

    def __init__(self, metrics: CrewOtelMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._in_use: dict[int, dict[str, int]] = {}
        self._warned: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._warned_lock = threading.Lock()
        self._interpolated_by: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def enter(self, obj: object, kind: str, request_id: str, span: Span, label: str) -> Usage:
        """Note that ``request_id`` started using ``obj``; flag ``span`` if another request is."""
        key = id(obj)
        with self._lock:
            users = self._in_use.get(key)
            if users is None:
                self._in_use[key] = {request_id: 1}
                others: list[str] = []
            else:
                others = [rid for rid in users if rid != request_id]
                users[request_id] = users.get(request_id, 0) + 1
        if others:
            self.report(obj, kind, request_id, others, span, label)
        return Usage(key, request_id, bool(others))

    def exit(self, usage: Usage) -> None:
        """Release what :meth:`enter` recorded (exactly once per enter)."""
        with self._lock:
            users = self._in_use.get(usage.key)
            if users is None:
                return
            count = users.get(usage.request_id, 0) - 1
            if count > 0:
                users[usage.request_id] = count
            else:
                users.pop(usage.request_id, None)
                if not users:
                    del self._in_use[usage.key]

    def users_of(self, obj: object) -> list[str]:
        """Request IDs using ``obj`` right now."""
        with self._lock:
            return list(self._in_use.get(id(obj), ()))

    @property
    def tracked_objects(self) -> int:
        """Number of objects in use right now (for tests of the no-growth property)."""
        return len(self._in_use)

    # --- silent cross-talk: inputs interpolated into a Task by another request ------------
    def note_interpolation(self, tasks: object, request_id: str) -> None:
        """Remember that ``request_id`` interpolated its inputs into these Tasks."""
        if not isinstance(tasks, (list, tuple)):
            return
        with self._lock:
            for task in tasks:
                try:
                    self._interpolated_by[task] = request_id
                except TypeError:  # not weak-referenceable
                    continue

    def check_task_inputs(self, task: object, request_id: str, span: Span, label: str) -> None:
        """Flag ``span`` if ``task`` runs with inputs another request interpolated into it."""
        with self._lock:
            try:
                owner = self._interpolated_by.get(task)
            except TypeError:
                return
        if owner is not None and owner != request_id:
            self.report(task, KIND_TASK_INPUTS, request_id, [owner], span, label)

    # --- reporting -------------------------------------------------------------------------
    def report(
        self,
        obj: object,
        kind: str,
        request_id: str,
        others: list[str],
        span: Span,
        label: str,
    ) -> None:
        """Event + attribute on ``span``, a counter increment, and a warning once per object."""
        other_ids = tuple(sorted(others)[:MAX_OTHER_IDS])
        class_name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if span.is_recording():
            span.set_attribute(a.SHARED_INSTANCE, True)
            span.add_event(
                a.EVENT_SHARED_INSTANCE,
                {
                    a.SHARED_INSTANCE_KIND: kind,
                    a.SHARED_INSTANCE_CLASS: class_name,
                    a.SHARED_INSTANCE_NAME: label,
                    a.SHARED_INSTANCE_OTHER_REQUEST_IDS: other_ids,
                },
            )
        self._metrics.shared_conflict(kind)
        if self._first_warning(obj, kind):
            _logger.warning(
                "crew_otel: %s %s %r is used by request %s while request(s) %s use it: %s.",
                kind.replace("_", " "),
                type(obj).__name__,
                label,
                request_id,
                ", ".join(other_ids),
                _ADVICE.get(kind, "build it per request"),
            )

    def _first_warning(self, obj: object, kind: str) -> bool:
        with self._warned_lock:
            try:
                kinds = self._warned.get(obj)
                if kinds is None:
                    self._warned[obj] = {kind}
                    return True
            except TypeError:  # not weak-referenceable: warn every time rather than never
                return True
            if kind in kinds:
                return False
            kinds.add(kind)
            return True
