"""Cross-talk: data of one in-flight run found inside another run, whatever carried it there.

The worst outcome of sharing state between concurrent requests is not an error but an answer
to customer B built from customer A's data. Whatever the cause (a module global, a file, an
Agent shared by two requests, state crew_otel cannot see: a C extension, Redis, another
process), the harm shows as A's identifiers inside B's run. This module finds them:

**Marks.** When a run starts, the distinctive identifiers in its kickoff inputs (walked
recursively through dicts, lists and models' fields) become its marks: email addresses, and
tokens of letters, digits and ``- _ . # / + @`` that hold at least :data:`MIN_DIGITS` digits
and :data:`MIN_LENGTH` characters (ticket, order and account numbers such as ``TCK-48213`` or
``ORD-5566-A``, UUIDs, long numbers), except the shapes every run has in common: dates
(``2026-12-06``), version and decimal numbers (``1.15.30``, ``3.14159``). A mark is kept only
as a salted hash (Python's ``hash``), in memory, while the run is in flight and as long as a
run that overlapped it is; no identifier is ever kept, recorded or logged.

**Foreign data.** Where data enters a run (each tool result, the messages of each model
request, the run's final output), a token that is a mark of exactly one other run that was in
flight at the same time, and not a mark of this run, is foreign. A mark of several concurrent
runs (a product name with a number, a shared reference) is nobody's. The token hashes of the
last 512 long texts checked are remembered by the text's own hash (the messages a run sends
again at each model request are read once); no text is kept.

What is recorded is in :class:`CrosstalkDetector`'s docstring.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry.trace import Span

from crew_otel import attributes

_logger = logging.getLogger("crew_otel")

#: A mark has at least this many digits and this many characters.
MIN_DIGITS = 4
MIN_LENGTH = 6
#: How much of one text is read (a larger tool result is read up to here).
MAX_TEXT = 1_000_000
#: How deep and how wide kickoff inputs are walked.
_MAX_DEPTH = 8
_MAX_VALUES = 10_000

_TOKEN_CHARS = r"A-Za-z0-9_@.#/+\-"
try:  # possessive quantifiers (Python >= 3.11): a word without a digit fails at once
    _DIGIT_TOKEN = re.compile(rf"(?<![{_TOKEN_CHARS}])[A-Za-z_@.#/+\-]*+[0-9][{_TOKEN_CHARS}]*+")
except re.error:  # pragma: no cover - Python 3.10
    _DIGIT_TOKEN = re.compile(rf"(?<![{_TOKEN_CHARS}])[{_TOKEN_CHARS}]*[0-9][{_TOKEN_CHARS}]*")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
#: Shapes that concurrent runs share without sharing data.
_COMMON_SHAPE = re.compile(
    r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"  # 2026-12-06
    r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"  # 06.12.2026
    r"|[\d.]+"  # 1.15.30, 3.14159 (a pure number never gets here: see _is_mark)
)
_PURE_NUMBER = re.compile(r"\d+")
_EDGE_PUNCTUATION = "._#/+-@"


def _is_mark(token: str) -> bool:
    if len(token) < MIN_LENGTH:
        return False
    if sum(c.isdigit() for c in token) < MIN_DIGITS:
        return False
    if _PURE_NUMBER.fullmatch(token):
        return True  # an account or phone number; a bare year is too short
    return _COMMON_SHAPE.fullmatch(token) is None


def marks_in_text(text: str) -> set[int]:
    """The hashes of the marks in ``text`` (the first :data:`MAX_TEXT` characters)."""
    return {hash(token) for token in _tokens(text) if _is_mark(token) or "@" in token}


def _token_hashes(text: str) -> frozenset[int]:
    """The hashes of every token that could be a mark (checked against known marks only:
    what a run's data is compared with needs no validation, and skipping it is the cost).

    Remembered for long texts, by the text's own hash and length (no text is kept): each
    model request of a run sends the system prompt and the earlier messages again.
    """
    if len(text) < _REMEMBER_FROM:
        return frozenset(hash(token) for token in _tokens(text))
    key = (hash(text), len(text))
    found = _remembered.get(key)
    if found is None:
        found = frozenset(hash(token) for token in _tokens(text))
        with _remembered_lock:
            if len(_remembered) >= _REMEMBERED_TEXTS:
                del _remembered[next(iter(_remembered))]  # the oldest
            _remembered[key] = found
    return found


#: Texts at least this long have their token hashes remembered, for this many texts.
_REMEMBER_FROM = 200
_REMEMBERED_TEXTS = 512
_remembered: dict[tuple[int, int], frozenset[int]] = {}
_remembered_lock = threading.Lock()


def _tokens(text: str) -> Iterator[str]:
    """Candidate tokens, normalised (lower case, no edge punctuation): words holding a digit,
    and email addresses."""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
    for token in set(_DIGIT_TOKEN.findall(text)):
        yield token.strip(_EDGE_PUNCTUATION).lower()
    if "@" in text:
        for email in _EMAIL.findall(text):
            yield email.strip(_EDGE_PUNCTUATION).lower()


def marks_in_value(value: object) -> set[int]:
    """The hashes of the marks in kickoff inputs: strings found walking dicts (keys and
    values), lists, tuples, sets and models' fields (``model_dump``-free: ``__dict__`` of
    pydantic models and dataclasses), bounded in depth and size. Never runs user code beyond
    ``str`` of scalars."""
    found: set[int] = set()
    for text in _strings(value):
        found |= marks_in_text(text)
    return found


def _strings(value: object) -> Iterator[str]:
    stack: list[tuple[object, int]] = [(value, 0)]
    seen = 0
    while stack and seen < _MAX_VALUES:
        item, depth = stack.pop()
        seen += 1
        if isinstance(item, str):
            yield item
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            yield repr(item)
        elif depth >= _MAX_DEPTH:
            continue
        elif isinstance(item, Mapping):
            for key, inner in itertools.islice(item.items(), _MAX_VALUES):
                stack.append((key, depth + 1))
                stack.append((inner, depth + 1))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((inner, depth + 1) for inner in itertools.islice(item, _MAX_VALUES))
        else:
            fields = getattr(item, "__dict__", None)
            if isinstance(fields, dict):
                stack.append((fields, depth + 1))


class _Run:
    """One request's runs in flight (kickoffs of one request ID share their marks)."""

    __slots__ = (
        "ended",
        "kickoff_span",
        "kickoffs",
        "marks",
        "reported",
        "request_id",
        "started",
        "warned",
        "workflow",
    )

    def __init__(self, request_id: str, started: int, kickoff_span: Span, workflow: str) -> None:
        self.request_id = request_id
        self.started = started
        self.ended: int | None = None
        self.kickoffs = 0
        self.marks: set[int] = set()
        self.kickoff_span = kickoff_span
        self.workflow = workflow
        #: Sources already counted in the metric for this run.
        self.reported: set[str] = set()
        #: Other request IDs a warning was logged for.
        self.warned: set[str] = set()

    def overlaps(self, other: _Run) -> bool:
        """Whether ``other`` was in flight at some time while this (in flight) run was."""
        return other.ended is None or other.ended > self.started


