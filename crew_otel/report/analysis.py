"""From spans to a diagnosis: per service, what failed, where it began, and why.

Works on :class:`~crew_otel.otlp_json.SpanRecord`s, so ``crew-otel demo`` and
``crew-otel report FILE`` compute the same figures from the same data. A *request* is a trace:
its root is the web framework's SERVER span when there is one (the HTTP status the client saw),
else the outermost kickoff. A *process* is the resource's ``service.instance.id`` (else
``process.pid``): requests in flight are counted per process when the spans name it, and an
object (Agent, Crew, module global, ...) is one thing per process.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable

from crew_otel import attributes as a
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

_STATE_WHAT = {
    "global": "module global",
    "file": "file",
    "database": "SQLite database",
    "resource": "",
}
_STATE_VERB = {
    "global": "written by the tool code of",
    "file": "written by the tool code of",
    "database": "written by the tool code of",
    "resource": "held by the tools of",
}
_STATE_ADVICE = {
    "global": "keep tool state per request",
    "file": "give each request its own path",
    "database": "give each request its own database or serialise the writes",
    "resource": "open connections, sessions and files per request",
}


def describe(kind: str, class_name: str, name: str) -> str:
    """What a shared thing is, in words: ``module global 'app.CACHE'``, ``Agent 'Analyst'``."""
    short = class_name.rsplit(".", 1)[-1]
    if kind in STATE_KINDS:
        what = _STATE_WHAT[kind]
        if kind == "resource":
            return name or short or "resource"
        return f"{what} {name!r}" if name else what
    return f"{short or kind} {name!r}" if name else (short or kind)


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
        """``module global 'x' written by the tool code of 3 requests at once; advice``."""
        verb = _STATE_VERB.get(self.kind, "used by")
        text = f"{'a ' if self.kind != 'resource' else 'a shared '}{self.label} {verb} "
        text += f"{self.at_once} requests at once"
        advice = _STATE_ADVICE.get(self.kind)
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
    concurrency: int = 1
    """The most requests in flight at once during this one (itself included), counted in its
    process when the spans name the process, else in its service."""
    process: str = ""


@dataclasses.dataclass
class OriginCount:
    span: str
    error_type: str
    recovered: bool
    count: int


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

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if r.failed)

    @property
    def amplification(self) -> float:
        """HTTP attempts sent to the provider per model call CrewAI made."""
        return self.http_attempts / self.model_calls if self.model_calls else 0.0


def _status_code(span: SpanRecord) -> int | None:
    for key in (a.HTTP_STATUS_CODE, a.HTTP_STATUS_CODE_OLD):
        value = span.attributes.get(key)
        if isinstance(value, int):
            return value
    return None


#: Model-call spans: crew_otel's ``chat {model}``, or ``crewai.llm.call {model}`` when a provider
#: instrumentation makes the inference span (which then sits under it, also named ``chat ...``
#: by openai-v2).
_MODEL_CALL_PREFIXES = (f"{a.SPAN_CHAT} ", f"{a.SPAN_LLM_CALL} ")


def _is_model_call(span: SpanRecord, by_id: dict[str, SpanRecord]) -> bool:
    """A model call, counted once (not a provider's inference span under crew_otel's)."""
    if not span.name.startswith(_MODEL_CALL_PREFIXES):
        return False
    parent = by_id.get(span.parent_id or "")
    return parent is None or not parent.name.startswith(_MODEL_CALL_PREFIXES)


def _is_http_attempt(span: SpanRecord, by_id: dict[str, SpanRecord]) -> bool:
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


def _shared_events(span: SpanRecord) -> list[dict[str, object]]:
    return [attrs for name, _, attrs in span.events if name == a.EVENT_SHARED_INSTANCE]


def _other_ids(event: dict[str, object]) -> list[str]:
    others = event.get(a.SHARED_INSTANCE_OTHER_REQUEST_IDS) or ()
    if isinstance(others, str):
        return [others]
    return [str(o) for o in others] if isinstance(others, (list, tuple)) else []


def analyse(spans: Iterable[SpanRecord]) -> list[ServiceReport]:
    """One :class:`ServiceReport` per ``service.name``, in name order."""
    by_service: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        by_service[span.service].append(span)
    return [_service(name, by_service[name]) for name in sorted(by_service)]


def _service(service: str, spans: list[SpanRecord]) -> ServiceReport:
    by_id = {s.span_id: s for s in spans}
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)

    conflicts: dict[tuple[str, str, str, str], Conflict] = {}
    for span in spans:
        for event in _shared_events(span):
            kind = str(event.get(a.SHARED_INSTANCE_KIND, ""))
            class_name = str(event.get(a.SHARED_INSTANCE_CLASS, ""))
            name = str(event.get(a.SHARED_INSTANCE_NAME, ""))
            # an object (or a global) lives in one process: two workers' Agents are two things
            process = "" if kind in MACHINE_WIDE_KINDS else span.process
            key = (process, kind, "" if kind in STATE_KINDS else class_name, name)
            conflict = conflicts.setdefault(
                key, Conflict(kind, class_name, name, request_ids=set(), process=process)
            )
            conflict.events += 1
            own = span.attributes.get(a.REQUEST_ID)
            if isinstance(own, str):
                conflict.request_ids.add(own)
            others = _other_ids(event)
            conflict.request_ids.update(o for o in others if o != "unknown")
            conflict.at_once = max(conflict.at_once, 1 + len(others))

    requests = []
    for trace_id, members in traces.items():
        request = _request(trace_id, members, by_id)
        if request is not None:
            requests.append(request)
    requests.sort(key=lambda r: r.start)
    scope = "process" if any(r.process for r in requests) else "service"
    _peak_in_flight(requests)

    origin_counts: Counter[tuple[str, str, bool]] = Counter()
    retries = dict.fromkeys(LAYERS, 0)
    model_calls = http_attempts = 0
    for span in spans:
        if span.attributes.get(a.ERROR_ORIGIN):
            label = "HTTP attempt" if _is_http_attempt(span, by_id) else span.name
            origin_counts[
                (
                    label,
                    str(span.attributes.get(a.ERROR_TYPE, "?")),
                    bool(span.attributes.get(a.ERROR_RECOVERED)),
                )
            ] += 1
        if _is_model_call(span, by_id):
            model_calls += 1
            retries[a.RETRY_LAYER_RATE_LIMIT] += sum(
                1
                for name, _, attrs in span.events
                if name == a.EVENT_RETRY and attrs.get(a.RETRY_LAYER) == a.RETRY_LAYER_RATE_LIMIT
            )
        if _is_http_attempt(span, by_id):
            http_attempts += 1
            resend = span.attributes.get(a.HTTP_RESEND_COUNT)
            if isinstance(resend, int) and resend > 0:
                retries[a.RETRY_LAYER_HTTP] += 1
        attempt = span.attributes.get(a.ATTEMPT)
        if isinstance(attempt, int) and attempt > 1:
            retries[a.RETRY_LAYER_AGENT] += 1

    by_concurrency: dict[int, tuple[int, int]] = {}
    for request in requests:
        total, failed = by_concurrency.get(request.concurrency, (0, 0))
        by_concurrency[request.concurrency] = (total + 1, failed + int(request.failed))

    causes: Counter[str] = Counter(r.cause for r in requests if r.failed and r.cause)
    failures = Counter(str(r.status_code or r.error_type or "error") for r in requests if r.failed)
    report = ServiceReport(
        service=service,
        requests=requests,
        failures_by_status=dict(failures.most_common()),
        origins=[OriginCount(k[0], k[1], k[2], n) for k, n in origin_counts.most_common()],
        retries=retries,
        model_calls=model_calls,
        http_attempts=http_attempts,
        conflicts=sorted(conflicts.values(), key=lambda c: -c.events),
        by_concurrency=dict(sorted(by_concurrency.items())),
        causes=causes,
        conclusion="",
        concurrency_scope=scope,
        processes=sorted({r.process for r in requests if r.process}),
        diagnoses=_diagnoses(traces, origin_counts),
    )
    report.conclusion = conclude(report)
    return report


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


def _diagnoses(
    traces: dict[str, list[SpanRecord]], origins: Counter[tuple[str, str, bool]]
) -> list[str]:
    """One sentence per finding the spans carry beyond failures and sharing (when present)."""
    found: dict[str, set[str]] = defaultdict(set)
    longest_wait, deepest_queue = 0.0, 0
    locked: set[str] = set()
    for trace_id, members in traces.items():
        for span in members:
            attrs = span.attributes
            for key in (
                a.SYNC_IN_EVENT_LOOP,
                a.CONTEXT_SUMMARIZED,
                a.CONTEXT_NO_FINAL_OUTPUT,
                a.CONTEXT_OVERFLOW,
                a.RETRY_BUDGET_EXHAUSTED,
            ):
                if attrs.get(key) is True:
                    found[key].add(trace_id)
            wait = attrs.get(a.QUEUE_WAIT)
            if isinstance(wait, (int, float)) and wait >= NOTABLE_QUEUE_WAIT_S:
                found[a.QUEUE_WAIT].add(trace_id)
                longest_wait = max(longest_wait, float(wait))
            depth = attrs.get(a.EXECUTOR_QUEUE_DEPTH)
            if isinstance(depth, int):
                deepest_queue = max(deepest_queue, depth)
            database = attrs.get(a.DATABASE_LOCKED)
            if isinstance(database, str):
                found[a.DATABASE_LOCKED].add(trace_id)
                locked.add(database)
            if any(name == a.EVENT_CALLER_CANCELLED for name, _, _ in span.events):
                found[a.EVENT_CALLER_CANCELLED].add(trace_id)

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
    recovered = [(k, n) for k, n in origins.most_common() if k[2]]
    fatal = sum(n for k, n in origins.items() if not k[2])
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
    trace_id: str, members: list[SpanRecord], by_id: dict[str, SpanRecord]
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
    )
    if failed:
        request.cause = _cause(members, by_id)
    return request


def _cause(members: list[SpanRecord], by_id: dict[str, SpanRecord]) -> str:
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
        events = _shared_events(span)
        if events or span.attributes.get(a.SHARED_INSTANCE):
            event = events[0] if events else {}
            kind = str(event.get(a.SHARED_INSTANCE_KIND, "object"))
            what = describe(
                kind,
                str(event.get(a.SHARED_INSTANCE_CLASS, "")) or kind.title(),
                str(event.get(a.SHARED_INSTANCE_NAME, "")),
            )
            users = 1 + len(_other_ids(event))
            verb = _STATE_VERB.get(kind, "used by").replace(" the tool code of", "")
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
    state = _shared_state(report.conflicts)
    if not report.failed:
        text = f"All {total} requests succeeded"
        if objects:
            text += f", but {len(objects)} shared object(s) were used by concurrent requests"
        if state:
            text += ("; " if objects else ", but ") + state
        return "; ".join([text, *report.diagnoses]) + "."
    parts = [f"{report.failed} of {total} requests failed"]
    for cause, count in report.causes.most_common():
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


def _shared_state(conflicts: list[Conflict]) -> str:
    """The clause naming the state tool code shares between requests, with what to change."""
    state = [c for c in conflicts if c.is_state]
    if not state:
        return ""
    named = [c.sentence() for c in state[:MAX_NAMED_STATE]]
    if len(state) > MAX_NAMED_STATE:
        named.append(f"and {len(state) - MAX_NAMED_STATE} more shared thing(s)")
    return "the tool code shares state between concurrent requests: " + "; ".join(named)


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
                "causes": dict(r.causes.most_common()),
                "conclusion": r.conclusion,
            }
            for r in reports
        }
    }
