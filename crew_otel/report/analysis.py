"""From spans to a diagnosis: per service, what failed, where it began, and why.

Works on :class:`~crew_otel.otlp_json.SpanRecord`s, so ``crew-otel demo`` and
``crew-otel report FILE`` compute the same figures from the same data. A *request* is a trace:
its root is the web framework's SERVER span when there is one (the HTTP status the client saw),
else the outermost kickoff. A *process* is the resource's ``service.instance.id`` (else
``process.pid``): requests in flight are counted per process when the spans name it, and an
object (Agent, Crew, module global, ...) is one thing per process. The spans are read as a
stream (:class:`Analysis`): a trace's spans are kept only until the trace is complete.
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from crew_otel import attributes as a
from crew_otel.diagnosis import state_words
from crew_otel.otlp_json import SpanRecord

LAYERS = (a.RETRY_LAYER_HTTP, a.RETRY_LAYER_RATE_LIMIT, a.RETRY_LAYER_AGENT)

#: Shared state outside CrewAI objects: one thing is its kind and name (a global, a path, the
#: attribute holding a resource), whatever class the event saw.
STATE_KINDS = ("global", "file", "database", "resource")
#: How many shared things the conclusion names before "and N more".
MAX_NAMED_STATE = 3
#: Shared things that are the same thing in every process (a path), not one per process.
MACHINE_WIDE_KINDS = ("file", "database")
#: Async kickoffs waiting at least this long for an executor thread are worth a sentence.
NOTABLE_QUEUE_WAIT_S = 0.1
#: How many recovered-origin kinds the conclusion names before "and N more".
MAX_NAMED_ORIGINS = 3


#: How the report names a shared object of each ``crew_otel.shared_instance.kind`` when only
#: the kind is known (``crew_otel.failure.shared_instance.kind`` carries no class).
_OBJECT_KIND_WORDS = {
    "crew": "Crew",
    "agent": "Agent",
    "task": "Task",
    "tool": "tool",
    "llm": "LLM",
    "task_inputs": "Task inputs",
    "flow": "Flow",
}
#: A ``crew_otel.failure.cause`` longer than this (a hostile file) is cut.
MAX_CAUSE_CHARS = 64


def describe(kind: str, class_name: str, name: str) -> str:
    """What a shared thing is, in words: ``module global 'app.CACHE'``, ``global int
    'app.COUNTER'``, ``environment variable 'X'``, ``Agent 'Analyst'`` (shared state in the
    words of :mod:`crew_otel.diagnosis.state_words`)."""
    if kind in STATE_KINDS:
        return state_words.describe_state(kind, class_name, name)
    short = class_name.rsplit(".", 1)[-1]
    return f"{short or kind} {name!r}" if name else (short or kind)


def _state_opening(kind: str, label: str) -> str:
    """``a module global 'x'``, ``an environment variable 'X'``, ``a shared
    sqlite3.Connection at app.db.POOL`` (a resource is named by where it is held)."""
    if kind == "resource":
        return f"a shared {label}"
    return f"{state_words.article(label)} {label}"


@dataclasses.dataclass
class Conflict:
    """One thing (object, global, file, database, resource) used by several requests at once."""

    kind: str
    class_name: str
    name: str
    request_ids: set[str]
    events: int = 0
    at_once: int = 0
    """The most requests seen using it at the same time."""
    process: str = ""
    """The process holding it (objects are per process; a file or database is not)."""

    @property
    def label(self) -> str:
        return describe(self.kind, self.class_name, self.name)

    @property
    def is_state(self) -> bool:
        """Shared state outside CrewAI objects (kinds global, file, database, resource)."""
        return self.kind in STATE_KINDS

    def sentence(self) -> str:
        """``a module global 'x' written by the tool code of 3 requests at once; advice``."""
        verb = state_words.report_verb(self.kind, self.class_name, self.name)
        text = f"{_state_opening(self.kind, self.label)} {verb} {self.at_once} requests at once"
        advice = state_words.report_advice(self.kind, self.class_name, self.name)
        return f"{text}; {advice}" if advice else text


@dataclasses.dataclass
class Request:
    """One request (trace) of a service."""

    trace_id: str
    start: int
    end: int
    status_code: int | None
    failed: bool
    request_id: str | None
    error_type: str | None
    cause: str | None = None
    """Where its failure began, in words (from the error origins: every file has them)."""
    classified: bool = False
    """A failed run of it carries ``crew_otel.failure.cause`` (then the conclusion says why
    from the attribute, and :attr:`cause` is where it began only)."""
    concurrency: int = 1
    """The most requests in flight at once during this one (itself included), counted in its
    process when the spans name the process, else in its service."""
    process: str = ""


@dataclasses.dataclass
class CauseCount:
    """Failed runs with one ``crew_otel.failure.cause``, and the shared things named on them
    (``crew_otel.failure.shared_instance.*``), most runs first."""

    cause: str
    runs: int
    shared: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """(the shared thing in words, runs it failed)."""

    def phrase(self) -> str:
        """``shared_instance 7 (Agent 'Support Analyst')``."""
        text = f"{self.cause} {self.runs}"
        if len(self.shared) == 1:
            return f"{text} ({self.shared[0][0]})"
        if self.shared:
            return f"{text} ({', '.join(f'{what} {n}' for what, n in self.shared)})"
        return text


def causes_clause(causes: list[CauseCount]) -> str:
    """``shared_instance 7 (Agent 'Support Analyst'), provider_error 2``."""
    return ", ".join(c.phrase() for c in causes)


@dataclasses.dataclass
class OriginCount:
    span: str
    error_type: str
    recovered: bool
    count: int


#: Where foreign data entered a run, in the order the report names them.
CROSSTALK_SOURCES = (a.CROSSTALK_TOOL_RESULT, a.CROSSTALK_MODEL_INPUT, a.CROSSTALK_OUTPUT)


@dataclasses.dataclass
class CrosstalkCause:
    """A shared thing both requests of a cross-talk pair touched (a ``crew_otel.shared_instance``
    event of one naming the other), with how many answers it explains."""

    kind: str
    name: str
    what: str
    answers: int


@dataclasses.dataclass
class Crosstalk:
    """Answers carrying another request's data (``crew_otel.crosstalk``).

    A run is an outermost kickoff span (a crew a flow kicks off is part of the flow's run); an
    *answer* is a run that ended without error. A run is carrying when its kickoff span has
    ``crew_otel.crosstalk=true`` or a ``crew_otel.crosstalk`` event sits on it or below it.
    Failed runs are no answers (they answered nobody): those carrying foreign data are counted
    in :attr:`failed_runs` only.
    """

    answers: int = 0
    carrying: int = 0
    request_ids: list[str] = dataclasses.field(default_factory=list)
    """The request IDs of the carrying answers (those that have one), sorted."""
    by_source: dict[str, int] = dataclasses.field(default_factory=dict)
    """Carrying answers per ``crew_otel.crosstalk.source`` (an answer counts once per source)."""
    causes: list[CrosstalkCause] = dataclasses.field(default_factory=list)
    """Shared things both requests of a pair touched, most answers first."""
    no_cause: int = 0
    """Carrying answers for which no shared thing was named (state crew_otel cannot see)."""
    failed_runs: int = 0

    def clause(self) -> str:
        """``3 of 5 answers carried another request's data (both requests touched ...)``, or
        nothing when no answer did."""
        if not self.carrying:
            return ""
        text = f"{self.carrying} of {self.answers} answers carried another request's data"
        why = self.why()
        return f"{text} ({why})" if why else text

    def why(self) -> str:
        """The shared things named as the cause, and how many answers have none."""
        parts = []
        if self.causes:
            things = ", ".join(f"{c.what} in {c.answers}" for c in self.causes)
            parts.append(f"both requests touched {things}")
        if self.causes and self.no_cause:
            parts.append(f"no shared thing named in {self.no_cause}")
        return "; ".join(parts)


@dataclasses.dataclass
class ServiceReport:
    """Everything the report says about one service."""

    service: str
    requests: list[Request]
    failures_by_status: dict[str, int]
    origins: list[OriginCount]
    retries: dict[str, int]
    model_calls: int
    http_attempts: int
    conflicts: list[Conflict]
    by_concurrency: dict[int, tuple[int, int]]
    causes: Counter[str]
    conclusion: str
    concurrency_scope: str = "service"
    """What :attr:`Request.concurrency` counts in: ``process`` or ``service``."""
    processes: list[str] = dataclasses.field(default_factory=list)
    diagnoses: list[str] = dataclasses.field(default_factory=list)
    """Findings the spans carry besides failures and sharing, one sentence each."""
    crosstalk: Crosstalk = dataclasses.field(default_factory=Crosstalk)
    failure_causes: list[CauseCount] = dataclasses.field(default_factory=list)
    """Failed runs (outermost kickoffs whose exception reached the caller) by
    ``crew_otel.failure.cause``, most first; empty for files written before it existed."""

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if r.failed)

    @property
    def amplification(self) -> float:
        """HTTP attempts sent to the provider per model call CrewAI made."""
        return self.http_attempts / self.model_calls if self.model_calls else 0.0


#: The attributes the analysis reads: an open trace keeps only these of each span.
_KEPT_ATTRIBUTES = frozenset(
    {
        a.HTTP_STATUS_CODE,
        a.HTTP_STATUS_CODE_OLD,
        a.REQUEST_ID,
        a.ERROR_TYPE,
        a.ERROR_ORIGIN,
        a.ERROR_RECOVERED,
        a.SHARED_INSTANCE,
        a.CROSSTALK,
        a.FAILURE_CAUSE,
        a.FAILURE_SHARED_KIND,
        a.FAILURE_SHARED_NAME,
        a.HTTP_RESEND_COUNT,
        "http.request.method",
        "http.method",
    }
)
#: Span kinds whose parent is, by definition, in another process (the caller).
_REMOTE_PARENT_KINDS = frozenset({"SERVER", "CONSUMER"})
#: A trace whose spans name no parent still unread is finished once the file's clock (the
#: newest span end read so far) is this far past its newest span: longer than a batch span
#: processor holds a finished span (5 s by default, 30 s export timeout) in any process.
SETTLE_S = 120.0
#: A trace still waiting for a parent (a root never written: the writer crashed) is finished
#: anyway once the file's clock is this far past its newest span.
ABANDON_S = 1800.0
#: Open traces are checked for completion after this many spans, or when the file's clock
#: moved on by :data:`SWEEP_STEP_S`, whichever comes first.
SWEEP_EVERY = 1024
SWEEP_STEP_S = 10.0


@dataclasses.dataclass(slots=True)
class _Span:
    """What the analysis keeps of a span while its trace is open (a few fields, not the
    span's attributes and events)."""

    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: int
    end: int
    status: str
    process: str
    attributes: dict[str, Any]
    shared: tuple[dict[str, object], ...]
    crosstalk: tuple[tuple[str, tuple[str, ...]], ...]
    """``crew_otel.crosstalk`` events: (source, other request IDs)."""
    rate_limit_retries: int
    seq: int


def _compact(span: SpanRecord, seq: int) -> _Span:
    return _Span(
        span_id=span.span_id,
        parent_id=span.parent_id,
        name=span.name,
        kind=span.kind,
        start=span.start,
        end=span.end,
        status=span.status,
        process=span.process,
        attributes={k: v for k, v in span.attributes.items() if k in _KEPT_ATTRIBUTES},
        shared=tuple(attrs for name, _, attrs in span.events if name == a.EVENT_SHARED_INSTANCE),
        crosstalk=tuple(
            (
                str(attrs.get(a.CROSSTALK_SOURCE, "")),
                tuple(_ids(attrs, a.CROSSTALK_OTHER_REQUEST_IDS)),
            )
            for name, _, attrs in span.events
            if name == a.EVENT_CROSSTALK
        ),
        rate_limit_retries=sum(
            1
            for name, _, attrs in span.events
            if name == a.EVENT_RETRY and attrs.get(a.RETRY_LAYER) == a.RETRY_LAYER_RATE_LIMIT
        ),
        seq=seq,
    )


def _status_code(span: _Span) -> int | None:
    for key in (a.HTTP_STATUS_CODE, a.HTTP_STATUS_CODE_OLD):
        value = span.attributes.get(key)
        if isinstance(value, int):
            return value
    return None


#: Model-call spans: crew_otel's ``chat {model}``, or ``crewai.llm.call {model}`` when a provider
#: instrumentation makes the inference span (which then sits under it, also named ``chat ...``
#: by openai-v2).
_MODEL_CALL_PREFIXES = (f"{a.SPAN_CHAT} ", f"{a.SPAN_LLM_CALL} ")


def _is_model_call(span: _Span, by_id: dict[str, _Span]) -> bool:
    """A model call, counted once (not a provider's inference span under crew_otel's)."""
    if not span.name.startswith(_MODEL_CALL_PREFIXES):
        return False
    parent = by_id.get(span.parent_id or "")
    return parent is None or not parent.name.startswith(_MODEL_CALL_PREFIXES)


def _is_http_attempt(span: _Span, by_id: dict[str, _Span]) -> bool:
    """An HTTP attempt of a model call: a CLIENT span under one (a provider instrumentation's
    inference span may sit in between)."""
    if span.kind != "CLIENT" or not (
        "http.request.method" in span.attributes or "http.method" in span.attributes
    ):
        return False
    parent = by_id.get(span.parent_id or "")
    for _ in range(2):
        if parent is None:
            return False
        if parent.name.startswith(_MODEL_CALL_PREFIXES):
            return True
        parent = by_id.get(parent.parent_id or "")
    return False


def _other_ids(event: dict[str, object]) -> list[str]:
    return _ids(event, a.SHARED_INSTANCE_OTHER_REQUEST_IDS)


def _ids(event: dict[str, object], key: str) -> list[str]:
    """A string-array attribute of an event (a lone string is one)."""
    others = event.get(key) or ()
    if isinstance(others, str):
        return [others]
    return [str(o) for o in others] if isinstance(others, (list, tuple)) else []


def analyse(spans: Iterable[SpanRecord]) -> list[ServiceReport]:
    """One :class:`ServiceReport` per ``service.name``, in name order (``spans`` is consumed
    once, as a stream: see :class:`Analysis`)."""
    analysis = Analysis()
    for span in spans:
        analysis.add(span)
    return analysis.reports()


@dataclasses.dataclass(slots=True)
class _Trace:
    """The spans of one trace of one service read so far."""

    seq: int
    spans: list[_Span] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    awaited: set[str] = dataclasses.field(default_factory=set)
    """Parents named by its spans and not read yet (remote parents of SERVER spans aside)."""
    newest: int = 0

    def add(self, span: _Span) -> None:
        self.spans.append(span)
        self.seen.add(span.span_id)
        self.awaited.discard(span.span_id)
        if (
            span.parent_id
            and span.kind not in _REMOTE_PARENT_KINDS
            and span.parent_id not in self.seen
        ):
            self.awaited.add(span.parent_id)
        self.newest = max(self.newest, span.end, span.start)


@dataclasses.dataclass
class _Findings:
    """What the diagnoses count, gathered span by span."""

    requests: dict[str, set[str]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    longest_wait: float = 0.0
    deepest_queue: int = 0
    locked: set[str] = dataclasses.field(default_factory=set)

    def add(self, trace_id: str, span: SpanRecord) -> None:
        attrs = span.attributes
        for key in (
            a.SYNC_IN_EVENT_LOOP,
            a.CONTEXT_SUMMARIZED,
            a.CONTEXT_NO_FINAL_OUTPUT,
            a.CONTEXT_OVERFLOW,
            a.RETRY_BUDGET_EXHAUSTED,
        ):
            if attrs.get(key) is True:
                self.requests[key].add(trace_id)
        wait = attrs.get(a.QUEUE_WAIT)
        if isinstance(wait, (int, float)) and wait >= NOTABLE_QUEUE_WAIT_S:
            self.requests[a.QUEUE_WAIT].add(trace_id)
            self.longest_wait = max(self.longest_wait, float(wait))
        depth = attrs.get(a.EXECUTOR_QUEUE_DEPTH)
        if isinstance(depth, int):
            self.deepest_queue = max(self.deepest_queue, depth)
        database = attrs.get(a.DATABASE_LOCKED)
        if isinstance(database, str):
            self.requests[a.DATABASE_LOCKED].add(trace_id)
            self.locked.add(database)
        if any(name == a.EVENT_CALLER_CANCELLED for name, _, _ in span.events):
            self.requests[a.EVENT_CALLER_CANCELLED].add(trace_id)


#: What makes shared things one: (process, kind, class for objects, name).
_ThingKey = tuple[str, str, str, str]


@dataclasses.dataclass(slots=True)
class _CarryingRun:
    """An answer that carried another request's data: what the report keeps of it."""

    request_id: str | None
    sources: set[str]
    others: set[str]


def _pair(one: str, other: str) -> tuple[str, str]:
    return (one, other) if one <= other else (other, one)


def _outermost_kickoff(span: _Span, by_id: dict[str, _Span]) -> _Span | None:
    """The run ``span`` belongs to: the outermost kickoff span above it (or itself)."""
    found = None
    current: _Span | None = span
    for _ in range(len(by_id) + 1):  # a parent cycle in a hostile file ends here
        if current is None:
            break
        if current.name.startswith(a.SPAN_WORKFLOW):
            found = current
        current = by_id.get(current.parent_id or "")
    return found


class _Service:
    """One service's figures, built as its spans stream in and its traces finish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conflicts: dict[_ThingKey, Conflict] = {}
        #: Two requests (sorted) -> the shared things an event of one named the other at.
        self.shared_pairs: dict[tuple[str, str], set[_ThingKey]] = {}
        #: Runs that ended without error, those of them that carried another request's
        #: data, and failed runs that did (per-run facts: kept after their trace is done).
        self.answers = 0
        self.carrying: list[_CarryingRun] = []
        self.failed_carrying = 0
        #: Failed runs by crew_otel.failure.cause, and by (cause, shared thing in words).
        self.failure_causes: Counter[str] = Counter()
        self.failure_shared: Counter[tuple[str, str]] = Counter()
        self.findings = _Findings()
        self.origins: Counter[tuple[str, str, bool]] = Counter()
        self.origin_seq: dict[tuple[str, str, bool], int] = {}
        self.retries = dict.fromkeys(LAYERS, 0)
        self.model_calls = 0
        self.http_attempts = 0
        self.requests: list[tuple[int, Request]] = []
        self.open: dict[str, _Trace] = {}
        #: Finished traces: whether each made a request (a late part may make it otherwise).
        self.finished: dict[str, bool] = {}

    def add(self, span: SpanRecord, seq: int) -> _Trace:
        """Count what needs the span alone; keep the rest with its trace."""
        self._conflicts(span)
        self.findings.add(span.trace_id, span)
        attempt = span.attributes.get(a.ATTEMPT)
        if isinstance(attempt, int) and attempt > 1:
            self.retries[a.RETRY_LAYER_AGENT] += 1
        trace = self.open.get(span.trace_id)
        if trace is None:
            trace = self.open[span.trace_id] = _Trace(seq=seq)
        trace.add(_compact(span, seq))
        return trace

    def _conflicts(self, span: SpanRecord) -> None:
        for name, _, event in span.events:
            if name != a.EVENT_SHARED_INSTANCE:
                continue
            kind = str(event.get(a.SHARED_INSTANCE_KIND, ""))
            class_name = str(event.get(a.SHARED_INSTANCE_CLASS, ""))
            thing = str(event.get(a.SHARED_INSTANCE_NAME, ""))
            # an object (or a global) lives in one process: two workers' Agents are two things
            process = "" if kind in MACHINE_WIDE_KINDS else span.process
            key = (process, kind, "" if kind in STATE_KINDS else class_name, thing)
            conflict = self.conflicts.setdefault(
                key, Conflict(kind, class_name, thing, request_ids=set(), process=process)
            )
            conflict.events += 1
            own = span.attributes.get(a.REQUEST_ID)
            if isinstance(own, str):
                conflict.request_ids.add(own)
            others = _other_ids(event)
            conflict.request_ids.update(o for o in others if o != "unknown")
            conflict.at_once = max(conflict.at_once, 1 + len(others))
            if isinstance(own, str):
                for other in others:
                    if other not in ("unknown", own):
                        pair = _pair(sys.intern(own), sys.intern(other))
                        self.shared_pairs.setdefault(pair, set()).add(key)

    def sweep(self, clock: int, settle_ns: int, abandon_ns: int) -> None:
        """Finish the traces that are complete: every parent read and ``settle_ns`` of file
        time since their newest span; or ``abandon_ns`` since it whatever is missing."""
        done = [
            trace_id
            for trace_id, trace in self.open.items()
            if clock - trace.newest >= (abandon_ns if trace.awaited else settle_ns)
        ]
        for trace_id in done:
            self.finish(trace_id)

    def finish(self, trace_id: str) -> None:
        trace = self.open.pop(trace_id)
        by_id = {s.span_id: s for s in trace.spans}
        for span in trace.spans:
            if span.attributes.get(a.ERROR_ORIGIN):
                label = "HTTP attempt" if _is_http_attempt(span, by_id) else span.name
                key = (
                    label,
                    str(span.attributes.get(a.ERROR_TYPE, "?")),
                    bool(span.attributes.get(a.ERROR_RECOVERED)),
                )
                self.origins[key] += 1
                self.origin_seq.setdefault(key, span.seq)
            if _is_model_call(span, by_id):
                self.model_calls += 1
                self.retries[a.RETRY_LAYER_RATE_LIMIT] += span.rate_limit_retries
            if _is_http_attempt(span, by_id):
                self.http_attempts += 1
                resend = span.attributes.get(a.HTTP_RESEND_COUNT)
                if isinstance(resend, int) and resend > 0:
                    self.retries[a.RETRY_LAYER_HTTP] += 1
        classified = self._runs(trace.spans, by_id)
        made = self.finished.get(trace_id, False)
        if not made:
            request = _request(trace_id, trace.spans, by_id, classified)
            if request is not None:
                self.requests.append((trace.seq, request))
                made = True
        self.finished[trace_id] = made

    def _runs(self, spans: list[_Span], by_id: dict[str, _Span]) -> bool:
        """Count the trace's runs (outermost kickoffs): answers, those carrying another
        request's data with where it entered (the cross-talk events below each), and failed
        runs by cause. Whether a failed run of the trace carries its cause."""
        classified = False
        entered: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        for span in spans:
            if span.crosstalk:
                run = _outermost_kickoff(span, by_id)
                if run is not None:
                    entered[run.span_id].extend(span.crosstalk)
        for span in spans:
            if not span.name.startswith(a.SPAN_WORKFLOW):
                continue
            if _outermost_kickoff(span, by_id) is not span:
                continue
            events = entered.get(span.span_id, [])
            carrying = bool(events) or span.attributes.get(a.CROSSTALK) is True
            if span.status == "ERROR":
                self.failed_carrying += carrying
                classified = self._failure(span) or classified
                continue
            self.answers += 1
            if carrying:
                request_id = span.attributes.get(a.REQUEST_ID)
                self.carrying.append(
                    _CarryingRun(
                        sys.intern(request_id) if isinstance(request_id, str) else None,
                        {source for source, _ in events},
                        {other for _, others in events for other in others},
                    )
                )
        return classified

    def _failure(self, kickoff: _Span) -> bool:
        """Count a failed run by its ``crew_otel.failure.cause`` (and the shared thing it
        names); False when it carries none (a file from before the attribute)."""
        cause = kickoff.attributes.get(a.FAILURE_CAUSE)
        if not isinstance(cause, str) or not cause:
            return False
        cause = sys.intern(cause[:MAX_CAUSE_CHARS])
        self.failure_causes[cause] += 1
        kind = kickoff.attributes.get(a.FAILURE_SHARED_KIND)
        if isinstance(kind, str) and kind:
            name = kickoff.attributes.get(a.FAILURE_SHARED_NAME)
            what = describe(
                kind, _OBJECT_KIND_WORDS.get(kind, kind), name if isinstance(name, str) else ""
            )
            self.failure_shared[(cause, what)] += 1
        return True

    def causes(self) -> list[CauseCount]:
        """Failed runs by cause, most first (ties by name), each with its shared things."""
        shared: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for (cause, what), runs in sorted(
            self.failure_shared.items(), key=lambda kn: (-kn[1], kn[0][1])
        ):
            shared[cause].append((what, runs))
        return [
            CauseCount(cause, runs, shared.get(cause, []))
            for cause, runs in sorted(self.failure_causes.items(), key=lambda kn: (-kn[1], kn[0]))
        ]

    def crosstalk(self) -> Crosstalk:
        """The answers carrying another request's data, where it entered and the shared
        things both requests of a pair touched."""
        sources: Counter[str] = Counter()
        causes: Counter[tuple[str, str, str]] = Counter()
        no_cause = 0
        for run in self.carrying:
            sources.update(run.sources)
            things: set[_ThingKey] = set()
            if run.request_id is not None:
                for other in run.others:
                    things |= self.shared_pairs.get(_pair(run.request_id, other), set())
            named = {(k[1], k[3], self.conflicts[k].label) for k in things}
            causes.update(named)
            no_cause += not named
        order = [*CROSSTALK_SOURCES, *sorted(set(sources) - set(CROSSTALK_SOURCES))]
        return Crosstalk(
            answers=self.answers,
            carrying=len(self.carrying),
            request_ids=sorted(r.request_id for r in self.carrying if r.request_id is not None),
            by_source={source: sources[source] for source in order if sources[source]},
            causes=[
                CrosstalkCause(kind, name, what, n)
                for (kind, name, what), n in sorted(
                    causes.items(), key=lambda kn: (-kn[1], kn[0][2])
                )
            ],
            no_cause=no_cause,
            failed_runs=self.failed_carrying,
        )

    def report(self) -> ServiceReport:
        for trace_id in sorted(self.open, key=lambda t: self.open[t].seq):
            self.finish(trace_id)
        requests = [r for _, r in sorted(self.requests, key=lambda sr: (sr[1].start, sr[0]))]
        scope = "process" if any(r.process for r in requests) else "service"
        _peak_in_flight(requests)
        by_concurrency: dict[int, tuple[int, int]] = {}
        for request in requests:
            total, failed = by_concurrency.get(request.concurrency, (0, 0))
            by_concurrency[request.concurrency] = (total + 1, failed + int(request.failed))
        causes: Counter[str] = Counter(r.cause for r in requests if r.failed and r.cause)
        failures = Counter(
            str(r.status_code or r.error_type or "error") for r in requests if r.failed
        )
        # most common first; ties in the order the spans were read
        origins = sorted(self.origins.items(), key=lambda kn: (-kn[1], self.origin_seq[kn[0]]))
        report = ServiceReport(
            service=self.name,
            requests=requests,
            failures_by_status=dict(failures.most_common()),
            origins=[OriginCount(k[0], k[1], k[2], n) for k, n in origins],
            retries=self.retries,
            model_calls=self.model_calls,
            http_attempts=self.http_attempts,
            conflicts=sorted(self.conflicts.values(), key=lambda c: -c.events),
            by_concurrency=dict(sorted(by_concurrency.items())),
            causes=causes,
            conclusion="",
            concurrency_scope=scope,
            processes=sorted({r.process for r in requests if r.process}),
            diagnoses=_diagnoses(self.findings, origins),
            crosstalk=self.crosstalk(),
            failure_causes=self.causes(),
        )
        report.conclusion = conclude(report)
        return report


class Analysis:
    """The report's analysis, fed one span at a time (``crew-otel report`` streams a file).

    Memory grows with the traces in flight, not with the input: what needs a span alone
    (shared things, diagnoses, agent retries) is counted as it is read; the rest (model calls,
    HTTP attempts and error origins, which need a span's parents, and the request a trace
    stands for) when its trace is complete, after which the trace's spans are dropped. A trace
    of a service is complete when every parent its spans name has been read (a SERVER or
    CONSUMER span's parent is the caller's) and the file's clock, the newest span end read so
    far, is ``settle_s`` past its newest span; one still missing a parent is finished
    ``abandon_s`` past it. Spans of a trace read after it was finished are counted on their
    own (their parents are gone) and make its request only if the finished part made none.
    """

    def __init__(self, settle_s: float = SETTLE_S, abandon_s: float = ABANDON_S) -> None:
        self._settle_ns = int(settle_s * 1e9) if settle_s != float("inf") else None
        self._abandon_ns = int(abandon_s * 1e9) if abandon_s != float("inf") else None
        self._services: dict[str, _Service] = {}
        self._seq = 0
        self._clock = 0
        self._since_sweep = 0
        self._swept_at = 0
        self._step_ns = int(SWEEP_STEP_S * 1e9)
        self.held_spans = 0
        """Spans of open traces (kept until their trace is finished)."""
        self.peak_held_spans = 0

    def add(self, span: SpanRecord) -> None:
        """Read one span."""
        service = self._services.get(span.service)
        if service is None:
            service = self._services[span.service] = _Service(span.service)
        service.add(span, self._seq)
        self._seq += 1
        self._clock = max(self._clock, span.end, span.start)
        self.held_spans += 1
        self.peak_held_spans = max(self.peak_held_spans, self.held_spans)
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY or self._clock - self._swept_at >= self._step_ns:
            self.sweep()

    def sweep(self) -> None:
        """Finish every trace that is complete now (see the class docstring)."""
        self._since_sweep = 0
        self._swept_at = self._clock
        if self._settle_ns is None:
            return
        abandon = self._abandon_ns if self._abandon_ns is not None else 1 << 126
        for service in self._services.values():
            service.sweep(self._clock, self._settle_ns, abandon)
        self.held_spans = sum(
            len(t.spans) for s in self._services.values() for t in s.open.values()
        )

    def reports(self) -> list[ServiceReport]:
        """One :class:`ServiceReport` per service, in name order (finishes every trace)."""
        reports = [self._services[name].report() for name in sorted(self._services)]
        self.held_spans = 0
        return reports


def _peak_in_flight(requests: list[Request]) -> None:
    """Set each request's :attr:`~Request.concurrency`: the most requests of its process (one
    group when no span names a process) in flight at one instant while it ran.

    Counting the requests that overlapped it at any time would add up requests that ran one
    after the other beside a long one (26 "in flight" where 8 ever were).
    """
    groups: dict[str, list[Request]] = defaultdict(list)
    for request in requests:
        groups[request.process].append(request)
    for members in groups.values():
        starts = sorted(r.start for r in members)
        ends = sorted(r.end for r in members)
        # in flight at each start: started at or before it and not yet ended (an end at that
        # instant is over); the peak during a request is at one of the starts inside it
        level = [bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t) for t in starts]
        for request in members:
            first = bisect.bisect_left(starts, request.start)
            last = max(bisect.bisect_left(starts, request.end), first + 1)
            request.concurrency = max([1, *level[first:last]])


def _diagnoses(findings: _Findings, origins: list[tuple[tuple[str, str, bool], int]]) -> list[str]:
    """One sentence per finding the spans carry beyond failures and sharing (when present);
    ``origins`` most common first."""
    found = findings.requests
    longest_wait, deepest_queue, locked = (
        findings.longest_wait,
        findings.deepest_queue,
        findings.locked,
    )

    def requests(key: str) -> str:
        count = len(found[key])
        return f"{count} request{'' if count == 1 else 's'}"

    sentences = []
    if found[a.SYNC_IN_EVENT_LOOP]:
        sentences.append(
            f"{requests(a.SYNC_IN_EVENT_LOOP)} kicked off a crew synchronously inside a running "
            "event loop (crew_otel.sync_in_event_loop), blocking the loop for the whole run: "
            "use kickoff_async or akickoff"
        )
    if found[a.QUEUE_WAIT]:
        sentences.append(
            f"async kickoffs of {requests(a.QUEUE_WAIT)} waited up to {longest_wait:.2f}s for "
            f"a thread of the event loop's default executor (queue depth up to "
            f"{deepest_queue}; crew_otel.kickoff.queue_wait): the executor is saturated"
        )
    context = [
        (a.CONTEXT_SUMMARIZED, "CrewAI summarised the conversation"),
        (a.CONTEXT_NO_FINAL_OUTPUT, "the agent ended without a final answer (placeholder output)"),
        (a.CONTEXT_OVERFLOW, "CrewAI exited with SystemExit"),
    ]
    context_requests = set().union(*(found[key] for key, _ in context))
    if context_requests:
        what = ", ".join(f"{text} in {requests(key)}" for key, text in context if found[key])
        sentences.append(
            f"the context window overflowed in {len(context_requests)} "
            f"request{'' if len(context_requests) == 1 else 's'}: {what}"
        )
    if found[a.RETRY_BUDGET_EXHAUSTED]:
        sentences.append(
            f"an Agent had used up its max_retry_limit in {requests(a.RETRY_BUDGET_EXHAUSTED)} "
            "(crew_otel.retry.budget_exhausted; CrewAI never resets it): build Agents per request"
        )
    if found[a.DATABASE_LOCKED]:
        sentences.append(
            f"'database is locked' on {', '.join(repr(p) for p in sorted(locked))} in "
            f"{requests(a.DATABASE_LOCKED)}"
        )
    if found[a.EVENT_CALLER_CANCELLED]:
        sentences.append(
            f"the caller stopped waiting for {requests(a.EVENT_CALLER_CANCELLED)} while the "
            "work went on"
        )
    recovered = [(k, n) for k, n in origins if k[2]]
    fatal = sum(n for k, n in origins if not k[2])
    if recovered:
        named = [f"{n} x {error} in {span}" for (span, error, _), n in recovered]
        if len(named) > MAX_NAMED_ORIGINS:
            named[MAX_NAMED_ORIGINS:] = [f"{len(named) - MAX_NAMED_ORIGINS} more"]
        total = sum(n for _, n in recovered)
        sentences.append(
            f"{total} error{'' if total == 1 else 's'} recovered by a retry or CrewAI's own "
            f"handling ({', '.join(named)}) and {fatal} fatal"
        )
    return sentences


def _request(
    trace_id: str, members: list[_Span], by_id: dict[str, _Span], classified: bool = False
) -> Request | None:
    roots = [s for s in members if not s.parent_id or s.parent_id not in by_id]
    servers = [s for s in roots if s.kind == "SERVER"]
    kickoffs = [s for s in roots if s.name.startswith(a.SPAN_WORKFLOW)]
    candidates = servers or kickoffs
    if not candidates:
        return None
    root = candidates[0]
    status = _status_code(root)
    failed = status >= 500 if status is not None else root.status == "ERROR"
    request_id = next(
        (
            s.attributes[a.REQUEST_ID]
            for s in members
            if isinstance(s.attributes.get(a.REQUEST_ID), str)
        ),
        None,
    )
    error_type = root.attributes.get(a.ERROR_TYPE)
    request = Request(
        trace_id=trace_id,
        start=root.start,
        end=root.end,
        status_code=status,
        failed=failed,
        request_id=request_id,
        error_type=str(error_type) if error_type is not None else None,
        process=root.process,
        classified=failed and classified,
    )
    if failed:
        request.cause = _cause(members, by_id)
    return request


def _cause(members: list[_Span], by_id: dict[str, _Span]) -> str:
    """Where a failed request's error began, in words (the fatal origin, else the last one)."""
    origins = sorted((s for s in members if s.attributes.get(a.ERROR_ORIGIN)), key=lambda s: s.end)
    fatal = [s for s in origins if not s.attributes.get(a.ERROR_RECOVERED)]
    if not origins:
        return "an error with no origin span (not instrumented)"
    origin = (fatal or origins)[-1]
    chain = [origin]
    while chain[-1].parent_id and chain[-1].parent_id in by_id:
        chain.append(by_id[chain[-1].parent_id])
    for span in chain:
        events = span.shared
        if events or span.attributes.get(a.SHARED_INSTANCE):
            event = events[0] if events else {}
            kind = str(event.get(a.SHARED_INSTANCE_KIND, "object"))
            what = describe(
                kind,
                str(event.get(a.SHARED_INSTANCE_CLASS, "")) or kind.title(),
                str(event.get(a.SHARED_INSTANCE_NAME, "")),
            )
            users = 1 + len(_other_ids(event))
            verb = state_words.report_verb(
                kind,
                str(event.get(a.SHARED_INSTANCE_CLASS, "")),
                str(event.get(a.SHARED_INSTANCE_NAME, "")),
            ).replace(" the tool code of", "")
            return f"a shared {what} {verb} {users} requests at once"
    error_type = str(origin.attributes.get(a.ERROR_TYPE, "error"))
    if _is_http_attempt(origin, by_id):
        retried = sum(
            1 for s in origins if _is_http_attempt(s, by_id) and s.attributes.get(a.ERROR_RECOVERED)
        )
        what = f"provider {error_type}s" if error_type.isdigit() else f"provider {error_type}"
        return f"{what} after {retried} retries"
    operation = origin.name.split(" ", 1)
    where = f"{operation[0]} {operation[1]!r}" if len(operation) == 2 else origin.name
    return f"{error_type} in {where}"


def conclude(report: ServiceReport) -> str:
    """The diagnosis in one sentence."""
    total = len(report.requests)
    if not total:
        return "No requests were traced."
    objects = [c for c in report.conflicts if not c.is_state]
    state = _shared_state(report)
    harm = report.crosstalk.clause()
    if not report.failed:
        text = f"All {total} requests succeeded"
        objects_used = (
            f"{len(objects)} shared object(s) were used by concurrent requests" if objects else ""
        )
        buts = [clause for clause in (harm, objects_used, state) if clause]
        if buts:
            text += ", but " + "; ".join(buts)
        return "; ".join([text, *report.diagnoses]) + "."
    parts = [f"{report.failed} of {total} requests failed"]
    if harm:
        parts.append(harm)
    if report.failure_causes:
        parts.append("failed runs by cause: " + causes_clause(report.failure_causes))
    # where no run says why (a file from before crew_otel.failure.cause): from the origins
    unclassified = Counter(
        r.cause for r in report.requests if r.failed and r.cause and not r.classified
    )
    for cause, count in unclassified.most_common():
        verb = (
            "began in"
            if cause.startswith("a shared")
            else "began as"
            if cause.startswith("provider")
            else "began with"
        )
        parts.append(f"{count} {'failure' if count == 1 else 'failures'} {verb} {cause}")
    if state:
        parts.append(state)
    levels = [level for level, (_, failed) in report.by_concurrency.items() if failed]
    if levels and min(levels) > 1 and 1 in report.by_concurrency:
        parts.append("no request failed while running alone: suspect concurrency")
    parts.extend(report.diagnoses)
    return "; ".join(parts) + "."


def process_tags(processes: list[str]) -> dict[str, str]:
    """``p1``, ``p2``... per process (in ``processes`` order), when there are several: the
    labels the report's table, timeline and conclusion use."""
    if len(processes) < 2:
        return {}
    return {process: f"p{n}" for n, process in enumerate(processes, 1)}


def _shared_state(report: ServiceReport) -> str:
    """The clause naming the state tool code shares between requests, with what to change:
    one sentence per thing, naming the processes that each hold one (a global per process)."""
    things: dict[tuple[str, str], list[Conflict]] = {}
    for conflict in report.conflicts:
        if conflict.is_state:
            things.setdefault((conflict.kind, conflict.name), []).append(conflict)
    if not things:
        return ""
    tags = process_tags(report.processes)
    named = [_state_sentence(group, tags) for group in list(things.values())[:MAX_NAMED_STATE]]
    if len(things) > MAX_NAMED_STATE:
        named.append(f"and {len(things) - MAX_NAMED_STATE} more shared thing(s)")
    return "the tool code shares state between concurrent requests: " + "; ".join(named)


def _state_sentence(group: list[Conflict], tags: dict[str, str]) -> str:
    """One thing (the same kind and name) in one or more processes, in one sentence."""
    if len(group) == 1 and group[0].process not in tags:
        return group[0].sentence()
    first = group[0]
    where = sorted({tags[c.process] for c in group if c.process in tags}, key=_tag_order)
    at_once = max(c.at_once for c in group)
    place = ""
    if len(where) == 1:
        place = f" in {where[0]}"
    elif where:
        place = f" in each of {', '.join(where[:-1])} and {where[-1]}"
    count = f"up to {at_once}" if len({c.at_once for c in group}) > 1 else str(at_once)
    verb = state_words.report_verb(first.kind, first.class_name, first.name)
    text = f"{_state_opening(first.kind, first.label)}{place} {verb} {count} requests at once"
    advice = state_words.report_advice(first.kind, first.class_name, first.name)
    return f"{text}; {advice}" if advice else text


def _tag_order(tag: str) -> int:
    return int(tag[1:])


def summary(reports: list[ServiceReport]) -> dict[str, object]:
    """The report's figures as plain data (``--summary-json``)."""
    return {
        "services": {
            r.service: {
                "requests": len(r.requests),
                "failed": r.failed,
                "failures_by_status": r.failures_by_status,
                "http_attempts": r.http_attempts,
                "model_calls": r.model_calls,
                "retries": r.retries,
                "origins": [dataclasses.asdict(o) for o in r.origins],
                "conflicts": [
                    {
                        "kind": c.kind,
                        "class": c.class_name,
                        "name": c.name,
                        "request_ids": sorted(c.request_ids),
                        "at_once": c.at_once,
                        "process": c.process,
                    }
                    for c in r.conflicts
                ],
                "by_concurrency": {str(k): list(v) for k, v in r.by_concurrency.items()},
                "concurrency_scope": r.concurrency_scope,
                "processes": r.processes,
                "diagnoses": r.diagnoses,
                "crosstalk": dataclasses.asdict(r.crosstalk),
                "causes": dict(r.causes.most_common()),
                "failed_runs_by_cause": {c.cause: c.runs for c in r.failure_causes},
                "failure_shared": [
                    {"cause": c.cause, "what": what, "runs": runs}
                    for c in r.failure_causes
                    for what, runs in c.shared
                ],
                "conclusion": r.conclusion,
            }
            for r in reports
        }
    }