class CrosstalkDetector:
    """Finds another in-flight run's marks where data enters a run, and records it:

    * an event ``crew_otel.crosstalk`` on the span where the data entered (``execute_tool``:
      source ``tool_result``; ``chat``: ``model_input``; the kickoff: ``output``) with
      ``crew_otel.crosstalk.source``, ``crew_otel.crosstalk.other_request_ids`` and
      ``crew_otel.crosstalk.marks`` (how many foreign identifiers, never which);
    * ``crew_otel.crosstalk=true`` on the run's kickoff span;
    * the counter ``crew_otel.crosstalk``, once per run and source;
    * one warning per pair of requests, without content.
    """

    def __init__(self, counter: Callable[[str, str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count(1)
        self._runs: dict[str, _Run] = {}
        #: mark -> request IDs whose runs have it (runs kept in ``_runs``).
        self._owners: dict[int, set[str]] = {}
        self._count = counter

    # --- runs ---------------------------------------------------------------------------------
    def start_run(
        self, request_id: str, inputs: object, kickoff_span: Span, workflow: str
    ) -> Callable[[], None]:
        """A kickoff of ``request_id`` starts; returns what ends it (call once)."""
        marks = marks_in_value(inputs) if inputs is not None else set()
        with self._lock:
            run = self._runs.get(request_id)
            if run is None or run.ended is not None:
                if run is not None:
                    self._forget(run)
                run = _Run(request_id, next(self._clock), kickoff_span, workflow)
                self._runs[request_id] = run
            run.kickoffs += 1
            for mark in marks - run.marks:
                self._owners.setdefault(mark, set()).add(request_id)
            run.marks |= marks
        return lambda: self._end_run(run)

    def _end_run(self, run: _Run) -> None:
        with self._lock:
            run.kickoffs -= 1
            if run.kickoffs > 0 or run.ended is not None:
                return
            run.ended = next(self._clock)
            self._prune()

    def _prune(self) -> None:
        """Forget ended runs that no run in flight overlapped."""
        in_flight = [r.started for r in self._runs.values() if r.ended is None]
        oldest = min(in_flight) if in_flight else None
        for run in list(self._runs.values()):
            if run.ended is not None and (oldest is None or run.ended < oldest):
                self._forget(run)

    def _forget(self, run: _Run) -> None:
        if self._runs.get(run.request_id) is run:
            del self._runs[run.request_id]
        for mark in run.marks:
            owners = self._owners.get(mark)
            if owners is not None:
                owners.discard(run.request_id)
                if not owners:
                    del self._owners[mark]

    @property
    def runs_tracked(self) -> int:
        """How many requests' marks are kept now (bounded by the runs in flight)."""
        with self._lock:
            return len(self._runs)

    # --- checks -------------------------------------------------------------------------------
    def check(self, request_id: str | None, texts: Iterable[str], source: str, span: Span) -> None:
        """Look for other runs' marks in ``texts``, which entered ``request_id``'s run at
        ``span`` (as ``source``: ``tool_result``, ``model_input`` or ``output``)."""
        if request_id is None or len(self._runs) < 2:
            return  # a run alone (or no run): nothing can be foreign; no lock on this path
        with self._lock:
            run = self._runs.get(request_id)
            if run is None or run.ended is not None or len(self._runs) < 2:
                return  # a run alone (or no run): nothing can be foreign
        found: set[int] = set()
        for text in texts:
            found |= _token_hashes(text)
        others = self._foreign(run, found)
        if others:
            self._record(run, others, source, span)

    def _foreign(self, run: _Run, found: set[int]) -> dict[str, int]:
        """Other request ID -> how many of its marks are in ``found``."""
        counts: dict[str, int] = {}
        with self._lock:
            for mark in found - run.marks:
                owners = self._owners.get(mark)
                if not owners:
                    continue
                concurrent = [o for o in owners if self._runs[o].overlaps(run)]
                if len(concurrent) == 1:  # a mark of several concurrent runs is nobody's
                    counts[concurrent[0]] = counts.get(concurrent[0], 0) + 1
        return counts

    def _record(self, run: _Run, others: dict[str, int], source: str, span: Span) -> None:
        other_ids = sorted(others)
        span.add_event(
            attributes.EVENT_CROSSTALK,
            {
                attributes.CROSSTALK_SOURCE: source,
                attributes.CROSSTALK_OTHER_REQUEST_IDS: other_ids,
                attributes.CROSSTALK_MARKS: sum(others.values()),
            },
        )
        run.kickoff_span.set_attribute(attributes.CROSSTALK, True)
        with self._lock:
            first_for_source = source not in run.reported
            run.reported.add(source)
            new_pairs = [o for o in other_ids if o not in run.warned]
            run.warned.update(new_pairs)
        if first_for_source and self._count is not None:
            self._count(source, run.workflow)
        for other in new_pairs:
            _logger.warning(
                "crew_otel: request %s received data of request %s, in flight at the same "
                "time (%s): state is shared between requests; see the crew_otel.crosstalk "
                "event in its trace",
                run.request_id,
                other,
                source,
            )


def strings_in(value: Any) -> Iterator[str]:
    """The strings inside a tool result, a model request's messages or a run's output (read
    lazily: a check with no other run in flight reads none of them)."""
    return _strings(value)
