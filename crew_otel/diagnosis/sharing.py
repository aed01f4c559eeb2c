"""Shared-instance detection: one Crew/Agent/Task/tool/LLM object used by two requests at once.

This is the most common cause of intermittent 500s when a CrewAI service scales: CrewAI keeps
per-run state on these objects (the agent's executor, interpolated task text, usage counters),
so two requests running through the same object corrupt each other.

Bookkeeping holds no strong references: objects in use are keyed by ``id()`` only while a call
on them is running (the caller keeps the object alive meanwhile) and the entry is removed when
the last call ends; the warn-once set is a ``WeakSet``. Things that are not one object (a file
path, a database, a module global; see :mod:`crew_otel.diagnosis.shared_state`) are keyed the
same way by :meth:`SharedInstanceDetector.enter_key`. Memory does not grow with the number of
runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Hashable
from typing import Any

from opentelemetry.trace import Span

from crew_otel import attributes
from crew_otel.attributes import StrEnum
from crew_otel.diagnosis import state_words
from crew_otel.metrics import CrewOtelMetrics, reset_in_forked_children

_logger = logging.getLogger("crew_otel")


class Kind(StrEnum):
    """What an instrumented object or shared thing is: the kickoff kinds (crew, flow, agent),
    the objects a run goes through, and the shared state outside CrewAI objects (see
    :mod:`crew_otel.diagnosis.shared_state`). Values of ``crew_otel.shared_instance.kind``."""

    CREW = "crew"
    FLOW = "flow"
    AGENT = "agent"
    TASK = "task"
    TOOL = "tool"
    LLM = "llm"
    TASK_INPUTS = "task_inputs"
    GLOBAL = "global"
    FILE = "file"
    DATABASE = "database"
    RESOURCE = "resource"
    MEMORY = "memory"
    KNOWLEDGE = "knowledge"


# The kinds by their former names.
KIND_GLOBAL = Kind.GLOBAL
KIND_FILE = Kind.FILE
KIND_DATABASE = Kind.DATABASE
KIND_RESOURCE = Kind.RESOURCE

_ADVICE: dict[str, str] = {
    Kind.CREW: "build the Crew per request (or use kickoff_for_each, which copies it)",
    Kind.AGENT: "build Agents per request; one Agent runs one task at a time",
    Kind.TASK: "build Tasks per request; CrewAI writes run state onto the Task",
    Kind.TOOL: "build tools per request, or make the tool thread-safe and stateless",
    Kind.LLM: "build the LLM per request (its usage counters are shared otherwise)",
    Kind.TASK_INPUTS: "another request interpolated its inputs into this Task: build Tasks per "
    "request",
    Kind.MEMORY: "build the Memory (and its storage) per request, or give each request its own "
    "storage path; concurrent writers contend for the store's lock",
    Kind.KNOWLEDGE: "build knowledge sources and their storage per request, or query one store "
    "from one request at a time",
}

MAX_OTHER_IDS = 8
#: Things named by a key (paths, globals) warned about once each; beyond this many, again.
MAX_WARNED_KEYS = 4096


class Usage:
    """A release token: the object and request that entered, and whether it conflicted."""

    __slots__ = ("conflicted", "generation", "key", "request_id")

    def __init__(
        self, key: Hashable, request_id: str, conflicted: bool, generation: int = 0
    ) -> None:
        self.key = key
        self.request_id = request_id
        self.conflicted = conflicted
        self.generation = generation


class ExpectedWrite:
    """A write ``request_id``'s tool call may make to ``key`` (its code writes it; whether the
    write ran is known when the call ends). ``met``: the requests that held ``key`` and let
    go of it meanwhile (their runs ended while this call was running)."""

    __slots__ = ("key", "met", "request_id")

    def __init__(self, key: Hashable, request_id: str) -> None:
        self.key = key
        self.request_id = request_id
        self.met: set[str] = set()


class SharedInstanceDetector:
    """Tracks which requests are using which objects right now."""

    def __init__(self, metrics: CrewOtelMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._in_use: dict[Hashable, dict[str, int]] = {}
        #: key -> writes expected while tool calls run (see :meth:`expect_key`).
        self._expected: dict[Hashable, list[ExpectedWrite]] = {}
        self._warned: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._warned_lock = threading.Lock()
        self._warned_keys: set[tuple[str, Hashable]] = set()
        self._interpolated_by: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        #: Bumped in a forked child: uses that began in the parent are released as no-ops.
        self._generation = 0
        reset_in_forked_children(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent's requests are not running here."""
        self._lock = threading.Lock()
        self._warned_lock = threading.Lock()
        self._in_use = {}
        self._expected = {}
        self._interpolated_by = weakref.WeakKeyDictionary()
        self._generation += 1

    def enter(self, obj: object, kind: Kind, request_id: str, span: Span, label: str) -> Usage:
        """Note that ``request_id`` started using ``obj``; flag ``span`` if another request is."""
        usage, others = self._enter(id(obj), request_id)
        if others:
            self.report(obj, kind, request_id, others, span, label)
        return usage

    def enter_key(
        self,
        key: Hashable,
        kind: str,
        request_id: str,
        span: Span,
        label: str,
        class_name: str,
        advice: str | None = None,
        met: set[str] | None = None,
    ) -> Usage:
        """:meth:`enter` for a thing that is not one object: a file path, a database, a global
        (``key`` identifies it; ``label`` names it, ``class_name`` says what it is; ``advice``
        words what to change when the shape's default does not fit; ``met``: requests that
        held it earlier in the same tool call, see :meth:`expect_key`)."""
        usage, others = self._enter(key, request_id)
        if met:
            others = sorted(set(others) | (met - {request_id}))
            usage.conflicted = bool(others)
        if others:
            self.report_key(key, kind, request_id, others, span, label, class_name, advice)
        return usage

    def hold_key(self, key: Hashable, request_id: str) -> Usage:
        """Note that ``request_id`` uses ``key`` without reporting anything: a thing that is
        shared only when requests contend for it (a SQLite database), see :meth:`report_key`."""
        return self._enter(key, request_id)[0]

    def expect_key(self, key: Hashable, request_id: str) -> ExpectedWrite:
        """A tool call of ``request_id`` may write ``key`` (known when it ends). Until
        :meth:`settle` every request that lets go of ``key`` is remembered as met: the write,
        once confirmed, collides with it although its run is over by then."""
        expected = ExpectedWrite(key, request_id)
        with self._lock:
            self._expected.setdefault(key, []).append(expected)
        return expected

    def settle(self, expected: ExpectedWrite) -> set[str]:
        """The call ended: stop watching for ``expected``; the requests it met."""
        with self._lock:
            waiting = self._expected.get(expected.key)
            if waiting is not None:
                with contextlib.suppress(ValueError):  # registered before a fork
                    waiting.remove(expected)
                if not waiting:
                    del self._expected[expected.key]
        return expected.met

    def users_of_key(self, key: Hashable) -> list[str]:
        """Request IDs holding ``key`` right now."""
        with self._lock:
            return list(self._in_use.get(key, ()))

    def report_key(
        self,
        key: Hashable,
        kind: str,
        request_id: str,
        others: list[str],
        span: Span,
        label: str,
        class_name: str,
        advice: str | None = None,
    ) -> None:
        """Event, flag and counter on ``span`` for ``key``, and a warning once per thing, in
        the words of :mod:`crew_otel.diagnosis.state_words` (``advice``: what to change, when
        the shape's default does not fit)."""
        self._report(kind, request_id, others, span, label, class_name)
        if self._first_key_warning(kind, key):
            kind = str(kind)
            self._warn_text(
                state_words.describe_state(kind, class_name, label),
                request_id,
                others,
                advice or state_words.warning_advice(kind, class_name, label),
            )

    def _enter(self, key: Hashable, request_id: str) -> tuple[Usage, list[str]]:
        with self._lock:
            users = self._in_use.get(key)
            if users is None:
                self._in_use[key] = {request_id: 1}
                others: list[str] = []
            else:
                others = [rid for rid in users if rid != request_id]
                users[request_id] = users.get(request_id, 0) + 1
        return Usage(key, request_id, bool(others), self._generation), others

    def exit(self, usage: Usage) -> None:
        """Release what :meth:`enter` recorded (exactly once per enter)."""
        if usage.generation != self._generation:
            return  # entered in the parent process before a fork
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
                for expected in self._expected.get(usage.key, ()):
                    if expected.request_id != usage.request_id:
                        expected.met.add(usage.request_id)

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
            self.report(task, Kind.TASK_INPUTS, request_id, [owner], span, label)

    # --- reporting -------------------------------------------------------------------------
    def report(
        self,
        obj: object,
        kind: Kind,
        request_id: str,
        others: list[str],
        span: Span,
        label: str,
    ) -> None:
        """Event + attribute on ``span``, a counter increment, and a warning once per object."""
        class_name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        self._report(kind, request_id, others, span, label, class_name)
        if self._first_warning(obj, kind):
            self._warn(kind, type(obj).__name__, label, request_id, others)

    def _report(
        self,
        kind: str,
        request_id: str,
        others: list[str],
        span: Span,
        label: str,
        class_name: str,
    ) -> None:
        kind = str(kind)  # a Kind's plain value
        if span.is_recording():
            span.set_attribute(attributes.SHARED_INSTANCE, True)
            span.add_event(
                attributes.EVENT_SHARED_INSTANCE,
                {
                    attributes.SHARED_INSTANCE_KIND: kind,
                    attributes.SHARED_INSTANCE_CLASS: class_name,
                    attributes.SHARED_INSTANCE_NAME: label,
                    attributes.SHARED_INSTANCE_OTHER_REQUEST_IDS: tuple(
                        sorted(others)[:MAX_OTHER_IDS]
                    ),
                },
            )
        self._metrics.shared_conflict(kind)

    @staticmethod
    def _warn(kind: str, what: str, label: str, request_id: str, others: list[str]) -> None:
        SharedInstanceDetector._warn_text(
            f"{kind.replace('_', ' ')} {what} {label!r}",
            request_id,
            others,
            _ADVICE.get(kind, "build it per request"),
        )

    @staticmethod
    def _warn_text(thing: str, request_id: str, others: list[str], advice: str) -> None:
        """``thing`` (its noun and name, in words) is used by several requests at once."""
        _logger.warning(
            "crew_otel: %s is used by request %s while request(s) %s use it: %s.",
            thing,
            request_id,
            ", ".join(sorted(others)[:MAX_OTHER_IDS]),
            advice,
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

    def _first_key_warning(self, kind: str, key: Hashable) -> bool:
        """Once per thing named by a key; the memory of what was warned about is bounded."""
        with self._warned_lock:
            if (kind, key) in self._warned_keys:
                return False
            if len(self._warned_keys) >= MAX_WARNED_KEYS:
                self._warned_keys.clear()
            self._warned_keys.add((kind, key))
            return True
